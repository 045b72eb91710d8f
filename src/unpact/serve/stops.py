"""Where `unpact serve` ends a completion, as vLLM does: EOS ids, `stop_token_ids`, `stop`
strings and `min_tokens` (vLLM's `check_stop` and its detokenizer's stop-string check)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stops:
    """What ends a completion besides the model's EOS ids and max_tokens, as a request asks
    vLLM: `stop` strings, `stop_token_ids`, and whether the text keeps what stopped it
    (`include_stop_str_in_output`), and `min_tokens`."""

    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    include: bool = False
    min_tokens: int = 0  # nothing stops a completion before it has this many tokens


@dataclass(frozen=True)
class Finished:
    """A completion as vLLM returns it: the generated ids (the one that stopped it among
    them), its text, and why it ended (`stop_reason`: the stop string or stop token id, None
    for the EOS token or the length)."""

    ids: tuple[int, ...]
    text: str
    finish_reason: str
    stop_reason: int | str | None = None


def finish(
    row: list[int] | tuple[int, ...],
    decode: Any,
    stops: Stops,
    eos_ids: set[int],
    eos: int | None,
) -> Finished:
    """A generated row cut where vLLM stops it (vLLM's `check_stop` and its detokenizer's
    stop-string check, step by step): at the first EOS id (`eos_ids`, the model's; stop
    reason None for the tokenizer's `eos`, the id for another, which vLLM takes among the
    stop token ids) or requested stop token id, that token's text left out unless
    `stops.include`; or at the first step whose text holds a stop string, the first of
    `stops.strings` found in the text that step added (with the stop string's length
    before it), the text cut before the string (after it with `stops.include`); else the
    whole row, ended by its length. Before `stops.min_tokens` tokens nothing stops it, and
    a stop string is looked for in the text after them (with its length before), as vLLM's
    `check_stop` and detokenizer hold back. `decode(ids)` is the text of ids."""
    ending = eos_ids | set(stops.token_ids)
    kept: list[int] = []
    text = ""
    for token in row:
        kept.append(token)
        if token in ending and len(kept) >= stops.min_tokens:
            shown = decode(kept if stops.include else kept[:-1])
            reason = None if token == eos else token
            return Finished(tuple(kept), shown, "stop", reason)
        if stops.strings:
            now = decode(kept)
            found = _stop_string(text, now, stops) if len(kept) > stops.min_tokens else None
            if found is not None:
                return Finished(tuple(kept), found[1], "stop", found[0])
            text = now
    return Finished(tuple(kept), text if stops.strings else decode(kept), "length")


def _stop_string(before: str, now: str, stops: Stops) -> tuple[str, str] | None:
    """The stop string `now` holds where `before` did not (vLLM's `check_stop_strings`: the
    search starts the string's length before the new text) and the text cut at it."""
    pairs = zip(before, now)
    new_from = next((n for n, (a, b) in enumerate(pairs) if a != b), min(len(before), len(now)))
    for string in stops.strings:
        at = now.find(string, max(new_from - len(string), 0))
        if at != -1:
            return string, now[: at + len(string) if stops.include else at]
    return None


def step_texts(decode: Any, done: Finished, stops: Stops) -> list[str]:
    """The text each generated token of `done` adds as vLLM streams it, one chunk per step
    (its detokenizer's `get_next_output_text`): the text so far, an unfinished character
    held back, and, with stop strings left out of the text, its last (longest stop string
    - 1) characters held back too; whatever is left comes with the last token. The pieces
    add up to `done.text` exactly. `decode(ids)` is the text of ids."""
    final, n = done.text, len(done.ids)
    held = max(map(len, stops.strings)) - 1 if stops.strings and not stops.include else 0
    pieces: list[str] = []
    shown = 0
    for k in range(1, n + 1):
        upto = len(final)
        if k < n:
            # the bytes of a character still to come decode as U+FFFD: held back
            so_far = decode(list(done.ids[:k])).rstrip("\ufffd")
            upto = min(max(len(so_far) - held, shown), len(final))
        pieces.append(final[shown:upto])
        shown = upto
    return pieces
