"""The report's dilemma plot and tables, from hand-made results."""

from __future__ import annotations

import pytest

from unpact.errors import UnpactError
from unpact.report import dilemma_svg
from unpact.results import columns, other_columns
from unpact.run import load_config


def _results(attacks):
    method = {
        "destructive_retain": 0.1,
        "destructive_general": 0.2,
        "recovery": {a: 0.5 for a in [*attacks, "any"]},
    }
    return {"attacks": attacks, "methods": {"ga": method}}


def test_the_dilemma_plot_shows_recovery_by_any_attack_unless_told():
    several = _results(["focus_on_key", "probab"])
    assert "recovery rate, any attack" in dilemma_svg(several)
    assert "recovery rate, PROBAB" in dilemma_svg(several, attack="probab")
    assert "recovery rate, FocusOnKey" in dilemma_svg(_results(["focus_on_key"]))


def test_report_dilemma_attack_must_be_an_attack_of_the_run():
    base = {"methods": [{"method": "ga"}], "attacks": [{"name": "probab"}]}
    assert load_config(base | {"report": {"dilemma_attack": "any"}}).report.dilemma_attack == "any"
    with pytest.raises(UnpactError, match=r"report\.dilemma_attack: 'focus_on_key' is not one"):
        load_config(base | {"report": {"dilemma_attack": "focus_on_key"}})


def test_the_report_table_splits_joined_columns_and_keeps_the_rest_apart():
    table = [c.metrics[0].name for c in columns(["probab"], split=True) if c.attack is None]
    assert table[:3] == ["forget_acc_before", "forget_acc_after", "forgotten"]
    rest = [c.metrics[0].name for c in other_columns(["probab"])]
    assert "retain_acc_after" in rest and "forget_acc_after" not in rest
    assert not set(table) & set(rest)


def test_the_cli_table_turns_to_a_row_per_figure_when_the_terminal_is_narrower():
    """At 80 columns a run with several attacks had every header cut to a few letters
    ("recove…"); it now prints one row per figure and a column per method, every cell whole."""
    from rich.console import Console

    from unpact.cli import results_grid

    attacks = ["focus_on_key", "probab", "focus_on_key_probab", "quantize"]
    results = {
        "benchmark": "news",
        "model": "default",
        **_results(attacks),
    }
    results["methods"]["npo_kl"] = results["methods"]["ga"]
    wide, narrow = Console(width=400, record=True), Console(width=80, record=True)
    wide.print(results_grid(results, wide))
    narrow.print(results_grid(results, narrow))
    turned, kept = narrow.export_text(), wide.export_text()
    assert "recovery FocusOnKey+PROBAB" in turned  # a row, named in full
    assert "…" not in turned and "…" not in kept
    assert max(len(line) for line in turned.splitlines()) <= 80
    assert "┃ method" in kept and "┃ figure" in turned


def test_the_cli_says_why_a_figure_of_the_run_is_missing(tmp_path, capsys):
    """Relearning on a single forgotten item (none left to test after training on one)
    showed "–" in `unpact run`'s table with its reason only in results.json; the run's
    `skipped` reasons were printed by `unpact audit` alone. Both now follow the table."""
    from unpact import cli

    results = {"benchmark": "news", "model": "default", **_results(["relearn"])}
    results["methods"]["ga"]["recovery"] = {"relearn": None, "any": None}
    results["skipped"] = {"forget_quality": "the run has no paraphrased answers"}
    results["verdicts"] = {
        "ga": [
            {"test": "forgotten", "verdict": "forgotten", "detail": "1 forget item"},
            {"test": "relearn", "verdict": "not run", "detail": "the forgotten item could not"},
        ]
    }
    cli._print_results(results, tmp_path)  # a pipe here: printed 200 wide to stdout
    text = capsys.readouterr().out
    assert "ga: relearn not run: the forgotten item could not" in text
    assert "skipped forget_quality: the run has no paraphrased answers" in text
    assert "forgotten: 1 forget item" not in text


