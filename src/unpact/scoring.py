"""The one hot path: batched teacher-forced log-probs of answers given prompts; and generation.

`answer_logprobs` is what attribution, judging, NPO's reference terms and multiple-choice
scoring all call. It packs (prompt, answer) pairs into batches bounded by a token budget
(batch rows x padded length), runs the transformer body once per batch, and applies the
LM head only to the hidden states that predict an answer token: for short answers after
long prompts that is most of the head's cost saved (49k-way vocabulary on SmolLM2).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import numbers
import os
import re
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import torch

from unpact.errors import NotForThisModel, UnpactError, items_named, out_of_memory
from unpact.progress import progress_bar
from unpact.types import AnyModel, EncodedPrompt, follow

if TYPE_CHECKING:
    from unpact.models import LanguageModel

DEFAULT_TOKEN_BUDGET = 4096
PaddingSide = Literal["left", "right"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """`model` (a torch module, or an unpact model around one) in eval mode for the
    duration, each module's own mode put back after. A model handed in while it trains
    (`model.train()`, or built with `from_config`: GPT-2's and OPT's dropout on, a LoRA
    adapter's) gave other scores, generations and attributions on every call. A served
    model is left alone."""
    # a torch module as it is (a transformers model's own `.model` is only its body)
    net = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    modules = net.modules() if isinstance(net, torch.nn.Module) else ()
    training = [m for m in modules if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def in_eval_mode(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn` run with its model (the first argument, or `lm=`/`model=`) `evaluating`."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        model = args[0] if args else kwargs.get("lm", kwargs.get("model"))
        with evaluating(model):
            return fn(*args, **kwargs)

    return run


def answer_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    padding_side: PaddingSide = "right",
    max_length: int | None = None,
    grad: bool = False,
    share_prefix: bool = True,
    progress: bool | str = False,
) -> list[torch.Tensor]:
    """Per-token log-probs of each answer given its prompt, under teacher forcing.

    `prompts[i]` and `answers[i]` are token ids; the result's item i is a float32 tensor
    of `len(answers[i])` values, `log p(y_k | x, y_<k)`. Batches hold at most
    `token_budget` padded tokens (one longer pair runs alone). `padding_side` only changes
    the layout, not the numbers (positions are taken from the attention mask). With
    `grad=True` the result keeps the autograd graph (for training losses).

    When the prompts of a batch share a prefix of `MIN_SHARED_PREFIX` tokens or more (a
    chat template's system turn, typically), the prefix runs once and every pair
    continues from its keys/values (`share_prefix`, default on; gradients flow through
    the shared prefix as through separate copies).

    `model` is a transformers model, or unpact's `LanguageModel` (its `.model` is used).
    """
    model = _torch_model(model, "answer_logprobs")
    check_numbers(
        token_budget=token_budget, **({} if max_length is None else {"max_length": max_length})
    )
    limit = max_length or int(getattr(text_config(model), "max_position_embeddings", 0) or 1 << 30)
    prompts, answers = check_pairs(prompts, answers, limit, vocabulary_size(model))
    results: list[torch.Tensor | None] = [None] * len(prompts)
    batches = list(
        token_budget_batches([len(p) + len(a) for p, a in zip(prompts, answers)], token_budget)
    )
    label = progress if isinstance(progress, str) else "Scoring"
    with (
        torch.set_grad_enabled(grad),
        # a training loss (grad) keeps the model's mode: dropout is the loop's to choose
        nullcontext() if grad else evaluating(model),
        progress_bar(label, total=len(prompts), enabled=bool(progress)) as advance,
    ):
        for batch in batches:
            batch_prompts = [prompts[i] for i in batch]
            batch_answers = [answers[i] for i in batch]
            shared = _usable_prefix(model, batch_prompts, batch_answers, share_prefix)
            if shared:
                out = _score_shared_prefix(model, batch_prompts, batch_answers, shared)
            else:
                out = score_batch(model, batch_prompts, batch_answers, padding_side)
            if not grad:
                check_not_nan(model, batch, out)
            for i, lp in zip(batch, out):
                results[i] = lp
            advance(len(batch))
    return [r for r in results if r is not None]


def check_not_nan(model: Any, places: Sequence[int], values: Sequence[torch.Tensor]) -> None:
    """Log-probs that are NaN (a model whose activations overflow its dtype on this input,
    float16 most often) are refused, naming the item (`places[k]` of `values[k]`): taken as
    they came, a NaN answered nothing, and a figure over the items read "–" or NaN."""
    # one flag per tensor, read once: no copy of the values (a membership chunk's are whole
    # next-token distributions)
    if not values or not bool(torch.stack([torch.isnan(v).any() for v in values]).any()):
        return
    i = next(p for p, v in zip(places, values) if bool(torch.isnan(v).any()))
    raise UnpactError(f"item {i}: the model's log-probs of the answer are NaN: {_nan_why(model)}")


def _nan_why(model: Any) -> str:
    """Why a model computes NaN, and what to do about it."""
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    if dtype == "float16":
        return (
            "its activations overflow float16 on this input, as those of Gemma and other "
            "models do: load it in bfloat16 or float32 (--dtype; `dtype:` in a run config)"
        )
    return (
        f"its activations overflow {dtype or 'its dtype'} on this input, or its weights are "
        "not finite"
    )


class NanWatch:
    """A logits processor for transformers' `generate` that refuses NaN next-token logits
    (`_nan_why`), naming the row, where greedy decoding took the NaN for the largest logit
    and wrote token 0 over and over, judged as any wrong answer, and sampling failed inside
    torch ("probability tensor contains either `inf`, `nan` or element < 0"). Returns the
    logits unchanged; `per_prompt` rows (samples) are one prompt's, "item" their place. A
    row that has ended (one of `stops` among its tokens after the prompts' `width`) is fed
    padding until the batch ends, and its logits are never read: not refused."""

    def __init__(
        self, model: Any, per_prompt: int, stops: Sequence[int] = (), width: int = 0
    ) -> None:
        self.model, self.per_prompt = model, per_prompt
        self.stops, self.width = list(stops), width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.isnan(scores).any(-1)
        if bool(bad.any()) and self.stops and input_ids.shape[1] > self.width:
            stops = torch.tensor(self.stops, device=input_ids.device)
            bad &= ~torch.isin(input_ids[:, self.width :], stops).any(-1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0]) // self.per_prompt
            raise UnpactError(
                f"item {row}: the model's next-token logits are NaN while generating: "
                f"{_nan_why(self.model)}"
            )
        return scores


def vocabulary_size(model: Any) -> int | None:
    """How many token ids the model's input embeddings hold (None: not told, as by a
    model of its own code whose `get_input_embeddings` raises NotImplementedError)."""
    try:
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    except NotImplementedError:
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


MIN_SHARED_PREFIX = 8


def _usable_prefix(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    share_prefix: bool,
) -> int:
    """The common prompt prefix to run once for these pairs, or 0: sharing is asked for,
    the prefix is `MIN_SHARED_PREFIX` tokens or more, and the model can continue a shared
    context under explicit masks at these lengths (`context_refusal`)."""
    if not share_prefix or len(prompts) < 2:
        return 0
    shared = _common_prefix(prompts)
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    if shared < MIN_SHARED_PREFIX or context_refusal(model, longest) is not None:
        return 0
    return shared


def attention_window(model: Any) -> int | None:
    """The fewest past tokens any layer attends to: its sliding window (Mistral, Gemma 2 and
    3, Qwen2 with `use_sliding_window`, Phi-3 where set) or its attention chunk (Llama 4);
    None where every layer sees the whole sequence. Read from the (text) config, as
    transformers' own mask builders read it."""
    config = text_config(model)
    types = getattr(config, "layer_types", None)
    spans: list[int] = []
    for field, kind in (("sliding_window", "sliding"), ("attention_chunk_size", "chunked")):
        span = getattr(config, field, None)
        if not isinstance(span, int) or isinstance(span, bool) or span <= 0:
            continue
        if types is None or any(str(t).startswith(kind) for t in types):
            spans.append(span)
    return min(spans, default=None)


def context_refusal(model: Any, longest: int) -> str | None:
    """Why sequences of up to `longest` tokens cannot be scored as continuations of a
    shared context under explicit 4-D masks (`context_logprobs`), or None when they can.

    Three kinds of model cannot: one whose ALiBi biases are built from a 2-D mask (BLOOM,
    MPT, Falcon with `alibi`); one with a layer that caches no keys and values of its own
    (Mamba's, Jamba's and Qwen3-Next's recurrent layers, which once failed with "'Linear
    AttentionLayer' object has no attribute 'keys'"); and one with a layer whose sliding
    window (or chunk) is not longer than the sequence, where the model's own cache keeps
    only the window's last keys of the context and an explicit mask would not slide. Under
    its window, sliding attention sees every earlier token, as full attention does."""
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind in ("bloom", "mpt") or getattr(config, "alibi", False) is True:
        return f"{kind or 'the model'}'s ALiBi attention builds its own mask"
    if other := layers_without_keys(model):
        return (
            f"its {other} layers keep a state of their own (a state-space or linear-attention "
            "recurrence, another layer's keys, or no cache at all), not keys and values to "
            "continue from under a mask"
        )
    window = attention_window(model)
    if window is not None and longest >= window:
        return (
            f"its attention window of {window} tokens is not longer than the "
            f"{longest}-token sequence"
        )
    return None


_LAYOUTS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
# the layer types whose cache is plain keys and values
_PLAIN = ("full_attention", "sliding_attention", "chunked_attention")


def layers_without_keys(model: Any) -> str | None:
    """The kinds of the model's layers whose cache is not plain keys and values, as
    transformers lays out a cache for its config (`linear_attention`, `hybrid`, a layer
    reusing another's keys), joined, or None when every layer's is. Read once per model
    (laying the cache out takes ~0.4 ms, and attribution asks per item)."""
    if model not in _LAYOUTS:
        _LAYOUTS[model] = _layers_without_keys(model)
    return _LAYOUTS[model]


# module classes that keep a recurrent state (state-space mixers, gated delta nets and
# other linear attention, short convolutions, RG-LRU, xLSTM), read where the cache layout
# transformers builds for a config does not say so (before 5.x laid those caches out)
_RECURRENT = re.compile(
    r"(Mixer|DeltaNet|LinearAttention|ShortConv|Rglru|MambaLayer|xLSTMLayer|RwkvSelfAttention)$"
)


def _layers_without_keys(model: Any) -> str | None:
    body, _ = lm_body_and_head(model)
    if not _takes_cache(body):  # GPT-1, XLM: no cache to continue from at all
        return type(body).__name__
    types = [str(t) for t in getattr(text_config(model), "layer_types", None) or []]
    named = [t for t in types if t not in _PLAIN]  # the config's own names for them
    found = _cache_layout(model, types, named)
    if found is None:
        kinds = [type(m).__name__ for m in body.modules() if _RECURRENT.search(type(m).__name__)]
        found = ", ".join(dict.fromkeys(named or kinds)) if kinds else None
    return found


def _takes_cache(body: Any) -> bool:
    """Whether the body's forward names a cache among its arguments (`cache` from
    transformers 5.x, `past_key_values` before; Mamba's `cache_params`, RWKV's `state`).
    GPT-1's names none: it computes every position each time. XLM's `cache` is a dict of
    its own (annotated so, read without running the model), which its forward never
    returns: nothing to continue from either."""
    try:
        taken = inspect.signature(body.forward).parameters
    except (TypeError, ValueError):
        return True
    if "cache" in taken:
        hint = str(taken["cache"].annotation)
        if "dict" in hint and "Cache" not in hint:
            return False
    return bool({"cache", "past_key_values", "cache_params", "state"} & set(taken))


def _cache_layout(model: Any, types: list[str], named: list[str]) -> str | None:
    """The non-plain layers of the cache transformers lays out for the model's config (by
    the config's name for each, else the cache layer's class), joined, or None."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

        layers = DynamicCache(config=model.config).layers
        kinds = (DynamicLayer, DynamicSlidingWindowLayer)
        other = [
            types[i] if i < len(types) and types[i] not in _PLAIN else type(x).__name__
            for i, x in enumerate(layers)
            if type(x) not in kinds
        ]
    except Exception:  # another transformers' layout: the config's own names
        other = named
    return ", ".join(dict.fromkeys(other)) or None


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the common prefix, leaving every prompt at least one token of its own
    (the hidden state that predicts the first answer token must be computed per pair)."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for k in range(n):
        if any(p[k] != first[k] for p in prompts[1:]):
            return k
    return max(n, 0)


def _score_shared_prefix(
    model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], shared: int
) -> list[torch.Tensor]:
    context = _prefix_context(model, prompts[0][:shared])
    return [r[0] for r in context_logprobs(model, context, _prefix_rows(prompts, answers, shared))]


def _prefix_context(model: Any, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for one shared prompt prefix (a batch of one)."""
    body, _ = lm_body_and_head(model)
    device = next(model.parameters()).device
    out = body(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    return _layer_kv(cache_of(out))


def _prefix_rows(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], shared: int
) -> list[list[Continuation]]:
    """One row per pair: the pair's own prompt tokens and answer after the shared prefix."""
    return [
        [Continuation(0, shared, tuple(p[shared:]) + tuple(a), shared, len(a))]
        for p, a in zip(prompts, answers)
    ]


def cache_kwarg(body: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands a model its key/value cache: `cache` in the API transformers
    documents since 5.x (`past_key_values` is removed in 5.40), `past_key_values` before."""
    params = inspect.signature(body.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def cache_of(out: Any) -> Any:
    """The key/value cache of a model output, under either API's name."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def token_budget_batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices grouped so that rows x longest length <= budget; similar lengths together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) + 1) * longest > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@contextmanager
def embeddings_in(model: Any, embeds: torch.Tensor | None = None) -> Iterator[dict[str, Any]]:
    """Within the block, the model's input embedding layer answers `embeds` (or, None, its
    own output made a leaf that requires a gradient), for a pass run on `input_ids`: what a
    model does to the embeddings after that layer on the `input_ids` path stays in, where
    passing `inputs_embeds` skips it (Falcon-H1 multiplies them by its
    `embedding_multiplier` only when it looks them up itself). Yields {"x": the tensor the
    layer answered}."""
    used: dict[str, Any] = {}

    def answer(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        used["x"] = out.detach().requires_grad_(True) if embeds is None else embeds
        return used["x"]

    handle = model.get_input_embeddings().register_forward_hook(answer)
    try:
        yield used
    finally:
        handle.remove()


def lm_body_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body (returns hidden states) and the output projection of a causal LM.

    A peft model is unwrapped first: its adapters live inside the wrapped model's layers.
    A vision-language model that transformers loads as a causal LM (Gemma 3 from 4B: its
    body holds a `language_model`) is scored through its language model: text alone takes
    no other path."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = model.base_model
    if body is model and isinstance(getattr(model, "model", None), torch.nn.Module):
        body = model.model  # Llama 4's text model: its base_model_prefix names no attribute
    inner = getattr(body, "language_model", None)
    return (inner if isinstance(inner, torch.nn.Module) else body), model.get_output_embeddings()


def expert_parameters(module: Any) -> list[tuple[str, Any, str]]:
    """The experts of a mixture of experts (Mixtral, Qwen-MoE, OLMoE, GPT-OSS in
    transformers 5) inside `module`: per projection, one 3-D parameter of (experts, ., .)
    on a submodule with `num_experts`. Each as (the submodule's name, the submodule, the
    parameter's attribute name); Linear layers are not among them."""
    return [
        (name, sub, attr)
        for name, sub in module.named_modules()
        if hasattr(sub, "num_experts")
        for attr, p in sub.named_parameters(recurse=False)
        if p.dim() == 3 and attr.endswith("proj")
    ]


def text_parameters(model: Any) -> set[int]:
    """The ids of the parameters of the text model and its head (`lm_body_and_head`): all
    of a causal LM's, none of a vision-language model's vision tower. Training marks only
    these trainable."""
    body, head = lm_body_and_head(model)
    return {id(p) for p in body.parameters()} | {id(p) for p in head.parameters()}


_MLP_PARTS = "mlp|mlp_block|fc1|fc2|feed_forward|ffn|block_sparse_moe|shared_mlp|mixer"


def mlp_parameter(name: str, layer: int | None = None) -> bool:
    """Whether the parameter `name` belongs to a decoder block's MLP (block `layer`'s, or
    any block's): `layers.i.mlp.` (Llama-style, GPT-NeoX), `h.i.mlp.` (GPT-2, Falcon,
    GPT-J), `layers.i.fc1.`/`fc2.` (OPT), `layers.i.feed_forward.` (Llama 4, Jamba),
    `blocks.i.ffn.` (MPT), `layers.i.mlp_block.` (RecurrentGemma), `block_sparse_moe` and
    `shared_mlp` (Granite's hybrids), and a Mamba block's `mixer`, its only part besides the
    norm. What RMU trains, and injection with `trainable: mlp`."""
    index = r"\d+" if layer is None else str(layer)
    where = rf"(?:^|\.)(?:layers|h|blocks)\.{index}\.(?:{_MLP_PARTS})\."
    return re.search(where, name) is not None


def _torch_model(model: Any, what: str) -> Any:
    """The torch model of `model`: itself, or a `LanguageModel`'s `.model` (given to
    `unpact.answer_logprobs`, it was "'LanguageModel' object has no attribute 'config'").
    A served model has none: it scores with its own `answer_logprobs` method."""
    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TypeError(
        f"{what}: give a transformers model or unpact's LanguageModel, not "
        f"{type(model).__name__} (a served model scores with its .answer_logprobs(...))"
    )


def text_config(model: Any) -> Any:
    """The configuration of a model's text part: its config, or a vision-language model's
    `text_config` (where the context length, the layers and the logit settings are)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# where the decoder blocks and the final norm live: Llama-style (layers, norm), GPT-2 and
# Falcon/Bloom (h, ln_f), OPT (decoder.layers, decoder.final_layer_norm), GPT-NeoX
# (layers, final_layer_norm)
_LAYER_PATHS = ("layers", "h", "decoder.layers", "blocks", "transformer.h")
_NORM_PATHS = (
    "norm",
    "ln_f",
    "final_layer_norm",
    "final_layernorm",  # Phi
    "norm_f",  # MPT
    "decoder.final_layer_norm",
    "final_norm",
)
_PROJECT_PATHS = ("decoder.project_out", "project_out")


def _find(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _first_module(root: Any, paths: Sequence[str], kind: type = torch.nn.Module) -> Any:
    """The first of `paths` under `root` that is a module of `kind` (None if none is)."""
    return next((m for p in paths if isinstance(m := _find(root, p), kind)), None)


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns: alone, first of a tuple, or (GPT-1's)
    first of a list; (batch, tokens, width), or a model whose layers carry several
    streams (Gemma 3n's AltUp) is refused: it has no one residual stream to read."""
    hidden = output[0] if isinstance(output, tuple | list) else output
    if hidden.dim() != 3:
        raise NotForThisModel(
            f"a decoder layer's hidden states are of shape {tuple(hidden.shape)}, not (batch, "
            "tokens, width): the model's layers carry parallel streams (as Gemma 3n's AltUp "
            "does), and the hidden-state attacks and RMU read one residual stream per layer"
        )
    return hidden


def with_layer_output(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's `output` with its hidden states replaced by `hidden`, in the same
    container."""
    if isinstance(output, tuple | list):
        return type(output)([hidden, *output[1:]])
    return hidden


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The causal LM's list of decoder blocks, whatever the architecture names it."""
    body, _ = lm_body_and_head(model)
    found = _first_module(body, _LAYER_PATHS, torch.nn.ModuleList)
    if found is not None and len(found):
        return found
    raise NotForThisModel(
        f"{type(model).__name__}: cannot find its decoder layers (looked for "
        f"{', '.join(_LAYER_PATHS)} on {type(body).__name__})"
    )


def final_norm(model: Any) -> Any:
    """What the body applies after its last decoder block, before the LM head: the final
    norm, then (OPT-350m's kind) a projection to the embedding width; None if nothing."""
    body, _ = lm_body_and_head(model)
    steps = [_first_module(body, _NORM_PATHS), _first_module(body, _PROJECT_PATHS)]
    found = [m for m in steps if m is not None]
    return found[0] if len(found) == 1 else torch.nn.Sequential(*found) if found else None


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits from final hidden states: LM head, then what some architectures do
    to the head's output (Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's
    `lm_head_multiplier`, Gemma 2's and RecurrentGemma's soft-capping); `check_head` tests
    a loaded model against its own forward."""
    _, head = lm_body_and_head(model)
    logits = head(hidden).float()
    scale = getattr(model, "logit_scale", None)  # Cohere multiplies its logits
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    config = text_config(model)
    divisor = getattr(config, "logits_scaling", None)  # Granite divides them
    if divisor:
        logits = logits / divisor
    factor = getattr(config, "lm_head_multiplier", None)  # Falcon-H1 multiplies them
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor != 1:
        logits = logits * factor
    # Gemma 2's soft-capping; RecurrentGemma's, under another name
    cap = getattr(config, "final_logit_softcapping", None) or getattr(
        config, "logits_soft_cap", None
    )
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def non_finite_weight(model: Any) -> str | None:
    """The name of the first parameter or buffer of `model` holding a NaN or an infinity,
    else None."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@torch.no_grad()
def check_head(model: Any, spec: str = "") -> None:
    """The kernel computes logits from the body's last hidden state (`head_logits`), not
    from the model's own forward. On a short input, check that both agree, so that an
    architecture that changes its logits some other way is refused, not scored wrongly.
    Logits that are not finite are a model whose weights are not (a diverged training):
    refused, naming the first such tensor (`spec`: the model, in the message)."""
    body, head = lm_body_and_head(model)
    if getattr(model.config, "model_type", "") == "recurrent_gemma" and not _takes_cache(body):
        raise UnpactError(  # transformers 5.0's, checked: scores off by 0.5 nat, in silence
            f"{type(model).__name__}: this transformers release's RecurrentGemma keeps its "
            "recurrent state inside its layers, not in a cache, and unpact's batched scoring "
            "does not reproduce it; upgrade transformers (5.24 was checked)"
        )
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]], device=device)
    with models_own_code(model, "a forward pass on 4 tokens", "score", spec):
        own = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    if not bool(torch.isfinite(own).all()):
        where = non_finite_weight(model)
        raise UnpactError(
            f"{spec or type(model).__name__}: its logits are NaN or infinite"
            + (f", and so is its tensor {where}" if where else "")
            + ": no answer or score of it would mean anything (a diverged training: a "
            "lower lr, or max_grad_norm)"
        )
    # the head on the whole sequence, as the forward applies it: on the last position alone
    # a bfloat16 matmul rounds otherwise, a gap of one bfloat16 step (0.0625 at logits of
    # 8-16) that refused every model loaded in bfloat16
    mine = head_logits(model, body(input_ids=ids, use_cache=False).last_hidden_state)[0, -1]
    low = next((p.dtype for p in head.parameters() if p.is_floating_point()), torch.float32)
    tol = max(1e-3, 2 * torch.finfo(low).eps)  # two steps of a half-precision head's rounding
    if not torch.allclose(mine, own, rtol=tol, atol=tol * (1 + float(own.abs().max()))):
        raise UnpactError(
            f"{type(model).__name__}: its logits are not its LM head applied to its last "
            f"hidden state (largest gap {float((mine - own).abs().max()):.3g}): it changes "
            "them in a way unpact's scoring kernel does not reproduce, so its scores would be "
            "wrong; this architecture is not supported"
        )


@contextmanager
def models_own_code(model: Any, what: str, cannot: str, spec: str = "") -> Iterator[None]:
    """An error raised by the model's own code (or transformers' for it) while doing `what`
    becomes one message, naming the model, not a traceback: an architecture unpact's calls
    do not suit (xmod: "Input language unknown"), which unpact then `cannot` do. Running out
    of memory keeps its own error, the GPU's or the CPU's (a RuntimeError of torch's
    allocator, once said to be the model's fault)."""
    try:
        yield
    except (torch.OutOfMemoryError, UnpactError):
        raise
    except Exception as e:
        if out_of_memory(e) is not None:
            raise
        name = type(model).__name__
        raise UnpactError(
            f"{spec or name}: {what} of this {name} fails inside the model's or transformers' code "
            f"({type(e).__name__}: {e}); unpact cannot {cannot} it"
        ) from e


def head_logprobs(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from final hidden states: LM head, optional soft-capping, log-softmax."""
    logits = head_logits(model, hidden)
    # gather - logsumexp: log-softmax without writing a full vocabulary-sized result.
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def score_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    padding_side: PaddingSide,
    keep_cache: bool = False,
) -> Any:
    """Answer log-probs of one padded batch; with `keep_cache`, also the keys and values
    of every layer, `[(K, V), ...]` of shape (rows, kv_heads, width, head_dim), to be
    shared as context by `context_logprobs` (right padding keeps position t at index t)."""
    picked, targets, out = _answer_hidden(model, prompts, answers, padding_side, keep_cache)
    lp = head_logprobs(model, picked, targets)
    lps = list(lp.split([len(a) for a in answers]))
    if not keep_cache:
        return lps
    return lps, _layer_kv(cache_of(out))


def answer_distributions(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    grad: bool = False,
    share_prefix: bool = False,
) -> list[torch.Tensor]:
    """Full next-token log-distributions at each answer position, all pairs in one pass.

    Item i is a `(len(answers[i]), vocab)` float32 tensor of log-softmax values: what a KL
    term between two models needs (`answer_logprobs` only keeps the answer tokens'
    entries, and is the one to use for anything else). With `share_prefix`, a common
    prompt prefix of `MIN_SHARED_PREFIX` tokens or more runs once, as in `answer_logprobs`
    (same numbers up to float rounding, fewer tokens through the model). Without `grad`
    the model runs `evaluating`; a training loss keeps the loop's mode."""
    with torch.set_grad_enabled(grad), nullcontext() if grad else evaluating(model):
        states = answer_states(model, prompts, answers, share_prefix=share_prefix)
        logp = head_logits(model, torch.cat(states)).log_softmax(-1)
    return list(logp.split([len(a) for a in answers]))


def answer_states(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    share_prefix: bool = False,
) -> list[torch.Tensor]:
    """The final hidden states that predict each answer token, one pass for all pairs.

    Item i is `(len(answers[i]), hidden)`; `head_logprobs` / `head_logits` turn them into
    log-probs. One pass over a whole mixed batch (a training step's facts and its
    rehearsal questions) reads the weights once instead of once per kind. Gradients
    follow torch's grad mode; `share_prefix` as in `answer_distributions`."""
    shared = _usable_prefix(model, prompts, answers, share_prefix)
    if shared:
        picked, _, _ = _context_hidden(
            model,
            _prefix_context(model, prompts[0][:shared]),
            _prefix_rows(prompts, answers, shared),
        )
    else:
        picked, _, _ = _answer_hidden(model, prompts, answers, "right", False)
    return list(picked.split([len(a) for a in answers]))


def _answer_hidden(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    padding_side: PaddingSide,
    keep_cache: bool,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One padded pass: the final hidden states that predict each answer token (in item
    order), those tokens, and the body's output."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    width = max(lengths)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for r, (p, a) in enumerate(zip(prompts, answers)):
        start = 0 if padding_side == "right" else width - lengths[r]
        input_ids[r, start : start + lengths[r]] = torch.tensor([*p, *a])
        mask[r, start : start + lengths[r]] = 1
        # The hidden state at position t predicts token t + 1.
        first = start + len(p) - 1
        rows.extend([r] * len(a))
        cols.extend(range(first, first + len(a)))
        targets.extend(a)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    body, _ = lm_body_and_head(model)
    out = body(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=keep_cache,
    )
    picked = out.last_hidden_state[
        torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    ]
    return picked, torch.tensor(targets, device=device), out


def right_padded(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the right with id 0."""
    width = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.tensor(list(x))
        mask[r, : len(x)] = 1
    return ids, mask


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the left with `pad` (generation)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, width - len(x) :] = torch.tensor(list(x))
        mask[r, width - len(x) :] = 1
    return ids, mask


def _layer_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) from a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass(frozen=True)
class Continuation:
    """A token sequence that continues a cached context and ends with an answer to score.

    Its tokens see the first `visible` positions of context row `source` and, causally,
    each other, except the tokens at `hidden` (a half-open range of indices into `ids`)
    whose keys no query sees. `ids[0]` sits at position `start`. The last `answer_len`
    tokens of `ids` are the answer whose log-probs are returned.
    """

    source: int
    visible: int
    ids: tuple[int, ...]
    start: int
    answer_len: int
    hidden: tuple[int, int] = (0, 0)


def pack_continuations(items: Sequence[Continuation], width: int) -> list[list[int]]:
    """Indices of `items` packed into rows of at most `width` tokens (or one longer item),
    first-fit by decreasing length; a row only holds items of one context `source`.

    Packing several short continuations into one row, each attending only to itself and
    its context, removes nearly all padding from the batch."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: dict[int, list[int]] = {}
    for i in sorted(range(len(items)), key=lambda i: -len(items[i].ids)):
        n = len(items[i].ids)
        candidates = open_rows.setdefault(items[i].source, [])
        for r in candidates:
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            candidates.append(len(rows))
            rows.append([i])
            room.append(max(width, n) - n)
    return rows


def context_logprobs(
    model: Any,
    context: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows: Sequence[Sequence[Continuation]],
) -> list[list[torch.Tensor]]:
    """Answer log-probs of continuations of a shared, precomputed context.

    The context's keys/values are computed once (by `score_batch(..., keep_cache=True)`)
    and reused: only the continuations' own tokens run through the model. Each row of
    the batch packs continuations of one context side by side; explicit position ids
    and a 4-D attention mask make each one see exactly `context[:visible]` and itself,
    so the numbers equal a full forward pass over `context[:visible] + ids`. Only for a
    model and lengths that `context_refusal` allows (no ALiBi, every sequence shorter
    than any sliding window); the callers check.
    """
    picked, targets, lengths = _context_hidden(model, context, rows)
    flat = list(head_logprobs(model, picked, targets).split(lengths))
    out: list[list[torch.Tensor]] = []
    for row in rows:
        out.append(flat[: len(row)])
        flat = flat[len(row) :]
    return out


def _context_hidden(
    model: Any,
    context: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows: Sequence[Sequence[Continuation]],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`context_logprobs`'s pass: the final hidden states that predict each answer token
    (continuations in row order), those tokens, and each continuation's answer length."""
    device = next(model.parameters()).device
    dtype = context[0][0].dtype
    n = len(rows)
    width = max(sum(len(c.ids) for c in row) for row in rows)
    ctx = max(c.visible for row in rows for c in row)
    input_ids = torch.zeros(n, width, dtype=torch.long)
    position_ids = torch.zeros(n, width, dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # which continuation; -1 = pad
    visible = torch.zeros(n, width, dtype=torch.long)
    hidden = torch.zeros(n, width, dtype=torch.bool)
    picks: list[tuple[int, int, int]] = []  # (row, first predictor column, answer length)
    targets: list[int] = []
    for r, row in enumerate(rows):
        offset = 0
        for seg, c in enumerate(row):
            end = offset + len(c.ids)
            input_ids[r, offset:end] = torch.tensor(c.ids)
            position_ids[r, offset:end] = torch.arange(c.start, c.start + len(c.ids))
            segment[r, offset:end] = seg
            visible[r, offset:end] = c.visible
            hidden[r, offset + c.hidden[0] : offset + c.hidden[1]] = True
            picks.append((r, end - c.answer_len - 1, c.answer_len))
            targets.extend(c.ids[len(c.ids) - c.answer_len :])
            offset = end
    see_context = torch.arange(ctx)[None, None, :] < visible[:, :, None]
    q = torch.arange(width)[None, :, None]
    k = torch.arange(width)[None, None, :]
    see_own = (
        (segment[:, :, None] == segment[:, None, :])
        & (segment[:, None, :] >= 0)
        & (k <= q)
        & ~hidden[:, None, :]
    )
    # A query that may see nothing (a hidden first token without context, or padding)
    # sees itself, so that no softmax row is empty.
    blind = ~(see_context.any(-1) | see_own.any(-1))
    see_own |= blind[:, :, None] & (k == q)
    allow = torch.cat([see_context, see_own], dim=-1)
    mask = torch.zeros(n, 1, width, ctx + width, dtype=dtype)
    mask.masked_fill_(~allow[:, None], torch.finfo(dtype).min)

    from transformers import DynamicCache

    source = torch.tensor([row[0].source for row in rows], device=device)
    # index_select, not kk[source]: advanced indexing's backward accumulates repeated rows
    # with atomic adds on CPU, so a shared prefix's gradient changed from run to run
    cache = DynamicCache(
        ddp_cache_data=[
            (kk[:, :, :ctx].index_select(0, source), vv[:, :, :ctx].index_select(0, source))
            for kk, vv in context
        ]
    )
    body, _ = lm_body_and_head(model)
    states = body(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=True,
        **cache_kwarg(body, cache),
    ).last_hidden_state
    row_idx = [r for r, _, t in picks for _ in range(t)]
    cols = [first + j for _, first, t in picks for j in range(t)]
    picked = states[torch.tensor(row_idx, device=device), torch.tensor(cols, device=device)]
    return picked, torch.tensor(targets, device=device), [t for _, _, t in picks]


# ------------------------------------------------------------------ text-level scoring


@dataclass(frozen=True)
class AnswerScore:
    """The log-probs of one answer given one prompt: LP is their mean (SPEC section 1)."""

    prompt: EncodedPrompt
    answer_ids: tuple[int, ...]
    answer_tokens: tuple[str, ...]
    logprobs: tuple[float, ...]

    @property
    def lp(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)


def check_pairs(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    limit: int,
    vocab: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Every backend's `answer_logprobs` scores only pairs of token ids that can be: as many
    answers as prompts, neither empty, each a flat list (or 1-d tensor or array) of whole
    token ids in the model's vocabulary of `vocab` (when known), each pair within the
    model's context of `limit`. A text, a float id or one past the vocabulary was an
    error from inside torch ("too many dimensions 'str'", "index out of range in self").
    Returns the ids as lists of Python ints."""
    for name, given in (("prompts", prompts), ("answers", answers)):
        listed = isinstance(given, Sequence) or getattr(given, "ndim", 0) >= 1
        if isinstance(given, (str, bytes)) or not listed:
            raise TypeError(f"{name}: give a list of token id lists, not {type(given).__name__}")
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pairs = [
        (
            _token_ids(f"item {i}: the prompt", p, vocab),
            _token_ids(f"item {i}: the answer", a, vocab),
        )
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]
    for i, (p, a) in enumerate(pairs):
        if len(p) == 0:
            raise UnpactError(f"item {i}: empty prompt")
        if len(a) == 0:
            raise UnpactError(f"item {i}: empty answer")
        check_fits(i, len(p) + len(a), limit)
    return [p for p, _ in pairs], [a for _, a in pairs]


def _token_ids(what: str, ids: Any, vocab: int | None) -> list[int]:
    values = ids.tolist() if callable(getattr(ids, "tolist", None)) else ids
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{what} is {type(ids).__name__} {ids!r}, not a list of token ids")
    out = []
    for v in values:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(f"{what} holds {type(v).__name__} {v!r}, not a token id (an int)")
        out.append(int(v))
    bad = [v for v in out if v < 0 or (vocab is not None and v >= vocab)]
    if bad:
        top = f"0 to {vocab - 1}" if vocab is not None else "0 and above"
        raise UnpactError(f"{what} holds token id {bad[0]}, outside the model's vocabulary ({top})")
    return out


def check_fits(i: int | str, tokens: int, limit: int) -> None:
    """Item `i`'s prompt + answer (`tokens` of them) fits the model's context of `limit`;
    `i`: its place in a list, or how a message names it (`QAItem.label`)."""
    if tokens > limit:
        name = f"item {i}" if isinstance(i, int) else i
        raise UnpactError(
            f"{name}: prompt + answer is {tokens} tokens, longer than the model's context "
            f"of {limit}"
        )


def check_room(
    what: str, prompt_tokens: int, max_new_tokens: int, limit: int, setting: str = ""
) -> None:
    """A prompt (`what` names it) leaves room for `max_new_tokens` of answer in the model's
    context of `limit`; `setting` names where that answer length is set, if anywhere."""
    if prompt_tokens + max_new_tokens > limit:
        where = f" ({setting})" if setting else ""
        lower = ", or lower that setting" if setting else ""
        raise UnpactError(
            f"{what} is {prompt_tokens} tokens as the model's prompt; with {max_new_tokens} "
            f"tokens of answer{where} it exceeds the model's context of {limit}: shorten it "
            f"or leave it out{lower}"
        )


_PROMPTS_ONLY: Any = object()  # check_texts of a function that takes no answers


def check_texts(prompts: Any, answers: Any = _PROMPTS_ONLY, *, open_answers: bool = False) -> None:
    """The public text functions take lists: one string given instead (it would be read
    as a list of characters) or lists of different lengths are one clear error, and so is
    anything but a list of texts (a TypeError, as for any argument of the wrong type;
    prompts may be `EncodedPrompt`s; with `open_answers`, answers may be None or hold None,
    each a model's own answer to be generated)."""
    _check_list("prompts", prompts, (str, EncodedPrompt), none_ok=True)
    if answers is _PROMPTS_ONLY or (answers is None and open_answers):
        return
    _check_list("answers", answers, (str,), none_ok=open_answers)
    if len(answers) != len(prompts):
        raise UnpactError(f"{len(prompts)} prompts but {len(answers)} answers")


def check_model(lm: Any) -> None:
    """The public text functions take a loaded unpact model; a spec or a bare transformers
    model is a TypeError that says how to get one (it was "has no attribute
    'encode_prompt'")."""
    if hasattr(lm, "encode_prompt"):
        return
    if isinstance(lm, (str, os.PathLike)):
        raise TypeError(
            f"give a loaded model, not the spec {str(lm)!r}: lm = unpact.load_model({str(lm)!r})"
        )
    raise TypeError(
        f"give an unpact model, not {type(lm).__name__}: unpact.load_model(spec), or "
        "unpact.LanguageModel(model, tokenizer) around a transformers model you have loaded"
    )


def _check_list(name: str, value: Any, allowed: tuple[type, ...], none_ok: bool) -> None:
    if isinstance(value, str):
        raise UnpactError(f"{name}: give a list of texts, not one string (e.g. [{value[:30]!r}])")
    if not isinstance(value, Sequence):
        raise TypeError(f"{name}: give a list of texts, not {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, allowed) and not (v is None and none_ok):
            raise TypeError(f"{name}[{i}] is {type(v).__name__} {v!r}, not a text")


_REAL_ARGUMENTS = frozenset({"temperature", "alpha", "beta"})  # any number; the rest whole


def check_numbers(**values: Any) -> None:
    """Whole numbers given as such (a float sample count or a text length is a TypeError
    naming the argument, not one from deep inside torch)."""
    for name, value in values.items():
        number = name in _REAL_ARGUMENTS
        ok = isinstance(value, numbers.Real if number else numbers.Integral)
        if not ok or isinstance(value, bool):
            kind = "a number" if number else "an int"
            raise TypeError(f"{name} must be {kind}, not {type(value).__name__} {value!r}")
        if not number and abs(int(value)) >= 2**63:  # torch's overflow from inside `generate`
            raise UnpactError(f"{name} {value} is too large (at most 2**63 - 1)")


@in_eval_mode
def score(
    lm: AnyModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    chat_template: bool | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: bool | str = False,
) -> list[AnswerScore]:
    """`answer_logprobs` on text: encode, score, and keep the tokens for display."""
    check_model(lm)
    check_texts(prompts, answers)
    encoded = []
    answer_ids = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        try:
            prompt, ids = follow(lm, lm.encode_prompt(p, chat_template), a)
            encoded.append(prompt)
            answer_ids.append(ids)
        except UnpactError as exc:
            raise UnpactError(f"item {i}: {exc}") from None
    lps = lm.answer_logprobs(
        [e.input_ids for e in encoded], answer_ids, progress=progress, token_budget=token_budget
    )
    return [
        AnswerScore(
            prompt=e,
            answer_ids=a,
            answer_tokens=tuple(lm.token_texts(a)),
            logprobs=tuple(lp.tolist()),
        )
        for e, a, lp in zip(encoded, answer_ids, lps)
    ]


# ------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class Generation:
    """One generated answer: its text and token ids (end-of-turn token excluded)."""

    text: str
    token_ids: tuple[int, ...]


# vLLM raises a sampling temperature in (0, 0.01) to 0.01 (`_MAX_TEMP`); below it, sampling
# is refused here, so that local and served samples come from one distribution
LOWEST_TEMPERATURE = 0.01


@in_eval_mode
def generate(
    lm: AnyModel,
    prompts: Sequence[str | EncodedPrompt],
    *,
    chat_template: bool | None = None,
    max_new_tokens: int = 32,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[list[Generation]]:
    """Greedy answers (`num_samples=0`, one per prompt) or `num_samples` seeded samples.

    Prompts are left-padded and batched. Samples of a prompt depend only on `seed` and the
    prompt's token ids, not on which other prompts share its batch, so they reproduce.
    """
    check_model(lm)
    check_texts(prompts)
    check_numbers(
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    if max_new_tokens < 1:
        raise UnpactError("max_new_tokens must be at least 1")
    if batch_size < 1:
        raise UnpactError(f"batch_size must be at least 1, not {batch_size}")
    if num_samples < 0:
        raise UnpactError("the number of samples cannot be negative")
    if num_samples and not 0 < temperature < math.inf:
        raise UnpactError(f"sampling needs a finite temperature > 0, not {temperature}")
    if num_samples and temperature < LOWEST_TEMPERATURE:
        raise UnpactError(
            f"sampling at temperature {temperature} (below {LOWEST_TEMPERATURE}) is not "
            f"supported: vLLM samples any such temperature at {LOWEST_TEMPERATURE}, so a "
            "served model and a local one would draw from different distributions (and it "
            "is greedy decoding within float rounding); ask for greedy answers (no samples) "
            f"or a temperature of at least {LOWEST_TEMPERATURE}"
        )
    encoded = [
        p if isinstance(p, EncodedPrompt) else lm.encode_prompt(p, chat_template) for p in prompts
    ]
    for i, e in enumerate(encoded):
        check_room(
            f"item {i}: the prompt",
            len(e.generation_ids),
            max_new_tokens,
            lm.max_length,
            "max_new_tokens",
        )
    gens = lm.generate_ids(
        [e.generation_ids for e in encoded],
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=temperature,
        seed=seed,
        progress=progress,
        batch_size=batch_size,
    )
    return [[Generation(text=t, token_ids=ids) for t, ids in g] for g in gens]


def generate_local(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    num_samples: int,
    temperature: float,
    seed: int,
    batch_size: int,
    progress: bool | str,
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The local backend's generation: left-padded batches (greedy), or per prompt a
    generator seeded by `seed` and its token ids (samples)."""
    for i, ids in enumerate(prompts):  # a token added to the tokenizer alone: an IndexError
        lm.check_vocabulary(f"item {i}: the prompt", ids)
    label = progress if isinstance(progress, str) else "Generating"
    out: list[list[Generation]] = []
    with (
        torch.no_grad(),
        progress_bar(label, total=len(prompts), enabled=bool(progress)) as advance,
    ):
        if num_samples == 0:
            greedy: dict[int, Generation] = {}
            for batch in _greedy_batches(lm, prompts, batch_size):
                chunk = [tuple(prompts[i]) for i in batch]
                with items_named(functools.partial(_item_at, batch)):
                    rows = generated_rows(lm, chunk, max_new_tokens, None, 1.0, 1)
                seqs = _answers(lm, rows)
                greedy.update(zip(batch, seqs))
                advance(len(chunk))
            out.extend([greedy[i]] for i in range(len(prompts)))
        else:
            for k, ids in enumerate(prompts):
                prompt_seed = sample_seed(seed, ids)
                with items_named(functools.partial(_item_at, [k])):
                    rows = generated_rows(
                        lm, [tuple(ids)], max_new_tokens, prompt_seed, temperature, num_samples
                    )
                out.append(_answers(lm, rows))
                advance(1)
    return [[(g.text, g.token_ids) for g in gens] for gens in out]


def _item_at(places: Sequence[int], n: int) -> str:
    """ "item N" of the whole list, for the `n`th of a batch holding its `places`."""
    return f"item {places[n]}"


def _greedy_batches(
    lm: LanguageModel, prompts: Sequence[Sequence[int]], size: int
) -> list[list[int]]:
    """The prompts' indices in batches of up to `size`: consecutive ones, or, for a model
    that reads its left padding, ones of the same length (no padding at all)."""
    order = list(range(len(prompts)))
    if len({len(p) for p in prompts}) > 1 and reads_padding(lm):
        order.sort(key=lambda i: len(prompts[i]))
        runs = [list(g) for _, g in itertools.groupby(order, key=lambda i: len(prompts[i]))]
        return [run[k : k + size] for run in runs for k in range(0, len(run), size)]
    return [order[k : k + size] for k in range(0, len(order), size)]


_PADDING: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def reads_padding(lm: LanguageModel) -> bool:
    """Whether the model's greedy next token depends on left padding it is told to ignore:
    RWKV reads no attention mask, so a pad token before a prompt enters its state, and a
    batch of prompts of unequal lengths answered otherwise than each alone. One step of
    `generate` on a short prompt, alone and after two pads, compared once per model."""
    model = lm.model
    if model not in _PADDING:
        prompt = [t for t in range(3, 9) if t != _pad_id(lm)][:4]
        alone, padded = (_first_logits(lm, r) for r in ([prompt], [prompt, [*prompt, *prompt[:2]]]))
        # half precision moves logits with the batch's shape alone (a pad read moves more)
        rounding = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
        scale = max(1.0, float(alone.abs().max()))
        _PADDING[model] = not torch.allclose(alone, padded[0], rtol=0, atol=rounding * scale)
    return _PADDING[model]


def _first_logits(lm: LanguageModel, rows: list[list[int]]) -> torch.Tensor:
    """The logits of greedy generation's first step for each row, left-padded together as
    `generated_rows` pads them."""
    pad = _pad_id(lm)
    ids, mask = left_padded(rows, pad)
    own_code = models_own_code(lm.model, "transformers' generate", "generate with", lm.spec)
    with quiet_padding_warning(), own_code:
        out = lm.model.generate(
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
            **_NEUTRAL_DECODING,
            **_GREEDY,
        )
    return out.logits[0].float().cpu()  # (rows, vocab)


def sample_seed(seed: int, ids: Sequence[int]) -> int:
    """The generator seed of one prompt's samples: from the run's seed and the prompt's
    token ids, so that they reproduce whatever the batching."""
    return zlib.crc32(repr((seed, tuple(ids))).encode())


# The plain softmax (at the temperature): whatever a model's generation_config says about
# top_k, top_p, min_p or repetition penalties is left out, here and in what unpact asks of
# a served model (remote.PLAIN_SAMPLING); so are beams, banned n-grams, a minimum length
# and the other truncations it may set (vLLM reads none of them): each at its neutral value.
# Also what else a generation_config may hold that changes the answers or fails: a forced
# last token, a length penalty that pushes EOS, classifier-free guidance, a watermark,
# top-H truncation, DoLa, token healing, prompt lookup and stop strings (the last three
# failed inside `generate`).
_NEUTRAL_DECODING: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "min_p": None,
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "top_h": None,
    "dola_layers": None,
    "token_healing": False,
    "prompt_lookup_num_tokens": None,
    "stop_strings": None,
    "penalty_alpha": None,
    "max_time": None,  # a clock's cut: answers that depend on the machine's load
}


# greedy decoding: none of the sampling knobs a generation_config may set
_GREEDY: dict[str, Any] = {"temperature": None, "top_k": None, "top_p": None}


def _pad_id(lm: LanguageModel) -> int:
    """The id generation pads prompts with: the tokenizer's pad token, else its EOS, else
    (a tokenizer that names neither) 0: padding is masked out, so any id does."""
    tok = lm.tokenizer
    found = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(found) if found is not None else 0


def _answers(lm: LanguageModel, rows: list[list[int]]) -> list[Generation]:
    """Generated rows as answers: each row's ids before its stop id, and their text."""
    stops = set(stop_ids(lm))
    results = []
    for row in rows:
        ids = until_stop(row, stops)
        text = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(Generation(text=text, token_ids=tuple(ids)))
    return results


def generated_rows(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    seed: int | None,
    temperature: float,
    num_return_sequences: int,
    *,
    nan_watch: bool = True,
    **given: Any,
) -> list[list[int]]:
    """transformers' `generate` of the prompts, left-padded: greedy (`seed` None) or seeded
    samples at `temperature` from the plain softmax; each row's generated ids as they came
    (its stop id, and the padding after it, kept). `given` adds to or replaces generate's
    arguments (a server's other stop ids, a stopping criterion). `nan_watch`: NaN logits
    refused (`NanWatch`); a server, as vLLM's, answers with what the model generates.

    One prompt's samples are drawn `sample_rows_at_once` at a time, one call after another
    from the same seeded stream: `generate` holds every row's cache at once, and 2,000
    samples of 512 tokens (within vLLM's cap on `n`) would need 48 GB for the 135M model
    (46 KB of keys and values a token). As many as fit are one call, drawn as before."""
    pad = _pad_id(lm)
    input_ids, mask = left_padded(prompts, pad)
    width = input_ids.shape[1]
    sampling = seed is not None
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampling,
        "pad_token_id": pad,
        "eos_token_id": stop_ids(lm),
    }
    kwargs.update(_NEUTRAL_DECODING)
    if sampling:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(_GREEDY)
    kwargs.update(given)
    if kwargs.get("min_new_tokens") is not None:
        # it sets the minimum length itself; a min_length beside it (the neutral 0) made
        # transformers warn "Both `min_new_tokens` and `min_length` seem to have been set"
        # on each call (every `unpact serve` request with min_tokens)
        kwargs.pop("min_length", None)
    at_once = num_return_sequences
    if num_return_sequences > 1 and len(prompts) == 1:  # one prompt's samples
        at_once = sample_rows_at_once(lm.model, width + max_new_tokens) or at_once
    from transformers import LogitsProcessorList

    rows: list[list[int]] = []
    with forked_rng(lm.device), quiet_padding_warning():
        if sampling:
            torch.manual_seed(seed)
        for start in range(0, num_return_sequences, at_once):
            part = min(at_once, num_return_sequences - start)
            if nan_watch and "logits_processor" not in given:
                watch = NanWatch(lm.model, part, kwargs["eos_token_id"], width)
                kwargs["logits_processor"] = LogitsProcessorList([watch])
            with models_own_code(lm.model, "transformers' generate", "generate with", lm.spec):
                generated = lm.model.generate(
                    input_ids=input_ids.to(lm.device),
                    attention_mask=mask.to(lm.device),
                    num_return_sequences=part,
                    **kwargs,
                )
            rows += generated[:, width:].tolist()
    return rows


# What one `generate` call may hold of a prompt's samples: their cache of keys and values
# (and each row's logits), estimated from the model's config (`sample_rows_at_once`).
SAMPLE_BYTES_AT_ONCE = 2 * 2**30


def sample_rows_at_once(model: Any, length: int) -> int | None:
    """How many samples of `length` tokens (prompt and answer) one `generate` call draws:
    as many as `SAMPLE_BYTES_AT_ONCE` holds, at least one; None where the model's config
    does not say its layers' sizes (each prompt's samples then drawn in one call)."""
    config: Any = getattr(model, "config", None)
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    layers, hidden = _config_int(config, "num_hidden_layers"), _config_int(config, "hidden_size")
    if layers is None or hidden is None:
        return None
    heads = _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_dim = _config_int(config, "head_dim") or (hidden // heads if heads else None)
    width = kv_heads * head_dim if kv_heads and head_dim else hidden  # else at most the hidden
    dtype = getattr(model, "dtype", torch.float32)
    size = dtype.itemsize if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 4
    vocabulary = _config_int(config, "vocab_size") or 0
    # keys and values of every layer per token, and a few float32 copies of the logits
    per_row = 2 * layers * width * size * length + 16 * vocabulary
    return max(1, SAMPLE_BYTES_AT_ONCE // per_row)


def _config_int(config: Any, name: str) -> int | None:
    """A model config's whole-number setting, or None: absent, not a number, or one a
    config will not give for the whole model (Gemma 4's per-layer `head_dim` raises)."""
    try:
        value = getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError, and the like
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Unsaid(logging.Filter):
    """Drops a library's log records that contain `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# transformers' note on generation_config flags greedy decoding leaves unused, each of
# which unpact sets to its neutral value (`_NEUTRAL_DECODING`): (logger, text)
GENERATION_FLAGS_NOTE = (
    "transformers.generation.configuration_utils",
    "generation flags are not valid",
)
# while generating, from these transformers loggers: what unpact's calls make moot
_GENERATE_NOISE = (
    ("transformers.modeling_utils", "passing in an `attention_mask`"),
    GENERATION_FLAGS_NOTE,
)


@contextmanager
def unsaid_while(*notes: tuple[str, str]) -> Iterator[None]:
    """Inside the block, each (logger name, text) of `notes`: that logger's records
    containing the text are not printed."""
    quiet = [(logging.getLogger(name), Unsaid(text)) for name, text in notes]
    for logger, unsaid in quiet:
        logger.addFilter(unsaid)
    try:
        yield
    finally:
        for logger, unsaid in quiet:
            logger.removeFilter(unsaid)


def quiet_padding_warning() -> AbstractContextManager[None]:
    """Without transformers' "We strongly recommend passing in an `attention_mask`" while
    generating: the mask is passed, but a model whose pad id is its EOS (GPT-2's family)
    meets the pad id in a sampled step's tokens (a sample that ended before the others),
    which its forward checks without the mask `generate` keeps: a library warning in the
    middle of PROBAB's output, about nothing. Nor "The following generation flags are not
    valid and may be ignored" for what a model's generation_config sets (`top_h` without
    sampling, a beam search's `length_penalty`): unpact sets each to its neutral value
    (`_NEUTRAL_DECODING`)."""
    return unsaid_while(*_GENERATE_NOISE)


def forked_rng(device: torch.device) -> Any:
    """A context in which seeding leaves the caller's random streams as they were: the CPU's
    and, for a model on a CUDA device, that device's (sampling there draws from it)."""
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.random.fork_rng(devices=[index])


def until_stop(row: Sequence[int], stops: set[int]) -> list[int]:
    """The generated ids before the first stop id (the answer, without its end)."""
    ids: list[int] = []
    for t in row:
        if t in stops:
            break
        ids.append(t)
    return ids


def stop_ids(lm: LanguageModel) -> list[int]:
    """The ids generation stops at: the generation config's EOS ids and the tokenizer's."""
    ids = set()
    for source in (lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)
