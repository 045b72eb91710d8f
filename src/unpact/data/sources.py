"""Where a benchmark comes from: a name or spec wherever a benchmark goes.

- a built-in name (`news`, `books`, `wmdp`, `general`) or a folder in the item format;
- `muse-news:PATH`, `muse-books:PATH`: a MUSE folder (`knowmem/`, optionally `raw/`);
- `tofu:PATH`: a TOFU folder; the forget set is the largest present (forget10, forget05,
  forget01) unless named: `tofu[forget05]:PATH`;
- `wmdp:PATH`: a WMDP JSON(-lines) file, or a folder holding one (`wmdp[wmdp-chem]:PATH`
  picks `wmdp-chem.json(l)` in a folder).

A malformed file gets the same one-line, file-and-line message as an item-format folder.
Training (injection, unlearning) needs the items as files: `materialise` writes a real
benchmark once into an item-format folder keyed by its content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import replace
from pathlib import Path

from unpact.data.items import (
    BUILTIN,
    BUILTIN_DIR,
    CONVERTING,
    Benchmark,
    QAItem,
    load_folder,
    other_files,
    write_folder,
)
from unpact.data.real import _TOFU_PAIRS, read_muse, read_tofu, read_wmdp, tofu_files
from unpact.errors import UnpactError
from unpact.files import json_value, write_folder_atomically

_SPEC = re.compile(r"(muse-news|muse-books|tofu|wmdp)(?:\[([\w.-]+)\])?:(.+)", re.S)
REAL_KINDS = ("muse-news", "muse-books", "tofu", "wmdp")


def general_items(spec: str | Path) -> list[QAItem]:
    """The general-knowledge questions a run, an injection or an evaluation judges (a run's
    `data.general`, an injection's `general`): the benchmark's items of split `general`
    (the built-in set, TOFU's world facts and real authors), or, where it has none (a
    WMDP-style file of questions, all read as forget; a folder of yours), every item, as a
    general one. Each item kept its own split before: a general set given as a file of
    forget or retain items was counted in the forget or retain figures."""
    bench = load_benchmark(spec)
    return bench.split("general") or [replace(i, split="general") for i in bench.items]


def load_benchmark(spec: str | Path) -> Benchmark:
    """A benchmark by built-in name, item-format folder or real-benchmark spec."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"a benchmark is a name, a folder or a spec such as tofu:PATH (a string or a "
            f"path), not {type(spec).__name__} {spec!r}"
        )
    key = os.fspath(spec)
    if not key.strip():  # it read the current folder
        raise UnpactError(
            f"empty benchmark: give a built-in one ({', '.join(BUILTIN)}), a folder or a spec "
            f"{', '.join(k + ':PATH' for k in REAL_KINDS)}"
        )
    if key in BUILTIN:
        return load_folder(BUILTIN_DIR / key, name=key)
    match = _SPEC.fullmatch(key)
    if match is not None and not Path(key).exists():
        kind, option, where = match.groups()
        return _read_real(kind, option, Path(where).expanduser())
    path = Path(spec).expanduser()
    if path.exists():
        try:
            return load_folder(path)
        except UnpactError as e:
            hint = None
            if path.is_dir() and not (path / "qa.jsonl").is_file():
                hint = _real_layout(path) or other_files(path)  # a real set's, or converted
            elif path.is_file():
                hint = _real_layout(path)
            if hint is None:
                raise
            raise UnpactError(f"{e}; {hint}") from None
    lower = _SPEC.fullmatch(key[: key.find(":")].lower() + key[key.find(":") :])
    hint = f" (spec names are lower case: {lower[1]}:...)" if lower is not None else ""
    raise UnpactError(
        f"no benchmark {key!r}: not a built-in one ({', '.join(BUILTIN)}), no such folder, "
        f"and not a spec {', '.join(k + ':PATH' for k in REAL_KINDS)}{hint}"
    )


def _real_layout(path: Path) -> str | None:
    """For a folder or file in a real benchmark's own layout given as an item-format
    folder, the spec that reads it; None if it looks like none of them."""
    where = str(path)
    if path.is_dir():
        if any(tofu_files(path, f) for f in _TOFU_PAIRS):
            return f"it holds TOFU's files: give it as tofu:{where}"
        if (path / "knowmem").is_dir():
            return f"it holds MUSE's files: give it as muse-news:{where} or muse-books:{where}"
        if any(path.glob("wmdp-*")):
            return f"it holds WMDP's files: give it as wmdp[NAME]:{where} (e.g. wmdp[wmdp-bio])"
        return None
    if path.name in ("qa.jsonl", "documents.jsonl", "verbmem.jsonl"):
        return f"give the folder that holds it: {path.parent}"
    if path.suffix == ".jsonl" and _holds_items(path):
        return (
            "it holds items in unpact's format: a benchmark is a folder with them in "
            f"qa.jsonl (mkdir NAME && cp {shlex.quote(where)} NAME/qa.jsonl; docs/data.md)"
        )
    if path.suffix in (".json", ".jsonl", ".parquet") and not _holds_items(path):
        return f"a file of multiple-choice questions such as WMDP's is read as wmdp:{where}"
    if path.suffix.lower() in (".json", ".csv", ".tsv"):  # the items as an array or a table
        return (
            "a benchmark is a folder with its items in qa.jsonl, one JSON object per line "
            f"({CONVERTING}; docs/data.md)"
        )
    return None


def _holds_items(path: Path) -> bool:
    """Whether the file's first line (or, in a JSON array, its first object) is an object
    with a `split`, as unpact's QA items have and WMDP's questions do not (both have
    `question` and `answer`)."""
    try:
        with path.open(encoding="utf-8") as fh:
            line = fh.readline().lstrip("\ufeff")
            first = json_value(line + fh.read() if line.lstrip().startswith("[") else line)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if isinstance(first, list):
        first = first[0] if first else None
    return isinstance(first, dict) and "split" in first and "question" in first


def _read_real(kind: str, option: str | None, path: Path) -> Benchmark:
    if not path.exists():
        # `tofu:PATH:forget05` (or @forget05): the option written after the path
        after = re.fullmatch(r"(.+)[:@#]([\w.-]+)", str(path))
        hint = (
            f" (an option goes in brackets before the path: {kind}[{after[2]}]:{after[1]})"
            if after is not None and Path(after[1]).exists()
            else ""
        )
        raise UnpactError(f"{kind}:{path}: no such file or folder{hint}")
    if kind.startswith("muse-"):
        if option is not None:
            raise UnpactError(f"{kind} takes no [option]")
        return read_muse(path, corpus=kind.split("-", 1)[1])
    if kind == "tofu":
        if not path.is_dir():
            raise UnpactError(f"tofu:{path}: a TOFU folder is needed, not a file")
        present = [f for f in _TOFU_PAIRS if tofu_files(path, f)]
        forget = option or (present[-1] if present else "forget10")
        return read_tofu(path, forget=forget)
    file = _wmdp_file(path, option)
    return read_wmdp(file, subset=option or _wmdp_name(file))


_WMDP_FILES = ("*.json", "*.jsonl", "*.parquet")


def _wmdp_file(path: Path, option: str | None) -> Path:
    """The one WMDP file at `path`: the file itself, the folder's one data file (named by
    the option where there are several), or, in a clone of the hub's cais/wmdp, the one
    Parquet file of the subset folder the option names (`wmdp[wmdp-bio]:CLONE`)."""
    if not path.is_dir():
        return path
    if option is not None and (path / option).is_dir():
        path, option = path / option, None  # cais/wmdp: wmdp-bio/test-00000-of-00001.parquet
    files = [f for pattern in _WMDP_FILES for f in sorted(path.glob(pattern))]
    if option is not None:
        files = [f for f in files if f.stem == option]
    if len(files) == 1:
        return files[0]
    found = ", ".join(f.name for f in files) or "none"
    subsets = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name.startswith("wmdp"))
    hint = f"; subsets here: {', '.join(subsets)}" if subsets and not files else ""
    raise UnpactError(
        f"wmdp:{path}: expected one .json, .jsonl or .parquet file (name one: "
        f"wmdp[NAME]:{path}); found {found}{hint}"
    )


def _wmdp_name(path: Path) -> str:
    """A WMDP subset's name: its file's (wmdp-bio.jsonl), or its folder's where the file is
    a hub split shard (wmdp-bio/test-00000-of-00001.parquet)."""
    return path.parent.name if path.stem.startswith(("test", "train")) else path.stem


def materialise(bench: Benchmark, root: Path) -> Benchmark:
    """`bench` as an item-format folder under `root` (written once, keyed by content;
    renamed into place when complete): what injection and unlearning read."""
    if bench.path is not None:
        return bench
    parts = [[i.to_dict() for i in bench.items], [d.to_dict() for d in bench.documents]]
    if bench.verbatim:  # a benchmark without VerbMem probes keeps the key it had before them
        parts.append([v.to_dict() for v in bench.verbatim])
    text = json.dumps(parts, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = root / f"{bench.name}-{key}"
    if not (folder / "qa.jsonl").is_file():
        write_folder_atomically(
            folder,
            lambda tmp: write_folder(tmp, bench.items, bench.documents, bench.verbatim),
            complete=lambda done: (done / "qa.jsonl").is_file(),
        )
    return Benchmark(bench.name, bench.items, bench.documents, folder, bench.verbatim)
