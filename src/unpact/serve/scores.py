"""`unpact serve`'s scoring: a sequence's log-probs, ranks and most likely tokens as vLLM
reports them, and the batcher that scores the sequences waiting together in one padded
forward pass (as far as a token budget allows)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from unpact.models import LanguageModel
from unpact.scoring import right_padded


def prompt_logprobs(lm: LanguageModel, ids: list[int]) -> list[float]:
    """log p(x_t | x_<t) for t >= 1, from one forward pass over the whole sequence."""
    return sequence_scores(lm, ids, 0).lps[: len(ids) - 1]


@dataclass(frozen=True)
class Scored:
    """A sequence's log-probs as vLLM reports them, for each position t >= 1 of the sequence
    followed by its greedy next token (so one scoring pass serves a prompt and a one-token
    greedy completion of it): log p(x_t | x_<t), x_t's rank (vLLM's: how many tokens are
    at least as likely, 1 for the most likely) and the k most likely tokens (id,
    log-prob), most likely first; and that greedy next token."""

    lps: list[float]
    ranks: list[int]
    tops: list[list[tuple[int, float]]]
    next_id: int


def scores_of(logits: torch.Tensor, ids: list[int], k: int) -> Scored:
    """`Scored` from a sequence's logits (one row per token)."""
    logp = torch.log_softmax(logits.float(), -1)
    following = int(logits[-1].argmax())
    target = torch.tensor([*ids[1:], following], dtype=torch.long, device=logits.device)
    lps = logp.gather(-1, target[:, None])
    ranks = (logp >= lps).sum(-1)
    tops: list[list[tuple[int, float]]] = [[] for _ in ids]
    if k > 0:
        values, top_ids = logp.topk(min(k, logp.shape[-1]), -1)
        tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    return Scored(lps.squeeze(-1).tolist(), ranks.tolist(), tops, following)


def sequence_scores(lm: LanguageModel, ids: list[int], k: int) -> Scored:
    """`Scored` of one sequence, from one forward pass over it."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0]
        return scores_of(logits, ids, k)


# a sequence to score, how many most likely tokens to find, and where its scores go
_Waiting = tuple[list[int], int, "Future[Scored]"]


def _within(ready: list[_Waiting], budget: int) -> tuple[list[_Waiting], list[_Waiting]]:
    """The first sequences whose padded batch stays within `budget` tokens (at least one),
    and the rest."""
    n, longest = 1, len(ready[0][0])
    while n < len(ready) and (n + 1) * max(longest, len(ready[n][0])) <= budget:
        longest = max(longest, len(ready[n][0]))
        n += 1
    return ready[:n], ready[n:]


class ScoreBatcher:
    """Scores token sequences (per-token log-probs and the greedy next token) in batches:
    a worker thread takes whatever requests are waiting, up to `token_budget` padded
    tokens, and runs them through the model in one pass."""

    def __init__(self, lm: LanguageModel, lock: threading.Lock, token_budget: int = 4096):
        self.lm = lm
        self.lock = lock
        self.budget = token_budget
        self.waiting: queue.Queue[list[_Waiting]] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, seqs: list[tuple[list[int], int]]) -> list[Future[Scored]]:
        """The futures of the sequences' `Scored` (each with its `k` most likely tokens at
        each position), handed over together: they are scored in one pass as far as the
        budget allows."""
        group: list[_Waiting] = [(ids, k, Future()) for ids, k in seqs]
        if group:
            self.waiting.put(group)
        return [done for _, _, done in group]

    def _work(self) -> None:
        ready: list[_Waiting] = []
        while True:
            if not ready:
                ready += self.waiting.get()
            while True:  # and whatever else is waiting
                try:
                    ready += self.waiting.get_nowait()
                except queue.Empty:
                    break
            batch, ready = _within(ready, self.budget)
            try:
                with self.lock:
                    results = self._run([(ids, k) for ids, k, _ in batch])
                for (_, _, done), r in zip(batch, results, strict=True):
                    done.set_result(r)
            except Exception as exc:  # handed to the requests waiting for it
                for _, _, done in batch:
                    done.set_exception(exc)

    def _run(self, seqs: list[tuple[list[int], int]]) -> list[Scored]:
        lm = self.lm
        ids, mask = right_padded([s for s, _ in seqs])
        with torch.no_grad():
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
            return [scores_of(logits[r, : len(s)], s, k) for r, (s, k) in enumerate(seqs)]
