"""The types every layer shares, and the one interface both kinds of model implement.

`Backend` is what scoring, generation, judging and attribution ask of a model: encode a
prompt and an answer, score answer token ids, generate, and a few tokenizer facts. The
local backend (`unpact.models.LanguageModel`, transformers weights) and the served one
(`unpact.remote.RemoteModel`, an OpenAI-compatible server such as vLLM) implement it;
`has_weights` says whether the weights are here (gradients, training, the fast attribution
kernel) or only log-probs and generations can be asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import string
import types
import typing
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, Protocol, TypeAlias, runtime_checkable

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

REMOTE_PREFIX = "openai:"
# Rendered into every chat template (a template that does not read a variable ignores it):
# - `date_string`: a template that prints the date (Llama 3.1 to 3.3: "Today Date: ..."
#   from transformers' strftime_now) would otherwise give other prompt tokens, and other
#   numbers, every day. This is the date those templates fall back on; open-unlearning
#   fixes one likewise (`date_string` in its model configs).
# - `enable_thinking`: False, so a hybrid reasoning model (Qwen3, SmolLM3) answers at once
#   instead of spending the judge's few tokens on a <think> block (the answer would be
#   judged wrong, i.e. "forgotten").
CHAT_TEMPLATE_KWARGS = {"date_string": "26 Jul 2024", "enable_thinking": False}

# A seed every generator takes: Python's, NumPy's (below 2**32) and torch's. A negative or
# larger one used to pass validation and fail as a traceback when training began.
Seed: TypeAlias = Annotated[int, Field(ge=0, lt=2**32)]


def plain_values(value: Any) -> Any:
    """`value` with every path (`os.PathLike`) in it, at any depth, as its text, and every
    array value (a numpy or torch number, a numpy array) as Python numbers or lists: what
    the config file would hold. A config built in Python holds them, and `np.int64(3)` in
    a free mapping (a method's settings) could not be written to config.yaml ("Unable to
    serialize unknown type")."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    value = plain_scalar(value)
    if getattr(value, "ndim", 0) and callable(getattr(value, "tolist", None)):
        return value.tolist()  # an array: its numbers, as lists
    return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a field's annotation admits at its top level: `int | None` and
    `Annotated[int, ...]` give int (and NoneType); a Literal gives its values' types."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    return {annotation}


class SettingsModel(BaseModel):
    """Base of every settings model a config holds: an unknown key is an error, and so is
    NaN or infinity, or true/false given for a number. Pydantic's lax mode reads `true` as
    1, so `epochs: yes` (YAML's true) or `forget_items: true` ran as 1 without a word."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in leaves and Any not in leaves and leaves & {int, float}:
                raise ValueError(f"expects a number, not {str(value).lower()}")
        return value


def describe_errors(
    error: ValidationError, prefix: str = "", unknown: str = "unknown setting"
) -> str:
    """Pydantic's errors as `key.path: problem; ...` (an extra key is `unknown`), the
    first MOST_ERRORS of them: a config of 3000 unknown keys was a 60 kB message."""
    lines = []
    errors = error.errors()
    for e in errors[:MOST_ERRORS]:
        loc = ".".join(str(x) for x in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        msg = unknown if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)  # a check of the whole: no key
    if len(errors) > MOST_ERRORS:
        lines.append(f"and {len(errors) - MOST_ERRORS} more")
    return "; ".join(lines)


MOST_ERRORS = 10


def unknown_keys(model: type[BaseModel], data: dict[str, Any]) -> list[str]:
    """The keys of `data` that `model` would drop without a word: a plugin's settings
    deriving from pydantic's `BaseModel` ignore an unknown key (a typo) unless their
    config says what to do with one; `SettingsModel`'s refuse it themselves."""
    if model.model_config.get("extra") is not None:
        return []
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return sorted(str(k) for k in data if k not in known)


class PlainInput(SettingsModel):
    """A settings model that takes what Python code holds (paths, numpy and torch numbers),
    at any depth of its input, as the config file's text and numbers (`plain_values`)."""

    @model_validator(mode="before")
    @classmethod
    def _plain_input(cls, data: Any) -> Any:
        return plain_values(data) if isinstance(data, dict) else data


def fills(
    *fields: str, required: tuple[str, ...] = (), one_of: tuple[str, ...] = ()
) -> AfterValidator:
    """Checks a text setting that `str.format` fills with the named `fields` (with none,
    one `{}`): `Annotated[str, fills("question")]`. Checked when the config loads, so that
    a typo (`{promt}`, a lone `{`, `{0}`, `{prompt.upper}`) is a config error naming the
    setting, not a KeyError when the first item is asked, after the unlearning. The
    `required` fields must appear (an LLM judge's prompt without `{output}` would have it
    judge an answer it is never shown), and at least one of `one_of` (a paraphrase that
    names neither the question nor its keywords asks every item the same thing)."""
    allowed = fields or ("", "0")
    shown = ", ".join("{" + f + "}" for f in fields) if fields else "one {}"

    def check(text: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc} (write a brace as {{{{ or }}}})") from None
        for name in names:
            if name not in allowed:
                raise ValueError(f"{text!r}: {{{name}}} is not filled in here; use {shown}")
        try:
            text.format(*(() if fields else ("x",)), **dict.fromkeys(fields, "x"))
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"{text!r}: {exc}; use {shown}") from None
        for name in required:
            if name not in names:
                raise ValueError(f"{text!r} has no {{{name}}}; put it where it goes")
        if one_of and not set(one_of) & set(names):
            listed = " nor ".join("{" + f + "}" for f in one_of)
            raise ValueError(f"{text!r} has neither {listed}; put one in")
        return text

    return AfterValidator(check)


