"""Gradient attributions on input embeddings, as checks of unPact (SPEC section 1's units).

Two standard alternatives to leave-one-out, on the same target (the answer's mean
log-prob LP(x, y)) and the same units (the user's content tokens, or words):

- `grad_x_input`: per token, `e_t . dLP/de_t` (gradient times input, summed over the
  embedding dimensions);
- `integrated_gradients` (Sundararajan et al. 2017): per token,
  `(e_t - e'_t) . mean_s dLP/de_t at e' + a_s (e - e')`, the path integral approximated by
  the midpoint rule on `steps` points. The baseline e' replaces the content tokens'
  embeddings by the mean embedding of the vocabulary (`ig_baseline: mean`, default), by
  zeros (`zero`) or by the unk/pad token's embedding (`pad`); the chat template's tokens
  keep theirs. Completeness: the scores sum to LP(x) - LP(x') up to the quadrature error
  (the tests check it). The zero baseline converges badly on RMSNorm models: the norm is
  scale-invariant except near 0, so the integrand spikes as the path leaves the origin
  (on the tiny test model, 512 midpoints still missed the sum by 0.1 nats where the mean
  baseline was within 3e-4); and a pad token's embedding is often exactly zero too.

A unit's score is the sum of its tokens' scores. `agreement` compares a gradient
attribution with unPact's contributions: Spearman rank correlation and top-k overlap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from unpact.attribution import Attribution, UnitKind, make_units
from unpact.determinism import kernels_for, reproducibly
from unpact.errors import UnpactError, said_of
from unpact.models import LanguageModel
from unpact.progress import progress_bar
from unpact.scoring import (
    check_fits,
    embeddings_in,
    head_logprobs,
    in_eval_mode,
    lm_body_and_head,
)
from unpact.types import follow

GradientMethod = Literal["grad_x_input", "integrated_gradients"]
GRADIENT_METHODS: tuple[str, ...] = ("grad_x_input", "integrated_gradients")
IG_BASELINES: tuple[str, ...] = ("mean", "zero", "pad")


@dataclass(frozen=True)
class GradientAttribution:
    """Per unit scores of one (prompt, answer) by a gradient method."""

    method: str
    unit_texts: list[str]
    scores: list[float]
    lp: float  # LP(x, y)
    baseline_lp: float | None  # LP(x', y) for integrated gradients


def _lp(
    model: object, embeds: torch.Tensor, ids: torch.Tensor, n_prompt: int, answer: torch.Tensor
) -> torch.Tensor:
    """Mean answer log-prob per row of `embeds` (rows, prompt + answer, d), the embeddings
    of the token `ids` or a point on a path from them, fed where the model's embedding
    layer answers (`scoring.embeddings_in`: what it does to them afterwards stays in)."""
    body, _ = lm_body_and_head(model)
    with embeddings_in(model, embeds):
        rows = ids[None].expand(embeds.shape[0], -1)
        hidden = body(input_ids=rows, use_cache=False).last_hidden_state
    picked = hidden[:, n_prompt - 1 : n_prompt - 1 + len(answer)]
    targets = answer.expand(embeds.shape[0], -1)
    return head_logprobs(model, picked, targets).mean(-1)


@in_eval_mode
def gradient_attributions(
    lm: LanguageModel,
    prompts: Sequence[str],
    answers: Sequence[str | Sequence[int]],
    *,
    method: GradientMethod = "integrated_gradients",
    unit: UnitKind = "token",
    steps: int = 64,
    ig_baseline: Literal["mean", "zero", "pad"] = "mean",
    chat_template: bool | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[GradientAttribution]:
    """Gradient attribution of each answer (text, or token ids as in an unPact record) to
    the units of its prompt (module docstring)."""
    if method not in GRADIENT_METHODS:
        raise UnpactError(f"unknown gradient method {method!r}; choose {GRADIENT_METHODS}")
    if ig_baseline not in IG_BASELINES:
        raise UnpactError(f"unknown ig_baseline {ig_baseline!r}; choose {IG_BASELINES}")
    if steps < 1:
        raise UnpactError("integrated gradients needs at least one step")
    if not lm.has_weights:
        raise UnpactError("gradient attributions need the model's weights (a local model)")
    out = []
    label = "Gradient x input" if method == "grad_x_input" else "Integrated gradients"
    with progress_bar(label, total=len(prompts), enabled=progress) as advance:
        for n, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            # on a GPU under torch's deterministic algorithms (unpact.determinism): the
            # embedding's and attention's backward add with atomics there by default
            one = partial(
                _one,
                n,
                lm,
                prompt,
                answer,
                method,
                unit,
                steps,
                ig_baseline,
                chat_template,
                batch_size,
            )
            attribution, _ = reproducibly(one, kernels_for(lm.device, label), label)
            out.append(attribution)
            advance(1)
    return out


def _one(
    n: int,
    lm: LanguageModel,
    prompt: str,
    answer: str | Sequence[int],
    method: str,
    unit: UnitKind,
    steps: int,
    ig_baseline: str,
    chat_template: bool | None,
    batch_size: int,
) -> GradientAttribution:
    model = lm.model
    embedding = model.get_input_embeddings()
    with said_of(f"item {n}"):
        enc = lm.encode_prompt(prompt, chat_template)
    if isinstance(answer, str):
        enc, answer_ids = follow(lm, enc, answer)
    else:
        answer_ids = tuple(answer)
    if not answer_ids:
        raise UnpactError(f"item {n}: empty answer: give the text whose log-prob to attribute")
    check_fits(n, len(enc.input_ids) + len(answer_ids), lm.max_length)  # not past its positions
    units = make_units(lm, enc, unit)
    ids = torch.tensor([*enc.input_ids, *answer_ids], device=lm.device)
    target = torch.tensor(answer_ids, device=lm.device)
    n = len(enc.input_ids)
    with torch.no_grad():
        e = embedding(ids[None]).detach()
    # in the embeddings' dtype (a model evaluated in bfloat16: a float32 mask made the
    # baseline, and every path point, float32, which the bf16 weights refused)
    content = torch.zeros(1, len(ids), 1, device=lm.device, dtype=e.dtype)
    content[0, enc.content_start : enc.content_end] = 1.0
    with torch.no_grad():
        if ig_baseline == "pad":
            pad = torch.tensor([lm.default_baseline_token()], device=lm.device)
            fill = embedding(pad)[0].expand_as(e)
        elif ig_baseline == "mean":
            fill = embedding.weight.mean(0).expand_as(e)
        else:
            fill = torch.zeros_like(e)
    base = e * (1 - content) + fill * content
    if method == "grad_x_input":
        x = e.clone().requires_grad_(True)
        lp = _lp(model, x, ids, n, target)
        (grad,) = torch.autograd.grad(lp.sum(), x)
        per_token = (grad.float() * e.float())[0].sum(-1)  # summed in float32
        lp_value, base_value = float(lp.detach()), None
    else:
        total = torch.zeros_like(e, dtype=torch.float32)  # the gradients summed in float32
        alphas = [(s + 0.5) / steps for s in range(steps)]
        for k in range(0, steps, batch_size):
            a = torch.tensor(alphas[k : k + batch_size], device=lm.device, dtype=e.dtype)
            x = (base + a[:, None, None] * (e - base)).requires_grad_(True)
            lp = _lp(model, x, ids, n, target)
            (grad,) = torch.autograd.grad(lp.sum(), x)
            total += grad.float().sum(0, keepdim=True)
        per_token = ((e - base).float() * total / steps)[0].sum(-1)
        with torch.no_grad():
            lp_value = float(_lp(model, e, ids, n, target))
            base_value = float(_lp(model, base, ids, n, target))
    scores = [float(sum(per_token[p] for p in u.positions)) for u in units]
    return GradientAttribution(method, [u.text for u in units], scores, lp_value, base_value)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on mid-ranks; tests/unit/test_gradient.py holds
    it to scipy's `spearmanr`); NaN when either side is constant."""
    if len(a) != len(b):
        raise ValueError("the two attributions have different numbers of units")
    ra, rb = _ranks(a), _ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """|top-k units by a ∩ top-k by b| / k (k capped at the number of units)."""
    k = min(k, len(a))
    if k <= 0:
        return math.nan
    top = lambda v: set(sorted(range(len(v)), key=lambda i: (-v[i], i))[:k])  # noqa: E731
    return len(top(a) & top(b)) / k


