"""`unpact serve`'s greedy completions generated together, as vLLM's engine batches the
requests in flight: a client that keeps several requests open (unpact's remote client keeps
`remote.concurrency`, 16) had them answered one after another, each a batch of one, where
one padded `generate` answers them in about the time of a few (`benchmarks/serve_batch.py`).

Only plain greedy completions are batched: temperature 0, one choice, nothing shaping the
logits, no stop strings, stop token ids or `min_tokens`, the model's EOS ending them (what
unpact's client and an LLM judge ask). Their rows need nothing of the request but its
prompt and `max_tokens`, so a batch holds requests of one `max_tokens` (a long one would
keep the short ones waiting for it), of one prompt length for a model that reads its left
padding (`scoring.reads_padding`), up to `max_num_seqs` of them, as vLLM's option names it,
or as many as their keys and values allow (`scoring.sample_rows_at_once`).
A batch generates exactly what `generated_rows` generates for its prompts left-padded
together, as the local `generate` batches them; like vLLM's answers, a request's greedy
answer can then move with what shares its batch, by float rounding alone. With
`max_num_seqs` 1 every request is a batch of its own, as before."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import torch

from unpact.models import LanguageModel
from unpact.scoring import generated_rows, reads_padding, sample_rows_at_once
from unpact.serve.cancel import Cancelled, current_event, left, stopping

# a prompt, its max_tokens, its client's disconnection event, and where its row goes
_Waiting = tuple[list[int], int, "threading.Event | None", "Future[list[int]]"]


def _next_batch(
    ready: list[_Waiting], size: int, same_length: bool
) -> tuple[list[_Waiting], list[_Waiting]]:
    """The first waiting request and up to `size` - 1 more after it of its `max_tokens`
    (and, `same_length`, of its prompt length), in the order they came; and the rest."""
    first = ready[0]

    def fits(w: _Waiting) -> bool:
        return w[1] == first[1] and (not same_length or len(w[0]) == len(first[0]))

    batch = [first]
    rest: list[_Waiting] = []
    for w in ready[1:]:
        (batch if len(batch) < size and fits(w) else rest).append(w)
    return batch, rest


class GenerateBatcher:
    """Generates plain greedy completions (`batchable`) in batches: a worker thread takes
    the requests waiting, up to `max_num_seqs` of one `max_tokens`, and generates them in
    one padded `generate` while holding the model (`lock`)."""

    def __init__(self, lm: LanguageModel, lock: threading.Lock, max_num_seqs: int) -> None:
        self.lm = lm
        self.lock = lock
        self.size = max_num_seqs
        self.waiting: queue.Queue[_Waiting] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, ids: list[int], max_tokens: int) -> Future[list[int]]:
        """The future of the prompt's greedy row (up to `max_tokens` ids, as generated: the
        EOS that ended it kept, padding after it): generated with whatever else waits. A
        request whose client goes (`unpact.serve.cancel`) is left out of its batch, or its
        row stopped there, and its future raises `Cancelled`."""
        done: Future[list[int]] = Future()
        self.waiting.put((ids, max_tokens, current_event(), done))
        return done

    def _work(self) -> None:
        ready: list[_Waiting] = []
        while True:
            if not ready:
                ready.append(self.waiting.get())
            while True:  # and whatever else is waiting
                try:
                    ready.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            with self.lock:  # the model's: `reads_padding` runs it the first time
                try:
                    batch, ready = _next_batch(ready, self._fits(ready), self._same_length())
                except Exception:  # never expected: the first alone, as it can always go
                    batch, ready = ready[:1], ready[1:]
                self._serve(batch)

    def _serve(self, batch: list[_Waiting]) -> None:
        """Generates the batch (the model held) and hands each request its row, or the
        error (a worker that died would leave every later request waiting); a request whose
        client has gone gets `Cancelled`, and nothing is generated for it if it went while
        waiting."""
        kept = []
        for w in batch:
            w[3].set_exception(Cancelled()) if left(w[2]) else kept.append(w)
        if not kept:
            return
        try:
            rows = self._run(kept)
            for w, row in zip(kept, rows, strict=True):
                w[3].set_exception(Cancelled()) if left(w[2]) else w[3].set_result(row)
        except Exception as exc:  # handed to the requests waiting for it
            for w in kept:
                if not w[3].done():
                    w[3].set_exception(exc)

    def _fits(self, ready: list[_Waiting]) -> int:
        """How many of the first request's kind one batch holds: `max_num_seqs`, or fewer
        where their keys and values would pass what one `generate` of samples may hold
        (`scoring.sample_rows_at_once`: a chat request that leaves `max_tokens` unset asks
        for the model's whole context, and 16 rows of 8,192 tokens of the 135M model hold
        6 GB)."""
        wanted = ready[0][1]
        longest = max(len(w[0]) for w in ready if w[1] == wanted)
        return min(self.size, sample_rows_at_once(self.lm.model, longest + wanted) or self.size)

    def _same_length(self) -> bool:
        """Whether a batch must hold prompts of one length (a model that reads its left
        padding); so where the model fails to tell: its batches then fail as they will."""
        try:
            return reads_padding(self.lm)
        except Exception:
            return True

    def _run(self, batch: list[_Waiting]) -> list[list[int]]:
        from transformers.generation import StoppingCriteriaList

        with torch.no_grad():
            return generated_rows(
                self.lm,
                [w[0] for w in batch],
                batch[0][1],
                None,
                1.0,
                1,
                nan_watch=False,  # vLLM serves what the model generates
                # a row whose client has gone ends; the others go on
                stopping_criteria=StoppingCriteriaList([stopping([w[2] for w in batch])]),
            )
