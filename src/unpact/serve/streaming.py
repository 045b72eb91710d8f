"""Replies as vLLM streams them (`stream: true`): server-sent events, one chunk per
generated token and choice (vLLM's `completion_stream_generator` and
`chat_completion_stream_generator` with its default `stream_interval` 1), then the usage
when `stream_options.include_usage` asks, then `data: [DONE]`. The completions are made
before the first event (`unpact serve` is a test server), then cut into the chunks vLLM
would send: the same text per token, its log-probs, the finish reason on the last."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stepped:
    """One choice as streamed: the text each generated token adds (`stops.step_texts`), its
    prompt's token count, how many log-prob entries come before the first generated
    token's (an echoed prompt's), and how many tokens it generated (an echo without
    generation: one, which vLLM counts but does not show)."""

    pieces: list[str]
    prompt_tokens: int
    echoed_tokens: int = 0
    generated: int = 0


def event_stream(reply: dict[str, Any], events: list[dict[str, Any]], usage: bool) -> Any:
    """The events as server-sent events under `reply`'s id, created time and model, the
    usage chunk (no choices) when asked, then `data: [DONE]`."""
    from fastapi.responses import StreamingResponse

    kind = "text_completion" if reply["object"] == "text_completion" else "chat.completion.chunk"
    head = {"id": reply["id"], "object": kind, "created": reply["created"], "model": reply["model"]}
    lines = [head | e for e in events]
    if usage:
        lines.append(head | {"choices": [], "usage": reply["usage"]})
    body = [f"data: {json.dumps(e)}\n\n" for e in lines] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(body), media_type="text/event-stream")


def _interleaved(per_choice: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Step by step, each choice's chunk for that step, as vLLM's engine yields them."""
    out = []
    for k in range(max((len(c) for c in per_choice), default=0)):
        out += [chunks[k] for chunks in per_choice if k < len(chunks)]
    return out


def _usage(prompt: int, made: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}


def _logprobs_part(lp: dict[str, Any], lo: int, hi: int, offset: int) -> dict[str, Any]:
    """Entries lo..hi of a completion's `logprobs`, their text offsets counted from
    `offset` (vLLM's `initial_text_offset`: the text the choice streamed before)."""
    tokens = lp["tokens"][lo:hi]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": lp["token_logprobs"][lo:hi],
        "tokens": tokens,
        "top_logprobs": lp["top_logprobs"][lo:hi],
    }


def completion_events(
    reply: dict[str, Any], stepped: list[Stepped], continuous: bool
) -> list[dict[str, Any]]:
    """A completion reply's choices as vLLM streams them: per generated token a chunk with
    the text it adds (the first also the echoed prompt, its log-probs and ids), the finish
    and stop reasons on the last; an echo without generation in one chunk.
    `continuous`: each chunk carries the usage so far (`continuous_usage_stats`)."""
    per_choice = []
    for choice, s in zip(reply["choices"], stepped, strict=True):
        lp, pieces = choice["logprobs"], s.pieces
        echoed = choice["text"][: len(choice["text"]) - sum(map(len, pieces))]
        steps = max(len(pieces), 1)
        chunks, streamed = [], 0
        for k in range(steps):
            last = k == steps - 1
            piece = pieces[k] if pieces else ""
            lo, hi = (0 if k == 0 else s.echoed_tokens + k), s.echoed_tokens + k + bool(pieces)
            chunk: dict[str, Any] = {
                "index": choice["index"],
                "text": (echoed if k == 0 else "") + piece,
                "logprobs": None if lp is None else _logprobs_part(lp, lo, hi, streamed),
                "finish_reason": choice["finish_reason"] if last else None,
                "stop_reason": choice["stop_reason"] if last else None,
            }
            if "token_ids" in choice:  # return_token_ids: the prompt's with the first
                chunk["prompt_token_ids"] = choice["prompt_token_ids"] if k == 0 else None
                chunk["token_ids"] = choice["token_ids"][k : k + 1]
            streamed += len(piece)
            event: dict[str, Any] = {"choices": [chunk]}
            if continuous:
                event["usage"] = _usage(s.prompt_tokens, k + 1 if pieces else s.generated)
            chunks.append(event)
        per_choice.append(chunks)
    return _interleaved(per_choice)


def chat_events(
    reply: dict[str, Any], stepped: list[Stepped], echoed: str, continuous: bool
) -> list[dict[str, Any]]:
    """A chat reply's choices as vLLM streams them: first each choice's role with empty
    content, then (with `echo`) the echoed last message, then per generated token a chunk
    with the text it adds and its log-probs, the finish and stop reasons on the last."""
    choices = reply["choices"]

    def event(chunk: dict[str, Any], s: Stepped, made: int) -> dict[str, Any]:
        return {"choices": [chunk]} | (
            {"usage": _usage(s.prompt_tokens, made)} if continuous else {}
        )

    opened = [
        event({"index": c["index"], "delta": {"role": c["message"]["role"], "content": ""},
               "logprobs": None, "finish_reason": None}, s, 0)
        for c, s in zip(choices, stepped, strict=True)
    ]  # fmt: skip
    if echoed:
        opened += [
            event({"index": c["index"], "delta": {"content": echoed}, "logprobs": None,
                   "finish_reason": None}, s, 0)
            for c, s in zip(choices, stepped, strict=True)
        ]  # fmt: skip
    per_choice = []
    for c, s in zip(choices, stepped, strict=True):
        chunks = []
        for k, piece in enumerate(s.pieces):
            chunk: dict[str, Any] = {
                "index": c["index"],
                "delta": {"content": piece},
                "logprobs": None
                if c["logprobs"] is None
                else {"content": c["logprobs"]["content"][k : k + 1]},
                "finish_reason": None,
            }
            if k == len(s.pieces) - 1:
                chunk |= {"finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]}
            chunks.append(event(chunk, s, k + 1))
        per_choice.append(chunks)
    return opened + _interleaved(per_choice)