_SAID: set[Hashable] = set()


def _first_time(said: Hashable) -> bool:
    """Whether a warning keyed `said` is new in this process (None: always new)."""
    if said is None:
        return True
    if said in _SAID:
        return False
    _SAID.add(said)
    return True


def plain_scalar(value: Any) -> Any:
    """A 0-d numpy or torch value as the Python scalar it holds; anything else as it is."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


# Two ordinary texts, whose first word every English vocabulary holds with a space before
# it: whether a template's text before the message (or its generation prompt, before the
# answer) ends in a space that the message's (the answer's) own first token carries is
# decided on them (local and served alike).
BOUNDARY_PROBES = ("the capital of France?", "the river bank.")


def joined_space(ids: Callable[[str], tuple[int, ...]], text: str) -> tuple[str, str]:
    """The template's text before the message (or its generation prompt, before the
    answer), and the lead that goes with what follows: where that text ends in a space
    the tokenizer (`ids`) gives to the next word, the space leaves the template's text.
    SentencePiece (Llama 2's, Mistral's `[INST] `, open-unlearning's `Answer: `) writes
    a text alone with a leading `▁` that stands for it (no lead); byte-level BPE
    (GPT-2's, Llama 3's `Question: `) joins it to the word as `ĠWhat`, so the message
    (the answer) is tokenised with a lead space (a message's units are still the
    prompt's own characters). Either way the whole is the template's own tokenisation
    of the two joined, checked on two ordinary texts; kept as it is where neither holds
    (said by `warn_if_split_differs` for the message's side). `models.LanguageModel`
    decides with its tokenizer, `remote.RemoteModel` with the server's."""
    short = text.removesuffix(" ")
    if short == text:
        return text, ""
    whole = [ids(text + q) for q in BOUNDARY_PROBES]
    for head, lead in ((text, ""), (short, ""), (short, " ")):
        start = ids(head)
        if all(start + ids(lead + q) == w for q, w in zip(BOUNDARY_PROBES, whole)):
            return head, lead
    return text, ""


def warn_if_split_differs(
    spec: str,
    prompt: str,
    assembled: Sequence[int],
    templated: Sequence[int],
    said: Hashable = None,
) -> bool:
    """Say (as a logged warning) when the chat template's own tokenisation of a prompt
    differs from unpact's prefix + content + suffix: a template that glues the prompt
    to a word (spaces before it go with its first token: `_joined_space`) merges the
    pieces at the boundary otherwise. unpact scores its own
    split (the content tokenised alone, so the units are the prompt's own tokens); the
    model behind a chat API would see the other. Said once per `said` key in a process
    (the tokenizer and its template, which every model a run derives from one base
    shares), or once per model without one. Returns whether it differs."""
    if tuple(assembled) == tuple(templated):
        return False
    if not _first_time(("split", said) if said is not None else None):
        return True
    first = next(
        (n for n, (a, b) in enumerate(zip(assembled, templated)) if a != b),
        min(len(assembled), len(templated)),
    )
    logging.getLogger("unpact").warning(
        "%s: the chat template tokenises %r differently at a boundary (first difference "
        "at token %d; %d tokens against %d): unpact scores the template's parts and the "
        "prompt tokenised apart, so the prompt's units are its own tokens, and the model "
        "behind a chat API sees the other tokenisation; compare with --no-chat-template, "
        "and in a template of your own put a space or a newline before the message (said "
        "once for the models that share this tokenizer and template)",
        spec,
        prompt[:60],
        first,
        len(assembled),
        len(templated),
    )
    return True


def warn_if_template_thinks(spec: str, suffix: str, said: Hashable = None) -> None:
    """Say once (per `said` key, or per call without one) when a chat template ends its
    generation prompt inside a `<think>` block (DeepSeek-R1's distilled models, and any
    model that reasons whatever `enable_thinking` says): the answer comes after the
    reasoning, so a judge reading a few dozen tokens may never see it and call every
    fact forgotten."""
    if not suffix.rstrip().endswith("<think>"):
        return
    if not _first_time(("thinks", said) if said is not None else None):
        return
    logging.getLogger("unpact").warning(
        "%s: its chat template opens a <think> block for every answer, so the model "
        "reasons before it answers and a judge reading judge.max_new_tokens tokens (32 by "
        "default) may see no answer at all: every fact would read as forgotten. Raise "
        "judge.max_new_tokens to cover the reasoning, or give a chat template whose "
        "generation prompt closes the block (ending in <think>\n\n</think>\n\n: "
        "--chat-template FILE, docs/audit.md)",
        spec,
    )


def short_repr(value: object, most: int = 60) -> str:
    """`repr(value)` cut to `most` characters: a message naming a wrong argument stays one
    line when the argument is a model (whose repr lists every layer)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= most else text[: most - 3] + "..."


def check_chat_flag(chat_template: object) -> None:
    """`chat_template` of a prompt is True, False or None (the model's own template, raw
    text, or the template where the model has one). A text was read as true: `"no"` asked
    in the template, and a template file's name used the model's own template, unsaid."""
    if chat_template is None or isinstance(chat_template, bool):
        return
    hint = (
        "; a template file goes with the model: load_model(with_chat_template(spec, FILE))"
        if isinstance(chat_template, (str, os.PathLike))
        else ""
    )
    raise TypeError(
        f"chat_template is True, False or None, not {type(chat_template).__name__} "
        f"{short_repr(chat_template)}{hint}"
    )


def spec_text(spec: object) -> str:
    """A model spec as text: a string, or a path (`pathlib.Path`, any `os.PathLike`)."""
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if not isinstance(spec, str):
        # a model in memory (a LanguageModel, a transformers model): said how to give it
        held = hasattr(spec, "save_pretrained") or hasattr(spec, "tokenizer")
        hint = (
            "; a model in memory is saved first, then its folder given: "
            "unpact.models.save_model(model, tokenizer, folder)"
            if held
            else ""
        )
        raise TypeError(
            f"a model spec is a string or a path ('default', a folder, a .gguf file, a hub "
            f"id, openai:MODEL@URL), not {type(spec).__name__} {short_repr(spec)}{hint}"
        )
    return spec


def is_remote_spec(spec: str) -> bool:
    """Whether a model spec names a served model (`openai:MODEL@BASE_URL`)."""
    return spec.startswith(REMOTE_PREFIX)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as fed to the model.

    `input_ids` is the whole input (template and special tokens included); the user's
    content is `input_ids[content_start:content_end]`: the tokens of `lead + text`. Only
    those positions are ever attribution units. `lead` is the chat template's last space
    where a byte-level BPE joins it to the prompt's first word (`Question: What` is
    `Question`, `:`, `ĠWhat`); usually empty. `answer_lead` is the same on the answer's
    side: where the generation prompt ends in a space (`Answer: `), `input_ids` end
    before it, and an answer that follows this prompt is tokenised with it in front
    (`Backend.encode_answer(answer, prompt)`), as the template's own text tokenises the
    two joined: what is scored, attributed and trained on. `tail` is that space's token,
    which generation feeds as the template's own tokenisation of the prompt has it
    (`generation_ids`: what a chat API, MUSE's and open-unlearning's generation feed).
    """

    input_ids: tuple[int, ...]
    content_start: int
    content_end: int
    text: str
    chat_template: bool
    lead: str = ""
    answer_lead: str = ""
    tail: tuple[int, ...] = ()

    @property
    def generation_ids(self) -> tuple[int, ...]:
        """The prompt a greedy or sampled answer is generated from: the template's own
        tokens, the generation prompt's last space included."""
        return self.input_ids + self.tail

    def answer_text(self, answer: str) -> str:
        """The text an answer is tokenised as after this prompt: `answer_lead` in front,
        standing for the spaces the answer opens with, if any (a generated ` Paris` after
        DeepSeek's `Assistant:` is `Paris` with its space: `ĠParis`, not `Ġ`, `ĠParis`)."""
        return self.answer_lead + answer.lstrip(" ") if self.answer_lead else answer

    @property
    def content_positions(self) -> range:
        return range(self.content_start, self.content_end)

    @property
    def content_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.content_start : self.content_end]


class TemplateSplit(NamedTuple):
    """A chat template's tokens around the user's message, as a backend uses them.

    `prefix` and `suffix` are the tokens before and after the message; `lead` and
    `answer_lead` the spaces the message's and the answer's first words carry (see
    `EncodedPrompt`); `generation` is the template's own generation prompt, which `suffix`
    shortens by that last space (the prompt generation feeds, and the tokenisation the
    boundary check compares with)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    lead: str = ""
    answer_lead: str = ""
    generation: tuple[int, ...] = ()
    lead_ids: tuple[int, ...] = ()  # the lead tokenised alone

    @property
    def tail(self) -> tuple[int, ...]:
        """The generation prompt's tokens after `suffix` (its last space, or none)."""
        return self.generation[len(self.suffix) :]

    def around(
        self, text: str, chat_template: bool, ids: Callable[[str], tuple[int, ...]]
    ) -> EncodedPrompt:
        """The prompt `text` between `prefix` and `suffix`, its content (`lead + text`)
        tokenised on its own (`ids`). Where the lead stays a token of its own before this
        text (a prompt that opens with a digit, `Ġ` then `1`, on a tokenizer that splits
        digits), that token is the template's space, not a unit of the prompt: it joins
        the prefix (the same ids)."""
        prefix, content, lead = self.prefix, ids(self.lead + text), self.lead
        alone = lead and len(self.lead_ids) == 1 and content[:1] == self.lead_ids
        if alone and content[1:] == ids(text):
            prefix, content, lead = prefix + content[:1], content[1:], ""
        return EncodedPrompt(
            input_ids=prefix + content + self.suffix,
            content_start=len(prefix),
            content_end=len(prefix) + len(content),
            text=text,
            chat_template=chat_template,
            lead=lead,
            answer_lead=self.answer_lead,
            tail=self.tail,
        )


def raw_prefix(with_special: Sequence[int], plain: Sequence[int]) -> tuple[int, ...]:
    """The special tokens a tokenizer puts before text (e.g. BOS), from a short text's ids
    with and without special tokens; none after: an end-of-sequence marker after a prompt
    would tell a causal LM to stop."""
    for start in range(len(with_special) - len(plain) + 1):
        if tuple(with_special[start : start + len(plain)]) == tuple(plain):
            return tuple(with_special[:start])
    return ()


@runtime_checkable
class Backend(Protocol):
    """A language model as unpact's algorithms use it (local or served)."""

    spec: str

    @property
    def has_weights(self) -> bool: ...

    @property
    def max_length(self) -> int: ...

    @property
    def has_chat_template(self) -> bool: ...

    def encode_prompt(self, prompt: str, chat_template: bool | None = None) -> EncodedPrompt: ...

    def encode_answer(
        self, answer: str, prompt: EncodedPrompt | None = None
    ) -> tuple[int, ...]: ...

    def answer_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        progress: bool | str = False,
        token_budget: int | None = None,
    ) -> list[torch.Tensor]: ...

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        num_samples: int,
        temperature: float,
        seed: int,
        progress: bool | str = False,
        batch_size: int = 16,
    ) -> list[list[tuple[str, tuple[int, ...]]]]: ...

    def token_texts(self, ids: Sequence[int]) -> list[str]: ...

    def token_offsets(self, text: str) -> tuple[tuple[int, ...], list[tuple[int, int]]]: ...

    def default_baseline_token(self) -> int: ...

    def tokenize(self, text: str, add_special_tokens: bool = False) -> tuple[int, ...]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def special_prefix(self) -> tuple[int, ...]: ...


