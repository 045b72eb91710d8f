"""A run directory keeps the runs of the config last run into it and no other's."""

from __future__ import annotations

from pathlib import Path

from unpact.run.layout import clear_other_runs

CONFIG = "model: default\nmethods:\n- method: ga\n"


def _run(folder: Path, models: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(CONFIG)
    for name in ("items.jsonl", "checks.jsonl", "results.json", "results.md", "report.html"):
        (folder / name).write_text("x")
    for label in models:
        (folder / "models" / label).mkdir(parents=True)
        (folder / "models" / label / "config.json").write_text("{}")
    return folder


def _tree(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


def test_a_grid_keeps_its_own_runs_and_takes_away_an_earlier_grids(tmp_path):
    out = _run(tmp_path / "out")
    _run(out / "tofu")
    _run(out / "news")
    mine = out / "mine"  # not a run's: the user's
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    clear_other_runs(out, ["news", "books"], [])
    assert (out / "news" / "results.json").is_file()
    assert not (out / "tofu").exists()
    assert (mine / "notes.txt").is_file()
    assert (out / "config.yaml").is_file() and (out / "results.json").is_file()


def test_a_grid_takes_away_a_single_runs_items_and_models_but_not_a_given_one(tmp_path):
    out = _run(tmp_path / "out", models=("ga", "npo"))
    clear_other_runs(out, ["a", "b"], [str(out / "models" / "npo")])
    assert not (out / "items.jsonl").exists() and not (out / "checks.jsonl").exists()
    assert [p.name for p in (out / "models").iterdir()] == ["npo"]
    clear_other_runs(out, ["a", "b"], [])
    assert not (out / "models").exists()


def test_a_single_run_takes_away_a_grids_runs_at_both_levels(tmp_path):
    out = _run(tmp_path / "out")
    _run(out / "smol" / "tofu")
    _run(out / "smol" / "news")
    _run(out / "tiny")
    clear_other_runs(out, None, [])
    assert _tree(out) == sorted(
        ["config.yaml", "items.jsonl", "checks.jsonl", "results.json", "results.md", "report.html"]
    )


def test_a_level_that_now_holds_a_grids_runs_keeps_only_them(tmp_path):
    """A grid of models only (`out/smol/`) followed by one of models and benchmarks
    (`out/smol/tofu/`): smol's own run files go, its new run stays."""
    out = _run(tmp_path / "out")
    _run(out / "smol", models=("ga",))
    _run(out / "smol" / "tofu")
    clear_other_runs(out, ["smol/tofu"], [])
    assert sorted(p.name for p in (out / "smol").iterdir()) == ["tofu"]


def test_an_earlier_run_holding_a_model_this_config_reads_stays(tmp_path):
    out = _run(tmp_path / "out")
    _run(out / "old", models=("npo",))
    clear_other_runs(out, None, [str(out / "old" / "models" / "npo")])
    assert (out / "old" / "models" / "npo" / "config.json").is_file()


def test_a_config_yaml_that_is_not_a_runs_is_let_be(tmp_path):
    out = _run(tmp_path / "out")
    for name, text in {"other": "lr: 1e-5\n", "broken": "a: [\n", "empty": ""}.items():
        (out / name).mkdir()
        (out / name / "config.yaml").write_text(text)
    clear_other_runs(out, None, [])
    assert {"other", "broken", "empty"} <= {p.name for p in out.iterdir()}


def test_another_configs_outputs_go_when_a_run_starts_and_the_same_configs_stay(tmp_path):
    """Only results.json went when a run started: a run of another config stopped before
    its end (Ctrl-C, an error) left the earlier config's report, items and tables beside
    its own config.yaml, to be read as its own. They go now, the earlier models too (but
    one this config reads); the same config again keeps them until it writes its own."""
    from unpact.run.layout import start_run

    out = _run(tmp_path / "out", models=("ga", "npo"))
    (out / "results.csv").write_text("x")
    start_run(out, CONFIG, [])
    assert (out / "report.html").is_file() and not (out / "results.json").exists()
    assert (out / "models" / "ga").is_dir()
    other = CONFIG + "seed: 1\n"
    start_run(out, other, [str(out / "models" / "npo")])
    assert _tree(out) == ["config.yaml", "models", "models/npo", "models/npo/config.json"]
    assert (out / "config.yaml").read_text() == other
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    start_run(fresh, CONFIG, [])
    assert _tree(fresh) == ["config.yaml"]
