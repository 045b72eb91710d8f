"""The run's cache: content-keyed artefacts written atomically, and model folders linked
into a run directory. A reader never sees half of anything: each file or folder is
written under a temporary name and renamed into place when complete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from unpact.determinism import made_note
from unpact.files import atomic_text, json_lines, link_files, write_folder_atomically

__all__ = ["Stage", "atomic_text", "digest", "jsonl", "link_model", "read_jsonl"]


def digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for _, line in json_lines(path.read_text(encoding="utf-8"))]


class Stage:
    """A cached artefact: rows of JSON under `cache_dir/kind/key.jsonl`, and beside them
    the wall time computing them took (`key.seconds`) and what they were computed on and
    under (`key.made`: `determinism.made()`), so that a run reading the artefact later can
    still say what its stages cost cold, and which of its numbers another machine or
    release made."""

    def __init__(self, cache: Path, kind: str, key: str) -> None:
        self.path = cache / kind / f"{key}.jsonl"
        self.timing = self.path.with_suffix(".seconds")
        self.origin = self.path.with_suffix(".made")

    def done(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def seconds(self) -> float | None:
        """How long computing the artefact took, where its writer noted it."""
        try:
            return float(self.timing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # written by older code, or the note was lost: unknown

    def made(self) -> dict[str, Any] | None:
        """Where and under what the artefact was computed, where its writer noted it."""
        return made_note(self.origin)  # None where not noted, as `seconds`

    def write(
        self,
        rows: list[dict[str, Any]],
        seconds: float | None = None,
        made: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        # the notes first: the rows' file is what marks the stage done
        if seconds is not None:
            atomic_text(self.timing, f"{seconds}\n")
        if made is not None:
            atomic_text(self.origin, json.dumps(made) + "\n")
        atomic_text(self.path, jsonl(rows))
        return rows


def link_model(src: Path, dst: Path) -> None:
    """`dst` gets the files of the model folder `src`: hard links (no copy) where the file
    system allows, copies otherwise; renamed into place when complete (a re-run relinks, so
    a changed method's new model replaces the old one)."""

    write_folder_atomically(dst, lambda tmp: link_files(src, tmp))
