"""How `unpact serve`'s scoring batcher cuts what is waiting into passes: the first
sequences whose padded batch (count times the longest) stays within the token budget,
at least one."""

from __future__ import annotations

from concurrent.futures import Future

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
