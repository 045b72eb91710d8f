"""The run's report: one self-contained HTML file (SPEC section 8).

Inline CSS, inline JS and an inline SVG plot, no network: it opens from a mail attachment.
It holds the per-method table (the paper's Table 2 shape), the dilemma plot (recovery
rate against destructive rate, one point per method), token heatmaps of contributions
before and after unlearning for a few forgotten items per method, and the settings.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unpact.attacks import attack_title
from unpact.attribution import Attribution
from unpact.files import atomic_text
from unpact.metrics import display
from unpact.report.roc import roc_svg, svg_of
from unpact.results import columns, other_columns, recovery_columns

if TYPE_CHECKING:
    from unpact.metrics import ItemRecord
    from unpact.run import RunConfig


def num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3f}"


def breakable(text: Any) -> Any:
    """A column head, escaped, that may break after "+", "_" or "/": an unbroken name such
    as "FocusOnKey+PROBAB" or "min_k_plus_plus" was wider than its column and ran over
    the next head at 1,400 px."""
    from markupsafe import Markup, escape

    return Markup(re.sub(r"([+_/])", r"\1<wbr>", str(escape(text))))


def _environment() -> Any:
    """The Jinja environment of the report's templates, with their filters."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("unpact", "report"), autoescape=select_autoescape(["html", "j2"])
    )
    env.filters["num"] = num
    env.filters["pct"] = lambda v: display("percent", v)
    env.filters["breakable"] = breakable
    return env


def dilemma_svg(
    results: dict[str, Any],
    by_model: dict[str, dict[str, Any]] | None = None,
    attack: str | None = None,
) -> str:
    """Recovery rate (of `attack`; default "any", the union, or the one attack) against
    destructive rate on retain and on general items: one point per method, as an inline
    SVG. With `by_model` (model name -> that model's results on the same benchmark), one
    colour per model."""
    svg = svg_of(lambda: _dilemma_figure(results, by_model, attack))
    assert svg is not None
    return svg


def _dilemma_figure(
    results: dict[str, Any], by_model: dict[str, dict[str, Any]] | None, attack: str | None
) -> Any:
    import matplotlib.pyplot as plt

    if attack is None:  # recovery by any attack; with one attack, by that one
        attack = recovery_columns(results["attacks"])[-1] if results["attacks"] else None
    series = by_model or {"": results}
    # One colour per model, or (one model) per method: a sweep's runs share their method's
    # colour and legend entry and are annotated with the swept value alone.
    families = dict.fromkeys(_family(n, m) for n, m in results["methods"].items())
    colour = {f: f"C{k % 10}" for k, f in enumerate(families)}
    swept = {  # a swept method's legend entry names its setting: "rmu (steering_coeff)"
        str(m["sweep"]["of"]): str(m["sweep"]["key"]).split(".")[-1]
        for m in results["methods"].values()
        if m.get("sweep")
    }
    # a panel per split with a destructive rate: a run without general items (an audit
    # with --general none) drew an empty general panel beside the retain one
    splits = [
        split
        for split in ("retain", "general")
        if any(
            m.get(f"destructive_{split}") is not None
            for res in series.values()
            for m in res["methods"].values()
        )
    ] or ["retain"]
    width = (4.5 if by_model else 5.25) * len(splits)
    fig, grid = plt.subplots(1, len(splits), figsize=(width, 3.8), sharey=True, squeeze=False)
    axes = list(grid[0])
    for ax, split in zip(axes, splits):
        labels: dict[tuple[float, float], list[str]] = {}
        for n, (model, res) in enumerate(series.items()):
            for x, y, label in _plot_series(
                ax, split, n, model, res, attack, by_model is not None, colour
            ):
                labels.setdefault((x, y), []).append(label)
        for at, said in labels.items():  # methods at one point: one label, not a smudge
            ax.annotate(
                "\n".join(said), at, textcoords="offset points", xytext=(5, 4), fontsize="small"
            )
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.set_xlabel(f"destructive rate on {split} items (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recovery rate, {attack_title(attack or '')} (%)")
    if not by_model:
        handles = [
            plt.Line2D(
                [], [], marker="o", ls="", color=c, label=f"{f} ({swept[f]})" if f in swept else f
            )
            for f, c in colour.items()
        ]
        axes[-1].legend(
            handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small"
        )
    wrap = "\n" if len(axes) == 1 else " "  # one panel is too narrow for it on one line
    fig.suptitle(f"The dilemma: lower-left is better{wrap}(forgets for good, destroys little)")
    fig.tight_layout()
    return fig


def _plot_series(
    ax: Any,
    split: str,
    n: int,
    model: str,
    res: dict[str, Any],
    attack: str | None,
    by_model: bool,
    colour: dict[str, str],
) -> list[tuple[float, float, str]]:
    """One model's methods on one axis of the dilemma plot: a point per method and a line
    through each swept method's runs; returns the points' labels (a sweep's runs: the
    swept value; several models: model and method) with where they go."""
    labels: list[tuple[float, float, str]] = []
    for name, m in res["methods"].items():
        x = m.get(f"destructive_{split}")
        y = m["recovery"].get(attack) if attack else None
        if x is None or y is None:
            continue
        if by_model:
            color = f"C{n % 10}"
            label = f"{model}: {short_label(name)}"
        else:
            color = colour[_family(name, m)]
            sweep = m.get("sweep")
            label = _setting_text(sweep["value"]) if sweep else ""
        ax.scatter([100 * x], [100 * y], s=40, color=color)
        if label:
            labels.append((100 * x, 100 * y, label))
    # A swept method's runs as one curve, in the order of the swept value.
    curves: dict[str, list[tuple[Any, float, float]]] = {}
    for m in res["methods"].values():
        sweep, x = m.get("sweep"), m.get(f"destructive_{split}")
        y = m["recovery"].get(attack) if attack else None
        if sweep and x is not None and y is not None:
            curves.setdefault(sweep["of"], []).append((sweep["value"], x, y))
    for family, points in curves.items():
        points.sort(key=lambda p: p[0])
        ax.plot(
            [100 * p[1] for p in points],
            [100 * p[2] for p in points],
            "-",
            alpha=0.5,
            color=f"C{n % 10}" if by_model else colour[family],
        )
    return labels


