"""The one item format every benchmark is read into, its validation, and the loader.

A benchmark is a folder with `qa.jsonl` (one QA item per line) and optionally
`documents.jsonl` (the texts items come from: membership inference and VerbMem read them;
injection and unlearning train on the QA items alone) and
`verbmem.jsonl` (openings of forget texts and their true continuations: VerbMem). See
docs/data.md for the format. Loading validates everything first and returns nothing on
error: one message names the file, the line and the field.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unpact.errors import UnpactError, check_text
from unpact.files import json_lines, json_value, read_text
from unpact.judge import invisible, optional_mark, takes_marks

SPLITS = ("forget", "retain", "general", "holdout")
# Fields an injection's cache key leaves out: they do not change what it teaches (issue 21).
ANSWER_FIELDS = ("paraphrased_answer", "perturbed_answers")
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN = ("news", "books", "wmdp", "general")


@dataclass(frozen=True)
class QAItem:
    """A question with its answer; a multiple-choice item also has `choices`."""

    id: str
    question: str
    answer: str
    split: str
    aliases: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    document: str | None = None
    choices: tuple[str, ...] | None = None
    # TOFU's truth ratio: the answer said another way, and wrong answers of the same kind
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] | None = None

    @property
    def is_mcq(self) -> bool:
        return self.choices is not None

    @property
    def label(self) -> str:
        """How a message names the item: its id and split."""
        return f"item {self.id} ({self.split})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"], d["keywords"] = list(self.aliases), list(self.keywords)
        for name in ("choices", "paraphrased_answer", "perturbed_answers"):
            if d[name] is None:
                del d[name]
            elif isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    def key_dict(self) -> dict[str, Any]:
        """`to_dict` without the truth-ratio answers: what a cache key of a stage that
        teaches, unlearns or judges this item depends on."""
        d = self.to_dict()
        for name in ANSWER_FIELDS:
            d.pop(name, None)
        return d


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    split: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerbatimPrompt:
    """A verbatim-memorisation probe: the opening of a forget text and its true
    continuation (MUSE's `verbmem/forget.json`: `prompt` and `gt`)."""

    id: str
    prompt: str
    continuation: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Benchmark:
    """Items and documents of one benchmark, with helpers to select by split."""

    name: str
    items: list[QAItem]
    documents: list[Document] = field(default_factory=list)
    path: Path | None = None
    verbatim: list[VerbatimPrompt] = field(default_factory=list)  # VerbMem's own probes

    def split(self, name: str) -> list[QAItem]:
        return [i for i in self.items if i.split == name]

    def documents_of(self, split: str) -> list[Document]:
        return [d for d in self.documents if d.split == split]

    def counts(self) -> dict[str, int]:
        c = Counter(i.split for i in self.items)
        return {s: c[s] for s in SPLITS if c[s]}


def _fail(path: Path, line: int, message: str) -> UnpactError:
    return UnpactError(f"{path}, line {line}: {message}")


ITEM_FIELDS = (
    "id",
    "question",
    "answer",
    "aliases",
    "split",
    "keywords",
    "document",
    "choices",
    *ANSWER_FIELDS,
)
DOCUMENT_FIELDS = ("id", "text", "split")
PROBE_FIELDS = ("id", "prompt", "continuation")


def _no_misspelt_field(obj: dict[str, Any], known: tuple[str, ...], path: Path, line: int) -> None:
    """Refuse a field whose name is a slip for a field of the format that the object lacks
    (`keyword`, `Question`, `perturbed`): read as written it would be dropped in silence,
    and the item would lose its keywords or answers. Other fields are the user's own
    (a source, a category) and are ignored."""
    absent = [k for k in known if k not in obj]
    for name in obj:
        if name in known:
            continue
        low = name.lower().strip()
        close = [k for k in absent if low == k or (len(low) >= 4 and k.startswith(low))]
        close = close or difflib.get_close_matches(low, absent, n=1, cutoff=0.75)
        if close:
            raise _fail(
                path,
                line,
                f"field {name!r} is not in the item format; did you mean {close[0]!r}? "
                "(see docs/data.md)",
            )


def _given(obj: dict[str, Any], key: str, path: Path, line: int, *, required: bool) -> Any:
    """The field's value; None where an optional field is absent or null (as a table's
    export writes an empty cell); a required one absent is refused."""
    if key not in obj:
        if required:
            raise _fail(path, line, f"field '{key}' is missing")
        return None
    return obj[key]


def _digits(value: Any) -> Any:
    """A whole number as its digits (a bool is no number here); anything else as it is."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _string(
    obj: dict[str, Any],
    key: str,
    path: Path,
    line: int,
    *,
    optional: bool = False,
    numbers: bool = False,
) -> Any:
    """A non-empty string; with `numbers` (ids, answers), a whole number too, read as its
    digits: many exports number their rows (`"id": 0`), and a year or a count is often a
    JSON number (`"answer": 1921`); refused, they sent the user to rewrite the file."""
    value = _given(obj, key, path, line, required=not optional)
    if optional and value is None:
        return None
    value = _digits(value) if numbers else value
    if not isinstance(value, str) or not value.strip():
        what = "a non-empty string or a whole number" if numbers else "a non-empty string"
        raise _fail(path, line, f"field '{key}' must be {what}")
    return value


def _strings(
    obj: dict[str, Any],
    key: str,
    path: Path,
    line: int,
    *,
    required: bool = False,
    numbers: bool = False,
) -> tuple[str, ...] | None:
    """A list of non-empty strings; with `numbers` (answers, options), whole numbers read
    as their digits too."""
    value = _given(obj, key, path, line, required=required)
    if value is None and not required:
        return None
    if numbers and isinstance(value, list):
        value = [_digits(v) for v in value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        what = "non-empty strings or whole numbers" if numbers else "non-empty strings"
        raise _fail(path, line, f"field '{key}' must be a list of {what}")
    return tuple(value)


def _split(obj: dict[str, Any], path: Path, line: int) -> str:
    split = _string(obj, "split", path, line)
    if split not in SPLITS:
        raise _fail(
            path, line, f"field 'split' is {split!r}; it must be one of {', '.join(SPLITS)}"
        )
    return str(split)


def other_files(folder: Path) -> str | None:
    """For a folder without qa.jsonl, what it holds instead that may be the items in another
    form (a JSON array, a table), said with how to convert it; or None."""
    found = sorted(
        f.name
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in (".json", ".csv", ".tsv", ".parquet", ".jsonl")
    )
    if not found:
        return None
    return (
        f"it has {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}: the items go "
        f"in qa.jsonl, one JSON object per line ({CONVERTING})"
    )


# How a user's items in another form become qa.jsonl.
CONVERTING = (
    "a JSON array converts with jq -c '.[]' FILE > qa.jsonl; a CSV table with pandas: "
    "pd.read_csv(FILE).to_json('qa.jsonl', orient='records', lines=True), list fields "
    "written as JSON lists"
)


_AN_ARRAY = (
    "a JSON array, not JSON lines: one object per line is the format "
    "(jq -c '.[]' FILE converts an array)"
)


class _Twice(ValueError):
    """A JSON object naming one field twice (`json.loads` keeps the last in silence)."""


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Twice(key)
        seen[key] = value
    return seen


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line of a JSON-lines file, or one error
    naming the file and line."""
    out: list[tuple[int, dict[str, Any]]] = []
    for n, text in json_lines(read_text(path)):
        try:
            obj = json_value(text, object_pairs_hook=_unique_fields)
        except _Twice as exc:
            raise _fail(
                path, n, f"field {exc.args[0]!r} given twice (JSON keeps the last)"
            ) from None
        except json.JSONDecodeError as exc:
            if not out and text.lstrip().startswith("["):  # an array written over lines
                raise _fail(path, n, _AN_ARRAY) from None
            raise _fail(path, n, f"not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            whole = not out and isinstance(obj, list)  # the whole array on one line
            raise _fail(path, n, _AN_ARRAY if whole else "expected a JSON object")
        try:
            check_text(obj, "the text")
        except UnpactError as exc:
            raise _fail(path, n, str(exc)) from None
        out.append((n, obj))
    return out


def choice_index(answer: Any) -> int | None:
    """A multiple-choice answer given as the correct choice's index: an int (cais/wmdp), or
    as MMLU-style files write it, the index as text ("2") or the choice's letter ("C").
    None for anything else."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    if text.isdecimal():  # not isdigit: "²" is a digit that int() refuses
        return int(text)
    if len(text) == 1 and "A" <= text.upper() <= "Z":
        return ord(text.upper()) - ord("A")
    return None


def keyword_spans(text: str, keyword: str) -> list[tuple[int, int]]:
    """Where `keyword` occurs in `text`, case aside (overlapping occurrences too), as
    offsets in `text` itself: a search in `text.lower()` gives offsets one late after each
    "İ" (U+0130, two characters in lower case) and misses "istanbul" in "İstanbul". Arabic
    and Hebrew vowel marks are optional on either side (`judge.optional_mark`): محمد is
    found in مُحَمَّد (its marks inside the span), where the item was refused; so are
    invisible format characters (the right-to-left mark of copied Arabic, a soft hyphen)."""
    letters = "".join(c for c in keyword if not (optional_mark(c) or invisible(c)))
    if not letters:
        return []
    runs = dict(m.span() for m in _skipped().finditer(text))  # start → end
    kept = _outside(runs, len(text)) if runs else None
    plain = "".join(text[i] for i in kept) if kept is not None else text
    marked = any(takes_marks(c) for c in letters)
    spans = []
    for m in re.finditer(f"(?=({re.escape(letters)}))", plain, re.IGNORECASE):
        start, end = m.start(1), m.end(1)
        if kept is not None:
            start, end = kept[start], kept[end - 1] + 1
        if marked:
            end = runs.get(end, end)  # the last letter's own marks
        spans.append((start, end))
    return spans


def _outside(runs: dict[int, int], size: int) -> list[int]:
    """The offsets of a text of `size` characters outside `runs` (start → end, in order)."""
    kept: list[int] = []
    at = 0
    for start, end in runs.items():
        kept.extend(range(at, start))
        at = end
    kept.extend(range(at, size))
    return kept


@functools.cache
def skippable_class() -> str:
    """The optional marks and invisible characters (as the judge reads them) as a regular
    expression's character class: listed once (0.3 s), when a keyword is first searched for."""
    chars = (chr(c) for c in range(0x110000))
    return "[" + "".join(re.escape(c) for c in chars if optional_mark(c) or invisible(c)) + "]"


@functools.cache
def _skipped() -> re.Pattern[str]:
    """A run of `skippable_class`, compiled. A keyword is searched for in the text with
    these runs taken out (offsets mapped back), so its own pattern is the plain letters:
    with the class between each letter (the pattern before this) reading 20,000 items
    with their own keywords took 235 s against 2.0 s (`benchmarks/reading.py`)."""
    return re.compile(skippable_class() + "+")


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def as_in_question(question: str, keyword: str) -> str:
    """`keyword` as the question writes it, for the KeyTokens are compared with its spans
    in the question: itself, or its other Unicode form where only that occurs (é typed as
    e and U+0301, NFD, in one and as one character, NFC, in the other: the two look the
    same, and the item was refused as "'Café' does not occur in the question"). Raises
    UnpactError when neither occurs."""
    forms = (keyword, _nfc(keyword), unicodedata.normalize("NFD", keyword))
    found = next((k for k in forms if keyword_spans(question, k)), None)
    if found is not None:
        return found
    mixed = _nfc(keyword) in _nfc(question)
    raise UnpactError(
        f"{keyword!r} does not occur in the question"
        + (
            " as written: the two hold its accents in different Unicode forms (a letter "
            "and a combining mark, or one character); save both in one form (NFC)"
            if mixed
            else ""
        )
    )


def _not_a_choice(answer: str, choices: Sequence[str]) -> str:
    """The message for an answer that is none of the choices; one that reads as the
    correct choice's letter or index is told which text it names."""
    said = f"field 'answer' ({answer!r}) is not one of 'choices'"
    meant = choice_index(answer)
    if meant is None or not 0 <= meant < len(choices):
        return said
    return (
        f"{said}: give the correct choice's text (for choice {answer.strip()}, "
        f"{choices[meant]!r}), not its letter or index"
    )


def parse_item(obj: dict[str, Any], path: Path, line: int) -> QAItem:
    """One QA item from its JSON object, or an error naming file, line and field."""
    _no_misspelt_field(obj, ITEM_FIELDS, path, line)
    item_id = _string(obj, "id", path, line, numbers=True)
    question = _string(obj, "question", path, line)
    answer = _string(obj, "answer", path, line, numbers=True)
    split = _split(obj, path, line)
    # optional: no other accepted answers, no KeyToken ground truth, no source document
    aliases = _strings(obj, "aliases", path, line, numbers=True) or ()
    keywords = _strings(obj, "keywords", path, line) or ()
    document = _string(obj, "document", path, line, optional=True, numbers=True)
    choices = _strings(obj, "choices", path, line, numbers=True)
    if choices is not None:
        if len(choices) < 2:
            raise _fail(path, line, "field 'choices' needs at least two options")
        forms = [_nfc(c) for c in choices]  # one choice in two Unicode forms is one choice
        if len(set(forms)) < len(forms):
            twice = next(c for c, f in zip(choices, forms) if forms.count(f) > 1)
            raise _fail(path, line, f"field 'choices' holds {twice!r} twice")
        if answer not in choices:  # the choice it is in another Unicode form: é, e + U+0301
            same = [c for c in choices if _nfc(c) == _nfc(answer)]
            if len(same) != 1:
                raise _fail(path, line, _not_a_choice(answer, choices))
            answer = same[0]
    try:
        keywords = tuple(as_in_question(question, k) for k in keywords)
    except UnpactError as e:
        raise _fail(path, line, f"field 'keywords': {e}") from None
    paraphrased = _string(obj, "paraphrased_answer", path, line, optional=True, numbers=True)
    perturbed = _strings(obj, "perturbed_answers", path, line, numbers=True)
    if perturbed is not None and not perturbed:
        raise _fail(path, line, "field 'perturbed_answers' needs at least one wrong answer")
    if perturbed is not None and _nfc(answer) in map(_nfc, perturbed):
        raise _fail(path, line, f"field 'perturbed_answers' holds the answer {answer!r} itself")
    return QAItem(
        item_id,
        question,
        answer,
        split,
        aliases,
        keywords,
        document,
        choices,
        paraphrased,
        perturbed,
    )


def _unique(seen: dict[str, int], an_id: str, path: Path, line: int) -> str:
    """`an_id`, noted as seen on `line`; one that was seen before is refused."""
    if an_id in seen:
        raise _fail(path, line, f"field 'id': duplicate id {an_id!r} (first on line {seen[an_id]})")
    seen[an_id] = line
    return an_id


def _one_split(
    asked: dict[tuple[str, tuple[str, ...]], tuple[int, str]], item: QAItem, path: Path, line: int
) -> None:
    """Refuse a question (with its choices, for a multiple-choice item) already asked in
    another split: forgetting and keeping (or never teaching) the same question cannot
    both be measured, and each split's figure would count the other's answer. Compared
    in NFC: é typed as e + U+0301 in one is the same question."""
    key = (" ".join(_nfc(item.question).split()), tuple(map(_nfc, item.choices or ())))
    first, split = asked.setdefault(key, (line, item.split))
    if split != item.split:
        raise _fail(
            path,
            line,
            f"field 'split': the question {item.question!r} is also a {split} item (line "
            f"{first}); a question can be in one split only",
        )


def _verbatim(path: Path) -> list[VerbatimPrompt]:
    """The probes of a `verbmem.jsonl` (`id`, `prompt`, `continuation` per line)."""
    out: list[VerbatimPrompt] = []
    seen: dict[str, int] = {}
    for n, obj in read_jsonl(path):
        _no_misspelt_field(obj, PROBE_FIELDS, path, n)
        probe_id = _unique(seen, _string(obj, "id", path, n, numbers=True), path, n)
        out.append(
            VerbatimPrompt(
                probe_id, _string(obj, "prompt", path, n), _string(obj, "continuation", path, n)
            )
        )
    return out


def load_folder(folder: str | Path, name: str | None = None) -> Benchmark:
    """Load and validate a benchmark folder (`qa.jsonl`, optional `documents.jsonl` and
    `verbmem.jsonl`)."""
    folder = Path(folder)
    qa_path = folder / "qa.jsonl"
    if not folder.is_dir():
        if folder.is_file():
            raise UnpactError(f"{folder} is a file, not a benchmark folder")
        raise UnpactError(f"benchmark folder {folder} does not exist")
    if not qa_path.is_file():
        raise UnpactError(f"{folder} has no qa.jsonl (one QA item per line; see docs/data.md)")
    documents: list[Document] = []
    doc_path = folder / "documents.jsonl"
    if doc_path.exists():
        seen_docs: dict[str, int] = {}
        for n, obj in read_jsonl(doc_path):
            _no_misspelt_field(obj, DOCUMENT_FIELDS, doc_path, n)
            doc_id = _unique(seen_docs, _string(obj, "id", doc_path, n, numbers=True), doc_path, n)
            documents.append(
                Document(doc_id, _string(obj, "text", doc_path, n), _split(obj, doc_path, n))
            )
    doc_ids = {d.id for d in documents}
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    asked: dict[tuple[str, tuple[str, ...]], tuple[int, str]] = {}
    for n, obj in read_jsonl(qa_path):
        item = parse_item(obj, qa_path, n)
        _unique(seen, item.id, qa_path, n)
        _one_split(asked, item, qa_path, n)
        if item.document is not None and doc_path.exists() and item.document not in doc_ids:
            raise _fail(
                qa_path,
                n,
                f"field 'document': no document with id {item.document!r} in {doc_path.name}",
            )
        items.append(item)
    if not items:
        raise UnpactError(f"{qa_path} holds no items")
    verbmem = folder / "verbmem.jsonl"
    verbatim = _verbatim(verbmem) if verbmem.exists() else []
    return Benchmark(name or folder.name, items, documents, folder, verbatim)


def write_folder(
    folder: str | Path,
    items: Sequence[QAItem],
    documents: Sequence[Document] = (),
    verbatim: Sequence[VerbatimPrompt] = (),
) -> None:
    """Write a benchmark folder in the item format (stable key order, one object per line)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "qa.jsonl", items)
    if documents:  # the optional files only when they hold something
        _write_jsonl(folder / "documents.jsonl", documents)
    if verbatim:
        _write_jsonl(folder / "verbmem.jsonl", verbatim)


def _write_jsonl(path: Path, rows: Sequence[QAItem | Document | VerbatimPrompt]) -> None:
    path.write_text(
        "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )
