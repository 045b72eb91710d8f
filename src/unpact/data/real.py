"""Readers that map the real unlearning benchmarks into the item format.

Each reader takes a local path in the benchmark's own layout, or (for users with a hub)
`hub=True` to fetch the same data through `datasets` (`pip install datasets`):

- MUSE (News or Books; muse-bench/MUSE-News, muse-bench/MUSE-Books): a folder with
  `knowmem/forget_qa.json` and `knowmem/retain_qa.json` (or `retain2_qa.json`, as an
  earlier release names it; JSON lists of `{"question", "answer"}`) and optionally
  `raw/forget`, `raw/retain1` and `raw/holdout` (MUSE's never-trained text, read as
  `holdout` documents), each as `.txt` (each blank-line-separated block becomes a
  document) or `.json`/`.jsonl` (a list of strings, or records with `text`); without a raw
  forget or holdout file, `privleak/forget.json` and `privleak/holdout.json` (MUSE's
  PrivLeak sets) are read instead; and optionally `verbmem/forget.json` (a JSON list of
  `{"prompt", "gt"}`: MUSE's VerbMem probes, continued as MUSE continues them). Each part
  may also be laid out as a clone of the hub's repository has it (`dataset_files`):
  Parquet shards (`knowmem/forget_qa-00000-of-00001.parquet`), hyphenated JSON names
  (`knowmem/forget-qa.json`, `retain2-qa.json`) or the Parquet conversion's folders.
- TOFU (locuslab/TOFU): a folder with `forget01.json`, `forget05.json` or `forget10.json`
  and the matching `retain99.json`, `retain95.json` or `retain90.json` (JSON lines or a
  JSON list of `{"question", "answer"}`), optionally `world_facts.json` and
  `real_authors.json` (read as `general`), `holdout01.json` (...05, ...10: read as
  `holdout`), `forget01_perturbed.json` (TOFU's `paraphrased_answer` and
  `perturbed_answer` list, matched to the forget items by question: the truth ratio) and
  `retain_perturbed.json` (the same for 400 retain items), `real_authors_perturbed.json` and
  `world_facts_perturbed.json` (`perturbed_answer` lists for the general items: TOFU's
  model utility).
- WMDP (cais/wmdp): a JSON-lines, JSON or Parquet file of `{"question", "choices",
  "answer"}` with `answer` the index of the correct choice (or, as MMLU-style copies give
  it, its letter "C" or the index as text) (the hub's `wmdp-bio`,
  `wmdp-chem`, `wmdp-cyber`; a clone of the hub's repository holds them as
  `wmdp-bio/test-00000-of-00001.parquet`, read with pyarrow); all items are `forget`.

Keywords are left empty: these benchmarks carry no ground truth for them.
"""

from __future__ import annotations

import json
from functools import cache, partial
from pathlib import Path
from typing import Any

from unpact.data.items import Benchmark, Document, QAItem, VerbatimPrompt, choice_index
from unpact.errors import UnpactError, check_text
from unpact.files import json_lines, json_value, read_text

_LFS_POINTER = "version https://git-lfs.github.com/spec/"


def _read(path: Path) -> str:
    text = read_text(path)
    _not_a_pointer(path, text[: len(_LFS_POINTER)])
    return text


def _not_a_pointer(path: Path, start: str) -> None:
    """A hub dataset cloned without Git LFS holds pointer files in place of its data."""
    if start == _LFS_POINTER:
        raise UnpactError(
            f"{path} is a Git LFS pointer, not the data: run `git lfs pull` in the clone "
            "(or download the file itself)"
        )