def short_label(name: str) -> str:
    """A method's name for a figure or table: a sweep's point as `rmu[steering_coeff=200.0]`
    (its full name is `rmu[settings.steering_coeff=200.0]`)."""
    return name.replace("settings.", "")


def _setting_text(value: Any) -> str:
    """A swept value as a point's label: numbers short (5e-06, 0.5, 200), others as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return str(value)


def _family(name: str, m: dict[str, Any]) -> str:
    """The method a result belongs to: a sweep's runs share their method's label."""
    sweep = m.get("sweep")
    return str(sweep["of"]) if sweep else name


def heatmaps(
    results: dict[str, Any],
    records: list[ItemRecord],
    attributions: dict[str, dict[str, dict[str, Any]]],
    per_method: int,
) -> list[dict[str, Any]]:
    """For each method, its first `per_method` forgotten items: before/after heatmaps."""
    sections = []
    for name in results["methods"]:
        chosen = [r for r in records if r.method == name and r.forgotten][:per_method]
        rows = []
        for r in chosen:
            before = Attribution.from_dict(attributions["original"][r.id])
            after = Attribution.from_dict(attributions[name][r.id])
            rows.append(
                {
                    "id": r.id,
                    "question": r.question,
                    "answer": r.answer,
                    "output_after": r.output_after,
                    "before": before.to_html(),
                    "after": after.to_html(),
                    "similarity": r.keytoken_similarity,
                }
            )
        sections.append({"method": name, "rows": rows})
    return sections


def render(
    results: dict[str, Any],
    records: list[ItemRecord],
    attributions: dict[str, dict[str, dict[str, Any]]],
    config: RunConfig,
) -> str:
    """The report as one HTML string."""
    env = _environment()
    template = env.get_template("report.html.j2")
    return template.render(
        results=results,
        attack_title=attack_title,
        columns=columns(results["attacks"], split=True),
        more=[  # the figures this run has (no column of dashes for a control never run)
            c
            for c in other_columns(results["attacks"])
            if any(c.cell(m) != "–" for m in results["methods"].values())
        ],
        plot=dilemma_svg(results, attack=config.report.dilemma_attack),
        scored=any(r.membership is not None for r in records),
        roc=roc_svg(records, config.membership.privleak_attack),
        references=results.get("references") or {},
        mia_attack=config.membership.privleak_attack,
        skipped=results.get("skipped") or {},
        check_columns=sorted(
            {k for row in (results.get("attribution_checks") or {}).values() for k in row}
        ),
        sections=heatmaps(results, records, attributions, config.attribution.heatmaps),
        verbatim=_verbatim(records),
        settings=yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        baseline=config.statistics.baseline_attack,
        level=config.statistics.level,
        alpha=config.statistics.alpha,
        escape=html.escape,
    )


VERBATIM_ROWS = 10  # continuations shown per model


def _verbatim(records: list[ItemRecord]) -> dict[str, list[ItemRecord]]:
    """Per model, its first VerbMem records of their own (a benchmark's probes, MUSE's
    verbmem set): the prompt, the true continuation and the model's, to read."""
    out: dict[str, list[ItemRecord]] = {}
    for r in records:
        if r.split == "verbmem" and len(out.setdefault(r.method, [])) < VERBATIM_ROWS:
            out[r.method].append(r)
    return {m: rows for m, rows in out.items() if rows}


def write_comparison(path: Path, runs: dict[str, dict[str, Any]]) -> None:
    """The side-by-side page of a multi-run (`run` with `models:` or `benchmarks:`): per
    benchmark, every model's methods in one table and one dilemma plot; each row links to
    its run's own report (its path percent-encoded: a model named "a#1" or "50%" linked to
    a fragment or nowhere). `runs` maps a run's sub-folder ("model/benchmark") to its
    results."""
    from urllib.parse import quote

    env = _environment()
    groups: dict[str, list[dict[str, Any]]] = {}
    per_bench: dict[str, dict[str, dict[str, Any]]] = {}
    attacks: list[str] = []
    for key, results in runs.items():
        bench = results["benchmark"]
        model = key.split("/")[0] if "/" in key or key != bench else results["model"]
        per_bench.setdefault(bench, {})[model] = results
        attacks += [a for a in results["attacks"] if a not in attacks]
        for method, m in results["methods"].items():
            groups.setdefault(bench, []).append(
                {"model": model, "method": method, "m": m, "link": quote(f"{key}/report.html")}
            )
    models = sorted({r["model"] for rows in groups.values() for r in rows})
    plots = {
        bench: dilemma_svg(next(iter(series.values())), series if len(series) > 1 else None)
        for bench, series in per_bench.items()
    }
    text = env.get_template("comparison.html.j2").render(
        groups=groups,
        models=models,
        columns=columns(attacks),
        plots=plots,
    )
    atomic_text(path, text)


def write_report(
    path: Path,
    results: dict[str, Any],
    records: list[ItemRecord],
    attributions: dict[str, dict[str, dict[str, Any]]],
    config: RunConfig,
) -> None:
    """Write report.html atomically."""
    text = render(results, records, attributions, config)
    atomic_text(path, text)