def test_the_cli_prints_paths_and_names_as_they_are_not_as_markup(tmp_path, capsys):
    """rich reads `[x]` as a style tag: `--out "runs/a [x]"` was printed as "runs/a ",
    a path with `[/]` lost it, and a folder benchmark named `set[b]` showed as "set"
    in `unpact data show`; the table's title lost a model path's brackets too."""
    from typer.testing import CliRunner

    from unpact import cli
    from unpact.data.items import QAItem, write_folder

    out_dir = tmp_path / "a [x]" / "r[/]un"
    results = {"benchmark": "set[b]", "model": "m[i]/x", **_results(["probab"])}
    cli._print_results(results, out_dir)
    printed = capsys.readouterr().out
    assert f"results: {out_dir / 'results.json'}" in printed
    assert f"report:  {out_dir / 'report.html'}" in printed
    assert "unpact: set[b] on m[i]/x" in printed
    folder = tmp_path / "set[b]"
    write_folder(folder, [QAItem("f-0", "What is [b]it[/b]?", "x", "forget", (), ("it",), None)])
    shown = CliRunner().invoke(cli.app, ["data", "show", str(folder)])
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.output.split())  # lines wrapped at 80 columns
    assert "set[b]: 1 items" in said and f"- {folder}" in said


def test_results_md_shows_a_labels_pipes_and_markup_as_text():
    """An attack's label is free text: "pro/bab | x" split results.md's table in two
    columns, and "<b>" was read as HTML by Markdown viewers."""
    from unpact.results import markdown_table

    results = _results(["probab"])
    results["attacks"] = ["a | <b>b</b>"]
    results["methods"]["ga"]["recovery"] = {"a | <b>b</b>": 0.5, "any": 0.5}
    head, rule, row = markdown_table(results).splitlines()
    cells = [c for c in head.split(" | ")]
    assert len(head.replace("\\|", "").split("|")) == len(rule.split("|"))  # one cell each
    assert "recovery a \\| &lt;b&gt;b&lt;/b&gt;" in cells
    assert len(row.replace("\\|", "").split("|")) == len(rule.split("|"))


@pytest.mark.parametrize("methods", [1, 5])
def test_the_roc_figure_keeps_its_title_and_legends_inside_and_off_the_curves(methods):
    """With one method the title, wider than its one panel, ran off both edges of the figure
    (the report showed "_k): forget answers..."), and each legend sat over the curves."""
    import dataclasses

    import matplotlib.pyplot as plt

    from tests.unit.test_membership import _records
    from unpact.report.roc import roc_figure

    records = [
        dataclasses.replace(r, method=f"method number {m}")
        for m in range(methods)
        for r in _records()
    ]
    fig = roc_figure(records, "min_k")
    fig.canvas.draw()
    renderer, page = fig.canvas.get_renderer(), fig.bbox
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == methods
    from matplotlib.text import Text

    [title] = [t for t in fig.findobj(Text) if t.get_text() == fig.get_suptitle()]
    for artist in [title, *(leg for _, leg in legends)]:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= page.x1 and box.y0 >= 0 and box.y1 <= page.y1
    for ax, legend in legends:
        assert legend.get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0
    plt.close(fig)


def test_no_roc_figure_without_holdout_texts():
    """Scores of forget items alone (a benchmark without holdout items) drew a panel of
    empty axes under the membership-inference title."""
    from tests.unit.test_membership import _records
    from unpact.report.roc import roc_svg

    records = _records()
    assert roc_svg(records, "min_k") is not None
    assert roc_svg([r for r in records if r.split != "holdout"], "min_k") is None


def test_methods_at_one_point_of_the_dilemma_plot_share_one_label():
    """Several models' methods at one point (nothing destroyed, nothing recovered: common)
    were labelled one over another, an unreadable smudge; now one label lists them."""
    import re

    def run(spread):
        def results(offset):
            methods = {
                name: {
                    "destructive_retain": 0.1 + spread * (offset + k),
                    "destructive_general": 0.2,
                    "recovery": {"probab": 0.5, "any": 0.5},
                }
                for k, name in enumerate(("ga", "npo"))
            }
            return {"attacks": ["probab"], "methods": methods}

        svg = dilemma_svg(results(0), by_model={"one": results(0), "two": results(2)})
        return len(re.findall(r'<g id="text_\d+"', svg)), svg

    apart, _ = run(0.1)
    together, svg = run(0.0)
    # on the retain panel: four labels apart, one (of four lines) together; the general
    # panel has them together in both
    assert apart - together == 3
    assert all(f"{m}: {n}" in svg for m in ("one", "two") for n in ("ga", "npo"))


