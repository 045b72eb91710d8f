"""Where `unpact serve` ends a completion, as vLLM does: EOS ids, `stop_token_ids`, `stop`
strings (vLLM's `check_stop` and its detokenizer's stop-string check)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.serve import Finished, Stops, finish

# a toy vocabulary: id -> text (0 the EOS, special: no text)
PIECES = {0: "", 1: "a", 2: "b", 3: "c", 4: ". ", 5: "ab", 6: "\n", 7: "bc"}


def decode(ids: list[int]) -> str:
    return "".join(PIECES[t] for t in ids)


def test_a_row_without_a_stop_ends_by_its_length():
    assert finish([1, 2, 3], decode, Stops(), {0}, 0) == Finished((1, 2, 3), "abc", "length")


def test_the_eos_ends_it_kept_in_the_ids_with_no_stop_reason():
    assert finish([1, 0, 0, 2], decode, Stops(), {0}, 0) == Finished((1, 0), "a", "stop")


def test_another_eos_id_of_the_model_is_its_stop_reason():
    """vLLM moves a generation_config EOS id other than the tokenizer's into the stop token
    ids: it is the stop reason."""
    assert finish([1, 6, 2], decode, Stops(), {0, 6}, 0) == Finished((1, 6), "a", "stop", 6)


def test_a_stop_token_id_leaves_its_text_out_unless_asked_to_keep_it():
    assert finish([1, 4, 2], decode, Stops(token_ids=(4,)), {0}, 0) == Finished(
        (1, 4), "a", "stop", 4
    )
    kept = Stops(token_ids=(4,), include=True)
    assert finish([1, 4, 2], decode, kept, {0}, 0) == Finished((1, 4), "a. ", "stop", 4)


def test_a_stop_string_cuts_the_text_not_the_token_that_completed_it():
    """ "b" then "c" makes "abc": the stop "bc" ends it at the token that completed it, and
    the text is cut before the string (after it with include)."""
    assert finish([1, 2, 3, 1], decode, Stops(("bc",)), {0}, 0) == Finished(
        (1, 2, 3), "a", "stop", "bc"
    )
    kept = Stops(("bc",), include=True)
    assert finish([1, 2, 3, 1], decode, kept, {0}, 0) == Finished((1, 2, 3), "abc", "stop", "bc")


def test_of_two_stop_strings_completed_by_one_token_the_first_listed_wins():
    """vLLM checks the stop strings in the request's order, not by where they occur."""
    row = [1, 7]  # "a" + "bc": both "ab" and "bc" appear at this step
    assert finish(row, decode, Stops(("bc", "ab")), {0}, 0).stop_reason == "bc"
    assert finish(row, decode, Stops(("bc", "ab")), {0}, 0).text == "a"
    assert finish(row, decode, Stops(("ab", "bc")), {0}, 0).text == ""


def test_a_stop_token_ends_it_before_its_text_is_searched_for_strings():
    """vLLM skips the stop-string check on the step a stop token ends."""
    assert finish([1, 4], decode, Stops((".",), token_ids=(4,)), {0}, 0).stop_reason == 4


def test_nothing_stops_a_completion_before_min_tokens():
    """vLLM's `check_stop` lets no stop end a completion shorter than `min_tokens`, and its
    detokenizer looks for stop strings only in the text after them."""
    late = Stops(("c",), token_ids=(4,), min_tokens=2)  # the stop id first: not yet
    assert finish([4, 1, 3, 2], decode, late, {0}, 0) == Finished((4, 1, 3), ". a", "stop", "c")
    early = Stops(("a",), min_tokens=2)  # "a" only in the first two tokens' text
    assert finish([1, 4, 2, 3], decode, early, {0}, 0) == Finished((1, 4, 2, 3), "a. bc", "length")


