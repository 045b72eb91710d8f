"""unPact: which prompt units carry an answer (SPEC sections 1-3).

For a prompt x (units x_1..x_n of the user's content) and an answer y,
`C_i = LP(x, y) - LP(x \\ x_i, y)` with `LP` the mean teacher-forced answer log-prob.
`x \\ x_i` is, by `baseline`:

- `delete` (default): the unit's tokens are removed; later tokens move up, exactly as if
  the shorter prompt had been written (deletion works on token ids, so no re-tokenisation
  can change the neighbours);
- `token`: each of the unit's tokens is replaced by a baseline token id (Captum's
  convention; default the tokenizer's unk, else pad, token);
- `mask`: the tokens stay in place but no query attends to them (their attention-mask
  columns are zeroed, as a 0 in a Hugging Face 2-D attention mask would).

KeyTokens, focus shift and prompt sensitivity follow SPEC sections 2-3.

The fast path computes all n variants of every prompt without recomputing what they
share: one forward pass over the original prompt + answer gives LP(x, y) and every
layer's keys/values; each variant then runs only the tokens from its first change
onwards on top of that shared prefix (explicit position ids and a 4-D attention mask
make this exact), in batches bounded by a token budget that mix variants of several
prompts, with the LM head applied only at answer positions. `naive_contributions` is the
obvious n + 1 separate forward passes, kept as the reference the fast path is tested and
benchmarked against.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast, get_args

import regex
import torch

from unpact.data.items import keyword_spans
from unpact.errors import UnpactError, check_text, items_named
from unpact.files import json_lines, json_value, read_text
from unpact.types import AnyModel, EncodedPrompt, follow

if TYPE_CHECKING:
    from unpact.models import LanguageModel
from unpact.progress import progress_bar
from unpact.scoring import (
    DEFAULT_TOKEN_BUDGET,
    Continuation,
    check_fits,
    check_model,
    check_numbers,
    check_texts,
    context_logprobs,
    context_refusal,
    generate,
    in_eval_mode,
    pack_continuations,
    score_batch,
    token_budget_batches,
    vocabulary_size,
)

UnitKind = Literal["token", "word"]
Baseline = Literal["delete", "token", "mask"]
Target = Literal["reference", "generated"]
ALPHA = 0.22
BETA = 0.24
# The size guard: token positions scored to attribute one prompt, (units + 1) x (prompt +
# answer tokens). Attribution grows with the square of the prompt: a 512-token prompt is
# ~0.28 M positions and took 241 s on the default model on 2 CPU cores (~1,200 positions/s,
# benchmarks/attribution_memory.py); 2 M is about half an hour there.
MAX_WORK = 2_000_000
POSITIONS_PER_SECOND = 1_200  # the rate above, for the estimate in the refusal
# CJK ideographs, each a word of its own as BERT's BasicTokenizer makes them
# (`_is_chinese_char`): Chinese and Japanese write words without spaces between them, so a
# run of word characters would make a whole clause one unit. Kana and Hangul are not here.
_CJK = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
)
# scripts written without spaces between words, not split into words here (that takes a
# dictionary): Thai, Lao, Myanmar, Khmer. A clause is one run of letters: one word unit
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")
_LETTER = rf"[^\W{_CJK}]"
_WORD = re.compile(rf"[{_CJK}]|{_LETTER}+(?:['’]{_LETTER}+)*|[^\w\s]+")
_JOINED = re.compile(r"(?<=\w)[\u200c\u200d](?=\w)")  # a joiner between word characters


# ---------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """One attribution unit: its text and the input positions (token indices) it covers."""

    text: str
    positions: tuple[int, ...]

    @property
    def span(self) -> tuple[int, int]:
        return self.positions[0], self.positions[-1] + 1


def make_units(lm: AnyModel, prompt: EncodedPrompt, kind: UnitKind = "token") -> list[Unit]:
    """The units of a prompt's user content: one per token, or one per word.

    A word is a run of word characters (with inner apostrophes) or of punctuation, and each
    CJK ideograph is a word of its own (`_CJK`); all subword pieces of a word form one
    unit, and a whitespace-only token joins the word after it. Template and special tokens
    are never units. Tokens that split one character (the byte pieces of a CJK character
    or an emoji in a byte-level vocabulary) form one token unit: half a character is
    nobody's unit, and its text would repeat the character.
    """
    _check_choice("unit", kind, UnitKind)
    ids, lead_offsets = lm.token_offsets(prompt.lead + prompt.text)
    if ids != prompt.content_ids:
        raise UnpactError(
            f"the tokenizer of {lm.spec!r} gives other tokens for the prompt alone than in "
            "the encoded prompt, so units cannot be placed"
        )
    k = len(prompt.lead)  # a lead space is the first word's, not a character of the prompt
    offsets = [(max(a - k, 0), max(b - k, 0)) for a, b in lead_offsets]
    text = prompt.text
    base = prompt.content_start
    if kind == "token":
        return [
            Unit(text=text[a:b], positions=tuple(base + t for t in tokens))
            for tokens, a, b in _whole_characters(offsets)
        ]
    # a combining mark (e + U+0301 = é) is part of its word, as a letter is; so is a
    # zero-width (non-)joiner between letters, inside a Persian word (می‌خواهم) or a
    # Devanagari conjunct: it was a word of its own, a unit with no visible text. Between
    # emoji it stays theirs (a family is one sequence).
    marked = "".join("a" if unicodedata.category(c).startswith("M") else c for c in text)
    marked = _JOINED.sub("a", marked)
    char_word = [-1] * len(text)
    for w, m in enumerate(_WORD.finditer(marked)):
        for c in range(m.start(), m.end()):
            char_word[c] = w
    groups: list[tuple[list[int], set[int]]] = []
    pending: list[int] = []
    for t, (a, b) in enumerate(offsets):
        words = {char_word[c] for c in range(a, b) if char_word[c] >= 0}
        if not words:
            pending.append(t)
        elif groups and not pending and words & groups[-1][1]:
            groups[-1][0].append(t)
            groups[-1][1].update(words)
        else:
            groups.append(([*pending, t], words))
            pending = []
    if pending:
        if groups:
            groups[-1][0].extend(pending)
        else:
            groups.append((pending, set()))
    units = []
    for tokens, _ in groups:
        a, b = offsets[tokens[0]][0], max(offsets[t][1] for t in tokens)
        units.append(
            Unit(text=text[a:b].strip() or text[a:b], positions=tuple(base + t for t in tokens))
        )
    return units


def _whole_characters(offsets: Sequence[tuple[int, int]]) -> list[tuple[list[int], int, int]]:
    """Consecutive tokens grouped so that no character is split between groups: a token
    whose span starts before the end of the previous ones joins them. Each group's tokens
    and character span; a token with an empty span stays alone."""
    groups: list[tuple[list[int], int, int]] = []
    for t, (a, b) in enumerate(offsets):
        if groups and a < groups[-1][2] and a < b:
            tokens, start, end = groups[-1]
            groups[-1] = ([*tokens, t], start, max(end, b))
        else:
            groups.append(([t], a, b))
    return groups


def check_settings(
    unit: str, baseline: str, target: str | None = None, alpha: float = ALPHA, beta: float = BETA
) -> None:
    """Reject unknown unit kinds, baselines and targets, and thresholds outside [0, 1]."""
    check_numbers(alpha=alpha, beta=beta)
    _check_choice("unit", unit, UnitKind)
    _check_choice("baseline", baseline, Baseline)
    if target is not None:
        _check_choice("target", target, Target)
    if not 0 <= beta <= 1 or not 0 <= alpha <= 1:
        raise UnpactError("alpha and beta are fractions between 0 and 1")


def _check_choice(name: str, value: str, options: Any) -> None:
    allowed = get_args(options)
    if value not in allowed:
        raise UnpactError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


# ------------------------------------------------------------------ KeyTokens, focus


def normalized_contributions(contributions: Sequence[float]) -> list[float]:
    """`N_i = C_i / sum of positive C_j` for positive C_i, else 0 (SPEC section 2)."""
    total = sum(c for c in contributions if c > 0)
    return [c / total if c > 0 else 0.0 for c in contributions]


def key_tokens(
    contributions: Sequence[float], alpha: float = ALPHA, beta: float = BETA
) -> list[int]:
    """KeyTokens K (SPEC section 2): all positive units when they are few (|P|/n < beta),
    else those whose normalised contribution exceeds alpha, else the single largest."""
    positive = [i for i, c in enumerate(contributions) if c > 0]
    if not positive:
        return []
    if len(positive) / len(contributions) < beta:
        return positive
    norm = normalized_contributions(contributions)
    chosen = [i for i in positive if norm[i] > alpha]
    return chosen or [max(positive, key=lambda i: contributions[i])]


def keyword_units(prompt: str, unit_texts: Sequence[str], keywords: Sequence[str]) -> list[int]:
    """Indices of the units that overlap an occurrence of a keyword in the prompt (case
    insensitive): the ground truth KeyTokens are compared with. Unit texts are located in
    the prompt in order (token and word units are consecutive slices of it)."""
    spans = [span for k in keywords for span in keyword_spans(prompt, k)]
    hits, pos = [], 0
    for i, text in enumerate(unit_texts):
        core = text.strip()
        at = prompt.find(core, pos) if core else -1
        if at < 0:
            continue
        a, b = at, at + len(core)
        pos = b
        if any(a < e and s < b for s, e in spans):
            hits.append(i)
    return hits


def prompt_sensitivity(contributions: Sequence[float]) -> float:
    """Sum of positive contributions; near zero means the model ignores the prompt."""
    return sum(c for c in contributions if c > 0)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        # Two empty focuses agree; an empty one and a real one do not.
        return 1.0 if na == nb else 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def _same_units(a: Attribution, b: Attribution) -> None:
    if [u.text for u in a.units] != [u.text for u in b.units]:
        raise UnpactError(
            "the two attributions have different units (another prompt, tokenizer or unit "
            "kind); focus shift compares the same prompt before and after"
        )


def keytoken_similarity(a: Attribution, b: Attribution) -> float:
    """Cosine of the two KeyToken indicator vectors (SPEC section 3); 1.0 if both empty."""
    _same_units(a, b)
    n = len(a.units)
    va = [1.0 if i in set(a.key_tokens) else 0.0 for i in range(n)]
    vb = [1.0 if i in set(b.key_tokens) else 0.0 for i in range(n)]
    return _cosine(va, vb)


def contribution_similarity(a: Attribution, b: Attribution) -> float:
    """Cosine of the two vectors of positive normalised contributions (SPEC section 3)."""
    _same_units(a, b)
    return _cosine(a.normalized, b.normalized)


# ------------------------------------------------------------------------ the record


@dataclass
class Attribution:
    """One prompt's unPact attribution. Its JSON field names are a public format."""

    prompt: str
    answer: str
    input_ids: list[int]
    answer_ids: list[int]
    units: list[Unit]
    lp: float
    contributions: list[float]
    unit: str = "token"
    baseline: str = "delete"
    target: str = "reference"
    alpha: float = ALPHA
    beta: float = BETA
    chat_template: bool = True
    model: str = ""
    baseline_token_id: int | None = None
    normalized: list[float] = field(init=False)
    key_tokens: list[int] = field(init=False)
    prompt_sensitivity: float = field(init=False)

    def __post_init__(self) -> None:
        self.normalized = normalized_contributions(self.contributions)
        self.key_tokens = key_tokens(self.contributions, self.alpha, self.beta)
        self.prompt_sensitivity = prompt_sensitivity(self.contributions)

    @property
    def key_token_texts(self) -> list[str]:
        return [self.units[i].text for i in self.key_tokens]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = [{"text": u.text, "positions": list(u.positions)} for u in self.units]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attribution:
        if not isinstance(d, dict):
            kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}
            raise UnpactError(
                "not an unpact attribution record (a JSON object, not "
                f"{kind.get(type(d), 'a number')})"
            )
        try:
            kwargs = {k: d[k] for k in _INIT_FIELDS if k in d}
            kwargs["units"] = [
                Unit(text=u["text"], positions=tuple(u["positions"])) for u in d["units"]
            ]
            for required in ("input_ids", "answer_ids", "lp", "contributions"):
                kwargs[required] = d[required]
            kwargs.setdefault("prompt", "")
            kwargs.setdefault("answer", "")
            return cls(**kwargs)
        except (KeyError, TypeError) as exc:
            raise UnpactError(f"not an unpact attribution record (missing or bad {exc})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        try:
            found = json_value(read_text(Path(path)))
        except json.JSONDecodeError as exc:
            raise UnpactError(f"{path}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(found)

    def _gaps(self) -> list[str]:
        """The prompt's text before each unit that no unit holds (the space between two
        words, none before `?` or between two ideographs), for drawing the units as the
        prompt reads. A record whose units cannot be found in order in its prompt (one
        saved without it) gets a space between words."""
        gaps, at = [], 0
        for u in self.units:
            found = self.prompt.find(u.text, at) if u.text else -1
            if found < 0:
                sep = " " if self.unit == "word" else ""
                return ["", *[sep] * (len(self.units) - 1)]
            gaps.append(self.prompt[at:found])
            at = found + len(u.text)
        return gaps

    def _shade(self, c: float, scale: float) -> tuple[int, int, int]:
        """White to red for positive contributions, white to blue for negative."""
        t = min(1.0, abs(c) / scale) if scale > 0 else 0.0
        fade = round(255 * (1 - 0.75 * t))
        return (255, fade, fade) if c > 0 else (fade, fade, 255)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        scale = max((abs(c) for c in self.contributions), default=0.0)
        keys = set(self.key_tokens)
        heat = Text()
        for i, (u, c, gap) in enumerate(zip(self.units, self.contributions, self._gaps())):
            r, g, b = self._shade(c, scale)
            style = f"black on rgb({r},{g},{b})" + (" bold underline" if i in keys else "")
            heat.append(gap)
            heat.append(u.text, style=style)
        table = Table("#", "unit", "C_i", "normalised", "key", title="Contributions (LOO log-prob)")
        for i, (u, c, nrm) in enumerate(zip(self.units, self.contributions, self.normalized)):
            unit = Text(repr(u.text))  # text, not markup: a unit "[b]" is no style tag
            table.add_row(str(i), unit, f"{c:+.4f}", f"{nrm:.3f}", "*" if i in keys else "")
        summary = Text(
            f"LP(x, y) = {self.lp:.4f}   prompt_sensitivity = {self.prompt_sensitivity:.4f}   "
            f"KeyTokens = {self.key_token_texts}   answer = {self.answer!r}"
        )
        return Group(heat, table, summary)

    def to_html(self) -> str:
        """A self-contained HTML fragment: the prompt's units shaded by contribution."""
        scale = max((abs(c) for c in self.contributions), default=0.0)
        keys = set(self.key_tokens)
        gaps = self._gaps()
        texts = joined_units([u.text for u in self.units], gaps)
        spans = []
        for i, (text, c, gap) in enumerate(zip(texts, self.contributions, gaps)):
            r, g, b = self._shade(c, scale)
            border = "border-bottom:2px solid #000;font-weight:bold;" if i in keys else ""
            spans.append(
                html.escape(gap) + f'<span class="unpact-unit" data-index="{i}" title="C={c:+.4f}" '
                f'style="background:rgb({r},{g},{b});{border}padding:1px 2px;margin:1px;'
                f'border-radius:3px">{html.escape(text)}</span>'
            )
        return (
            '<div class="unpact-attribution" style="font-family:sans-serif;line-height:2">'
            # dir="auto": a prompt in Arabic or Hebrew runs right to left from the right
            f'<div dir="auto" style="white-space:pre-wrap">{"".join(spans)}</div>'
            f'<div style="font-size:smaller">answer: <code><bdi>{html.escape(self.answer)}</bdi></code> '
            f"&middot; LP = {self.lp:.4f} &middot; prompt sensitivity = "
            f"{self.prompt_sensitivity:.4f} &middot; KeyTokens: "
            f"{', '.join(f'<bdi>{html.escape(k)}</bdi>' for k in self.key_token_texts) or '(none)'}"
            "</div></div>"
        )


_JOINS_NEXT = regex.compile(r"[\p{Joining_Type=Dual_Joining}\p{Joining_Type=Join_Causing}]")
_JOINS_PREVIOUS = regex.compile(
    r"[\p{Joining_Type=Dual_Joining}\p{Joining_Type=Right_Joining}\p{Joining_Type=Join_Causing}]"
)
_TRANSPARENT = regex.compile(r"\p{Joining_Type=Transparent}+")


def joined_units(texts: Sequence[str], gaps: Sequence[str]) -> list[str]:
    """The units' texts for their own boxes, with a zero-width joiner (U+200D) on both
    sides of a boundary inside a word of a joining script (Arabic, Syriac, NKo, Mongolian):
    a box each drew every letter of "عاصمة", cut into tokens, in its isolated form. Which
    letters join is Unicode's Joining_Type (ArabicShaping.txt): the letter before the
    boundary joins the next one (dual-joining, as ع; not right-joining, as ا, after which
    a word's next letter starts anew) and the letter after it joins the one before;
    marks between them (harakat) are transparent. The text is otherwise unchanged."""
    out = list(texts)
    for i in range(1, len(out)):
        if gaps[i]:
            continue
        before = _TRANSPARENT.sub("", texts[i - 1])[-1:]
        after = _TRANSPARENT.sub("", texts[i])[:1]
        if before and after and _JOINS_NEXT.match(before) and _JOINS_PREVIOUS.match(after):
            out[i - 1] += "\u200d"
            out[i] = "\u200d" + out[i]
    return out


def html_page(records: Sequence[Attribution], title: str = "unPact attributions") -> str:
    """A self-contained HTML page holding the heatmap fragment of each record."""
    body = "\n".join(
        f"<section><h3>{i}. <bdi>{html.escape(r.prompt)}</bdi></h3>{r.to_html()}</section>"
        for i, r in enumerate(records)
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        '</head><body style="font-family:sans-serif;max-width:60em;margin:auto">'
        f"<h1>{html.escape(title)}</h1><p>Red: the unit raises the answer's log-prob "
        "(positive contribution); blue: it lowers it; bold underlined: KeyTokens.</p>"
        f"{body}</body></html>\n"
    )


def read_prompts(path: str | Path) -> tuple[list[str], list[str | None]]:
    """Prompts and optional answers from a JSONL file: one object per line with `prompt`
    (or `question`, as in the benchmark item format) and optionally `answer`; or, from a
    `.txt` file, one prompt per non-blank line (each answered by the model itself)."""
    from unpact.data.items import read_jsonl

    if Path(path).suffix.lower() == ".txt":
        lines = [text.strip() for _, text in json_lines(read_text(Path(path)))]
        if not lines:
            raise UnpactError(f"{path} holds no prompts")
        return lines, [None] * len(lines)
    prompts: list[str] = []
    answers: list[str | None] = []
    try:
        rows = read_jsonl(Path(path))
    except UnpactError as exc:
        if "not valid JSON" not in str(exc):
            raise
        raise UnpactError(
            f'{exc}; --data is JSON lines ({{"prompt": ..., "answer": ...}} per line), '
            "or plain prompts one per line in a file named .txt"
        ) from None
    for n, obj in rows:
        where = f"{path}, line {n}"
        key = next((k for k in ("prompt", "question") if obj.get(k) is not None), None)
        if key is None:
            has = ", ".join(map(repr, obj)) or "none"
            raise UnpactError(f"{where}: no field 'prompt' (or 'question'); its fields: {has}")
        prompt = obj[key]
        if not isinstance(prompt, str):
            raise UnpactError(f"{where}: field {key!r} must be text, not {prompt!r:.40}")
        if not prompt.strip():
            raise UnpactError(f"{where}: field {key!r} is empty")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise UnpactError(f"{where}: field 'answer' must be text, not {answer!r:.40}")
        prompts.append(prompt)
        answers.append(answer)
    if not prompts:
        raise UnpactError(f"{path} holds no prompts")
    return prompts, answers


def load_records(path: str | Path) -> list[Attribution]:
    """Attribution records from a JSON file (one record, or a list of them) or a JSONL
    file (one per line); a file without any is an error."""
    text = read_text(Path(path))
    if not text.strip():
        raise UnpactError(f"{path} is empty: no attribution records")
    try:
        whole = json_value(text)
    except json.JSONDecodeError:
        pass  # JSONL, read line by line below
    else:
        check_text(whole, str(path))
        many = whole if isinstance(whole, list) else [whole]
        if not many:
            raise UnpactError(f"{path}: an empty list, no attribution records")
        try:
            return [Attribution.from_dict(r) for r in many]
        except UnpactError as exc:
            raise UnpactError(f"{path}: {exc}") from None
    records = []
    for n, line in json_lines(text):
        try:
            found = json_value(line)
            check_text(found, "the text")
            records.append(Attribution.from_dict(found))
        except json.JSONDecodeError as exc:
            raise UnpactError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
        except UnpactError as exc:
            raise UnpactError(f"{path}, line {n}: {exc}") from None
    return records


_INIT_FIELDS = [
    f for f in Attribution.__dataclass_fields__ if Attribution.__dataclass_fields__[f].init
]


# ------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class _Item:
    prompt: EncodedPrompt
    answer_text: str
    answer_ids: tuple[int, ...]
    units: list[Unit]


def _baseline_token(lm: AnyModel, baseline_token_id: int | None) -> int:
    if baseline_token_id is None:
        return lm.default_baseline_token()
    net = cast("LanguageModel", lm).model if lm.has_weights else None
    rows = vocabulary_size(net) if net is not None else None
    if baseline_token_id < 0 or (rows is not None and baseline_token_id >= rows):
        raise UnpactError(
            f"baseline token id {baseline_token_id} is not in the model's vocabulary"
            + (f" (ids 0-{rows - 1})" if rows is not None else "")
        )
    return baseline_token_id


def _variant_row(
    item: _Item, unit: Unit, baseline: Baseline, source: int, baseline_id: int
) -> Continuation:
    """The variant of `item` without `unit`, as a continuation of its shared prefix."""
    x = item.prompt.input_ids
    y = item.answer_ids
    s, e = unit.span
    if baseline == "delete":
        # Run from the first token after the unit; when the unit ends the prompt, start
        # one token earlier so the hidden state that predicts y_1 is computed here too.
        start = s if e < len(x) else max(s - 1, 0)
        return Continuation(source, start, x[start:s] + x[e:] + y, start, len(y))
    if baseline == "token":
        return Continuation(source, s, (baseline_id,) * (e - s) + x[e:] + y, s, len(y))
    return Continuation(source, s, x[s:] + y, s, len(y), hidden=(0, e - s))


def _fast_contributions(
    lm: LanguageModel,
    items: Sequence[_Item],
    baseline: Baseline,
    baseline_id: int,
    token_budget: int,
    advance: Any,
    pack_width: int = 64,
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per item: the answer tokens' log-probs given the whole prompt, and given each
    variant (one tensor per unit). Contributions are differences of their means."""
    model = lm.model
    results: list[tuple[torch.Tensor, list[torch.Tensor]]] = [(torch.zeros(0), [])] * len(items)
    lengths = [len(it.prompt.input_ids) + len(it.answer_ids) for it in items]
    with torch.no_grad():
        for chunk in token_budget_batches(lengths, token_budget):
            lps, context = score_batch(
                model,
                [items[i].prompt.input_ids for i in chunk],
                [items[i].answer_ids for i in chunk],
                "right",
                keep_cache=True,
            )
            keys = [(c, u) for c, i in enumerate(chunk) for u in range(len(items[i].units))]
            variants = [
                _variant_row(items[chunk[c]], items[chunk[c]].units[u], baseline, c, baseline_id)
                for c, u in keys
            ]
            packed = pack_continuations(variants, pack_width)
            # Bound each pass by its query tokens plus a share for the context it reads.
            cost = [
                sum(len(variants[j].ids) for j in row) + max(variants[j].visible for j in row) // 4
                for row in packed
            ]
            variant_lp: dict[tuple[int, int], torch.Tensor] = {}
            for batch in token_budget_batches(cost, token_budget):
                rows = [packed[b] for b in batch]
                out = context_logprobs(model, context, [[variants[j] for j in row] for row in rows])
                for row, lps_row in zip(rows, out):
                    for j, lp in zip(row, lps_row):
                        variant_lp[keys[j]] = lp
            for c, i in enumerate(chunk):
                results[i] = (lps[c], [variant_lp[c, u] for u in range(len(items[i].units))])
            advance(len(chunk))
    return results


def _generated_targets(
    lm: AnyModel,
    encoded: list[EncodedPrompt],
    wanted: list[bool],
    max_new_tokens: int,
    progress: bool,
) -> dict[int, tuple[str, tuple[int, ...]]]:
    """The model's greedy answers (text, ids) for the prompts whose target is generated."""
    todo = [i for i, g in enumerate(wanted) if g]
    if not todo:
        return {}
    with items_named(lambda n: f"item {todo[n]}"):
        gens = generate(
            lm,
            [encoded[i] for i in todo],
            max_new_tokens=max_new_tokens,
            progress="Generating targets" if progress else False,
        )
    out = {}
    for i, g in zip(todo, gens):
        if not g[0].token_ids or (encoded[i].tail and not g[0].text.strip()):
            raise UnpactError(f"item {i}: the model's greedy answer is empty; give an answer")
        out[i] = (g[0].text, g[0].token_ids)
    return out


def _check_work(i: int, item: _Item, max_work: int, unit: UnitKind) -> None:
    """Refuse a prompt whose attribution would score more than `max_work` positions."""
    tokens = len(item.prompt.input_ids) + len(item.answer_ids)
    work = (len(item.units) + 1) * tokens
    if work > max_work:
        minutes = work / POSITIONS_PER_SECOND / 60
        words = "attribute words instead of tokens (fewer units), " if unit == "token" else ""
        raise UnpactError(
            f"item {i}: attributing this prompt scores {len(item.units) + 1} variants of "
            f"{tokens} tokens = {work:,} token positions (about {minutes:.0f} min for the "
            f"default model on 2 CPU cores), over the limit of {max_work:,}; {words}"
            "shorten the prompt, or raise the limit (--max-work, attribution.max_work)"
        )


def _item(
    lm: AnyModel,
    i: int,
    enc: EncodedPrompt,
    generated: tuple[str, tuple[int, ...]] | None,
    answer: str | None,
    unit: UnitKind,
) -> _Item:
    """One prompt's attribution item: its answer ids and units, checked. A generated answer
    is its own ids, unless the prompt it was generated after ends in a space that scored
    answers carry (`EncodedPrompt.tail`): then its text, tokenised to follow the prompt."""
    if generated is not None and not enc.tail:
        answer_text, answer_ids = generated
    else:
        answer_text = generated[0] if generated is not None else (answer or "")
        try:
            enc, answer_ids = follow(lm, enc, answer_text)
        except UnpactError as exc:
            raise UnpactError(f"item {i}: {exc}") from None
    check_fits(i, len(enc.input_ids) + len(answer_ids), lm.max_length)
    units = make_units(lm, enc, unit)
    if len(units) < 2:
        hint = ""
        if unit == "word" and _UNSPACED.search(enc.text):
            hint = (
                " (a script written without spaces between words, as Thai, makes a clause "
                "one word: attribute it by token units)"
            )
        raise UnpactError(
            f"item {i}: the prompt {enc.text!r} is a single {unit}; attribution compares "
            f"units, so it needs at least two{hint}"
        )
    return _Item(enc, answer_text, tuple(answer_ids), units)


def _per_token(
    lm: AnyModel,
    items: Sequence[_Item],
    baseline: Baseline,
    baseline_id: int,
    token_budget: int,
    progress: bool,
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    if not lm.has_weights:  # a served model (unpact.remote)
        why = f"a served model ({lm.spec}) cannot be handed"
        return _whole_prompts(lm, items, baseline, baseline_id, progress, why)
    local = cast("LanguageModel", lm)  # has_weights: the local backend
    # a model that cannot continue a shared context under explicit masks at an item's
    # length (ALiBi, a sliding window shorter than the item) scores whole variants
    reasons = [
        context_refusal(local.model, len(it.prompt.input_ids) + len(it.answer_ids)) for it in items
    ]
    fast = [i for i, why in enumerate(reasons) if why is None]
    slow = [i for i, why in enumerate(reasons) if why is not None]
    out: list[tuple[torch.Tensor, list[torch.Tensor]]] = [(torch.zeros(0), [])] * len(items)
    if slow:  # first: it refuses the 'mask' baseline before any work
        why = f"this model cannot take (item {slow[0]}: {reasons[slow[0]]})"
        done = _whole_prompts(lm, [items[i] for i in slow], baseline, baseline_id, progress, why)
        for i, result in zip(slow, done):
            out[i] = result
    if fast:
        with progress_bar("Attributing", total=len(fast), enabled=progress) as advance:
            done = _fast_contributions(
                local, [items[i] for i in fast], baseline, baseline_id, token_budget, advance
            )
        for i, result in zip(fast, done):
            out[i] = result
    return out


@dataclass(frozen=True)
class TokenContributions:
    """unPact per answer token: `logprobs[k] = log p(y_k | x, y_<k)` and
    `by_unit[i][k] = logprobs[k] - log p(y_k | x \\ x_i, y_<k)`, so that the unit's
    contribution `C_i` is the mean of `by_unit[i]` over k (SPEC section 1)."""

    units: list[Unit]
    logprobs: list[float]
    by_unit: list[list[float]]

    @property
    def contributions(self) -> list[float]:
        return [sum(row) / len(row) for row in self.by_unit]


@in_eval_mode
def token_contributions(
    lm: AnyModel,
    prompts: Sequence[EncodedPrompt],
    answer_ids: Sequence[Sequence[int]],
    *,
    unit: UnitKind = "token",
    baseline: Baseline = "delete",
    baseline_token_id: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: bool = False,
) -> list[TokenContributions]:
    """Each prompt unit's contribution to each answer token's log-prob, for encoded
    prompts and answer token ids (the same computation as `attribute_many`, before the
    mean over answer tokens). KeyToken-weighted unlearning weighs answer tokens by it."""
    check_settings(unit, baseline)
    b_id = _baseline_token(lm, baseline_token_id) if baseline == "token" else 0
    items = []
    for i, (enc, ans) in enumerate(zip(prompts, answer_ids, strict=True)):
        units = make_units(lm, enc, unit)
        if not units:
            raise UnpactError(f"item {i}: the prompt has no content to attribute")
        items.append(_Item(enc, "", tuple(ans), units))
    per_token = _per_token(lm, items, baseline, b_id, token_budget, progress)
    return [
        TokenContributions(
            units=it.units,
            logprobs=full.tolist(),
            by_unit=[(full - v).tolist() for v in variants],
        )
        for it, (full, variants) in zip(items, per_token)
    ]


def _refuse_mask(why: str) -> NoReturn:
    """The 'mask' baseline needs an explicit attention mask, which `why` says cannot be
    given (a served model, a sliding window the prompt reaches, ALiBi)."""
    raise UnpactError(
        f"baseline 'mask' hides tokens from attention with an explicit mask, which {why}; "
        "use 'delete' or 'token'"
    )


def _whole_prompts(
    lm: AnyModel,
    items: Sequence[_Item],
    baseline: Baseline,
    baseline_id: int,
    progress: bool,
    why: str,
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Contributions with every variant scored as a whole prompt of token ids, all in one
    `answer_logprobs` call: for a served model (a server cannot be handed shared
    keys/values) and a local one that cannot continue a shared context (`why`). The
    'mask' baseline needs an explicit attention mask, which `why` says cannot be given."""
    if baseline == "mask":
        _refuse_mask(why)
    prompts: list[tuple[int, ...]] = []
    answers: list[tuple[int, ...]] = []
    for it in items:
        x = it.prompt.input_ids
        prompts.append(x)
        for unit in it.units:
            s, e = unit.span
            fill = (baseline_id,) * (e - s) if baseline == "token" else ()
            prompts.append(x[:s] + fill + x[e:])
        answers.extend([it.answer_ids] * (len(it.units) + 1))
    lps = lm.answer_logprobs(prompts, answers, progress="Attributing" if progress else False)
    out, k = [], 0
    for it in items:
        out.append((lps[k], list(lps[k + 1 : k + 1 + len(it.units)])))
        k += len(it.units) + 1
    return out


@in_eval_mode
def naive_contributions(
    lm: LanguageModel,
    prompt: EncodedPrompt,
    answer_ids: Sequence[int],
    units: Sequence[Unit],
    baseline: Baseline = "delete",
    baseline_token_id: int | None = None,
) -> tuple[float, list[float]]:
    """The obvious computation: LP(x, y) and each LP(x \\ x_i, y) by its own forward pass.

    The reference the fast path must match; also what most tools do (slowly)."""
    model = lm.model
    y = list(answer_ids)
    b_id = _baseline_token(lm, baseline_token_id)

    def lp_of(ids: list[int], hidden: range = range(0)) -> float:
        n = len(ids)
        inp = torch.tensor([ids + y], device=lm.device)
        # every token read, stated: transformers warns of padding at a pad id in the input
        # (a replacement token that is the pad, as GPT-2's EOS)
        kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(inp)}
        if hidden:
            total = n + len(y)
            allow = torch.tril(torch.ones(total, total, dtype=torch.bool))
            allow[:, list(hidden)] = False
            for q in range(total):
                if not allow[q].any():
                    allow[q, q] = True
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(1, 1, total, total, dtype=dtype)
            mask.masked_fill_(~allow, torch.finfo(dtype).min)
            kwargs["attention_mask"] = mask.to(lm.device)
            # positions stated, not derived from the mask (OPT counts them from a 2-D one)
            kwargs["position_ids"] = torch.arange(total, device=lm.device)[None]
        logits = model(input_ids=inp, **kwargs).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        return float(torch.stack([logp[n - 1 + k, t] for k, t in enumerate(y)]).mean())

    x = list(prompt.input_ids)
    if baseline == "mask" and (why := context_refusal(model, len(x) + len(y))):
        _refuse_mask(f"this model cannot take ({why})")
    with torch.no_grad():
        full = lp_of(x)
        contributions = []
        for unit in units:
            s, e = unit.span
            if baseline == "delete":
                lp = lp_of(x[:s] + x[e:])
            elif baseline == "token":
                lp = lp_of(x[:s] + [b_id] * (e - s) + x[e:])
            else:
                lp = lp_of(x, hidden=range(s, e))
            contributions.append(full - lp)
    return full, contributions


# ----------------------------------------------------------------------- public API


@in_eval_mode
def attribute_many(
    lm: AnyModel,
    prompts: Sequence[str],
    answers: Sequence[str | None] | None = None,
    *,
    unit: UnitKind = "token",
    baseline: Baseline = "delete",
    target: Target | None = None,
    chat_template: bool | None = None,
    alpha: float = ALPHA,
    beta: float = BETA,
    baseline_token_id: int | None = None,
    max_new_tokens: int = 32,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: bool = False,
    max_work: int | None = MAX_WORK,
) -> list[Attribution]:
    """Attribute many prompts at once, batching variants across prompts.

    `target="reference"` attributes the given answers; `"generated"` the model's own
    greedy answers. By default the target is the reference where an answer is given.
    A prompt whose attribution would score more than `max_work` token positions is refused
    before any work, with the estimate (None: no limit).
    """
    check_model(lm)
    check_settings(unit, baseline, target, alpha, beta)
    check_texts(prompts, answers, open_answers=True)
    given = {"baseline_token_id": baseline_token_id, "max_work": max_work}
    check_numbers(
        max_new_tokens=max_new_tokens,
        token_budget=token_budget,
        **{name: value for name, value in given.items() if value is not None},
    )
    answer_list = list(answers) if answers is not None else [None] * len(prompts)
    if target == "reference" and any(a is None for a in answer_list):
        missing = next(i for i, a in enumerate(answer_list) if a is None)
        raise UnpactError(f"item {missing}: target 'reference' needs an answer")

    encoded = []
    for i, p in enumerate(prompts):
        try:
            encoded.append(lm.encode_prompt(p, chat_template))
        except UnpactError as exc:
            raise UnpactError(f"item {i}: {exc}") from None
    wants_generated = [target == "generated" or a is None for a in answer_list]
    generated = _generated_targets(lm, encoded, wants_generated, max_new_tokens, progress)
    items = [
        _item(lm, i, enc, generated.get(i), answer_list[i], unit) for i, enc in enumerate(encoded)
    ]
    if max_work is not None:
        for i, it in enumerate(items):
            _check_work(i, it, max_work, unit)
    b_id = _baseline_token(lm, baseline_token_id) if baseline == "token" else 0
    per_token = _per_token(lm, items, baseline, b_id, token_budget, progress)
    scored = []
    for full_lps, variant_lps in per_token:
        full = float(full_lps.mean())
        scored.append((full, [full - float(v.mean()) for v in variant_lps]))
    return [
        Attribution(
            prompt=it.prompt.text,
            answer=it.answer_text,
            input_ids=list(it.prompt.input_ids),
            answer_ids=list(it.answer_ids),
            units=it.units,
            lp=lp,
            contributions=contributions,
            unit=unit,
            baseline=baseline,
            target="generated" if wants_generated[i] else "reference",
            alpha=alpha,
            beta=beta,
            chat_template=it.prompt.chat_template,
            model=lm.spec,
            baseline_token_id=b_id if baseline == "token" else None,
        )
        for i, (it, (lp, contributions)) in enumerate(zip(items, scored))
    ]


@in_eval_mode
def attribute(
    lm: AnyModel,
    prompt: str,
    answer: str | None = None,
    *,
    unit: UnitKind = "token",
    baseline: Baseline = "delete",
    target: Target | None = None,
    chat_template: bool | None = None,
    alpha: float = ALPHA,
    beta: float = BETA,
    baseline_token_id: int | None = None,
    max_new_tokens: int = 32,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> Attribution:
    """unPact attribution of one answer to the units of one prompt (SPEC sections 1-2).

    Without `answer` (or with `target="generated"`) the model's own greedy answer is the
    target. See `attribute_many` for the options.
    """
    (result,) = attribute_many(
        lm,
        [prompt],
        [answer],
        unit=unit,
        baseline=baseline,
        target=target,
        chat_template=chat_template,
        alpha=alpha,
        beta=beta,
        baseline_token_id=baseline_token_id,
        max_new_tokens=max_new_tokens,
        token_budget=token_budget,
    )
    return result
