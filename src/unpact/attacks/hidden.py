"""The residual stream of a local model: read it at every layer, project a direction out of
it, and read the vocabulary from it (logit lens); the maths of the hidden-state attacks.

Positions: a prompt's state is the residual stream at its last token (the position that
predicts the answer's first token), as the first decoder layer receives it (index 0: the
embeddings, with what the model adds to them, e.g. GPT-2's positions or Gemma's scaling) and
after each decoder layer (index l + 1), as hooks on those layers see it: explicit, the same
in every transformers version and architecture, and before the final norm (which the logit
lens applies itself).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from unpact.errors import UnpactError
from unpact.scoring import (
    decoder_layers,
    final_norm,
    head_logits,
    in_eval_mode,
    layer_output,
    lm_body_and_head,
    right_padded,
    with_layer_output,
)


def residual_size(model: Any) -> int:
    """Points of the residual stream read: before the first decoder layer, then after each."""
    return len(decoder_layers(model)) + 1


def _on_residual(model: Any, fn: Any, where: Sequence[int] | None = None) -> list[Any]:
    """Hooks calling `fn(hidden)` on the residual stream at each index of `where` (all by
    default): 0 is the first decoder layer's input (the embeddings, with whatever the model
    adds to them: positions, scaling), l + 1 is layer l's output. When `fn` returns a
    tensor, it replaces the stream there. Returns the handles."""
    layers = decoder_layers(model)
    handles = []
    for k in range(len(layers) + 1) if where is None else where:
        if k == 0:

            def before(_m: Any, args: Any, kwargs: Any) -> Any:
                if args:
                    new = fn(layer_output(args[0]))
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(layer_output(kwargs["hidden_states"]))
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handles.append(layers[0].register_forward_pre_hook(before, with_kwargs=True))
        else:

            def after(_m: Any, _i: Any, output: Any) -> Any:
                new = fn(layer_output(output))
                return None if new is None else with_layer_output(output, new)

            handles.append(layers[k - 1].register_forward_hook(after))
    return handles


def _capture(into: list[torch.Tensor], at: tuple[torch.Tensor, torch.Tensor], h: Any) -> None:
    into.append(h[at[0].to(h.device), at[1].to(h.device)].float().cpu())


@in_eval_mode
@torch.no_grad()
def last_states(model: Any, seqs: Sequence[Sequence[int]], batch: int = 16) -> torch.Tensor:
    """The residual stream at each sequence's last token: (len(seqs), layers + 1, hidden),
    float32 on the CPU."""
    device = next(model.parameters()).device
    found: list[torch.Tensor] = []
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        ids, mask = right_padded(chunk)
        captured: list[torch.Tensor] = []
        at = (torch.arange(len(chunk)), torch.tensor([len(s) - 1 for s in chunk]))
        handles = _on_residual(model, partial(_capture, captured, at))
        try:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        found.append(torch.stack(captured, dim=1))
    return torch.cat(found)


@in_eval_mode
@torch.no_grad()
def continuation_states(
    model: Any, prompt: Sequence[int], continuations: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The residual stream at the last token of `prompt + c` for each continuation `c`:
    (len(continuations), layers + 1, hidden), float32 on the CPU. The prompt runs once and
    its keys and values are shared by the continuations (right-padded, explicit positions),
    so the states equal `last_states` of the concatenations up to float rounding, at the
    cost of the continuations' tokens alone. A model whose layers keep a recurrent state
    instead (`scoring.layers_without_keys`: Mamba, Qwen3-Next) runs the concatenations."""
    from unpact.scoring import cache_kwarg, cache_of, layers_without_keys

    if layers_without_keys(model):
        return last_states(model, [[*prompt, *c] for c in continuations])
    body, _ = lm_body_and_head(model)
    device = next(model.parameters()).device
    n = len(continuations)
    first = body(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True)
    cache = cache_of(first)
    cache.batch_repeat_interleave(n)
    ids, mask = right_padded(continuations)
    full_mask = torch.cat([torch.ones(n, len(prompt), dtype=torch.long), mask], dim=1)
    positions = len(prompt) + torch.arange(ids.shape[1])[None].expand(n, -1)
    captured: list[torch.Tensor] = []
    at = (torch.arange(n), torch.tensor([len(c) - 1 for c in continuations]))
    handles = _on_residual(model, partial(_capture, captured, at))
    try:
        body(
            input_ids=ids.to(device),
            attention_mask=full_mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **cache_kwarg(body, cache),
        )
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured, dim=1)


def project_out(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`hidden` without its component along `direction`: h - (h . d) d, d of unit norm."""
    d = direction / direction.norm()
    d = d.to(hidden.dtype)
    return hidden - (hidden @ d).unsqueeze(-1) * d


@contextmanager
def ablated(model: Any, direction: torch.Tensor, at: Sequence[int] | None = None) -> Iterator[None]:
    """Inside the block, `direction` is projected out of the residual stream at every
    position, after the embeddings and after each decoder layer (`at`: only after these
    residual indices, 0 = embeddings, l + 1 = layer l). The hooks go when the block ends."""
    if float(direction.norm()) == 0.0:
        raise UnpactError("the direction to ablate is zero: the two models' activations agree")
    device = next(model.parameters()).device
    d = direction.to(device)
    handles = _on_residual(model, lambda h: project_out(h, d), at)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The difference-of-means direction between two sets of states (rows), unit norm."""
    d = a.float().mean(0) - b.float().mean(0)
    n = d.norm()
    return d / n if float(n) > 0 else d


@torch.no_grad()
def lens_logits(model: Any, states: torch.Tensor) -> torch.Tensor:
    """Logit lens: the vocabulary logits read from residual states (..., hidden) through
    the model's final norm and LM head, as nostalgebraist's logit lens does. At the last
    layer this is the model's own output."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    hidden = states.to(device=device, dtype=dtype)
    norm = final_norm(model)
    if norm is not None:
        hidden = norm(hidden)
    return head_logits(model, hidden).cpu()


def token_ranks(logits: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `logits` (..., vocab): the rank of `token` (0 = the top token; ties
    counted in its favour) and its probability."""
    target = logits[..., token].unsqueeze(-1)
    rank = (logits > target).sum(-1)
    prob = torch.softmax(logits.float(), dim=-1)[..., token]
    return rank, prob


def probe_accuracy(
    train_x: Any, train_y: Any, test_x: Any, test_groups: list[list[int]], correct: list[int]
) -> tuple[list[bool], Any]:
    """A linear probe (scikit-learn's logistic regression on standardised features) trained
    to tell correct options from wrong ones (`train_y` 1/0); on the test rows, each item's
    pick is its option (rows `test_groups[i]`) the probe scores highest, and it is right when
    that is option `correct[i]`. Returns the per-item verdicts and the fitted probe."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(np.asarray(train_y).tolist())) < 2:
        raise UnpactError("the probe needs both correct and wrong options to train on")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(np.asarray(train_x), np.asarray(train_y))
    scores = probe.decision_function(np.asarray(test_x)) if len(test_x) else np.zeros(0)
    verdicts = [int(np.argmax(scores[rows])) == right for rows, right in zip(test_groups, correct)]
    return verdicts, probe
