"""Writing files so that a reader never sees half of one.

Every artefact unpact writes (results, records, cached stages, reports, checkpoints' notes)
goes to a temporary name beside its place and is renamed into place once complete; a write
that fails (a full disk, an interrupt) leaves neither half a file nor the temporary one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: Path, text: str) -> None:
    """Write `text` to `path` as UTF-8, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