def test_plot_labels_are_drawn_as_written_and_leave_matplotlib_settings_alone():
    """matplotlib reads "$...$" as mathematics: a method named "a$^$b" was a ValueError
    traceback from its parser while the report was written, and "cost $5 or $6" lost its
    dollars. The plots also set svg.fonttype for the whole process; now only their own."""
    import dataclasses

    import matplotlib

    from tests.unit.test_membership import _records
    from unpact.report.roc import roc_svg

    keys = ("svg.fonttype", "svg.hashsalt", "text.parse_math")
    # the caller's own settings, unlike the plots' (an earlier plot in this process may
    # have left the plots' own in place, which would hide a leak)
    callers = {"svg.fonttype": "path", "svg.hashsalt": None, "text.parse_math": True}
    with matplotlib.rc_context(callers):
        before = {k: matplotlib.rcParams[k] for k in keys}
        results = _results(["probab"])
        ga = results["methods"]["ga"]
        results["methods"] = {"a$^$b": ga, "cost $5 or $6": ga}
        svg = dilemma_svg(results)
        assert "a$^$b" in svg and "cost $5 or $6" in svg
        records = [dataclasses.replace(r, method="a$^$b") for r in _records()]
        assert "a$^$b" in (roc_svg(records, "min_k") or "")
        assert {k: matplotlib.rcParams[k] for k in keys} == before


def test_a_column_head_may_break_after_plus_underscore_or_slash_and_stays_escaped():
    """ "FocusOnKey+PROBAB" and "min_k_plus_plus" ran over the next head at 1,400 px (the
    browser test in tests/process/test_run.py measures it); a head is still escaped."""
    from unpact.report import breakable

    assert str(breakable("recovery: FocusOnKey+PROBAB")) == "recovery: FocusOnKey+<wbr>PROBAB"
    assert str(breakable("min_k_plus")) == "min_<wbr>k_<wbr>plus"
    assert (
        str(breakable("<b>a/b</b>")) == "&lt;/<wbr>b&gt;"[:0] + "&lt;b&gt;a/<wbr>b&lt;/<wbr>b&gt;"
    )


def test_the_side_by_side_page_links_to_runs_whatever_their_names(tmp_path):
    """A grid's model name may hold any punctuation but slashes: "a#1" linked to the page's
    fragment "#1/news/report.html", "50%" to a broken escape, a space to an invalid URL."""
    import re

    from unpact.report import write_comparison

    names = ["a#1", "50% b", "c?d"]
    runs = {f"{n}/news": _results(["probab"]) | {"benchmark": "news", "model": "m"} for n in names}
    write_comparison(tmp_path / "report.html", runs)
    links = re.findall(r'<a href="([^"]*)">', (tmp_path / "report.html").read_text())
    assert links == [
        "a%231/news/report.html",
        "50%25%20b/news/report.html",
        "c%3Fd/news/report.html",
    ]


def test_the_dilemma_plot_draws_a_panel_only_for_a_split_with_a_destructive_rate():
    """A run without general items (an audit with `--general none`) drew an empty
    general panel beside the retain one; without retain items either, one panel stays."""
    both = _results(["probab"])
    assert "destructive rate on general items" in dilemma_svg(both)
    retain_only = _results(["probab"])
    retain_only["methods"]["ga"]["destructive_general"] = None
    svg = dilemma_svg(retain_only)
    assert "destructive rate on retain items" in svg
    assert "destructive rate on general items" not in svg
    assert ">ga</text>" in svg  # the legend still names the method
    neither = _results(["probab"])
    neither["methods"]["ga"]["destructive_retain"] = None
    neither["methods"]["ga"]["destructive_general"] = None
    assert "destructive rate on retain items" in dilemma_svg(neither)
