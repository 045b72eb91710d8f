"""The statistics `unpact.membership` reads, computed with a local model: per text, one
batched teacher-forced pass of the scoring kernel (token log-probs, argmax flags, the moments
of log p(z) under the model's next-token distribution), and per-text gradient norms. A
served model gives what its server's prompt log-probs hold (`served_stats`): the token
log-probs, and the argmax flags where it gives each token's rank (vLLM does)."""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch

from unpact.determinism import kernels_for, reproducibly
from unpact.errors import UnpactError, said_of
from unpact.membership import TextStats
from unpact.progress import progress_bar
from unpact.scoring import in_eval_mode
from unpact.types import pair_ids

if TYPE_CHECKING:
    from unpact.models import LanguageModel
    from unpact.remote import RemoteModel
    from unpact.types import AnyModel


def token_stats(
    lm: AnyModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[TextStats]:
    """Teacher-forced statistics of each `texts[i]` as the answer to `prompts[i]` (in the
    chat format evaluation uses), batched: one pass per `batch_size` texts."""
    encoded = fitting_pairs(lm, prompts, texts)
    label = progress if isinstance(progress, str) else "Membership scores"
    return _batched_stats(lm, encoded, list(texts), batch_size, label, bool(progress))


def served_stats(
    lm: RemoteModel,
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    texts: list[str],
    label: str,
    progress: bool,
) -> list[TextStats]:
    """TextStats of each (context, text) id pair from a server's prompt log-probs: the text
    tokens' log-probs and, where the server gives ranks, whether each is the argmax (rank
    1; a token tied with another for the top has rank 2 in vLLM's count). The moments of
    the next-token distribution need all of it, which no server returns: None, and Min-K%++
    is left out."""
    scored = lm.answer_scores(
        [c for c, _ in encoded], [t for _, t in encoded], progress=label if progress else False
    )
    return [
        TextStats(
            lp.double().tolist(),
            None if ranks is None else [r == 1 for r in ranks],
            None,
            None,
            len(zlib.compress(text.encode("utf-8"))),
        )
        for (lp, ranks), text in zip(scored, texts)
    ]


def fitting_pairs(
    lm: AnyModel, prompts: Sequence[str], texts: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """Each text as the answer to its prompt (`pair_ids`), every pair checked to fit the
    model's context as scoring checks it ("item N: prompt + answer is ... tokens"): a longer
    one was scored past a rotary model's positions, and its numbers taken as they came."""
    from unpact.scoring import check_pairs

    encoded = []
    for n, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        with said_of(f"item {n}"):
            encoded.append(pair_ids(lm, prompt, text))
    ids, answers = check_pairs([p for p, _ in encoded], [a for _, a in encoded], lm.max_length)
    return list(zip(ids, answers))


def document_stats(
    lm: AnyModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 512,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[TextStats]:
    """Teacher-forced statistics of raw documents (no chat template), as MUSE scores its
    forget and holdout texts (`metrics/privleak.py`: the text encoded with the tokenizer's
    special tokens, each token after the first given the ones before it): a tokenizer that
    opens a text with a BOS (Llama's) has every text token scored after it; one without
    (the default model's) every token after the first. Over the first `max_tokens` tokens
    of each document's text, and no more than the model's positions hold (ZLib's length is
    that of the text scored): a longer document crashed a model with learned positions
    (GPT-2's 1024) and was scored past a rotary model's context. A document with no token
    to score is refused."""
    encoded: list[tuple[Sequence[int], Sequence[int]]] = []
    scored: list[str] = []
    bos = list(lm.special_prefix())
    limit = min(max_tokens, lm.max_length - len(bos))
    for n, text in enumerate(texts):
        ids = list(lm.tokenize(text))[:limit]
        context, target = (bos, ids) if bos else (ids[:1], ids[1:])
        if not target:
            raise UnpactError(f"document {n}: {len(ids)} token(s), nothing to score")
        encoded.append((context, target))
        scored.append(lm.detokenize(ids))
    label = progress if isinstance(progress, str) else "Membership scores (documents)"
    return _batched_stats(lm, encoded, scored, batch_size, label, bool(progress))


def _batched_stats(
    model: AnyModel,
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    texts: list[str],
    batch_size: int,
    label: str,
    progress: bool,
) -> list[TextStats]:
    """TextStats of each (context, text) id pair: a local model's batched passes, a served
    model's prompt log-probs (`served_stats`)."""
    from unpact.scoring import answer_states, check_not_nan, evaluating, head_logits

    if not model.has_weights:
        return served_stats(cast("RemoteModel", model), encoded, texts, label, progress)
    lm = cast("LanguageModel", model)

    out: list[TextStats] = []
    with (
        progress_bar(label, total=len(texts), enabled=progress) as advance,
        torch.no_grad(),
        evaluating(lm.model),
    ):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            states = answer_states(
                lm.model, [p for p, _ in chunk], [a for _, a in chunk], share_prefix=True
            )
            # One text's next-token distributions at a time, from the batch's hidden states
            # (the same numbers, bit for bit): the whole batch's, with their log-softmax,
            # were 16 x 512 positions x the vocabulary x 2 float32s for 16 documents of 512
            # tokens: 3.2 GB on the default model's 49k, 8.4 GB on Llama 3's 128k.
            for n, ((_, answer), h) in enumerate(zip(chunk, states)):
                d = head_logits(lm.model, h).log_softmax(-1)
                check_not_nan(lm.model, [start + n], [d])
                out.append(_stats(_float64(d), answer, texts[start + n]))
            advance(len(chunk))
    return out


def _float64(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64, on its device where that has float64 (Apple's MPS has none: the CPU)."""
    return t.to("cpu", torch.float64) if t.device.type == "mps" else t.double()


def _stats(logp: torch.Tensor, answer: Sequence[int], text: str) -> TextStats:
    """TextStats from the `(len(answer), vocab)` log-distributions along the answer."""
    ids = torch.tensor(list(answer), device=logp.device)
    lp = logp.gather(-1, ids[:, None])[:, 0]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = ((p * logp.square()).sum(-1) - mu.square()).clamp_min(1e-6)
    return TextStats(
        lp.tolist(),
        (logp.argmax(-1) == ids).tolist(),
        mu.tolist(),
        var.sqrt().tolist(),
        len(zlib.compress(text.encode("utf-8"))),
    )


@in_eval_mode
def gradient_norms(
    lm: LanguageModel, prompts: Sequence[str], texts: Sequence[str], progress: bool | str = False
) -> list[float]:
    """Per text, GradNorm as open-unlearning computes it (`GradNormAttack` in its
    `src/evals/metrics/mia/gradnorm.py`, p = 2; MIMIR's attack, which it follows, too): the
    gradient of the text's mean answer NLL with respect to each weight tensor of the model,
    each tensor's L2 norm, and the mean of those norms over the tensors that get a gradient
    (`mean_weight_norm`). One backward pass each: a per-text gradient cannot share a batch.
    The model stays in eval mode, where open-unlearning switches to training mode: with
    dropout that would make the score random; without it (Llama, Qwen, SmolLM2) the two
    are the same."""

    net = lm.model
    pairs = fitting_pairs(lm, prompts, texts)
    params = [p for p in net.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    norms: list[float] = []
    label = progress if isinstance(progress, str) else "GradNorm"
    try:
        with progress_bar(label, total=len(texts), enabled=bool(progress)) as advance:
            for ids, answer in pairs:
                # torch's deterministic algorithms on a GPU (unpact.determinism)
                grads, _ = reproducibly(
                    partial(_weight_gradients, net, params, ids, answer),
                    kernels_for(lm.device, "GradNorm"),
                    "GradNorm",
                )
                squares = [float(_float64(g).square().sum()) for g in grads if g is not None]
                norms.append(mean_weight_norm(squares))
                advance(1)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return norms


def mean_weight_norm(squares: Sequence[float]) -> float:
    """GradNorm from each weight tensor's squared gradient norm: the mean of their square
    roots (open-unlearning's and MIMIR's `torch.stack(norms).mean()`), not the norm of the
    whole gradient, whose ranking of texts differs (a large tensor's gradient weighs no more
    than a norm weight's)."""
    return sum(math.sqrt(max(v, 0.0)) for v in squares) / len(squares) if squares else 0.0


class _GhostNorms:
    """Per-sample squared gradient norms of every weight from ONE batched backward pass
    (the "ghost norm" identity, Goodfellow 2015; Li et al. 2022): for a linear layer the
    per-sample gradient is sum_t g_t x_t^T, whose squared norm is the sum over position
    pairs of (g_t . g_s)(x_t . x_s), so no per-sample gradient is ever materialised. An
    embedding's per-sample gradient sums the output gradients per token row; a norm
    weight's is sum_t g_t * x_hat_t, x_hat the input normalised by its root mean square
    (RMSNorm) or after its mean is taken off (LayerNorm), whether the weight scales by w or,
    as Gemma's, by 1 + w, and a norm bias's is sum_t g_t; a weight tied between the
    embedding and the LM head gets both parts and their cross term. Samples must not
    interact (no shared prefix).

    A layer's input may carry more axes than (batch, position, feature) — Qwen 3's and
    Gemma 3's q/k norms see one vector per head — which are positions too. What the
    identity cannot read is found in the forward pass and makes `uncovered` true: an
    input whose first axis is not the batch (tokens gathered across texts, as a mixture
    of experts routes them), or a norm whose output is neither kind's x_hat times its
    weight (and plus its bias): each norm's kind is read there, so a LayerNorm under an
    RMSNorm's attribute names (Cohere's, once read as an RMSNorm: norms off by 4e-4 in
    silence) is read as what it computes. The call then falls back to a backward pass per
    text, as it does for an input embedding that scales the rows it looks up (Gemma's)."""

    def __init__(self, net: torch.nn.Module, batch: int) -> None:
        device = next(net.parameters()).device
        # sums in float64, on the model's device where it has float64 (not MPS)
        self.where = torch.device("cpu") if device.type == "mps" else device
        self.batch = batch
        # id(weight tensor) -> its per-sample squared gradient norms
        self.sq: dict[int, torch.Tensor] = {}
        self.uncovered = False
        self.norm_kind: dict[int, bool] = {}  # id(norm) -> whether it takes the mean off
        self.norm_eps: dict[int, float] = {}  # id(norm) -> its epsilon
        self.hooks: list[Any] = []
        self.embed_rows: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # id(weight) -> ids, grads
        self.head: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> x, g
        # input (address, shape, strides) -> its gram; inputs stay alive until the backward
        # pass has run (the hooks hold them), so no two share an address meanwhile
        self.grams: dict[tuple[Any, ...], torch.Tensor] = {}
        covered: set[int] = set()
        # weights an embedding shares with a linear layer (a tied LM head)
        self.tied = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                self._watch(module, self._linear)
                covered |= {id(p) for p in module.parameters(recurse=False)}
            elif isinstance(module, torch.nn.Embedding):
                covered.add(id(module.weight))  # the caller passes its gradient (embedding)
            elif (eps := _norm_eps(module)) is not None:
                self.norm_eps[id(module)] = eps
                self._watch(module, self._norm)
                covered |= {id(p) for p in module.parameters(recurse=False)}
        self.complete = all(id(p) in covered for p in net.parameters())

    def _watch(self, module: torch.nn.Module, fn: Any) -> None:
        def forward(mod: Any, args: Any, out: Any) -> None:
            x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
            if not isinstance(out, torch.Tensor) or x is None:
                self.uncovered = True
            elif out.requires_grad and self._readable(mod, fn, x, out):
                out.register_hook(lambda g: fn(mod, x, g.detach()))

        self.hooks.append(module.register_forward_hook(forward))

    def _readable(self, mod: Any, fn: Any, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether the identity reads this layer's input and output (see the class)."""
        if x.dim() < 3 or x.shape[0] != self.batch or out.shape[0] != self.batch:
            self.uncovered = True
        elif fn == self._norm:
            w = mod.weight.detach().float()
            bias = getattr(mod, "bias", None)
            b = 0.0 if bias is None else bias.detach().float()
            got = out.detach().float()
            tol = 1e-4 if out.dtype == torch.float32 else 2e-2
            # the first kind that matches, RMSNorm first (a generator: no check past it)
            kinds = (
                centred
                for centred in (False, True)
                for x_hat in [_normed(x.float(), self.norm_eps[id(mod)], centred)]
                if any(torch.allclose(got, x_hat * a + b, rtol=tol, atol=tol) for a in (w, 1 + w))
            )
            kind = next(kinds, None)
            if kind is None:
                self.uncovered = True
            else:
                self.norm_kind[id(mod)] = kind
        return not self.uncovered

    def _add(self, key: int, squares: torch.Tensor) -> None:
        """Adds per-sample squared norms (or cross terms) to those of the weight `key`
        (its id)."""
        if key not in self.sq:
            self.sq[key] = torch.zeros(self.batch, dtype=torch.float64, device=self.where)
        self.sq[key] += squares

    def _double(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in float64 as (batch, positions, features): any axes between are positions."""
        return t.to(self.where, torch.float64).reshape(t.shape[0], -1, t.shape[-1])

    def _linear(self, mod: Any, x: torch.Tensor, g: torch.Tensor) -> None:
        # layers reading one input (q, k, v; gate, up) share its gram: one product, not three
        where = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        if where not in self.grams:
            xd = self._double(x)
            self.grams[where] = xd @ xd.transpose(1, 2)
        g = self._double(g)
        gram = self.grams[where] * (g @ g.transpose(1, 2))
        self._add(id(mod.weight), gram.sum((1, 2)))
        if id(mod.weight) in self.tied:  # the LM head: its input for the cross term
            self.head[id(mod.weight)] = (self._double(x), g)
        if mod.bias is not None:
            self._add(id(mod.bias), g.sum(1).square().sum(-1))

    def embedding(self, weight: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> None:
        """The input embedding's part: its output's gradient `g` at the token `ids`."""
        self.embed_rows[id(weight)] = (ids.to(self.where), self._double(g))

    def _norm(self, mod: Any, x: torch.Tensor, g: torch.Tensor) -> None:
        centred = self.norm_kind[id(mod)]
        x_hat = self._double(_normed(x.double(), self.norm_eps[id(mod)], centred))
        g = self._double(g)
        self._add(id(mod.weight), (g * x_hat).sum(1).square().sum(-1))
        if getattr(mod, "bias", None) is not None:
            self._add(id(mod.bias), g.sum(1).square().sum(-1))

    def finish(self) -> list[float]:
        """The per-sample GradNorms (`mean_weight_norm`), once the backward pass is done
        (embeddings last: a weight tied to a linear layer adds the cross term)."""
        for key, (ids, g) in self.embed_rows.items():
            tied = self.head.get(key)
            part = torch.zeros(self.batch, dtype=torch.float64, device=self.where)
            for i in range(ids.shape[0]):
                rows, inverse = ids[i].unique(return_inverse=True)
                summed = g.new_zeros(len(rows), g.shape[-1])
                summed.index_add_(0, inverse, g[i])
                part[i] += summed.square().sum()
                if tied is not None:  # <head part, embedding part> on the rows the text uses
                    x, gh = tied
                    head_rows = gh[i][:, rows].transpose(0, 1) @ x[i]
                    part[i] += 2 * (head_rows * summed).sum()
            self._add(key, part)
        for h in self.hooks:
            h.remove()
        per_weight = [v.tolist() for v in self.sq.values()]
        return [mean_weight_norm([w[i] for w in per_weight]) for i in range(self.batch)]


def _weight_gradients(
    net: Any, params: list[torch.nn.Parameter], ids: Sequence[int], answer: Sequence[int]
) -> tuple[torch.Tensor | None, ...]:
    """The gradient of one text's mean answer NLL with respect to each of `params`."""
    from unpact.scoring import answer_logprobs

    lp = answer_logprobs(net, [ids], [answer], grad=True)[0]
    return torch.autograd.grad(-lp.mean(), params, allow_unused=True)


def _norm_eps(module: torch.nn.Module) -> float | None:
    """The epsilon of a module that looks like a norm over the last axis with a weight (an
    RMSNorm or a LayerNorm, with or without a bias; which one, and whether it is one, is
    checked on its output in the forward pass), else None."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if bias is not None and (not isinstance(bias, torch.nn.Parameter) or bias.dim() != 1):
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    if set(dict(module.named_parameters(recurse=False))) - {"weight", "bias"}:
        return None
    return float(eps)


def _normed(x: torch.Tensor, eps: float, centred: bool) -> torch.Tensor:
    """`x` over its last axis by its root mean square, or, `centred`, with its mean taken
    off and by its standard deviation (a LayerNorm's)."""
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


@in_eval_mode
def gradient_norms_batched(
    lm: LanguageModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool | str = False,
) -> list[float]:
    """`gradient_norms` from one backward pass per `batch_size` texts (`_GhostNorms`); the
    per-text loop where a model has a weight the identity does not cover.

    The identity needs each layer's input and output gradient, never a weight's gradient:
    the backward pass runs from a copy of the input embeddings that requires a gradient,
    with every weight frozen (no weight-gradient products), and the LM head is applied only
    at the positions that predict an answer token (`logits_to_keep`), the others having no
    gradient to give."""
    net = lm.model
    embed = net.get_input_embeddings()
    probe = _GhostNorms(net, 0)
    probe.finish()
    embeddings = [m for m in net.modules() if isinstance(m, torch.nn.Embedding)]
    if not probe.complete or embeddings != [embed]:  # e.g. learned position embeddings
        return gradient_norms(lm, prompts, texts, progress)
    keep = "logits_to_keep" in inspect.signature(net.forward).parameters
    pairs = fitting_pairs(lm, prompts, texts)
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    norms: list[float] = []
    label = progress if isinstance(progress, str) else "GradNorm"
    try:
        for p in params:
            p.requires_grad_(False)
        with progress_bar(label, total=len(texts), enabled=bool(progress)) as advance:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                got, _ = reproducibly(  # deterministic on a GPU (unpact.determinism)
                    partial(_ghost_chunk, net, embed, chunk, keep),
                    kernels_for(lm.device, "GradNorm"),
                    "GradNorm",
                )
                if got is None:
                    break
                norms += got
                advance(len(chunk))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if len(norms) < len(pairs):  # a layer the identity cannot read: a backward per text
        return gradient_norms(lm, prompts, texts, progress)
    return norms


def _ghost_chunk(
    net: Any,
    embed: Any,
    chunk: Sequence[tuple[Sequence[int], Sequence[int]]],
    keep: bool,
) -> list[float] | None:
    """The gradient norms of one chunk of (prompt, answer) ids from one backward pass, or
    None where the forward pass met a layer the identity cannot read (`_GhostNorms`)."""
    from unpact.scoring import embeddings_in, right_padded

    ids, mask = right_padded([list(p) + list(a) for p, a in chunk])
    ids, mask = ids.to(net.device), mask.to(net.device)
    # the positions predicting an answer token, in any text of the chunk
    first = min(len(p) for p, _ in chunk) - 1
    last = max(len(p) + len(a) for p, a in chunk) - 1
    ghost = _GhostNorms(net, len(chunk))
    extra = {"logits_to_keep": torch.arange(first, last, device=ids.device)}
    try:
        # on input_ids, the embedding layer's output a leaf: what the model does to it
        # afterwards (Falcon-H1's multiplier) stays in the graph
        with embeddings_in(net) as used:
            logits = net(input_ids=ids, attention_mask=mask, **(extra if keep else {})).logits
        inputs = used["x"]
        # an embedding that changes the rows it looks up (Gemma's scales them by
        # sqrt(hidden)) gives its weight another gradient than its output's
        if not torch.equal(inputs, torch.nn.functional.embedding(ids, embed.weight)):
            return None
        if ghost.uncovered:
            return None
        offset = first if keep else 0
        logp = logits.float().log_softmax(-1)
        loss = logits.new_zeros((), dtype=torch.float32)
        for i, (p, a) in enumerate(chunk):
            at = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=logp.device)
            target = torch.tensor(list(a), device=logp.device)
            loss = loss - logp[i, at - offset, target].mean()
        (grad,) = torch.autograd.grad(loss, inputs)
        ghost.embedding(embed.weight, ids, grad)
    finally:
        norms = ghost.finish()  # and its hooks removed
    return norms