def check_unpact(
    lm: LanguageModel,
    records: Sequence[Attribution],
    method: GradientMethod,
    *,
    steps: int = 64,
    ig_baseline: Literal["mean", "zero", "pad"] = "mean",
    top_k: int = 3,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per unPact record: the gradient method's unit scores for the record's own prompt,
    units and answer tokens, with their Spearman correlation and top-k overlap with the
    record's contributions (and LP, and for integrated gradients LP at the baseline).
    An undefined agreement (constant scores, no units) is None, so the rows are valid JSON."""
    if not records:
        return []
    found = gradient_attributions(
        lm,
        [r.prompt for r in records],
        [r.answer_ids for r in records],
        method=method,
        unit=records[0].unit,  # type: ignore[arg-type]
        steps=steps,
        ig_baseline=ig_baseline,
        chat_template=records[0].chat_template,
        progress=progress,
    )
    rows = []
    for r, g in zip(records, found, strict=True):
        if g.unit_texts != [u.text for u in r.units]:  # the same encoding: cannot happen
            raise UnpactError(f"{method} found other units than unPact for {r.prompt!r}")
        rows.append(
            {
                "scores": g.scores,
                "spearman": _finite(spearman(g.scores, r.contributions)),
                "top_k_overlap": _finite(top_k_overlap(g.scores, r.contributions, top_k)),
                "lp": g.lp,
                "baseline_lp": g.baseline_lp,
            }
        )
    return rows


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