AnyModel: TypeAlias = Backend  # the name the rest of the code has always used


def follow(
    lm: Backend, prompt: EncodedPrompt, answer: str
) -> tuple[EncodedPrompt, tuple[int, ...]]:
    """The prompt an answer is scored after, and the answer's ids tokenised to follow it
    (`Backend.encode_answer(answer, prompt)`). Where the generation prompt's last space stays
    a token of its own before the answer's first word (a year after `Answer: `: `Ġ` or `▁`,
    then `1`, ... on tokenizers that split digits), that token is the prompt's, as in the
    template's own generation prompt (`EncodedPrompt.generation_ids`), and the answer is
    its own tokens: its log-prob is not counted in the answer's (open-unlearning's labels
    leave it out likewise)."""
    ids = lm.encode_answer(answer, prompt)
    if prompt.tail and len(ids) > 1 and ids[:1] == prompt.tail:
        whole = dataclasses.replace(prompt, input_ids=prompt.generation_ids, tail=())
        return whole, ids[1:]
    return prompt, ids


def pair_ids(lm: Backend, prompt: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A question asked in the model's default way (its chat template, if any) and an answer
    tokenised to follow it (`follow`): the ids that score, train on or attribute the pair."""
    encoded, ids = follow(lm, lm.encode_prompt(prompt), answer)
    return encoded.input_ids, ids
