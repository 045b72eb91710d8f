"""`unpact serve`'s logit shaping: what vLLM's sampler does to a request's logits before
the temperature (allowed tokens, bad words, logit bias, penalties), as a transformers
logits processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shaping:
    """What vLLM's sampler does to a request's logits before the temperature, in its order
    (vLLM v1 `Sampler.apply_logits_processors`, then `apply_penalties`): every token but
    the `allowed` ones (`allowed_token_ids`) ruled out; the last token of each of the `bad`
    words' token ids ruled out where the completion so far ends with the ones before it
    (`bad_words`, vLLM's `apply_bad_words`); each `bias` (`logit_bias`, clamped to
    [-100, 100]) added; a token's logit where the token is in the
    prompt or the completion so far divided by `repetition` if positive, multiplied by it
    if not; `frequency` times the token's count in the completion and `presence` where it
    is in it subtracted. `ignore_eos`: the model's EOS ends nothing (the request's stop ids
    still do), though every stop id stays out of the first `min_tokens` tokens, as vLLM's
    MinTokens processor keeps them. Log-probs are the model's own (vLLM's raw_logprobs)."""

    bias: tuple[tuple[int, float], ...] = ()
    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0
    ignore_eos: bool = False
    allowed: tuple[int, ...] | None = None
    bad: tuple[tuple[int, ...], ...] = ()

    @property
    def neutral(self) -> bool:
        """Whether the logits are left as they are."""
        penalised = self.repetition != 1 or self.presence or self.frequency
        return not (self.bias or penalised or self.allowed is not None or self.bad)

    def processor(self, width: int, held: list[int], least: int) -> Any:
        """A transformers logits processor doing this to rows whose first `width` ids are the
        prompt, `held` kept out of the first `least` generated tokens; None if nothing."""
        from transformers.generation import LogitsProcessor, LogitsProcessorList

        if self.neutral and not (least and held):
            return None
        shaping = self

        class _Shape(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                return shaping.apply(input_ids, scores, width, held if least else [], least)

        return LogitsProcessorList([_Shape()])

    def apply(
        self, ids: torch.Tensor, scores: torch.Tensor, width: int, held: list[int], least: int
    ) -> torch.Tensor:
        """`scores` (rows by vocabulary) shaped for the rows `ids` (prompt, then output)."""
        scores = scores.clone()
        out = ids[:, width:]
        if self.allowed is not None:
            kept = scores[:, list(self.allowed)]
            scores.fill_(float("-inf"))[:, list(self.allowed)] = kept
        for row, past in enumerate(out.tolist() if self.bad else []):
            for *before, last in self.bad:
                if len(before) <= len(past) and past[len(past) - len(before) :] == before:
                    scores[row, last] = float("-inf")
        if held and out.shape[1] < least:
            scores[:, held] = float("-inf")
        if self.bias:
            tokens, biases = zip(*self.bias, strict=True)
            scores[:, list(tokens)] += torch.tensor(
                biases, dtype=scores.dtype, device=scores.device
            )
        if self.repetition != 1:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)
            penalised = torch.where(scores > 0, scores / self.repetition, scores * self.repetition)
            scores = torch.where(seen, penalised, scores)
        if self.presence or self.frequency:
            counts = torch.zeros_like(scores).scatter_add_(
                1, out, torch.ones_like(out, dtype=scores.dtype)
            )
            scores = (
                scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
            )
        return scores
