"""The built-in run configs: the YAML files of this folder, by name (`unpact run NAME`).

A light module on purpose: the CLI lists these names in `unpact run --help`."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def names() -> list[str]:
    """Names of the built-in run configs, sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def path(name: str) -> Path | None:
    """The built-in config called `name`, or None when there is none."""
    return FOLDER / f"{name}.yaml" if name in names() else None
