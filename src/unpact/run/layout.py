"""A run directory holds the files of the config last run into it, and no other's.

A single run writes `config.yaml`, `items.jsonl`, `checks.jsonl`, `results.{json,csv,md}`,
`report.html` and `models/`; a grid writes the same tables at its top level and each of its
runs into `<model>/<benchmark>/`. Run into a folder that held another layout (a grid of
other benchmarks, a single run where a grid was, or the reverse), the earlier one's runs
would stay beside the new results and look like part of them; they are taken away here.
A folder is an earlier run's when it holds a run's `config.yaml` (written first, so an
interrupted run counts too); anything else in the folder is let be."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from unpact.files import atomic_text

__all__ = ["clear_models", "clear_other_runs", "start_run", "unlearn_run"]

# what a run writes beside its config.yaml
_RUN_FILES = (
    "items.jsonl",
    "checks.jsonl",
    "results.json",
    "results.csv",
    "results.md",
    "report.html",
)


def start_run(out: Path, config_text: str, given: Iterable[str]) -> None:
    """Make `out` the run of the config written as `config_text` (its `config.yaml`, written
    here): results.json goes, re-derived at the end; where the folder held another
    config's run, that run's items, tables, report and models go too (a model named in
    `given`, specs this config reads, stays), so a run stopped before its end leaves no
    earlier config's report beside its own config. The same config again (continued or
    re-run) keeps them until it writes its own."""
    path = out / "config.yaml"
    other = _is_run(out) and path.read_text(encoding="utf-8") != config_text
    for name in _RUN_FILES if other else ("results.json",):
        (out / name).unlink(missing_ok=True)
    if other:
        clear_models(out / "models", {os.path.realpath(spec) for spec in given})
    atomic_text(path, config_text)


def clear_other_runs(out: Path, runs: Iterable[str] | None, given: Iterable[str]) -> None:
    """Take away from `out` the runs of an earlier config that this one does not write:
    with `runs` (a grid's run folders, `model/benchmark` relative to `out`) every other
    run folder, and a single run's items and models at the top; with None (a single run)
    every run folder below `out`. A folder holding a model named in `given` (specs this
    config reads) stays."""
    kept = set(runs or ())
    held = {os.path.realpath(spec) for spec in given}
    for folder in _run_folders(out):
        rel = folder.relative_to(out).as_posix()
        if rel in kept:
            continue
        if any(r.startswith(rel + "/") for r in kept):  # now a level above the grid's runs
            _clear_files(folder, held, every=True)
        elif not any(_inside(spec, folder) for spec in held):
            shutil.rmtree(folder)
            if folder.parent != out and not any(folder.parent.iterdir()):
                folder.parent.rmdir()
    if runs is not None:  # a grid's top level: no single run's items, checks or models
        _clear_files(out, held, every=False)


def _run_folders(out: Path) -> list[Path]:
    """The run folders one and two levels below `out` (a grid's `model/benchmark`)."""
    found = []
    for sub in _subfolders(out):
        if _is_run(sub):
            found.append(sub)
        found += [two for two in _subfolders(sub) if _is_run(two)]
    return found


def _subfolders(folder: Path) -> list[Path]:
    """Folders a grid may have made: not hidden, not a run's models, not a link."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name != "models" and not p.name.startswith(".")
    )


def _is_run(folder: Path) -> bool:
    """Whether `folder` holds a run's config.yaml (a mapping naming a model and methods)."""
    config = _config(folder)
    return isinstance(config, dict) and "model" in config and "methods" in config


def _config(folder: Path) -> Any:
    """`folder`'s config.yaml as YAML reads it; None where there is none or it is unreadable."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None


def unlearn_run(folder: Path) -> bool:
    """Whether `folder` holds an `unpact unlearn` run: a config.yaml naming one `method`
    (unlearn/loop.py writes it), not a run's `methods`."""
    from unpact.unlearn.config import is_unlearn_record

    return is_unlearn_record(_config(folder))


def _inside(spec: str, folder: Path) -> bool:
    return spec == os.path.realpath(folder) or spec.startswith(os.path.realpath(folder) + os.sep)


def _clear_files(folder: Path, held: set[str], *, every: bool) -> None:
    """A single run's items, checks and models (`every`: its config, tables and report
    too) out of `folder`; a model named in `held` stays."""
    names = (*_RUN_FILES, "config.yaml") if every else ("items.jsonl", "checks.jsonl")
    for name in names:
        (folder / name).unlink(missing_ok=True)
    clear_models(folder / "models", held)


def clear_models(models: Path, held: set[str], made: Iterable[str] = ()) -> None:
    """The folders (links, hard links or copies of cached models: the cache keeps them) in
    a run's `models/` but those named `made` and those holding a model in `held` (real
    paths of specs the config reads); `models/` itself when nothing is left."""
    if not models.is_dir() or models.is_symlink():
        return
    keep = set(made)
    for old in sorted(models.iterdir()):
        if old.name in keep or old.name.startswith("."):
            continue
        if any(_inside(spec, old) for spec in held):
            continue
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old)
    if not any(models.iterdir()):
        models.rmdir()
