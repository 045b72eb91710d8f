"""What unpact's cache holds and how to give its space back (`unpact cache`).

The cache (`models.cache_root`: `$UNPACT_CACHE`, else `unpact` in `$XDG_CACHE_HOME` or
`~/.cache`) keeps what is slow to make again: a grid of runs fills it with a model of the
default's size (0.5 GB in float32) per injection, per unlearning and per weight-level
attack's copy, and nothing is ever removed by itself. Each top-level folder is one part,
whose artefacts `clear` removes; each is remade when a run needs it again, at the cost
`PARTS` says. A file hard-linked into a run's `models/` folder (`files.link_files`) stays
there when the cache lets it go, and only what no other folder holds frees space.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from stat import S_ISREG

from unpact.errors import UnpactError
from unpact.models import DIGESTS, DIGESTS_INDEX, cache_root

# each part of the cache, and what clearing it costs the next run that needs it (docs/runner.md)
PARTS = {
    "models": "copies of model files: GGUF conversions, merged adapters (seconds to remake)",
    "injected": "taught models: a run's original and reference (minutes to hours)",
    "stages": "a run's stages: unlearned models, answers, attacks (a run again)",
    "benchmarks": "benchmarks written out for teaching (at once)",
    DIGESTS: "hashes of model files already read (reading them again)",
}
# a part's files beside its folder (the digests' lasting index)
_BESIDE = {DIGESTS: (DIGESTS_INDEX,)}
_DELETING = ".unpact-deleting-"  # an entry renamed so, on its way out


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the cache: its entries (the artefacts in it), the bytes its files take
    on disk (each file once, however many names it has), of which `shared` are files also
    linked from outside the cache (a run's `models/`), which clearing the part does not
    free, and the newest modification time among its entries (0 when it is empty)."""

    name: str
    entries: int
    size: int
    shared: int
    newest: float

    @property
    def description(self) -> str:
        return PARTS[self.name]


def usage(root: Path | None = None) -> list[Part]:
    """Each part of the cache at `root` (default: `cache_root()`) in `PARTS`' order; one
    that is absent is empty."""
    root = cache_root() if root is None else root
    return [_measure(name, list(_part_paths(root, name))) for name in PARTS]


def clear(parts: Iterable[str], root: Path | None = None) -> list[Part]:
    """Remove the named parts of the cache at `root` ("all": every part of `PARTS`), each
    entry first renamed out of the way (so that a run never finds it half gone), and
    return what each part held before. A name that is not a part of `PARTS` is refused."""
    root = cache_root() if root is None else root
    wanted = list(dict.fromkeys(parts))
    unknown = [p for p in wanted if p != "all" and p not in PARTS]
    if unknown or not wanted:
        said = f"unknown part of the cache {unknown[0]!r}" if unknown else "no part named"
        raise UnpactError(f"{said}: choose among {', '.join(PARTS)}, or all")
    names = list(PARTS) if "all" in wanted else wanted
    cleared = []
    for name in names:
        paths = list(_part_paths(root, name))
        cleared.append(_measure(name, paths))
        for path in paths:
            _remove(path)
    return cleared


def _part_paths(root: Path, name: str) -> Iterator[Path]:
    """A part's artefacts: the entries of its folder and of the folders of artefacts in it
    (`_grouping`) that unpact named (a content hash in the name: `ga-9a9f0276db793922`,
    `0265f542567865d6.jsonl`; their locks), and the files kept beside the folder. Anything
    else there is not unpact's (`UNPACT_CACHE` set to a folder of the user's own) and is
    neither counted nor removed."""
    for extra in _BESIDE.get(name, ()):
        if (root / extra).exists():
            yield root / extra
    found = _children(root / name)
    inside = [c for group in found if _grouping(name, group) for c in _children(group)]
    yield from (path for path in [*found, *inside] if _named(path))


def _grouping(part: str, path: Path) -> bool:
    """Whether `path`, in a part's folder, is a folder of artefacts: a stage kind's
    (`stages/unlearned/`), the base models' facts beside the injected models
    (`injected/.base/`)."""
    if part == "stages":
        return not _named(path)
    return part == "injected" and path.name == ".base"


def _children(folder: Path) -> list[Path]:
    """`folder`'s entries, sorted; none where it is absent or no folder. A part's folder
    may be a link (`models/` moved to a larger disk): its entries are those there."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


_HASHED = re.compile(r"(?:^|[-_.])[0-9a-f]{12,64}(?:$|[-_.])")


def _named(path: Path) -> bool:
    """Whether unpact named `path` (a hash of its content in the name, or a lock's)."""
    return path.name.startswith(".lock-") or bool(_HASHED.search(path.name))


def _entry(path: Path) -> str | None:
    """The artefact `path` belongs to (`0265f542567865d6.jsonl`, its `.seconds` and its
    `.made` are one), None for a lock."""
    return None if path.name.startswith(".lock-") else f"{path.parent}/{path.name.split('.')[0]}"


def _measure(name: str, paths: list[Path]) -> Part:
    """`Part` of `paths`, walked without following links."""
    files: dict[tuple[int, int], list[int]] = {}  # inode: [bytes, names seen, names]
    entries, newest = set(), 0.0
    for path in paths:
        if (entry := _entry(path)) is None:
            continue
        if path.name not in _BESIDE.get(name, ()):
            entries.add(entry)
        for stat in _stats(path):
            links = stat.st_nlink if S_ISREG(stat.st_mode) else 1  # a folder's: its own
            found = files.setdefault((stat.st_dev, stat.st_ino), [_bytes(stat), 0, links])
            found[1] += 1
            newest = max(newest, stat.st_mtime)
    size = sum(b for b, _, _ in files.values())
    shared = sum(b for b, seen, links in files.values() if seen < links)
    return Part(name, len(entries), size, shared, newest)


def _stats(path: Path) -> Iterator[os.stat_result]:
    """The lstat of `path` and, for a folder, of everything under it."""
    try:
        stat = path.lstat()
    except OSError:
        return
    yield stat
    if not path.is_dir() or path.is_symlink():
        return
    for top, dirs, files in os.walk(path, onerror=lambda _: None):
        for child in (*dirs, *files):
            try:
                stat = os.lstat(os.path.join(top, child))
            except OSError:
                continue
            yield stat


def _bytes(stat: os.stat_result) -> int:
    """What a file takes on disk (its blocks; its length where the system has none)."""
    blocks = getattr(stat, "st_blocks", None)
    return blocks * 512 if blocks is not None else stat.st_size


def _remove(path: Path) -> None:
    """`path` renamed out of the way, then deleted; one it may not delete is one message."""
    gone = path.with_name(f"{_DELETING}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        path.rename(gone)
        if gone.is_dir() and not gone.is_symlink():
            shutil.rmtree(gone)
        else:
            gone.unlink()
    except FileNotFoundError:
        return  # another process cleared it first
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        raise UnpactError(f"cannot remove {path} from the cache: {why}") from None
