"""`unpact serve`'s logit shaping, as vLLM's sampler does it before the temperature:
`allowed_token_ids`, `bad_words`, `logit_bias`, then the repetition, frequency and
presence penalties (vLLM v1
`Sampler.apply_logits_processors` and `apply_penalties`), checked against a plain loop
over each token."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.serve import Shaping

VOCAB = 7


def slow(
    scores: list[float], prompt: list[int], out: list[int], s: Shaping, held: list[int], least: int
) -> list[float]:
    """One row shaped token by token, from the definitions."""
    row = list(scores)
    if s.allowed is not None:
        row = [v if t in s.allowed else -math.inf for t, v in enumerate(row)]
    for word in s.bad:  # banned where the output ends with the word's tokens but its last
        if len(word) == 1 or (
            len(out) >= len(word) - 1 and out[-(len(word) - 1) :] == list(word[:-1])
        ):
            row[word[-1]] = -math.inf
    if len(out) < least:
        for t in held:
            row[t] = -math.inf
    for t, b in s.bias:
        row[t] += b
    for t in set(prompt) | set(out):
        row[t] = row[t] / s.repetition if row[t] > 0 else row[t] * s.repetition
    for t in set(out):
        row[t] -= s.frequency * out.count(t) + s.presence
    return row


shapings = st.builds(
    Shaping,
    bias=st.dictionaries(
        st.integers(0, VOCAB - 1), st.floats(-100, 100, allow_nan=False), max_size=3
    ).map(lambda d: tuple(d.items())),
    repetition=st.floats(0.1, 3),
    presence=st.floats(-2, 2),
    frequency=st.floats(-2, 2),
    allowed=st.none()
    | st.sets(st.integers(0, VOCAB - 1), min_size=1).map(lambda a: tuple(sorted(a))),
    bad=st.lists(
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3).map(tuple), max_size=3
    ).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(
    s=shapings,
    rows=st.integers(0, 4).flatmap(  # rows of one output length, as generation has them
        lambda n: st.lists(
            st.tuples(
                st.lists(st.floats(-20, 20, allow_nan=False), min_size=VOCAB, max_size=VOCAB),
                st.lists(st.integers(0, VOCAB - 1), min_size=3, max_size=3),
                st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n),
            ),
            min_size=1,
            max_size=3,
        )
    ),
    least=st.integers(0, 6),
)
def test_shaping_is_the_definition_token_by_token(s, rows, least):
    held = [1, 5]
    scores = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    ids = torch.tensor([r[1] + r[2] for r in rows])
    got = s.apply(ids, scores, 3, held, least)
    for n, (row, prompt, out) in enumerate(rows):
        want = slow(row, prompt, out, s, held, least)
        for a, b in zip(got[n].tolist(), want, strict=True):
            assert a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b))


def test_neutral_shaping_gives_no_processor_and_leaves_the_scores():
    s = Shaping()
    assert s.neutral and s.processor(3, [1], 0) is None
    scores = torch.randn(2, VOCAB)
    ids = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4]])
    assert torch.equal(s.apply(ids, scores, 3, [], 0), scores)
    assert s.processor(3, [1], 2) is not None  # stop ids still held back (ignore_eos)
