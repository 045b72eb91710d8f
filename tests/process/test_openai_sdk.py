"""The official OpenAI Python SDK against `unpact serve` (the tiny model on 127.0.0.1): what
docs/remote.md says a client of vLLM can do, done with the client most users have. The SDK
parses every reply into its own typed objects, so a field of the wrong shape fails here."""

from __future__ import annotations

import openai
import pytest

from unpact.scoring import answer_logprobs, generate
from unpact.serve import BackgroundServer, make_app

PROMPT = "Who founded the Vostrand Glassworks?"


@pytest.fixture(scope="module")
def client(tiny):
    with BackgroundServer(make_app(tiny, "tiny")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_completions_are_the_local_models(tiny, client):
    """Greedy text as the local model generates it raw; an echo's prompt log-probs are the
    local model's, each with at most k + 1 most likely tokens beside it."""
    [[local]] = generate(tiny, [PROMPT], chat_template=False, max_new_tokens=6)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert reply.choices[0].text == local.text
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    echoed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2, echo=True
    )
    got = echoed.choices[0].logprobs
    assert got is not None and got.token_logprobs is not None and got.top_logprobs is not None
    ids = tiny.tokenizer.encode(PROMPT, add_special_tokens=True)
    [expected] = answer_logprobs(tiny.model, [ids[:1]], [ids[1:]])
    assert got.token_logprobs[0] is None  # the first token has no context
    assert got.token_logprobs[1 : len(ids)] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(len(top) <= 3 for top in got.top_logprobs[1:])
    batch = client.completions.create(model="tiny", prompt=[PROMPT, "a b"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]


def test_chat_with_logprobs_and_streams(tiny, client):
    """A chat answer is the local model's greedy answer in its template; its log-probs'
    bytes spell the answer; streamed, the chunks add up to the same text and a usage chunk
    comes when asked."""
    [[local]] = generate(tiny, [PROMPT], max_new_tokens=5)
    messages = [{"role": "user", "content": PROMPT}]
    ask = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0}
    reply = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    assert reply.choices[0].message.content == local.text
    tokens = reply.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace") == local.text
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    chunks = list(
        client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True
    )
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    pieces = [c.choices[0].text for c in streamed]
    assert len(pieces) == 4 and "".join(pieces) == whole.choices[0].text  # a chunk per token


def test_refusals_are_the_sdks_typed_errors(client):
    """vLLM's error body is what the SDK reads its exceptions from: the status, the message
    and the parameter reach the caller."""
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert refused.value.body["message"] == "max_tokens must be at least 1, got -1."
    assert refused.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="max allowed: 20"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=21)