def _parquet(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file (the hub's own format: a clone of a dataset repository
    such as cais/wmdp holds these), read with pyarrow when it is installed."""
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise UnpactError(f"reading {path} needs pyarrow (Parquet): pip install pyarrow") from None
    try:
        with path.open("rb") as f:
            _not_a_pointer(path, f.read(len(_LFS_POINTER)).decode("latin-1"))
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    except OSError as exc:
        raise UnpactError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ArrowException as exc:
        raise UnpactError(f"cannot read {path}: not a Parquet file ({exc})") from None
    return rows


def _records(path: Path) -> list[dict[str, Any]]:
    """A JSON list, a single JSON object, JSON lines, or a Parquet file's rows."""
    if path.suffix == ".parquet":
        return _parquet(path)
    text = _read(path)
    try:
        data = json_value(text)
    except json.JSONDecodeError:
        pass
    else:
        check_text(data, str(path))
        return data if isinstance(data, list) else [data]
    out = []
    for n, line in json_lines(text):
        try:
            out.append(json_value(line))
        except json.JSONDecodeError as exc:
            raise UnpactError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
        check_text(out[-1], f"{path}, line {n}")
    return out


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise UnpactError(f"{where}: field '{key}' is missing")
    return record[key]


def _text(record: dict[str, Any], key: str, where: str) -> str:
    """A field holding text: a non-empty string (a number is taken as its digits; a list,
    as MUSE gives some answers, by its first entry)."""
    value = _field(record, key, where)
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise UnpactError(f"{where}: field '{key}' must be non-empty text, not {value!r}")
    return value.strip()


def _qa(records: list[dict[str, Any]], split: str, prefix: str, where: str) -> list[QAItem]:
    items = []
    for n, r in enumerate(records):
        question = _text(r, "question", f"{where}, record {n + 1}")
        answer = _text(r, "answer", f"{where}, record {n + 1}")
        aliases = tuple(a for a in r.get("aliases", ()) if isinstance(a, str) and a.strip())
        items.append(QAItem(f"{prefix}-{n:05d}", question, answer, split, aliases, (), None))
    return items


def _hub(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UnpactError(
            "reading from the hub needs the datasets package: pip install datasets"
        ) from None
    try:
        return list(datasets.load_dataset(repo, config, split=split))
    except Exception as exc:  # datasets raises many kinds; all mean "not reachable here"
        raise UnpactError(f"could not load {repo} ({config}, {split}) from the hub: {exc}") from exc


def _paragraphs(paths: list[Path], split: str, prefix: str) -> list[Document]:
    """MUSE text files as documents: a .txt file's blank-line-separated paragraphs, or a
    JSON or Parquet file's texts (a list of strings, or records with a `text` field)."""
    blocks = []
    for path in paths:
        if path.suffix == ".txt":
            blocks += [b.strip() for b in _read(path).split("\n\n") if b.strip()]
            continue
        for n, r in enumerate(_records(path)):
            text = r if isinstance(r, str) else _text(r, "text", f"{path}, record {n + 1}")
            if text.strip():
                blocks.append(text.strip())
    return [Document(f"{prefix}-{n:05d}", b, split) for n, b in enumerate(blocks)]


def dataset_files(folder: Path, names: tuple[str, ...], text: bool = False) -> list[Path]:
    """The files holding one part of a benchmark in a folder, the first name found first,
    in each layout the benchmarks have been published in: NAME.json (a JSON list or JSON
    lines), NAME.jsonl, NAME.parquet, NAME.txt (with `text`), the shards of a hub dataset's
    own upload (NAME-00000-of-00001.parquet) and those of the hub's Parquet conversion
    under NAME/; none: []."""
    for name in names:
        for ext in (".json", ".jsonl", ".parquet", *((".txt",) if text else ())):
            if (folder / f"{name}{ext}").is_file():
                return [folder / f"{name}{ext}"]
        where = (folder / name).parent
        shards = sorted(where.glob(f"{Path(name).name}-*-of-*.parquet"))
        if not shards and (folder / name).is_dir():
            shards = sorted((folder / name).rglob("*.parquet"))
        if shards:
            return shards
    return []


def _rows(files: list[Path]) -> list[dict[str, Any]]:
    return [row for f in files for row in _records(f)]


def _where(files: list[Path], folder: Path, name: str) -> str:
    """How an error names a part read from `files`: the file, or the part's name."""
    return str(files[0]) if len(files) == 1 else str(folder / name)


# MUSE's parts, each under the names its releases used, first found first: the GitHub
# release (knowmem/forget_qa.json, raw/forget.txt), the hub's upload (forget-qa.json,
# retain2-qa.json, Parquet shards) and the hub's Parquet conversion (knowmem/forget_qa/)
_MUSE_QA = {
    "forget": ("knowmem/forget_qa", "knowmem/forget-qa"),
    "retain": (
        "knowmem/retain_qa",
        "knowmem/retain2_qa",
        "knowmem/retain-qa",
        "knowmem/retain2-qa",
    ),
}
# each split's text: MUSE's raw corpus, else its PrivLeak sets (forget and holdout)
_MUSE_TEXTS = {
    "forget": ("raw/forget", "privleak/forget"),
    "retain": ("raw/retain1",),
    "holdout": ("raw/holdout", "privleak/holdout"),
}


def read_muse(source: str | Path, *, corpus: str = "news", hub: bool = False) -> Benchmark:
    """MUSE knowledge-memorisation QA (forget / retain) and, if present, its texts: the
    raw forget, retain1 and holdout corpora (or the PrivLeak forget and holdout sets)."""
    name = f"muse-{corpus}"
    if hub:
        repo = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}[corpus]
        items = _qa(_hub(repo, "knowmem", "forget_qa"), "forget", f"{name}-forget", repo)
        items += _qa(_hub(repo, "knowmem", "retain_qa"), "retain", f"{name}-retain", repo)
        hub_docs = [
            Document(f"{name}-{split}-{n:05d}", r["text"], split)
            for split, part in (("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout"))
            for n, r in enumerate(_hub(repo, "raw", part))
        ]
        probes = _probes(_hub(repo, "verbmem", "forget"), f"{name}-verbmem", repo)
        return Benchmark(name, items, hub_docs, verbatim=probes)
    folder = Path(source)
    qa: list[QAItem] = []
    for split, names in _MUSE_QA.items():
        files = dataset_files(folder, names)
        if not files:
            raise UnpactError(
                f"{folder} is not a MUSE folder: {names[0]}.json is missing (nor any of "
                f"{', '.join(names[1:])} as JSON or Parquet)"
            )
        where = _where(files, folder, names[0])
        qa += _qa(_rows(files), split, f"{name}-{split}", where)
    docs: list[Document] = []
    for split, names in _MUSE_TEXTS.items():
        docs += _paragraphs(dataset_files(folder, names, text=True), split, f"{name}-{split}")
    verbmem = dataset_files(folder, ("verbmem/forget",))
    where = _where(verbmem, folder, "verbmem/forget") if verbmem else ""
    probes = _probes(_rows(verbmem), f"{name}-verbmem", where) if verbmem else []
    return Benchmark(name, qa, docs, verbatim=probes)


def _probes(records: list[dict[str, Any]], prefix: str, where: str) -> list[VerbatimPrompt]:
    """MUSE's VerbMem probes (`prompt`: a forget text's opening, `gt`: its continuation),
    kept as given: the prompt's last space decides how its last word is tokenised."""
    out = []
    for n, r in enumerate(records):
        where_n = f"{where}, record {n + 1}"
        prompt, truth = _text(r, "prompt", where_n), _text(r, "gt", where_n)
        out.append(
            VerbatimPrompt(
                f"{prefix}-{n:05d}",
                r["prompt"] if isinstance(r["prompt"], str) else prompt,
                r["gt"] if isinstance(r["gt"], str) else truth,
            )
        )
    return out


_TOFU_PAIRS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def tofu_files(folder: Path, config: str) -> list[Path]:
    """The files holding one TOFU config (forget10, retain90, ...) in a folder, in the
    layouts TOFU has been published in (`dataset_files`): `forget10.json` (JSON lines,
    the hub's files today), `forget10_dataset.json` (its first release), `.jsonl`, Parquet
    and the shards of the hub's Parquet conversion under `forget10/`; none: []."""
    return dataset_files(folder, (config, f"{config}_dataset"))


def read_tofu(source: str | Path, *, forget: str = "forget10", hub: bool = False) -> Benchmark:
    """TOFU forget / retain QA about fictitious authors; world facts and real authors as general."""
    if forget not in _TOFU_PAIRS:
        raise UnpactError(
            f"unknown TOFU forget set {forget!r}; choose one of {', '.join(_TOFU_PAIRS)}"
        )
    retain = _TOFU_PAIRS[forget]
    if hub:

        def get(config: str) -> list[dict[str, Any]]:
            return _hub("locuslab/TOFU", config, "train")

        def at(config: str) -> str:
            return f"locuslab/TOFU ({config})"
    else:
        folder = Path(source)
        files = cache(partial(tofu_files, folder))  # each config looked up once

        def get(config: str) -> list[dict[str, Any]]:
            return _rows(files(config))

        def at(config: str) -> str:
            return _where(files(config), folder, config)

        for config in (forget, retain):
            if not files(config):
                raise UnpactError(f"{folder} is not a TOFU folder: {config}.json is missing")
    items = _qa(get(forget), "forget", f"tofu-{forget}", at(forget)) + _qa(
        get(retain), "retain", f"tofu-{retain}", at(retain)
    )

    def present(config: str) -> bool:
        return hub or bool(files(config))

    for extra in ("world_facts", "real_authors"):
        if present(extra):
            items += _qa(get(extra), "general", f"tofu-{extra}", at(extra))
    holdout = forget.replace("forget", "holdout")
    if present(holdout):
        items += _qa(get(holdout), "holdout", f"tofu-{holdout}", at(holdout))
    for split, perturbed in (
        ("forget", f"{forget}_perturbed"),
        ("retain", "retain_perturbed"),
        ("general", "real_authors_perturbed"),
        ("general", "world_facts_perturbed"),
    ):
        if present(perturbed):
            items = _with_truth_answers(items, get(perturbed), at(perturbed), split)
    return Benchmark(f"tofu-{forget}", items, [])


def _with_truth_answers(
    items: list[QAItem], records: list[dict[str, Any]], where: str, split: str
) -> list[QAItem]:
    """The items of `split` with TOFU's `paraphrased_answer` and `perturbed_answer` (a
    list), from the records of the same question; a general item (TOFU's real authors and
    world facts, whose records have no paraphrase: the model utility compares the answer
    itself) with the perturbed answers alone."""
    import dataclasses

    by_question: dict[str, dict[str, Any]] = {}
    for n, r in enumerate(records):
        by_question[str(_field(r, "question", f"{where}, record {n + 1}")).strip()] = r
    out = []
    for item in items:
        found = (by_question.get(item.question) if item.split == split else None) or {}
        para, pert = found.get("paraphrased_answer"), found.get("perturbed_answer")
        if not (isinstance(pert, list) and pert):
            out.append(item)
            continue
        wrong = tuple(w for w in (str(x).strip() for x in pert) if w and w != item.answer)
        if split == "general":
            item = dataclasses.replace(item, perturbed_answers=wrong or None)
        elif isinstance(para, str) and para.strip():
            item = dataclasses.replace(
                item, paraphrased_answer=para.strip(), perturbed_answers=wrong or None
            )
        out.append(item)
    return out


def read_wmdp(source: str | Path, *, subset: str = "wmdp-bio", hub: bool = False) -> Benchmark:
    """WMDP four-option questions; the answer index becomes the correct choice's text."""
    records = _hub("cais/wmdp", subset, "test") if hub else _records(Path(source))
    items = []
    for n, r in enumerate(records):
        where = f"{source}, record {n + 1}"
        choices = _field(r, "choices", where)
        index = choice_index(_field(r, "answer", where))
        if not isinstance(choices, list) or index is None or not 0 <= index < len(choices):
            raise UnpactError(
                f"{where}: 'answer' must index into 'choices' (0 for the first, or its "
                f"letter, A for the first), not {r['answer']!r}"
            )
        if not all(isinstance(c, (str, int, float)) and str(c).strip() for c in choices):
            raise UnpactError(f"{where}: 'choices' must all be non-empty text")
        items.append(
            QAItem(
                f"{subset}-{n:05d}",
                _text(r, "question", where),
                str(choices[index]),
                "forget",
                (),
                (),
                None,
                tuple(str(c) for c in choices),
            )
        )
    return Benchmark(subset, items, [])
