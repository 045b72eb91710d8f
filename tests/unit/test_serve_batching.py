"""How `unpact serve` batches what is waiting: its scoring batcher cuts it into passes (the
first sequences whose padded batch, count times the longest, stays within the token budget,
at least one), its generation batcher into batches of plain greedy completions of one
`max_tokens`, each row that of its prompt alone."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from unpact.serve.scores import _within


def waiting(*lengths: int) -> list:
    return [([0] * n, 0, Future()) for n in lengths]


def test_a_batch_is_the_first_sequences_within_the_budget():
    ready = waiting(3, 5, 2, 9)
    batch, rest = _within(ready, 15)  # 3 x 5 = 15 fits, 4 x 9 = 36 does not
    assert batch == ready[:3] and rest == ready[3:]
    batch, rest = _within(ready, 14)  # 2 x 5 = 10 fits, 3 x 5 = 15 does not
    assert batch == ready[:2] and rest == ready[2:]


def test_a_sequence_longer_than_the_budget_is_a_pass_of_its_own():
    ready = waiting(50, 1)
    assert _within(ready, 10) == (ready[:1], ready[1:])
    assert _within(ready[1:], 10) == (ready[1:], [])


def test_the_model_list_is_vllm_s_cards():
    """vLLM's ModelCard: `owned_by` "vllm" (its default, which clients read to tell vLLM
    from SGLang or llama.cpp; this server said "unpact"), and `root` the model it serves,
    its hub revision kept (a remote run keys the served model's stages by it)."""
    from unpact.serve import _Server
    from unpact.testing import tiny_model

    local, hub = tiny_model(seed=0), tiny_model(seed=0)
    hub.spec = "org/name@0123abc"
    cards = _Server({"local": local, "hub": hub}).list_models()["data"]
    assert [c["owned_by"] for c in cards] == ["vllm", "vllm"]
    assert [(c["id"], c["root"]) for c in cards] == [
        ("local", local.spec),
        ("hub", "org/name@0123abc"),
    ]


# ------------------------------------------------- greedy completions generated together


def held(*specs: tuple[int, int]) -> list:
    """Waiting greedy requests: (prompt length, max_tokens) each."""
    return [([1] * n, m, None, Future()) for n, m in specs]


def test_a_generation_batch_holds_requests_of_the_first_one_s_max_tokens_in_order():
    from unpact.serve.batching import _next_batch

    ready = held((3, 8), (5, 4), (2, 8), (9, 8), (4, 8))
    assert _next_batch(ready, 16, False) == ([ready[0], ready[2], ready[3], ready[4]], [ready[1]])
    # at most max_num_seqs, the rest kept in the order they came
    assert _next_batch(ready, 2, False) == ([ready[0], ready[2]], [ready[1], ready[3], ready[4]])
    assert _next_batch(ready, 1, False) == ([ready[0]], ready[1:])
    # a model that reads its left padding: prompts of one length only
    ready = held((3, 8), (5, 8), (3, 8))
    assert _next_batch(ready, 16, True) == ([ready[0], ready[2]], [ready[1]])


def _batcher(lm, size):
    """A `GenerateBatcher` whose batches (the prompts of each) are recorded."""
    import threading

    from unpact.serve.batching import GenerateBatcher

    lock = threading.Lock()
    batcher = GenerateBatcher(lm, lock, size)
    sizes: list[int] = []
    run = batcher._run

    def recorded(batch):
        sizes.append(len(batch))
        return run(batch)

    batcher._run = recorded
    return batcher, lock, sizes


def _prompts(tiny, n):
    texts = [f"Question {k}: where is{' the old' * (k % 3)} river {k}?" for k in range(n)]
    return [list(tiny.encode_prompt(t).generation_ids) for t in texts]


def test_greedy_requests_waiting_together_are_one_batch_with_each_alone_s_rows(tiny):
    """Requests that wait while the model is busy are generated in one padded batch, and
    each gets the row it would get alone: left padding, its mask and positions changing no
    greedy token (a batch that read its padding, or shifted positions, would)."""
    from unpact.scoring import generated_rows

    prompts = _prompts(tiny, 6)
    assert len({len(p) for p in prompts}) == 3  # of unequal lengths: padded
    batcher, lock, sizes = _batcher(tiny, 16)
    with lock:  # the model busy: they all wait (the first may already be taken, alone)
        futures = [batcher.submit(p, 7) for p in prompts]
    rows = [f.result(timeout=60) for f in futures]
    assert sum(sizes) == 6 and len(sizes) <= 2  # the worker may have taken the first ones
    for p, row in zip(prompts, rows):
        (alone,) = generated_rows(tiny, [p], 7, None, 1.0, 1)
        n = len(alone)  # alone, generation ends at the EOS; in a batch, padding follows it
        assert row[:n] == alone and len(row) == 7


def test_a_request_whose_client_has_gone_is_left_out_of_its_batch(tiny):
    import threading

    from unpact.serve import cancel
    from unpact.serve.cancel import Cancelled

    prompts = _prompts(tiny, 3)
    batcher, lock, sizes = _batcher(tiny, 16)
    left = threading.Event()
    with lock:
        first = batcher.submit(prompts[0], 5)
        token = cancel._GONE.set(left)  # the next request's client
        try:
            gone = batcher.submit(prompts[1], 5)
        finally:
            cancel._GONE.reset(token)
        last = batcher.submit(prompts[2], 5)
        left.set()  # disconnected while waiting
    assert len(first.result(timeout=60)) == len(last.result(timeout=60)) == 5
    with pytest.raises(Cancelled):
        gone.result(timeout=60)
    assert sum(sizes) == 2  # never generated


def test_a_failed_batch_fails_each_of_its_requests(tiny):
    prompts = _prompts(tiny, 2)
    batcher, _, _ = _batcher(tiny, 16)
    working = batcher._run

    def broken(batch):
        raise RuntimeError("out of memory")

    batcher._run = broken
    futures = [batcher.submit(p, 5) for p in prompts]
    for f in futures:
        with pytest.raises(RuntimeError, match="out of memory"):
            f.result(timeout=60)
    batcher._run = lambda batch: []  # fewer rows than requests: failed, never left waiting
    with pytest.raises(ValueError):
        batcher.submit(prompts[0], 5).result(timeout=60)
    # and the worker goes on serving
    batcher._run = working
    assert len(batcher.submit(prompts[0], 5).result(timeout=60)) == 5


def test_max_num_seqs_is_a_whole_number_of_at_least_one(tiny):
    from unpact.errors import UnpactError
    from unpact.serve import make_app

    for bad in (0, -3, 1.5, True, "8"):
        with pytest.raises(UnpactError, match="max_num_seqs: a whole number of at least 1"):
            make_app(tiny, max_num_seqs=bad)


def test_unpact_serve_s_default_is_the_app_s():
    import inspect

    from unpact.cli import serve
    from unpact.serve import DEFAULT_MAX_NUM_SEQS

    assert inspect.signature(serve).parameters["max_num_seqs"].default == DEFAULT_MAX_NUM_SEQS


def test_a_batch_holds_no_more_rows_than_their_keys_and_values_allow(tiny, monkeypatch):
    """A request that leaves max_tokens unset asks for the whole context: 16 such rows
    could hold gigabytes of keys and values, so a batch holds what `generate`'s bound for
    a prompt's samples holds (`sample_rows_at_once`)."""
    import threading

    from unpact import scoring
    from unpact.serve.batching import GenerateBatcher

    batcher = GenerateBatcher(tiny, threading.Lock(), 16)
    ready = held((5, 30), (9, 30), (5, 2))
    assert batcher._fits(ready) == 16  # the tiny model's rows are small
    per_row = scoring.SAMPLE_BYTES_AT_ONCE // scoring.sample_rows_at_once(tiny.model, 39)
    monkeypatch.setattr(scoring, "SAMPLE_BYTES_AT_ONCE", 3 * per_row)
    assert batcher._fits(ready) == 3  # rows of the longest prompt and the first's max_tokens
    assert GenerateBatcher(tiny, threading.Lock(), 2)._fits(ready) == 2


def test_a_batch_s_rows_stop_each_when_its_own_client_goes():
    import threading

    import torch

    from unpact.serve import cancel

    left, stays = threading.Event(), threading.Event()
    left.set()
    rows = torch.zeros(3, 4, dtype=torch.long)
    assert cancel.stopping([None, left, stays])(rows, None).tolist() == [False, True, False]
    # one request's rows (its samples): all of them once its client has gone
    assert cancel.stopping()(rows, None).tolist() == [False] * 3
    token = cancel._GONE.set(left)
    try:
        assert cancel.stopping()(rows, None).tolist() == [True] * 3
    finally:
        cancel._GONE.reset(token)
