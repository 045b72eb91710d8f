"""The statistics `unpact.membership` reads, computed with a local model: per text, one
batched teacher-forced pass of the scoring kernel (token log-probs, argmax flags, the moments
of log p(z) under the model's next-token distribution), and per-text gradient norms."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unpact.membership import TextStats
from unpact.progress import progress_bar

if TYPE_CHECKING:
    from unpact.models import LanguageModel


def token_stats(
    lm: LanguageModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[TextStats]:
    """Teacher-forced statistics of each `texts[i]` as the answer to `prompts[i]` (in the
    chat format evaluation uses), batched: one pass per `batch_size` texts."""
    from unpact.scoring import answer_distributions

    encoded = [(lm.encode_prompt(p).input_ids, lm.encode_answer(t)) for p, t in zip(prompts, texts)]
    out: list[TextStats] = []
    label = progress if isinstance(progress, str) else "Membership scores"
    with progress_bar(label, total=len(texts), enabled=bool(progress)) as advance:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            with torch.no_grad():
                dists = answer_distributions(
                    lm.model, [p for p, _ in chunk], [a for _, a in chunk], share_prefix=True
                )
            for (_, answer), d, text in zip(chunk, dists, texts[start : start + batch_size]):
                out.append(_stats(d.double(), answer, text))
            advance(len(chunk))
    return out


def _stats(logp: torch.Tensor, answer: Sequence[int], text: str) -> TextStats:
    """TextStats from the `(len(answer), vocab)` log-distributions along the answer."""
    ids = torch.tensor(list(answer))
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


def gradient_norms(
    lm: LanguageModel, prompts: Sequence[str], texts: Sequence[str], progress: bool | str = False
) -> list[float]:
    """Per text, the L2 norm over all the model's weights of the gradient of its mean
    answer NLL (one backward pass each: a per-text gradient cannot share a batch)."""
    from unpact.scoring import answer_logprobs

    net = lm.model
    params = [p for p in net.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    norms: list[float] = []
    label = progress if isinstance(progress, str) else "GradNorm"
    try:
        with progress_bar(label, total=len(texts), enabled=bool(progress)) as advance:
            for prompt, text in zip(prompts, texts):
                lp = answer_logprobs(
                    net, [lm.encode_prompt(prompt).input_ids], [lm.encode_answer(text)], grad=True
                )[0]
                grads = torch.autograd.grad(-lp.mean(), params, allow_unused=True)
                total = sum(float(g.double().square().sum()) for g in grads if g is not None)
                norms.append(math.sqrt(total))
                advance(1)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return norms