def _slow(row: list[int], stops: Stops, eos_ids: set[int], eos: int) -> Finished:
    """The obvious definition: the first step (of at least `min_tokens` tokens) that ends on
    a stop token, or (of more than `min_tokens`) whose text, from the string's length
    before the first `min_tokens` tokens' text ends, holds a stop string (the first listed
    that it holds, cut at its first place there)."""
    m = stops.min_tokens
    held = len(decode(row[:m]))
    for k in range(1, len(row) + 1):
        ids, token = row[:k], row[k - 1]
        if token in eos_ids | set(stops.token_ids) and k >= m:
            text = decode(ids if stops.include else ids[:-1])
            return Finished(tuple(ids), text, "stop", None if token == eos else token)
        text = decode(ids)
        for s in stops.strings if k > m else ():
            start = max(held - len(s), 0)
            if s in text[start:]:
                at = text.index(s, start)
                return Finished(tuple(ids), text[: at + len(s) * stops.include], "stop", s)
    return Finished(tuple(row), decode(row), "length")


@settings(max_examples=300, deadline=None)
@given(
    row=st.lists(st.sampled_from(sorted(PIECES)), max_size=12),
    strings=st.lists(st.sampled_from(["a", "b", "ab", "ca", ". a", "\n\n", "cab"]), max_size=3),
    token_ids=st.lists(st.sampled_from([3, 4, 6]), max_size=2),
    include=st.booleans(),
    min_tokens=st.sampled_from([0, 0, 1, 3]),
)
def test_finish_equals_the_obvious_definition(row, strings, token_ids, include, min_tokens):
    stops = Stops(tuple(strings), tuple(token_ids), include, min_tokens)
    assert finish(row, decode, stops, {0}, 0) == _slow(row, stops, {0}, 0)


# byte-level tokens, as a byte-level BPE's: a character's bytes may span two tokens
BYTES = {0: b"", 1: b"a", 2: b" b", 3: b"\xe2\x82", 4: b"\xac", 5: b"c.", 6: b"\xff"}


def byte_decode(ids: list[int]) -> str:
    return b"".join(BYTES[t] for t in ids).decode("utf-8", errors="replace")


@settings(max_examples=300)
@given(
    row=st.lists(st.sampled_from(sorted(BYTES)), min_size=1, max_size=10),
    strings=st.lists(st.sampled_from(["a", " b", "c", "a b", "\u20ac"]), max_size=2),
    include=st.booleans(),
)
def test_streamed_pieces_add_up_to_the_text_one_per_token(row, strings, include):
    """vLLM streams a chunk per token: the pieces add up to the completion's text exactly;
    without stop strings each token's piece is what it adds to the text so far (bytes of
    an unfinished character held back until it is whole); with stop strings left out of
    the text, the last (longest - 1) characters so far are held back until the end."""
    from unpact.serve.stops import step_texts

    stops = Stops(tuple(strings), (), include)
    done = finish(row, byte_decode, stops, {0}, 0)
    pieces = step_texts(byte_decode, done, stops)
    assert len(pieces) == len(done.ids) and "".join(pieces) == done.text
    held = max(map(len, strings)) - 1 if strings and not include else 0
    for k in range(1, len(done.ids)):
        so_far = byte_decode(list(done.ids[:k])).rstrip("\ufffd")
        shown = "".join(pieces[:k])
        if not strings:
            assert shown == so_far
        assert len(shown) <= max(len(so_far) - held, 0)


def test_a_stop_strings_first_characters_are_held_back_until_the_end():
    """ "abc" then "XY" then "z" completes the stop string "XYz": vLLM's detokenizer holds
    back its last 2 characters at each step, so no "X" is ever sent."""
    from unpact.serve.stops import step_texts

    pieces = {1: "ab", 2: "c", 3: "XY", 4: "z"}

    def toy(ids: list[int]) -> str:
        return "".join(pieces[t] for t in ids)

    stops = Stops(("XYz",))
    done = finish([1, 2, 3, 4], toy, stops, set(), None)
    assert done.text == "abc" and done.stop_reason == "XYz"
    assert step_texts(toy, done, stops) == ["", "a", "bc", ""]
