"""The remote backend against a real HTTP server on 127.0.0.1 serving the tiny model.

The server (`unpact.serve`, FastAPI + uvicorn) answers in vLLM's formats; a fault layer in
front of it delays, fails, throttles, garbles and drops replies on a fixed plan. Every
test asserts numbers against the same model scored locally, or one clear error.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import threading
from typing import Any

import pytest

import unpact
from unpact.attribution import attribute_many
from unpact.backends import open_model
from unpact.errors import UnpactError
from unpact.remote import RemoteError, RemoteModel, RemoteSettings, parse_remote_spec
from unpact.scoring import generate, score
from unpact.serve import BackgroundServer, make_app

PROMPTS = [
    "Who founded the Vostrand Glassworks?",
    "What is the capital of France?",
    "Mira Quintrell founded it in 1874, the report says.",
]
ANSWERS = [" Mira Quintrell", " Paris", " Kilimanjaro"]
FAST = {"timeout": 0.5, "deadline": 8.0, "backoff": 0.01, "max_backoff": 0.05}


class Faults:
    """ASGI layer: the next requests to /v1/completions meet the planned faults in order."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.plan: list[str] = []
        self.repeat: str | None = None  # a fault every request meets, after the plan
        self.lock = threading.Lock()
        self.calls = 0
        self.auth: list[str | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/completions"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        with self.lock:
            self.calls += 1
            self.auth.append(
                headers.get(b"authorization", b"").decode() or None  # what the client sent
            )
            fault = self.plan.pop(0) if self.plan else self.repeat
        if fault is None:
            await self.app(scope, receive, send)
        elif fault == "delay":  # arrives after the client's timeout
            await asyncio.sleep(1.0)
            await self.app(scope, receive, send)
        elif fault in ("500", "503", "429"):
            # a transient fault's message names the attempt, as a server's request id would
            extra = [(b"retry-after", b"0.05")] if fault == "429" else []
            body = json.dumps({"error": f"try again (call {self.calls})"}).encode()
            await _reply(send, int(fault), body, extra)
        elif fault == "500same":  # a deterministic internal error: the same reply each time
            await _reply(send, 500, b'{"error": {"message": "boom: this request fails"}}')
        elif fault == "501html":  # a plain web server at the URL: its HTML error page
            page = (
                b'<!DOCTYPE HTML>\n<html lang="en">\n<head><meta charset="utf-8">\n'
                b"<title>Error response</title>\n<style>p { margin: 0 }</style></head>\n"
                b"<body><h1>Error response</h1><p>Error code: 501</p>\n<p>Message: "
                b"Unsupported method (&#x27;POST&#x27;).</p></body></html>\n"
            )
            await _reply(send, 501, page, content_type=b"text/html;charset=utf-8")
        elif fault == "200html":  # a web UI answering every path with its page
            page = b"<html><head><title>My UI</title></head><body>Welcome</body></html>"
            await _reply(send, 200, page, content_type=b"text/html; charset=utf-8")
        elif fault == "badjson":
            await _reply(send, 200, b'{"choices": [{"index": 0, "prompt_logp')
        elif fault == "drop":  # headers promise 1000 bytes, the connection ends after 10
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"1000")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"choices"', "more_body": True})
            raise ConnectionResetError("fault: dropped")
        elif fault in ("nologprobs", "short", "nan", "clamped", "401"):
            await _rewrite(self.app, scope, receive, send, fault)
        else:
            raise AssertionError(fault)


async def _reply(
    send: Any,
    status: int,
    body: bytes,
    headers: list | None = None,
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _rewrite(app: Any, scope: Any, receive: Any, send: Any, fault: str) -> None:
    """Let the real app answer, then change its JSON: a server without prompt log-probs,
    one that scores fewer tokens than it was sent, one with a NaN, or a refused key."""
    parts: list[bytes] = []

    async def capture(message: Any) -> None:
        if message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, capture)
    data = json.loads(b"".join(parts))
    status = 200
    for choice in data["choices"]:
        if fault == "nologprobs":
            choice.pop("prompt_logprobs", None)
            choice["logprobs"] = None
        elif fault == "short" and choice.get("prompt_logprobs"):
            choice["prompt_logprobs"] = choice["prompt_logprobs"][:-1]
        elif fault in ("nan", "clamped") and choice.get("prompt_logprobs"):
            entry = choice["prompt_logprobs"][-1]
            for v in entry.values():
                v["logprob"] = "NaN" if fault == "nan" else -9999.0  # vLLM's clamp of -inf
    if fault == "401":
        status, data = 401, {"error": {"message": "invalid api key"}}
    await _reply(send, status, json.dumps(data).encode())


@pytest.fixture(scope="module")
def served(tiny):
    faults = Faults(make_app(tiny, "tiny"))
    with BackgroundServer(faults) as url:
        yield faults, f"{url}/v1"


def _remote(url: str, **settings: Any) -> RemoteModel:
    lm = open_model(f"openai:tiny@{url}", remote=RemoteSettings(**{**FAST, **settings}))
    assert isinstance(lm, RemoteModel)
    return lm


@pytest.fixture
def faults(served):
    f, _ = served
    f.plan.clear()
    f.repeat = None
    yield f
    f.plan.clear()
    f.repeat = None


def _max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo", "auto"])
def test_scores_equal_local(tiny, served, faults, mode):
    remote = _remote(served[1], logprobs_mode=mode)
    local = score(tiny, PROMPTS, ANSWERS)
    got = score(remote, PROMPTS, ANSWERS)
    assert [s.answer_ids for s in got] == [s.answer_ids for s in local]
    assert [s.prompt.input_ids for s in got] == [s.prompt.input_ids for s in local]
    assert _max_diff([s.logprobs for s in got], [s.logprobs for s in local]) < 1e-4
    # Token texts come from the server's detokeniser: the same text, without BPE marks.
    assert [t.replace("Ġ", " ") for t in local[0].answer_tokens] == list(got[0].answer_tokens)


@pytest.mark.parametrize(
    ("unit", "baseline", "chat"),
    [("token", "delete", True), ("word", "delete", True), ("word", "token", False)],
)
def test_attribution_equals_local(tiny, served, faults, unit, baseline, chat):
    remote = _remote(served[1])
    kwargs = dict(unit=unit, baseline=baseline, chat_template=chat, baseline_token_id=0)
    local = attribute_many(tiny, PROMPTS, ANSWERS, **kwargs)
    got = attribute_many(remote, PROMPTS, ANSWERS, **kwargs)
    for a, b in zip(local, got):
        assert b.input_ids == a.input_ids and b.answer_ids == a.answer_ids
        assert [u.positions for u in b.units] == [u.positions for u in a.units]
        assert [u.text for u in b.units] == [u.text for u in a.units]
        assert abs(a.lp - b.lp) < 1e-4
        assert max(abs(x - y) for x, y in zip(a.contributions, b.contributions)) < 1e-4
        assert a.key_tokens == b.key_tokens
    assert max(abs(c) for r in local for c in r.contributions) > 1e-2  # not a vacuous match


def test_generated_target_and_greedy_generation_equal_local(tiny, served, faults):
    remote = _remote(served[1])
    local = generate(tiny, PROMPTS, max_new_tokens=6)
    got = generate(remote, PROMPTS, max_new_tokens=6)
    assert [g[0].token_ids for g in got] == [g[0].token_ids for g in local]
    assert [g[0].text for g in got] == [g[0].text for g in local]
    a = attribute_many(tiny, PROMPTS[:1], target="generated", max_new_tokens=6)[0]
    b = attribute_many(remote, PROMPTS[:1], target="generated", max_new_tokens=6)[0]
    assert a.answer_ids == b.answer_ids
    assert max(abs(x - y) for x, y in zip(a.contributions, b.contributions)) < 1e-4
    samples = generate(remote, PROMPTS[:1], max_new_tokens=6, num_samples=3, seed=1)
    assert len(samples[0]) == 3
    assert samples == generate(remote, PROMPTS[:1], max_new_tokens=6, num_samples=3, seed=1)


@pytest.mark.parametrize(
    "plan",
    [
        ["500", "503", "429"],
        ["delay"],
        ["badjson", "drop"],
        ["drop", "429", "delay", "500", "badjson"],
    ],
)
def test_transient_faults_are_retried_to_the_right_numbers(tiny, served, faults, plan):
    # Enough retries that however the planned faults fall on the concurrent requests,
    # every request gets through: the point is the numbers after retrying.
    remote = _remote(served[1], concurrency=4, retries=30, deadline=60.0)
    local = attribute_many(tiny, PROMPTS, ANSWERS)
    before = faults.calls
    faults.plan.extend(plan * 3)
    got = attribute_many(remote, PROMPTS, ANSWERS)
    assert not faults.plan, "every planned fault was met"
    assert faults.calls - before >= len(plan) * 3
    for a, b in zip(local, got):
        assert max(abs(x - y) for x, y in zip(a.contributions, b.contributions)) < 1e-4


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("500", "gave up after 4 attempt(s)"),
        ("503", "gave up after 4 attempt(s)"),
        ("500same", "HTTP 500 3 times with the same message"),
        ("429", "HTTP 429"),
        (
            "delay",
            "s (a server that answers one request at a time, as a llama.cpp slot does, and "
            "`unpact serve` does all but plain greedy completions, makes the 2 sent at once "
            "wait for each other: send fewer",
        ),
        ("badjson", "not valid JSON"),
        ("drop", "connection failed"),
    ],
)
def test_persistent_faults_end_in_one_clear_error(served, faults, fault, message):
    remote = _remote(served[1], retries=3, concurrency=2)
    faults.repeat = fault
    with pytest.raises(RemoteError, match="gave up after") as info:
        score(remote, PROMPTS, ANSWERS)
    assert message in str(info.value)
    assert "/v1/completions" in str(info.value)


def test_a_server_that_does_not_offer_the_request_fails_at_once_in_words(served, faults):
    """HTTP 501 (a plain web server at BASE_URL, say) was retried like a passing fault until
    the retries ran out (22 s against `python -m http.server`), and its HTML error page
    was the message, markup and all."""
    remote = _remote(served[1], retries=5)
    faults.repeat = "501html"
    before = faults.calls
    with pytest.raises(RemoteError) as info:
        score(remote, PROMPTS[:1], ANSWERS[:1])
    assert faults.calls - before == 1
    text = str(info.value)
    assert "/v1/completions: HTTP 501: Error response Error code: 501 Message: " in text
    assert "Unsupported method ('POST')." in text and "<" not in text and "margin" not in text
    assert "is BASE_URL an OpenAI-compatible server's API root" in text
    # a web page with 200 (a UI at BASE_URL) was retried as a reply cut short
    faults.repeat = "200html"
    before = faults.calls
    with pytest.raises(RemoteError, match=r"HTTP 200 with a web page, not JSON: Welcome — "):
        score(remote, PROMPTS[:1], ANSWERS[:1])
    assert faults.calls - before == 1


def test_a_host_that_takes_no_connection_is_not_waited_for_as_a_queue(monkeypatch):
    """An attempt waits long for its reply (a server's queue), not for its connection: a
    host that drops the packets took the whole timeout, 600 s, on each attempt. A full
    accept backlog on 127.0.0.1 drops them as a firewall would."""
    import socket

    import unpact.remote

    monkeypatch.setattr(unpact.remote, "CONNECT_TIMEOUT", 0.3)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(0)  # accepts none: the backlog fills, later connections wait
        port = listening.getsockname()[1]
        waiting = [socket.socket() for _ in range(4)]
        for w in waiting:
            w.setblocking(False)
            w.connect_ex(("127.0.0.1", port))
        try:
            settings = RemoteSettings(timeout=60.0, retries=0)
            remote = RemoteModel("m", f"http://127.0.0.1:{port}/v1", settings)
            with pytest.raises(RemoteError) as info:
                remote.post(f"http://127.0.0.1:{port}/v1/completions", {})
        finally:
            for w in waiting:
                w.close()
    assert "gave up after 1 attempt(s) in " in str(info.value)
    assert str(info.value).endswith(" s: no connection within 0.3 s")
    assert "one request at a time" not in str(info.value)  # no queue to wait for


def test_deadline_bounds_a_request(served, faults):
    remote = _remote(served[1], retries=50, timeout=0.3, deadline=1.0)
    faults.repeat = "delay"
    with pytest.raises(RemoteError, match="gave up after"):
        score(remote, PROMPTS[:1], ANSWERS[:1])


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("nologprobs", "returns no prompt log-probs"),
        ("short", "scored 14 prompt tokens but 15 were sent"),
        ("nan", "impossible log-prob"),
        ("clamped", "vLLM's clamp of -inf"),
    ],
)
def test_wrong_replies_are_errors_not_numbers(served, faults, fault, message):
    remote = _remote(
        served[1], logprobs_mode="prompt_logprobs" if fault != "nologprobs" else "auto"
    )
    faults.repeat = fault
    with pytest.raises(RemoteError, match=message.split(" 1")[0]):
        score(remote, ["Who founded it?"], [" Mira"], chat_template=False)


def test_log_probs_below_the_clamp_are_scores_from_prompt_logprobs(tiny):
    """A model with blown-up logits (gradient ascent's; here the tiny one with its LM head
    scaled by 1e4) gives log-probs in the ten thousands below 0. vLLM's prompt_logprobs
    return them as they are (it writes -inf alone as -9999.0), and the client took every
    value at or below -9999 for that clamp: a local model was scored, the same one served
    was refused. Its echo floors them at -9999.0, which is refused, saying so."""
    import copy

    import torch

    blown = copy.deepcopy(tiny)
    with torch.no_grad():
        blown.model.get_output_embeddings().weight.mul_(1e4)
    local = score(blown, PROMPTS[:2], ANSWERS[:2])
    assert min(min(s.logprobs) for s in local) < -9999
    with BackgroundServer(make_app(blown, "tiny")) as url:
        for mode in ("prompt_logprobs", "auto"):
            got = score(_remote(f"{url}/v1", logprobs_mode=mode), PROMPTS[:2], ANSWERS[:2])
            assert _max_diff([s.logprobs for s in got], [s.logprobs for s in local]) < 1.0
        with pytest.raises(RemoteError, match=r"echo floors every log-prob there"):
            score(_remote(f"{url}/v1", logprobs_mode="echo"), PROMPTS[:2], ANSWERS[:2])


def test_api_key_is_sent_but_never_shown(served, faults, monkeypatch):
    secret = "sk-unpact-test-0123456789"
    monkeypatch.setenv("MY_KEY", secret)
    remote = _remote(served[1], api_key_env="MY_KEY")
    n = len(faults.auth)
    score(remote, PROMPTS[:1], ANSWERS[:1])
    assert faults.auth[n:] == [f"Bearer {secret}"]
    faults.repeat = "401"
    with pytest.raises(RemoteError) as info:
        score(remote, PROMPTS[:1], ANSWERS[:1])
    assert "HTTP 401" in str(info.value) and "api_key_env" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(remote)
    # a key pasted with a curly quote or a no-break space: refused in words before any
    # request (it was a UnicodeEncodeError from inside httpx), the key never shown
    for bad, at in [("\u201csk-unpact\u201d", 1), ("sk-unpact\u00a0x", 10)]:
        monkeypatch.setenv("MY_KEY", bad)
        n = len(faults.auth)
        with pytest.raises(UnpactError, match=rf"\$MY_KEY: .* \(character {at}\), which an HTTP"):
            score(_remote(served[1], api_key_env="MY_KEY"), PROMPTS[:1], ANSWERS[:1])
        assert faults.auth[n:] == []


def test_unpact_serve_api_key_guards_as_vllms_does(tiny, monkeypatch):
    """`--api-key`: vLLM's AuthenticationMiddleware. Every route but /health wants one of
    the keys as a Bearer token (the scheme in any case), else vLLM's 401 reply; unpact's
    client sends $UNPACT_API_KEY and gets the local numbers, or says to check the key."""
    import httpx

    with BackgroundServer(make_app(tiny, "tiny", api_keys=["k-one", "k-two"])) as url:
        get = httpx.Client(base_url=url, timeout=30)
        assert get.get("/health").status_code == 200
        # vLLM's other public routes: its SageMaker ping (GET or POST) and its version
        assert [get.request(m, "/ping").status_code for m in ("get", "post")] == [200, 200]
        assert get.get("/version").json() == {"version": unpact.__version__}
        for path, kind in [("/v1/models", "get"), ("/tokenize", "post"), ("/detokenize", "post")]:
            for header in [None, "Bearer k-three", "Basic k-one", "Bearer", "k-one"]:
                headers = {} if header is None else {"Authorization": header}
                reply = get.request(kind, path, headers=headers, json={"prompt": "hi"})
                assert (reply.status_code, reply.json()) == (401, {"error": "Unauthorized"})
        ok = get.get("/v1/models", headers={"Authorization": "bearer k-two"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        assert get.get("/elsewhere").status_code == 404  # under no guarded prefix
        monkeypatch.setenv("UNPACT_API_KEY", "k-one")
        got = score(_remote(f"{url}/v1"), PROMPTS, ANSWERS)
        assert (
            _max_diff(
                [s.logprobs for s in got], [s.logprobs for s in score(tiny, PROMPTS, ANSWERS)]
            )
            < 1e-4
        )
        monkeypatch.setenv("UNPACT_API_KEY", "k-wrong")
        with pytest.raises(
            UnpactError, match=r"401: Unauthorized — .* refused the API key in \$UNPACT_API_KEY"
        ):
            score(_remote(f"{url}/v1"), PROMPTS[:1], ANSWERS[:1])
        monkeypatch.delenv("UNPACT_API_KEY")
        with pytest.raises(UnpactError, match=r"wants an API key, and \$UNPACT_API_KEY .* not set"):
            score(_remote(f"{url}/v1"), PROMPTS[:1], ANSWERS[:1])
    for bad in ["", "two words", "caf\u00e9"]:
        with pytest.raises(UnpactError, match="--api-key"):
            make_app(tiny, "tiny", api_keys=[bad])


def test_mask_baseline_and_unknown_baseline_token_are_clear_errors(served, faults):
    remote = _remote(served[1])
    with pytest.raises(UnpactError, match="baseline 'mask'"):
        attribute_many(remote, PROMPTS[:1], ANSWERS[:1], baseline="mask")
    with pytest.raises(UnpactError, match="baseline token id"):
        attribute_many(remote, PROMPTS[:1], ANSWERS[:1], baseline="token")


def test_a_proxy_in_the_environment_is_not_used_for_this_machine_and_is_named(
    tiny, served, faults, monkeypatch
):
    """On a cluster $HTTP_PROXY is often set: every request to a server on 127.0.0.1 went
    through the proxy and failed "connection failed"; a SOCKS proxy without socksio was
    an ImportError's traceback. This machine's servers are reached directly; a server
    elsewhere that cannot be reached through the proxy is said to be, its password not."""
    url = served[1]
    monkeypatch.setenv("HTTP_PROXY", "http://user:secret@127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    for spec in (url, url.replace("127.0.0.1", "localhost")):
        got = score(_remote(spec), PROMPTS[:2], ANSWERS[:2])
        assert (
            _max_diff(
                [s.logprobs for s in got],
                [s.logprobs for s in score(tiny, PROMPTS[:2], ANSWERS[:2])],
            )
            < 1e-4
        )
    elsewhere = "http://192.0.2.1:8000/v1"  # TEST-NET-1: reached only through the proxy
    monkeypatch.delenv("ALL_PROXY")
    with pytest.raises(UnpactError) as caught:
        score(_remote(elsewhere, retries=0), ["a question?"], [" yes"])
    said = str(caught.value)
    assert "connection failed (ConnectError), through the proxy the environment names" in said
    assert "HTTP_PROXY=http://127.0.0.1:9" in said and "NO_PROXY=192.0.2.1" in said
    assert "secret" not in said
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    import importlib.util

    if importlib.util.find_spec("socksio") is None:  # httpx's SOCKS support not installed
        with pytest.raises(UnpactError, match=r"names a SOCKS proxy \(HTTP_PROXY=.*, ALL_PROX"):
            score(_remote(elsewhere, retries=0), ["a question?"], [" yes"])


def test_unreachable_server_and_bad_specs():
    remote = open_model(
        "openai:tiny@http://127.0.0.1:9/v1",
        remote=RemoteSettings(retries=1, backoff=0.01, timeout=0.5),
    )
    with pytest.raises(UnpactError, match="connection failed"):
        score(remote, ["a question?"], [" yes"])
    for bad in ["openai:tiny", "openai:@http://x", "openai:tiny@ftp://x"]:
        with pytest.raises(UnpactError, match="openai:MODEL@BASE_URL"):
            open_model(bad)
    assert parse_remote_spec("openai:org/m-7B@http://h:8000/v1/") == (
        "org/m-7B",
        "http://h:8000/v1",
    )
    # an endpoint or a bare host given for BASE_URL: said so, not a 404 about /tokenize
    for bad, why in [
        ("openai:m@http://h:8000/v1/completions", "without the endpoint /completions"),
        ("openai:m@http://h:8000/v1/chat/completions/", "without the endpoint /chat/comp"),
        ("openai:m@h:8000/v1", "BASE_URL starts with http:// or https://"),
    ]:
        with pytest.raises(UnpactError, match=why):
            parse_remote_spec(bad)


def test_a_base_url_without_v1_is_hinted(served, faults):
    """vLLM's routes are under /v1 (its /tokenize is not): a BASE_URL without it reached
    /tokenize and then failed with a bare 404 on /completions."""
    _, url = served
    remote = _remote(url.removesuffix("/v1"))
    with pytest.raises(UnpactError, match=r"HTTP 404.*BASE_URL usually ends in /v1"):
        score(remote, ["a question?"], [" yes"])


def test_weights_steps_refuse_a_served_model():
    from unpact.models import load_model

    with pytest.raises(UnpactError, match="weights on this machine"):
        load_model("openai:tiny@http://127.0.0.1:9/v1")


def test_cli_attribute_against_the_server(tiny, served, faults, tmp_path):
    from typer.testing import CliRunner

    from unpact.cli import app

    out = tmp_path / "a.json"
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            "--model",
            f"openai:tiny@{served[1]}",
            "-p",
            PROMPTS[0],
            "-a",
            ANSWERS[0],
            "--unit",
            "word",
            "--json",
            str(out),
            "--concurrency",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    local = attribute_many(tiny, PROMPTS[:1], ANSWERS[:1], unit="word")[0]
    assert record["model"] == f"openai:tiny@{served[1]}"
    assert all(
        math.isclose(x, y, abs_tol=1e-4)
        for x, y in zip(record["contributions"], local.contributions)
    )
    bad = subprocess.run(
        [sys.executable, "-m", "unpact", "attribute", "--model", "openai:tiny", "-p", "a b"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "openai:MODEL@BASE_URL" in bad.stderr
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------- runs with served models


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, tiny):
    """A tiny benchmark, a locally unlearned copy of the tiny model, and a server serving
    both the original (`tiny`) and the unlearned one (`tiny-ga`)."""
    from tests.process.test_run import MAX_NEW, QUESTIONS, _known_items
    from unpact.data.items import write_folder
    from unpact.models import load_model, save_model
    from unpact.run import run

    root = tmp_path_factory.mktemp("served")
    save_model(tiny.model, tiny.tokenizer, root / "tiny")
    forget = _known_items(tiny, QUESTIONS[:6], "forget")
    retain = _known_items(tiny, QUESTIONS[6:10], "retain")
    write_folder(root / "bench", forget + retain)
    write_folder(root / "general", _known_items(tiny, QUESTIONS[10:], "general"))
    base = {
        "data": {"benchmark": str(root / "bench"), "general": str(root / "general")},
        "inject": {"enabled": False},
        "attacks": [{"name": "focus_on_key"}, {"name": "keyword_only"}],
        "judge": {"max_new_tokens": MAX_NEW},
        "statistics": {"resamples": 50},
        "remote": {"concurrency": 4},
    }
    trained = base | {
        "model": str(root / "tiny"),
        "methods": [{"method": "ga", "config": {"lr": 3e-3, "steps": 3, "batch_size": 2}}],
    }
    run(trained, root / "trained", cache_dir=root / "cache", progress=False)
    unlearned = load_model(str(root / "trained" / "models" / "ga"))
    with BackgroundServer(make_app({"tiny": tiny, "tiny-ga": unlearned})) as url:
        yield root, base, f"{url}/v1"


def _metrics(results: dict) -> dict:
    return {k: v for k, v in results["methods"]["ga"].items() if k not in ("model", "ci")}


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, abs_tol=1e-4)
    return a == b


def test_a_run_against_served_models_gives_the_local_numbers(served_run):
    from unpact.run import run

    root, base, url = served_run
    local = base | {
        "model": str(root / "tiny"),
        "methods": [{"name": "ga", "model": str(root / "trained" / "models" / "ga")}],
    }
    remote = base | {
        "model": f"openai:tiny@{url}",
        "methods": [{"name": "ga", "model": f"openai:tiny-ga@{url}"}],
    }
    a = run(local, root / "local", cache_dir=root / "cache", progress=False).results
    b = run(remote, root / "remote", cache_dir=root / "cache", progress=False).results
    assert _metrics(a)["forgotten"] > 0, "the test needs forgotten items to attack"
    assert _close(
        {**_metrics(a), "unlearn_seconds": None}, {**_metrics(b), "unlearn_seconds": None}
    )
    assert b["methods"]["ga"]["model"] == f"openai:tiny-ga@{url}"
    assert not (root / "remote" / "models").exists()  # nothing local to link


@pytest.fixture(scope="module")
def multi_run(served_run):
    """One run over two base models: the tiny model loaded locally and the same model
    served, against the same (local) unlearned model."""
    from unpact.run import run

    root, base, url = served_run
    config = base | {
        "models": [
            {"name": "local", "model": str(root / "tiny")},
            {"name": "served", "model": f"openai:tiny@{url}"},
        ],
        "methods": [{"name": "ga", "model": str(root / "trained" / "models" / "ga")}],
    }
    return run(config, root / "multi", cache_dir=root / "cache", progress=False)


def test_several_models_side_by_side(served_run, multi_run):
    root, _, _ = served_run
    runs = multi_run.results["runs"]
    assert set(runs) == {"local", "served"}
    assert _close(_metrics(runs["local"]), _metrics(runs["served"]))
    for name in ("local", "served"):
        assert (root / "multi" / name / "results.json").is_file()
    page = (root / "multi" / "report.html").read_text()
    assert page.count('href="local/report.html"') == 1 and 'href="served/report.html"' in page
    assert "<svg" in page and "served: ga" in page
    csv_rows = (root / "multi" / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("run,") and {r.split(",")[0] for r in csv_rows[1:]} == {
        "local",
        "served",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": [{"method": "ga"}]}, "unlearning needs local weights"),
        ({"inject": {"enabled": True}}, "injection trains weights"),
        ({"attribution": {"baseline": "mask"}}, "'mask' cannot be asked"),
        ({"methods": [{"method": "ga", "model": "x", "name": "a"}]}, "either method"),
        ({"methods": [{"model": "openai:m@http://h/v1"}]}, "needs a name"),
        ({"model": "openai:m"}, "openai:MODEL@BASE_URL"),
    ],
)
def test_served_model_config_mistakes(change, message):
    from unpact.run import load_config

    config = {
        "model": "openai:m@http://127.0.0.1:9/v1",
        "inject": {"enabled": False},
        "methods": [{"name": "u", "model": "openai:u@http://127.0.0.1:9/v1"}],
    } | change
    with pytest.raises(UnpactError, match=re.escape(message)):
        load_config(config)


def _served_scores_equal_local(tiny, folder: Any, spec: str, *options: str) -> str:
    """Start `unpact serve` on the model in `folder` with `options` in its own process,
    score through `spec` (retried until the server is up), check the scores equal local
    ones, stop it; its stderr."""
    import time

    cmd = [sys.executable, "-m", "unpact", "serve", "--model", str(folder), "--name", "t"]
    proc = subprocess.Popen(
        [*cmd, *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        remote = open_model(
            spec, remote=RemoteSettings(retries=60, backoff=0.25, max_backoff=0.5, deadline=90)
        )
        start = time.monotonic()
        got = score(remote, PROMPTS, ANSWERS)
        assert time.monotonic() - start < 90
        local = score(tiny, PROMPTS, ANSWERS)
        assert _max_diff([s.logprobs for s in got], [s.logprobs for s in local]) < 1e-4
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    return err


def test_unpact_serve_command(tiny, tmp_path):
    """`unpact serve` as a user starts it, in its own process; scores equal local ones."""
    import socket

    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = f"openai:t@http://127.0.0.1:{port}/v1"
    err = _served_scores_equal_local(tiny, tmp_path / "tiny", spec, "--port", str(port))
    assert spec in err


def test_unpact_serve_listens_where_host_says(tiny, tmp_path):
    """`--host` as vLLM's (it was 127.0.0.1 only): the IPv6 loopback, reached through a
    spec with the address in brackets; an address not this machine's, or not an address,
    is one message."""
    import socket

    from unpact.models import save_model

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    save_model(tiny.model, tiny.tokenizer, tmp_path / "tiny")
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        port = s.getsockname()[1]
    spec = f"openai:t@http://[::1]:{port}/v1"
    options = ("--port", str(port), "--host", "::1")
    assert spec in _served_scores_equal_local(tiny, tmp_path / "tiny", spec, *options)
    cmd = [sys.executable, "-m", "unpact", "serve", "--model", str(tmp_path / "tiny")]
    # every interface, without a key: said to be open to whoever reaches the machine
    proc = subprocess.Popen(
        [*cmd, "--host", "0.0.0.0", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "1000"},  # one line each: two lines to read
    )
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline(), proc.stderr.readline()]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    said = " ".join(" ".join(lines).split())
    assert "on every interface" in said and "without --api-key: anyone who can reach" in said
    for host, said in (
        ("192.0.2.1", "--host 192.0.2.1: not an address of this machine"),  # TEST-NET-1
        ("no such host.invalid", "--host 'no such host.invalid': not an address"),
    ):
        bad = subprocess.run(
            [*cmd, "--host", host, "--port", "0"], capture_output=True, text=True, timeout=120
        )
        assert bad.returncode == 2 and said in " ".join(bad.stderr.split()), bad.stderr


def test_side_by_side_page_in_a_real_browser(served_run, multi_run, tmp_path):
    from tests.process.test_run import _HEAD_PROBE, _browse, _chromium

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed")
    root, _, _ = served_run
    page = root / "multi" / "report.html"
    proc = _browse(chromium, page, tmp_path / "p1", "--dump-dom")
    assert [line for line in proc.stderr.splitlines() if ":CONSOLE" in line] == []
    assert 'data-ready="1"' in proc.stdout
    assert proc.stdout.count('class="comparison"') == 1 and "<svg" in proc.stdout
    # at 1,400 px no head breaks inside a word or runs over its neighbour (as the report's)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _HEAD_PROBE + "</body>"))
    dom = _browse(chromium, probe, tmp_path / "p2", "--window-size=1400,900", "--dump-dom").stdout
    for said in ("broken", "overflowing"):
        found = re.search(rf'data-{said}-heads="([^"]*)"', dom)
        assert found is not None and found.group(1) == "", found


def test_byte_split_characters_get_the_same_units(tiny, served, faults):
    """Characters the byte-level tokenizer splits into several tokens: the served model's
    units cover the same positions, and word units read the same, as the local ones."""
    from unpact.attribution import make_units

    remote = _remote(served[1])
    prompt = "Who founded «Vostrand» in 東京?"
    a, b = tiny.encode_prompt(prompt), remote.encode_prompt(prompt)
    assert a == b
    assert len(a.content_ids) > len(prompt.split())  # several byte pieces
    for unit in ("token", "word"):
        la, lb = make_units(tiny, a, unit), make_units(remote, b, unit)
        assert [u.positions for u in la] == [u.positions for u in lb]
        if unit == "word":
            assert [u.text for u in la] == [u.text for u in lb]
            assert [u.text for u in lb][-3:] == ["東", "京", "?"]  # an ideograph a word


def test_served_answers_drop_the_stop_token_vllm_keeps(tiny, tmp_path):
    """vLLM keeps the stop/EOS id in a stopped completion's token ids and log-probs (so
    does `unpact serve`); the client drops it, so served answers are the local ones."""
    import httpx

    lm = _model_with(tiny, tmp_path)
    (first,) = generate(lm, PROMPTS[:1], max_new_tokens=12)
    ids = first[0].token_ids
    stop = next(t for n, t in enumerate(ids) if n >= 1 and t not in ids[:n])
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, stop]
    local = generate(lm, PROMPTS, max_new_tokens=12)
    assert local[0][0].token_ids == ids[: ids.index(stop)]  # it stops there now
    with BackgroundServer(make_app(lm, "tiny")) as url:
        body = {
            "model": "tiny",
            "prompt": list(lm.encode_prompt(PROMPTS[0]).input_ids),
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        choice = reply["choices"][0]
        tokens = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        assert choice["finish_reason"] == "stop"
        assert tokens[:-1] == list(local[0][0].token_ids)  # the stop id kept, as vLLM does
        assert len(choice["logprobs"]["token_logprobs"]) == len(tokens)
        got = generate(_remote(f"{url}/v1"), PROMPTS, max_new_tokens=12)
    assert [g[0].token_ids for g in got] == [g[0].token_ids for g in local]


def _model_with(tiny, tmp_path, **generation):
    """A copy of the tiny model whose generation_config carries `generation`."""
    from unpact.models import load_model, save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    for key, value in generation.items():
        setattr(lm.model.generation_config, key, value)
    return lm


def test_samples_come_from_the_same_distribution_served_or_local(tiny, tmp_path):
    """vLLM fills unset top_k, min_p and repetition_penalty from generation_config (as
    `unpact serve` does); the client sends every sampling parameter the local sampler uses,
    so a model whose config says top_k=1 still gives the local samples."""
    import httpx

    lm = _model_with(tiny, tmp_path, top_k=1, do_sample=True, repetition_penalty=1.5)
    # the local sampler ignores them too: the plain model's greedy answers and samples
    assert generate(lm, PROMPTS, max_new_tokens=6) == generate(tiny, PROMPTS, max_new_tokens=6)
    local = generate(lm, PROMPTS[:2], max_new_tokens=6, num_samples=4, seed=3)
    assert local == generate(tiny, PROMPTS[:2], max_new_tokens=6, num_samples=4, seed=3)
    assert any(len({s.token_ids for s in g}) > 1 for g in local)  # the samples differ
    with BackgroundServer(make_app(lm, "tiny")) as url:
        served = generate(
            _remote(f"{url}/v1"), PROMPTS[:2], max_new_tokens=6, num_samples=4, seed=3
        )
        assert served == local
        # a request that leaves top_k unset gets the model's top_k=1: greedy, like vLLM
        body = {
            "model": "tiny",
            "prompt": list(lm.encode_prompt(PROMPTS[0]).input_ids),
            "max_tokens": 6,
            "n": 4,
            "temperature": 1.0,
            "seed": 3,
        }
        texts = {
            c["text"] for c in httpx.post(f"{url}/v1/completions", json=body).json()["choices"]
        }
        assert len(texts) == 1


class OldTopK:
    """ASGI layer: a server that refuses `top_k: 0` as vLLM before 0.8, SGLang and others
    do ("top_k must be -1 (disable), or at least 1"); -1 is off everywhere."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/completions"):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        top_k = json.loads(body).get("top_k")
        if top_k is not None and (top_k < -1 or top_k == 0):
            message = f"top_k must be -1 (disable), or at least 1, got {top_k}."
            await _reply(send, 400, json.dumps({"error": {"message": message}}).encode())
            return

        replayed = False

        async def replay() -> Any:
            """The body once, then what the client sends next (its disconnection), as
            an ASGI server's receive does."""
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def test_sampling_is_off_in_a_form_every_server_takes(tiny):
    """The client sent `top_k: 0` with every generation, which older vLLM and SGLang refuse
    with a 400: no answer could be generated from them at all. `unpact serve` takes -1 and
    0 alike (vLLM today) and refuses below -1 with vLLM's message."""
    import httpx

    with BackgroundServer(OldTopK(make_app(tiny, "tiny"))) as url:
        remote = _remote(f"{url}/v1")
        assert generate(remote, PROMPTS[:2], max_new_tokens=6) == generate(
            tiny, PROMPTS[:2], max_new_tokens=6
        )
        sampled = generate(remote, PROMPTS[:1], max_new_tokens=6, num_samples=3, seed=2)
        assert sampled == generate(tiny, PROMPTS[:1], max_new_tokens=6, num_samples=3, seed=2)
    with BackgroundServer(make_app(tiny, "tiny")) as url:
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 4, "n": 3, "seed": 1}
        texts = [
            [
                c["text"]
                for c in httpx.post(f"{url}/v1/completions", json=body | k).json()["choices"]
            ]
            for k in ({"top_k": -1}, {"top_k": 0})
        ]
        assert texts[0] == texts[1]
        reply = httpx.post(f"{url}/v1/completions", json=body | {"top_k": -2})
        assert reply.status_code == 400
        assert (
            reply.json()["error"]["message"] == "top_k must be 0 (disable), or at least 1, got -2."
        )


def test_a_model_that_stops_at_once_is_the_same_error_served_or_local(tiny, tmp_path):
    """The greedy answer is the stop token itself: empty, locally and served alike."""
    lm = _model_with(tiny, tmp_path)
    with torch_no_grad():
        lm.model.model.norm.weight.zero_()  # every logit 0: the greedy token is id 0
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, 0]
    with pytest.raises(UnpactError, match="greedy answer is empty"):
        attribute_many(lm, PROMPTS[:1], target="generated")
    with (
        BackgroundServer(make_app(lm, "tiny")) as url,
        pytest.raises(UnpactError, match="greedy answer is empty"),
    ):
        attribute_many(_remote(f"{url}/v1"), PROMPTS[:1], target="generated")


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_a_wrong_model_name_is_an_error_not_a_missing_chat_template(served, faults):
    """A 404 from the chat /tokenize (no such model) is not "no chat template"; the error
    reply has vLLM's shape."""
    import httpx

    url = served[1]
    wrong = open_model(f"openai:nope@{url}", remote=RemoteSettings(**FAST))
    with pytest.raises(RemoteError, match="HTTP 404") as failed:
        wrong.has_chat_template  # noqa: B018
    # it said "the server has no vLLM-style /tokenize" (it has): the names it serves instead
    assert "serves no model named 'nope'" in str(failed.value)
    assert "it serves 'tiny'" in str(failed.value)
    assert "no vLLM-style /tokenize" not in str(failed.value)
    reply = httpx.post(f"{url}/completions", json={"model": "nope", "prompt": "hi"})
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == "The model `nope` does not exist."
    assert _remote(url).has_chat_template  # the right name: the template is there


def test_a_sequence_filling_the_context_is_scored_by_echo(tiny, served, faults):
    """prompt_logprobs scoring asks for one generated token, which a sequence of exactly
    the context length has no room for: it is scored by echo, to the local numbers."""
    remote = _remote(served[1])
    ids = [(7 * n) % 200 + 10 for n in range(tiny.max_length)]
    assert len(ids) == remote.max_length
    from unpact.serve import prompt_logprobs

    local = prompt_logprobs(tiny, ids)
    got = remote.sequence_logprobs(ids)
    assert max(abs(a - b) for a, b in zip(got, local)) < 1e-4 and len(got) == len(local)
    pinned = _remote(served[1], logprobs_mode="prompt_logprobs")
    with pytest.raises(UnpactError, match="fill the model's context"):
        pinned.sequence_logprobs(ids)
    # a pair longer than the context is said as locally, not as the server's HTTP 400
    from unpact import score

    long = " ".join(["word"] * tiny.max_length)
    for model in (tiny, remote):
        with pytest.raises(UnpactError, match=r"item 0: prompt \+ answer is \d+ tokens, longer"):
            score(model, [long], [" x"])


def test_a_sentencepiece_inst_template_is_split_alike_served_and_local(tiny, caplog):
    """`[INST] ` then the message on a SentencePiece tokenizer: the server's split (the
    token prefix templated messages share) stops before the space the message's leading
    `▁` stands for, and so does the local one; both equal the template's tokenisation."""
    import logging

    from unpact.models import LanguageModel
    from unpact.testing import tiny_sentencepiece_tokenizer

    lm = LanguageModel(tiny.model, tiny_sentencepiece_tokenizer(), spec="sp")
    prompt = "Who wrote the report about the town?"
    with BackgroundServer(make_app(lm, "tiny")) as url, caplog.at_level(logging.WARNING):
        served = _remote(f"{url}/v1").encode_prompt(prompt)
        local = lm.encode_prompt(prompt)
    assert served.input_ids == local.input_ids
    assert (served.content_start, served.content_end) == (local.content_start, local.content_end)
    assert not [r for r in caplog.records if "boundary" in r.getMessage()]


@pytest.mark.parametrize("kind", ["byte-bpe", "sentencepiece"])
def test_an_answer_after_answer_colon_space_is_split_alike_served_and_local(tiny, kind, caplog):
    """open-unlearning's `Question: q\nAnswer: `: the served split drops the generation
    prompt's last lone space token and gives the answer that space (the server's
    tokenisations decide it, from the detokenised generation prompt), as the local one
    does; prompts, answers and their scores are the same served and local."""
    import copy
    import logging

    from tests.unit.test_models import QA_TEMPLATE
    from unpact.models import LanguageModel
    from unpact.testing import tiny_sentencepiece_tokenizer

    tok = copy.deepcopy(tiny.tokenizer) if kind == "byte-bpe" else tiny_sentencepiece_tokenizer()
    tok.chat_template = QA_TEMPLATE
    lm = LanguageModel(tiny.model, tok, spec=kind)
    with caplog.at_level(logging.WARNING):
        _split_alike_served_and_local(lm, kind)
    assert not [r for r in caplog.records if "boundary" in r.getMessage()]


def _split_alike_served_and_local(lm, kind):
    """A prompt, its answer's tokens and their scores, served by `unpact serve` and local:
    the same, the answer with a lead space on byte-level BPE."""
    prompt, answer = "Who wrote the report about the town?", "the river bank."
    with BackgroundServer(make_app(lm, "tiny")) as url:
        remote = _remote(f"{url}/v1")
        served = remote.encode_prompt(prompt)
        served_answer = remote.encode_answer(answer, served)
        (served_score,) = score(remote, [prompt], [answer])
    local = lm.encode_prompt(prompt)
    assert served == local and local.answer_lead == (" " if kind == "byte-bpe" else "")
    assert served_answer == lm.encode_answer(answer, local)
    (local_score,) = score(lm, [prompt], [answer])
    assert served_score.answer_ids == local_score.answer_ids
    assert served_score.logprobs == pytest.approx(local_score.logprobs, abs=1e-4)


@pytest.mark.parametrize("kind", ["byte-bpe", "sentencepiece"])
def test_an_answer_after_a_generation_prompt_short_of_its_space_is_split_alike_served(tiny, kind):
    """DeepSeek-LLM's `Assistant:`: the server's /tokenize of an assistant message to
    continue (`continue_final_message`) and /detokenize say what the local template says,
    so served answers carry the space as local ones do; /tokenize refuses the two flags
    together in vLLM's words."""
    import copy

    import httpx

    from tests.unit.test_models import GAP_TEMPLATE
    from unpact.models import LanguageModel
    from unpact.testing import tiny_sentencepiece_tokenizer

    tok = copy.deepcopy(tiny.tokenizer) if kind == "byte-bpe" else tiny_sentencepiece_tokenizer()
    tok.chat_template = GAP_TEMPLATE
    lm = LanguageModel(tiny.model, tok, spec=kind)
    _split_alike_served_and_local(lm, kind)
    with BackgroundServer(make_app(lm, "tiny")) as url:
        both = {"add_generation_prompt": True, "continue_final_message": True}
        messages = [{"role": "user", "content": "Who?"}]
        reply = httpx.post(f"{url}/tokenize", json={"messages": messages, **both})
    assert reply.status_code == 400
    assert "Cannot set both `continue_final_message`" in reply.json()["error"]["message"]


def test_a_served_template_that_merges_at_the_boundary_is_said(tmp_path, tiny, caplog):
    """The served split (prefix and suffix from the server's templated tokenisations) is
    checked against the server's own tokenisation of each prompt's message."""
    import logging

    from tests.unit.test_models import MERGING_TEMPLATE, USER_TEMPLATE

    lm = _model_with(tiny, tmp_path)
    lm.tokenizer.chat_template = MERGING_TEMPLATE
    prompt = "t is the capital of France?"
    with BackgroundServer(make_app(lm, "tiny")) as url, caplog.at_level(logging.WARNING):
        remote = _remote(f"{url}/v1")
        encoded = remote.encode_prompt(prompt)
    assert any("differently at a boundary" in r.getMessage() for r in caplog.records)
    assert encoded.content_ids == tuple(lm.encode_prompt(prompt).content_ids)
    # `User: ` then the prompt: the space goes with the first word, served as locally
    caplog.clear()
    lm.tokenizer.chat_template, lm._template_split = USER_TEMPLATE, None
    alone = "Who wrote the report about the town?"  # `Ġ` stays a token before `Wh`
    with BackgroundServer(make_app(lm, "tiny")) as url, caplog.at_level(logging.WARNING):
        remote = _remote(f"{url}/v1")
        served = remote.encode_prompt("the capital of France?")
        served_alone = remote.encode_prompt(alone)
    local = lm.encode_prompt("the capital of France?")
    assert served == local and local.lead == " "
    assert served_alone == lm.encode_prompt(alone) and served_alone.lead == ""
    assert not [r for r in caplog.records if "boundary" in r.getMessage()]


def test_a_served_template_gets_the_same_fixed_date(tmp_path, tiny):
    """The server renders the template (vLLM takes the date from chat_template_kwargs, as
    `unpact serve` does): a served model's prompt tokens equal the local ones, any day."""
    from tests.unit.test_models import DATE_TEMPLATE

    lm = _model_with(tiny, tmp_path)
    lm.tokenizer.chat_template = DATE_TEMPLATE
    with BackgroundServer(make_app(lm, "tiny")) as url:
        remote = _remote(f"{url}/v1")
        served = remote.encode_prompt("Who wrote it?").input_ids
    assert served == lm.encode_prompt("Who wrote it?").input_ids


def test_a_served_template_that_always_thinks_is_said(tmp_path, tiny, caplog):
    import logging

    from tests.unit.test_models import THINKING_TEMPLATE

    lm = _model_with(tiny, tmp_path)
    lm.tokenizer.chat_template = THINKING_TEMPLATE
    with BackgroundServer(make_app(lm, "tiny")) as url, caplog.at_level(logging.WARNING):
        _remote(f"{url}/v1").encode_prompt("Who wrote it?")
    assert any("opens a <think> block" in r.getMessage() for r in caplog.records)


def test_unpact_serve_refuses_what_vllm_refuses(served, faults):
    """An out-of-vocabulary token id and more top log-probs than --max-logprobs (20) are
    a 400 with vLLM's error shape, and the client shows the server's message."""
    import httpx

    url = served[1]
    oov = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": [5, 10**6]})
    assert oov.status_code == 400 and "out of vocabulary" in oov.json()["error"]["message"]
    # text of no tokens (the tiny tokenizer adds no BOS) was a 500 from inside the model
    empty = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": ""})
    assert empty.status_code == 400, empty.text
    assert empty.json()["error"]["message"] == "The decoder prompt cannot be empty"
    many = {"model": "tiny", "prompt": [5, 6], "max_tokens": 1, "logprobs": 21}
    reply = httpx.post(f"{url}/completions", json=many)
    assert reply.status_code == 400 and "max allowed: 20" in reply.json()["error"]["message"]
    with pytest.raises(RemoteError, match="out of vocabulary"):
        _remote(url).sequence_logprobs([5, 10**6])
    # these were a 500 (the sampler, the tokenizer's decode failed on them)
    root = url.removesuffix("/v1")
    for tokens in ([-1], [10**12]):
        reply = httpx.post(f"{root}/detokenize", json={"model": "tiny", "tokens": tokens})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["message"] == f"Token id {tokens[0]} is out of vocabulary"
    sample = {"model": "tiny", "prompt": [5, 6], "max_tokens": 2}
    for change, param, message in (
        ({"temperature": -1}, "temperature", "temperature must be non-negative, got -1.0."),
        ({"temperature": 2.5}, "temperature", "temperature must be in [0, 2], got 2.5."),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0.0."),
        ({"min_p": 1.5}, None, "min_p must be in [0, 1], got 1.5."),
        ({"repetition_penalty": 0}, None, "repetition_penalty must be greater than zero, got 0.0."),
        ({"temperature": 0, "n": 2}, None, "n must be 1 when using greedy sampling, got 2."),
        # vLLM's order and words: these were "min_tokens must be less than or equal to
        # max_tokens=-1, got 0." and "max_tokens must be >= 0 and n >= 1"
        ({"max_tokens": -1}, "max_tokens", "max_tokens must be at least 1, got -1."),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0."),
        ({"n": 0}, None, "n must be at least 1, got 0."),
        # vLLM's bound (VLLM_MAX_N_SEQUENCES): a million samples were drawn in one batch
        (
            {"n": 16385},
            None,
            "n must be at most 16384, got 16385. To increase this limit, set the "
            "VLLM_MAX_N_SEQUENCES environment variable.",
        ),
        ({"min_tokens": 3}, None, "min_tokens must be less than or equal to max_tokens=2, got 3."),
        # were taken as banning nothing
        ({"bad_words": [""]}, None, "bad_words cannot contain an empty string. Got bad_words=['']"),
        (
            {"bad_words": ["  "]},
            "bad_words",
            "bad_words entries must tokenize to at least one token.",
        ),
    ):
        reply = httpx.post(f"{url}/completions", json=sample | change)
        assert reply.status_code == 400, (change, reply.text)
        assert reply.json()["error"] == reply.json()["error"] | {"message": message, "param": param}


def test_unpact_serve_refuses_a_request_over_the_context_in_vllms_words(served):
    """vLLM's renderer refuses a prompt and `max_tokens` that do not fit before it checks
    the sampling values (`TokenizeParams`); a chat request without `max_tokens` asks for
    the room left, and a prompt longer than the context is refused as asking 0 tokens
    (it was "max_tokens must be at least 1, got -N")."""
    import httpx

    url = served[1]
    room = httpx.get(f"{url}/models").json()["data"][0]["max_model_len"]
    body = {"model": "tiny", "prompt": [5, 6], "temperature": -1}
    over = httpx.post(f"{url}/completions", json=body | {"max_tokens": room + 1})
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "max_tokens"
    assert over.json()["error"]["message"] == (
        f"max_tokens={room + 1} cannot be greater than max_model_len={room}. "
        "Please request fewer output tokens."
    )
    tight = httpx.post(f"{url}/completions", json=body | {"max_tokens": room - 1})
    assert tight.status_code == 400 and tight.json()["error"]["param"] == "input_tokens"
    assert tight.json()["error"]["message"].startswith(
        f"You passed 2 input tokens and requested {room - 1} output tokens. However, the "
        f"model's context length is only {room} tokens, resulting in a maximum input length "
        "of 1 tokens."
    )
    fits = httpx.post(f"{url}/completions", json=body | {"max_tokens": room - 2})
    assert fits.json()["error"]["param"] == "temperature"  # fits; then the sampling values
    long = {"model": "tiny", "messages": [{"role": "user", "content": "word " * room}]}
    chat = httpx.post(f"{url}/chat/completions", json=long)
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "input_tokens"
    assert "and requested 0 output tokens" in chat.json()["error"]["message"]


def test_unpact_serve_samples_a_tiny_temperature_at_vllms_floor(served):
    """vLLM raises a temperature in (0, 0.01) to 0.01 before it checks for greedy decoding
    (`SamplingParams.__post_init__`), so 1e-6 samples, `n` > 1 allowed, exactly as 0.01
    does; unpact serve decoded it greedily and refused `n` 2. Without a seed, or with -1,
    vLLM draws from its own random state: not the same samples on every request."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 12, "n": 6, "seed": 4}
    tiny_t = httpx.post(f"{url}/completions", json=body | {"temperature": 1e-6})
    floor = httpx.post(f"{url}/completions", json=body | {"temperature": 0.01})
    assert tiny_t.status_code == 200, tiny_t.text
    assert [c["text"] for c in tiny_t.json()["choices"]] == [
        c["text"] for c in floor.json()["choices"]
    ]
    hot = {"model": "tiny", "prompt": [5, 6], "max_tokens": 12, "n": 4, "temperature": 2}
    for seed in ({}, {"seed": -1}):
        drawn = [
            [c["text"] for c in httpx.post(f"{url}/completions", json=hot | seed).json()["choices"]]
            for _ in range(2)
        ]
        assert drawn[0] != drawn[1], seed


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": "many"}, "max_tokens"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 2**63}, "seed"),  # vLLM bounds it to int64
        ({"temperature": "hot"}, "temperature"),
        ({"n": None}, "n"),
        ({"logprobs": "all"}, "logprobs"),
        ({"logprobs": -2}, "logprobs"),
        ({"top_k": "x"}, "top_k"),
    ],
)
def test_unpact_serve_answers_a_mistyped_field_with_vllms_400(served, change, param):
    """vLLM validates a completion request's fields (pydantic) and answers a wrong type or
    an out-of-range seed with 400 naming the field; unpact serve answered 500."""
    import httpx

    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 1} | change
    reply = httpx.post(f"{served[1]}/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == 400 and error["param"] == param, error


@pytest.mark.parametrize(
    "change",
    [
        {"suffix": "."},
        {"best_of": 3},
        {"structured_outputs": {"choice": ["a", "b"]}},
        {"use_beam_search": True},
        {"truncate_prompt_tokens": 1},
    ],
)
def test_unpact_serve_refuses_a_field_it_does_not_implement(served, change):
    """vLLM honours `suffix`, `best_of` and the rest; unpact serve ignored them and
    answered as if they were not there. Now a 400 naming the field (of those it does not
    implement); the values that change nothing (as unpact's client sends them) pass."""
    import httpx

    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 2}
    reply = httpx.post(f"{served[1]}/completions", json=body | change)
    assert reply.status_code == 400, reply.text
    (field,) = change
    error = reply.json()["error"]
    if field == "suffix":  # vLLM refuses it too, any text (an empty one as well)
        assert error["message"] == "suffix is not currently supported"
        empty = httpx.post(f"{served[1]}/completions", json=body | {"suffix": ""})
        assert empty.json()["error"]["message"] == "suffix is not currently supported"
        return
    assert error["param"] == field and f"does not implement `{field}`" in error["message"]
    inert = {"stop": [], "presence_penalty": 0.0, "best_of": 1, "logit_bias": {}}
    assert httpx.post(f"{served[1]}/completions", json=body | inert).status_code == 200


def test_unpact_serve_stops_where_vllm_stops(tiny, served, caplog):
    """`stop`, `stop_token_ids` and `include_stop_str_in_output` were refused: a client
    such as lm-evaluation-harness, which sends its `until` strings as `stop`, could not use
    `unpact serve`. Now a completion ends as vLLM ends it: the text cut before the stop
    string (after it when asked), the tokens up to the one that completed it, the stop
    string or token id as `stop_reason`, in completions and chat alike."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0}

    def ask(**change: Any) -> dict:
        reply = httpx.post(f"{url}/completions", json=body | change, timeout=60)
        assert reply.status_code == 200, reply.text
        [choice] = reply.json()["choices"]
        tokens = (choice["logprobs"] or {}).get("tokens", [])
        ids = [int(t.split(":")[1]) for t in tokens]
        return choice | {"ids": ids, "usage": reply.json()["usage"]}

    full = ask(logprobs=0, return_tokens_as_token_ids=True)
    text, ids = full["text"], full["ids"]
    assert full["stop_reason"] is None and len(ids) == 12 and len(text) > 6
    # a stop string from the middle of the greedy answer (whole characters, not the
    # replacement of a partial one): the text before it
    string = next(text[n : n + 2] for n in range(3, len(text)) if "\ufffd" not in text[n : n + 2])
    stopped = ask(stop=[string], logprobs=0, return_tokens_as_token_ids=True)
    at = text.index(string)
    assert stopped["text"] == text[:at] and stopped["finish_reason"] == "stop"
    assert stopped["stop_reason"] == string
    assert ids[: len(stopped["ids"])] == stopped["ids"] and len(stopped["ids"]) < 12
    assert tiny.tokenizer.decode(stopped["ids"]).find(string) >= 0  # its last token made it
    assert string not in tiny.tokenizer.decode(stopped["ids"][:-1])
    assert stopped["usage"]["completion_tokens"] == len(stopped["ids"])
    kept = ask(stop=string, include_stop_str_in_output=True)
    assert kept["text"] == text[: at + len(string)]
    token = ids[4]  # a stop token id: ends there, kept in the tokens, its text left out
    by_id = ask(stop_token_ids=[token], logprobs=0, return_tokens_as_token_ids=True)
    first = ids.index(token)
    assert by_id["ids"] == ids[: first + 1] and by_id["stop_reason"] == token
    assert by_id["text"] == tiny.tokenizer.decode(ids[:first], skip_special_tokens=True)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}
    said = httpx.post(f"{url}/chat/completions", json=chat | {"temperature": 0}).json()
    content = said["choices"][0]["message"]["content"]
    halted = httpx.post(
        f"{url}/chat/completions", json=chat | {"temperature": 0, "stop": [content[2:4]]}
    ).json()["choices"][0]
    assert halted["message"]["content"] == content[: content.index(content[2:4])]
    assert halted["stop_reason"] == content[2:4]
    for bad in ("", ["x", ""]):
        reply = httpx.post(f"{url}/completions", json=body | {"stop": bad})
        assert reply.status_code == 400 and "empty string" in reply.json()["error"]["message"]
    # stop ids no token has: never generated, the answer as without them
    never = ask(stop_token_ids=[-5, 10**12], logprobs=0, return_tokens_as_token_ids=True)
    assert never["ids"] == ids
    assert not [r for r in caplog.records if "positive integers" in r.getMessage()]


def test_unpact_serve_reports_log_probs_as_vllm_does(tiny, served):
    """`top_logprobs` was None and `text_offset` counted tokens, not characters; prompt
    log-probs had no rank and no most likely tokens. lm-evaluation-harness reads
    `top_logprobs` to tell whether a continuation is greedy, and failed on None. Now each
    is vLLM's: the token and the `logprobs` most likely ones at each position, the
    characters before each token, and each prompt token's rank (how many tokens are at
    least as likely) followed by the most likely ones with ranks 1..k."""
    import httpx
    import torch

    url = served[1]
    ids = list(tiny.encode_prompt(PROMPTS[0]).input_ids)
    (greedy,) = generate(tiny, PROMPTS[:1], max_new_tokens=6)
    seq = ids + list(greedy[0].token_ids)
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
    body = {"model": "tiny", "prompt": seq, "max_tokens": 0, "echo": True, "logprobs": 2}
    reply = httpx.post(f"{url}/completions", json=body | {"prompt_logprobs": 3}).json()
    [choice] = reply["choices"]
    got = choice["logprobs"]
    texts = [tiny.tokenizer.decode([t]) for t in seq]
    assert got["tokens"] == texts
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    offsets = [sum(len(t) for t in texts[:n]) for n in range(len(texts))]
    assert got["text_offset"] == offsets
    for n in range(1, len(seq)):
        row = logp[n - 1].tolist()
        order = sorted(range(len(row)), key=lambda t: -row[t])
        assert abs(got["token_logprobs"][n] - row[seq[n]]) < 1e-4
        # the token first, then the two most likely, keyed by text (a text twice: once,
        # where it comes first, with its last value, as vLLM's dictionary has it)
        top = got["top_logprobs"][n]
        expected = {tiny.tokenizer.decode([t]): row[t] for t in [seq[n], *order[:2]]}
        assert list(top) == list(expected)
        assert max(abs(top[k] - v) for k, v in expected.items()) < 1e-4
        rank = sum(v >= row[seq[n]] for v in row)
        entry = choice["prompt_logprobs"][n]
        assert list(entry) == list(dict.fromkeys([str(seq[n]), *map(str, order[:3])]))
        assert entry[str(seq[n])]["rank"] == (
            rank if seq[n] not in order[:3] else order.index(seq[n]) + 1
        )
        assert [entry[str(t)]["rank"] for t in order[:3]] == [1, 2, 3]
    # lm-evaluation-harness's greedy check: each continuation token is its position's top
    cont = range(len(ids), len(seq))
    assert all(got["token_logprobs"][n] == max(got["top_logprobs"][n].values()) for n in cont)
    one = httpx.post(f"{url}/completions", json=body | {"prompt": seq[:1]}).json()["choices"][0]
    assert one["logprobs"]["token_logprobs"] == [None] and one["prompt_logprobs"] == [None]
    # echo with logprobs alone: the prompt's log-probs come back as well, as in vLLM
    echoed = httpx.post(f"{url}/completions", json=body).json()["choices"][0]
    assert len(echoed["prompt_logprobs"]) == len(seq) and echoed["prompt_logprobs"][0] is None
    for asked, said in (
        (21, "sample logprobs of 21"),
        (-1, f"sample logprobs of {len(tiny.tokenizer)}"),
    ):
        refused = httpx.post(f"{url}/completions", json=body | {"logprobs": asked})
        assert refused.status_code == 400 and said in refused.json()["error"]["message"]


def test_unpact_serve_answers_lm_evaluation_harness_requests(tiny, served):
    """lm-evaluation-harness's `local-completions` sends its prompts as a list of token-id
    lists (a batch, even of one), which was a 400 here: a user could not evaluate a model
    served by `unpact serve` with it. Now a batch is answered as vLLM answers it (each
    prompt's choices, numbered across the batch, the usage summed), and the harness's two
    requests give what it computes from vLLM: the log-likelihood of a continuation (echo,
    one greedy token, `logprobs: 1`, summed over the continuation's positions) and a
    greedy generation cut at its `until` strings."""
    import httpx
    import torch

    url = served[1]
    contexts = [list(tiny.encode_prompt(p).input_ids) for p in PROMPTS[:2]]
    conts = [[11, 12, 13], [40]]
    whole = [c + x for c, x in zip(contexts, conts)]
    payload = {"model": "tiny", "prompt": whole, "temperature": 0, "max_tokens": 1}
    payload |= {"logprobs": 1, "seed": 1234, "echo": True}
    reply = httpx.post(f"{url}/completions", json=payload, timeout=60).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert reply["usage"]["prompt_tokens"] == sum(map(len, whole))
    for choice, ctx, cont, seq in zip(reply["choices"], contexts, conts, whole):
        lps = choice["logprobs"]["token_logprobs"][len(ctx) : -1]  # the harness's slice
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([seq])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected = [logp[len(ctx) + n - 1, t].item() for n, t in enumerate(cont)]
        assert len(lps) == len(cont) and max(abs(a - b) for a, b in zip(lps, expected)) < 1e-4
        greedy = [int(logp[len(ctx) + n - 1].argmax()) == t for n, t in enumerate(cont)]
        tops = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        assert [lp == max(top.values()) for lp, top in zip(lps, tops)] == greedy
    one = [
        httpx.post(f"{url}/completions", json=payload | {"prompt": seq}).json()["choices"][0]
        for seq in whole
    ]
    for alone, batched in zip(one, reply["choices"], strict=True):  # one pass, or a pass each
        a, b = alone["logprobs"], batched["logprobs"]
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        pairs = zip(a["token_logprobs"][1:], b["token_logprobs"][1:], strict=True)
        assert max(abs(x - y) for x, y in pairs) < 1e-5
    until = {"model": "tiny", "prompt": [contexts[0]], "max_tokens": 8, "temperature": 0}
    free = httpx.post(f"{url}/completions", json=until).json()["choices"][0]["text"]
    stop = next(free[n : n + 1] for n in range(2, len(free)) if free[n] != "\ufffd")
    cut = httpx.post(f"{url}/completions", json=until | {"stop": [stop, "\n\n"]}).json()
    assert cut["choices"][0]["text"] == free[: free.index(stop)]
    texts = {"model": "tiny", "prompt": ["Hello there", "The sky is"], "max_tokens": 2}
    assert len(httpx.post(f"{url}/completions", json=texts | {"n": 2}).json()["choices"]) == 4
    for bad in ([], [[1, 2], "text"], [[]], [[1, "x"]]):
        refused = httpx.post(f"{url}/completions", json=until | {"prompt": bad})
        assert refused.status_code == 400 and "'prompt' must be" in refused.text


def test_unpact_serve_keeps_min_tokens_as_vllm_does(tiny, served):
    """`min_tokens` was refused. Now no stop token can end a completion before it has
    that many tokens (the model's EOS is kept from being generated, as vLLM's MinTokens
    logits processor keeps every stop token), and a stop string is looked for only in the
    text after them."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 10, "temperature": 0}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}

    def ids_of(change: dict) -> tuple[list[int], dict]:
        reply = httpx.post(f"{url}/completions", json=body | change).json()
        [choice] = reply["choices"]
        return [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]], choice

    free, _ = ids_of({})
    stop = free[1]  # as a stop token id: the free answer ends at its second token
    cut, choice = ids_of({"stop_token_ids": [stop]})
    assert cut == free[: free.index(stop) + 1] and choice["stop_reason"] == stop
    held, choice = ids_of({"stop_token_ids": [stop], "min_tokens": 4})
    assert len(held) >= 4 and stop not in held[:4]
    assert (choice["stop_reason"] == stop) == (held[-1] == stop)
    for change, words in (
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"min_tokens": 11}, "min_tokens must be less than or equal to max_tokens=10, got 11."),
    ):
        refused = httpx.post(f"{url}/completions", json=body | change)
        assert refused.status_code == 400 and refused.json()["error"]["message"] == words


def test_a_completion_is_decoded_after_the_prompt_as_vllm_decodes_it(tiny):
    """vLLM's detokenizer is primed with the prompt's last tokens, so a completion whose
    first token begins a word keeps its space (SentencePiece's `▁`); unpact serve decoded
    the completion alone, and its text lost that space, and a stop string holding it was
    not found where vLLM finds it."""
    import httpx

    from unpact.models import LanguageModel
    from unpact.testing import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer()
    lm = LanguageModel(tiny.model, tok, spec="sp")
    ids = tok("The capital is", add_special_tokens=True)["input_ids"]
    body = {"model": "sp", "prompt": ids, "max_tokens": 6, "temperature": 0}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
    with BackgroundServer(make_app(lm, "sp")) as url:
        [choice] = httpx.post(f"{url}/v1/completions", json=body).json()["choices"]
        made = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        before = tok.decode(ids, skip_special_tokens=True)
        assert choice["text"] == tok.decode(ids + made, skip_special_tokens=True)[len(before) :]
        assert choice["text"].startswith(" ") and not tok.decode(made).startswith(" ")
        word = choice["text"].split()[0]
        stop = {"stop": " " + word}
        [cut] = httpx.post(f"{url}/v1/completions", json=body | stop).json()["choices"]
    assert cut["text"] == "" and cut["stop_reason"] == " " + word


def _events(reply: Any) -> list[Any]:
    """A server-sent event stream's `data:` payloads, JSON decoded but the last."""
    assert reply.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in reply.text.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_unpact_serve_gives_chat_log_probs_as_vllm_does(tiny, served):
    """Chat `logprobs` was refused: an LLM judge that reads the log-probs of its verdict
    token (a Yes against a No) could not be served. Now each generated token comes with
    its text, log-prob and UTF-8 bytes, and `top_logprobs` lists the first k of the token
    followed by the most likely ones, as vLLM lists them; the values are the completion
    endpoint's for the same tokens."""
    import httpx

    url = served[1]
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    chat = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0}
    reply = httpx.post(
        f"{url}/chat/completions", json=chat | {"logprobs": True, "top_logprobs": 3}
    ).json()
    [choice] = reply["choices"]
    content = choice["logprobs"]["content"]
    ids = httpx.post(
        f"{url.removesuffix('/v1')}/tokenize", json={"model": "tiny", "messages": messages}
    ).json()["tokens"]
    plain = httpx.post(
        f"{url}/completions",
        json={"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 3},
    ).json()["choices"][0]["logprobs"]
    assert [c["token"] for c in content] == plain["tokens"]
    assert [c["logprob"] for c in content] == plain["token_logprobs"]
    for entry, top in zip(content, plain["top_logprobs"]):
        assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))
        assert len(entry["top_logprobs"]) == 3
        # greedy: the token is the most likely, so the list is the three most likely
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
            (t["logprob"] for t in entry["top_logprobs"]), reverse=True
        )
        assert {t["token"]: t["logprob"] for t in entry["top_logprobs"]}.items() <= top.items()
    bare = httpx.post(f"{url}/chat/completions", json=chat | {"logprobs": True}).json()
    assert all(c["top_logprobs"] == [] for c in bare["choices"][0]["logprobs"]["content"])
    assert httpx.post(f"{url}/chat/completions", json=chat).json()["choices"][0]["logprobs"] is None


def test_unpact_serve_streams_as_vllm_streams(served):
    """`stream: true` was refused: a client that streams (the OpenAI SDK's `stream=True`, a
    chat front end) could not talk to `unpact serve`. Now the reply comes as vLLM's
    server-sent events: completion chunks (`text_completion`), or chat chunks
    (`chat.completion.chunk`: the role first, then the content with the finish reason),
    with a last chunk of usage when `stream_options.include_usage` asks, then [DONE]; the
    texts and reasons are the unstreamed reply's."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 6, "n": 2, "seed": 4}
    whole = httpx.post(f"{url}/completions", json=body).json()
    usage = {"stream_options": {"include_usage": True}}
    events = _events(httpx.post(f"{url}/completions", json=body | {"stream": True} | usage))
    *chunks, last = events
    assert {e["object"] for e in events} == {"text_completion"} and last["choices"] == []
    assert last["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c for e in chunks for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    said = httpx.post(f"{url}/chat/completions", json=chat | {"temperature": 0}).json()
    streamed = _events(
        httpx.post(f"{url}/chat/completions", json=chat | {"temperature": 0, "stream": True})
    )
    assert {e["object"] for e in streamed} == {"chat.completion.chunk"}
    deltas = [c["delta"] for e in streamed for c in e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == said["choices"][0]["message"]["content"]
    assert streamed[-1]["choices"][0]["finish_reason"] == said["choices"][0]["finish_reason"]
    unstreamed = httpx.post(f"{url}/completions", json=body | {"stream": "false"})
    assert unstreamed.json()["choices"]  # vLLM's pydantic reads "false" as false
    for change, words in (
        ({"stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
        ({"stream": True, "prompt_logprobs": 1}, "not available when `stream=True`"),
        ({"stream": True, "stream_options": "usage"}, "stream_options"),
    ):
        refused = httpx.post(f"{url}/completions", json=body | change)
        assert refused.status_code == 400 and words in refused.json()["error"]["message"]


def test_unpact_serve_streams_one_chunk_per_token_as_vllm_does(served):
    """The stream came as one chunk per choice, its whole text at once. vLLM sends a chunk
    per generated token: the text that token adds, its log-probs (text offsets counted
    from the text streamed before, vLLM's `initial_text_offset`), its id with
    `return_token_ids`, the usage so far with `continuous_usage_stats`, and the finish
    and stop reasons on the last; an echo comes with the first token; a chat stream gives
    the role, then a chunk per token with that token's log-probs."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0}
    asked = body | {"logprobs": 2, "return_token_ids": True}
    whole = httpx.post(f"{url}/completions", json=asked).json()["choices"][0]
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    *events, usage = _events(
        httpx.post(f"{url}/completions", json=asked | {"stream": True} | options)
    )
    chunks = [e["choices"][0] for e in events]
    assert len(chunks) == len(whole["token_ids"]) == 6
    assert [c["token_ids"] for c in chunks] == [[t] for t in whole["token_ids"]]
    assert chunks[0]["prompt_token_ids"] == [5, 6, 7] and chunks[1]["prompt_token_ids"] is None
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [c["logprobs"]["tokens"][0] for c in chunks] == whole["logprobs"]["tokens"]
    assert [c["logprobs"]["token_logprobs"][0] for c in chunks] == whole["logprobs"][
        "token_logprobs"
    ]
    before = [len("".join(c["text"] for c in chunks[:k])) for k in range(len(chunks))]
    assert [c["logprobs"]["text_offset"][0] for c in chunks] == before
    assert [c["finish_reason"] for c in chunks] == [None] * 5 + [whole["finish_reason"]]
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert usage["usage"]["completion_tokens"] == 6 and usage["choices"] == []
    echo = httpx.post(
        f"{url}/completions", json=body | {"echo": True, "logprobs": 0, "stream": True}
    )
    first = _events(echo)[0]["choices"][0]
    assert len(first["logprobs"]["tokens"]) == 3 + 1  # the prompt's and the first token's
    only = _events(httpx.post(f"{url}/completions", json=body | {"echo": True, "max_tokens": 0,
                                                                  "stream": True}))  # fmt: skip
    assert len(only) == 1 and only[0]["choices"][0]["finish_reason"] == "length"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True}  # fmt: skip
    said = httpx.post(f"{url}/chat/completions", json=chat).json()["choices"][0]
    streamed = [e["choices"][0] for e in _events(httpx.post(f"{url}/chat/completions",
                                                            json=chat | {"stream": True}))]  # fmt: skip
    assert streamed[0]["delta"] == {"role": "assistant", "content": ""}
    tokens = streamed[1:]
    assert len(tokens) == len(said["logprobs"]["content"])
    assert [t["logprobs"]["content"] for t in tokens] == [[c] for c in said["logprobs"]["content"]]
    assert "".join(t["delta"]["content"] for t in tokens) == said["message"]["content"]
    assert tokens[-1]["finish_reason"] == said["finish_reason"]
    two = body | {"n": 2, "temperature": 1, "seed": 3, "max_tokens": 3, "stream": True}
    order = [e["choices"][0]["index"] for e in _events(httpx.post(f"{url}/completions", json=two))]
    assert order[:2] == [0, 1]  # step by step, each choice's chunk, as vLLM's engine yields


def test_unpact_serve_echoes_without_generation_as_vllm_does(served):
    """vLLM serves an echo with `max_tokens` 0 as a one-token completion whose token it
    leaves out of the text and log-probs but counts in the usage, lists in `token_ids` and
    reads the finish reason from, once per `n` (`echo_without_generation` in its
    completion protocol: `max_tokens=1`). `unpact serve` made no token: one choice for any
    `n`, no completion tokens, no id, "length" even where the token was a stop id, and a
    `min_tokens` of 1 refused."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "echo": True, "temperature": 0}
    one = body | {"max_tokens": 0, "logprobs": 0, "return_token_ids": True}
    reply = httpx.post(f"{url}/completions", json=one).json()
    (choice,) = reply["choices"]
    token = httpx.post(
        f"{url}/completions", json=body | {"max_tokens": 1, "echo": False, "return_token_ids": True}
    ).json()["choices"][0]["token_ids"]
    assert choice["token_ids"] == token and choice["prompt_token_ids"] == [5, 6, 7, 8]
    assert choice["text"] == "" and len(choice["logprobs"]["tokens"]) == 4  # the prompt's
    assert choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    stopped = httpx.post(f"{url}/completions", json=one | {"stop_token_ids": token}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["stop_reason"] == token[0]
    sampled = body | {"max_tokens": 0, "n": 3, "temperature": 1, "seed": 1}
    reply = httpx.post(f"{url}/completions", json=sampled).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert {c["text"] for c in reply["choices"]} == {reply["choices"][0]["text"]}
    assert reply["usage"]["completion_tokens"] == 3
    options = {"stream": True, "stream_options": {"include_usage": True,
                                                  "continuous_usage_stats": True}}  # fmt: skip
    *chunks, usage = _events(httpx.post(f"{url}/completions", json=one | options))
    assert len(chunks) == 1 and chunks[0]["choices"][0]["token_ids"] == token
    assert chunks[0]["usage"]["completion_tokens"] == usage["usage"]["completion_tokens"] == 1
    least = httpx.post(f"{url}/completions", json=one | {"min_tokens": 1})
    assert least.status_code == 200, least.text  # vLLM's max_tokens is 1 here
    more = httpx.post(f"{url}/completions", json=one | {"min_tokens": 2})
    assert more.status_code == 400 and "max_tokens=1, got 2" in more.json()["error"]["message"]


def test_unpact_serve_tokenizes_as_vllm_does(tiny, served):
    """vLLM's TokenizeResponse: count, max_model_len, tokens and token_strs, the tokens'
    strings when `return_token_strs` asks (`convert_ids_to_tokens`), else null;
    `unpact serve` left the field out and ignored the flag."""
    import httpx

    root = served[1].removesuffix("/v1")
    body = {"model": "tiny", "prompt": "The quick fox"}
    plain = httpx.post(f"{root}/tokenize", json=body).json()
    ids = tiny.tokenizer("The quick fox")["input_ids"]
    assert plain == {"count": len(ids), "max_model_len": tiny.max_length, "tokens": ids,
                     "token_strs": None}  # fmt: skip
    named = httpx.post(f"{root}/tokenize", json=body | {"return_token_strs": True}).json()
    assert named["token_strs"] == tiny.tokenizer.convert_ids_to_tokens(ids)


def test_stop_strings_leave_the_samples_as_they_were(served):
    """A seeded request's samples with a stop string are its samples without one, each cut
    where its text first holds the string: stopping a sample early changes no other's."""
    import httpx

    url = served[1]
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 10, "n": 4, "seed": 3}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
    for extra in ({}, {"top_p": 0.9}):  # the local sampler, and transformers' with top_p
        free = httpx.post(f"{url}/completions", json=body | extra, timeout=60).json()
        texts = [c["text"] for c in free["choices"]]
        string = next(t[1:3] for t in texts if len(t) >= 3)
        cut = httpx.post(f"{url}/completions", json=body | extra | {"stop": string}, timeout=60)
        for whole, part in zip(free["choices"], cut.json()["choices"]):
            tokens = [t for t in whole["logprobs"]["tokens"]]
            assert part["logprobs"]["tokens"] == tokens[: len(part["logprobs"]["tokens"])]
            if string in whole["text"]:
                assert part["text"] == whole["text"][: whole["text"].index(string)]
                assert part["stop_reason"] == string
            else:
                assert part == whole
        # a stop token id with the same sampler (transformers' sampler was handed the EOS
        # ids twice: a server error): each sample its free one, cut after that token
        token = int(free["choices"][0]["logprobs"]["tokens"][2].split(":")[1])
        by_id = httpx.post(
            f"{url}/completions", json=body | extra | {"stop_token_ids": [token]}, timeout=60
        )
        assert by_id.status_code == 200, by_id.text
        for whole, part in zip(free["choices"], by_id.json()["choices"]):
            tokens = whole["logprobs"]["tokens"]
            ending = (
                tokens.index(f"token_id:{token}") + 1 if f"token_id:{token}" in tokens else None
            )
            assert part["logprobs"]["tokens"] == tokens[:ending]


def test_unpact_serve_takes_a_request_without_a_model_and_refuses_a_body_not_an_object(served):
    """As vLLM: no `model` means the served one; a body that is not a JSON object is a 400
    in vLLM's error shape (FastAPI's own reply is a 422 of another shape)."""
    import httpx

    url = served[1]
    reply = httpx.post(f"{url}/completions", json={"prompt": [5, 6], "max_tokens": 1})
    assert reply.status_code == 200 and reply.json()["model"] == "tiny"
    for content in (b"[1, 2]", b"{not json"):
        bad = httpx.post(
            f"{url}/completions", content=content, headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == 400, bad.text
    chat = {"model": "tiny", "messages": "hello"}
    assert httpx.post(f"{url[: -len('/v1')]}/tokenize", json=chat).status_code == 400
    # vLLM's health check, which scripts poll before the first request: an empty 200
    health = httpx.get(f"{url[: -len('/v1')]}/health")
    assert (health.status_code, health.content) == (200, b"")


@pytest.mark.parametrize(
    "failure, status, kind",
    [
        (RuntimeError("disk on fire"), 500, "InternalServerError"),
        (ValueError("no such thing"), 400, "BadRequestError"),
        (NotImplementedError("not here"), 501, "NotImplementedError"),
    ],
)
def test_unpact_serve_answers_a_failure_no_check_foresaw_as_vllm_does(
    served, monkeypatch, failure, status, kind
):
    """A failure inside a request is answered as vLLM's exception_handler answers it (its
    create_error_response: the request's fault, not implemented, or the server's), in
    vLLM's error shape, not Starlette's plain-text "Internal Server Error"."""
    import httpx

    def fails(*args: Any) -> None:
        raise failure

    monkeypatch.setattr("unpact.serve.check_text", fails)
    reply = httpx.post(f"{served[1][: -len('/v1')]}/tokenize", json={"prompt": "hi"})
    assert reply.status_code == status, reply.text
    message = str(failure)
    assert reply.json() == {
        "error": {"message": message, "type": kind, "param": None, "code": status}
    }


def test_a_body_nested_past_pythons_recursion_is_answered_as_vllm_answers_it(served):
    """FastAPI raises Starlette's HTTPException for a body json.loads cannot finish (nested
    deeper than Python recurses), which vLLM's handler does not catch: its own 400."""
    import httpx

    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = httpx.post(
        f"{served[1]}/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400
    assert reply.json() == {"detail": "There was an error parsing the body"}


def test_unpact_serve_answers_chat_completions_as_an_llm_judge_asks(served, faults):
    """/v1/chat/completions was a 404: an LLM judge could not be served by `unpact serve`.
    Its answer is the greedy completion of the messages in the chat template (the same
    tokens /tokenize gives them, the same text /v1/completions generates from those), in
    vLLM's chat format; the judge reads it over HTTP."""
    import httpx

    from unpact.judge import JudgeSettings, LLMJudgeSettings, Verdict, judge_many

    url = served[1]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Who wrote it?"}]}]
    body = {"model": "tiny", "messages": messages, "max_completion_tokens": 5, "temperature": 0}
    chat = httpx.post(f"{url}/chat/completions", json=body).json()
    ids = httpx.post(
        f"{url.removesuffix('/v1')}/tokenize",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Who wrote it?"}]},
    ).json()["tokens"]
    plain = httpx.post(
        f"{url}/completions",
        json={"model": "tiny", "prompt": ids, "max_tokens": 5, "temperature": 0},
    ).json()
    [choice] = chat["choices"]
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == plain["choices"][0]["text"]
    assert choice["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chat["usage"]["prompt_tokens"] == len(ids)
    [card] = httpx.get(f"{url}/models").json()["data"]  # vLLM's ModelCard fields
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] > 0
    assert {"created", "owned_by", "root", "parent", "permission"} <= set(card)
    assert card["owned_by"] == "vllm"  # vLLM's ModelCard default, which clients read
    settings = LLMJudgeSettings(base_url=url, model="tiny", api_key_env=None, max_tokens=4)
    verdicts = [Verdict("Who wrote it?", "Mira", "Mira"), Verdict("Sky?", "blue", "green")]
    # the untrained tiny model's reply is no verdict: said, not read as "no"
    with pytest.raises(UnpactError, match="neither yes nor no"):
        judge_many(verdicts, JudgeSettings(kind="llm", llm=settings))
    for change, said in (
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "'messages' must be a non-empty list"),
        ({"tools": [{"type": "function"}]}, "does not implement `tools`"),
        ({"top_logprobs": 2}, "`logprobs` must be set to true"),
        ({"temperature": -1}, "temperature must be non-negative"),
        ({"model": "other"}, "The model `other` does not exist."),
    ):
        reply = httpx.post(f"{url}/chat/completions", json=body | change)
        assert reply.status_code in (400, 404), (change, reply.text)
        assert said in reply.json()["error"]["message"], (change, reply.text)


def test_a_served_models_own_stages_do_not_depend_on_the_local_dtype(served_run):
    """`dtype:` joined every stage's key, a served model's too, whose dtype is its
    server's: a run mixing a local original and a served unlearned model judged and
    attributed the served one again when only the local dtype changed."""
    from unpact.run import run

    root, base, url = served_run
    mixed = base | {
        "model": str(root / "tiny"),
        "methods": [{"name": "ga", "model": f"openai:tiny-ga@{url}"}],
        "attacks": [{"name": "focus_on_key"}],
    }
    cache = root / "cache-dtype"
    first = run(mixed | {"dtype": "bfloat16"}, root / "bf16", cache_dir=cache, progress=False)
    assert any(c.startswith("evaluating:ga") for c in first.computed)
    again = run(mixed, root / "fp32", cache_dir=cache, progress=False)
    mine = [c for c in again.computed if c.startswith(("evaluating:ga", "attributing:ga"))]
    assert mine == [], again.computed
    assert any(c.startswith("evaluating:original") for c in again.computed)  # local: again


def test_a_name_served_with_another_checkpoint_is_not_read_from_the_cache(served_run, tiny):
    """A served model's stages were keyed by its name and URL alone: a user who served one
    checkpoint as `model`, ran, then restarted the server with another under the same name
    got the first one's cached answers, silently. The key now holds what the server says it
    loaded (vLLM's `root` in /v1/models); the same checkpoint again is still read back."""
    from unpact.backends import model_key
    from unpact.models import load_model
    from unpact.run import run

    root, base, _ = served_run
    unlearned = load_model(str(root / "trained" / "models" / "ga"))
    first = BackgroundServer(make_app({"m": tiny, "m-ga": unlearned}))
    port, runs, keys = first.port, [], []
    for n, served in enumerate((first, None, None)):
        if served is None:  # the same name and URL, another checkpoint behind it (then again)
            models = {"m": unlearned if n == 1 else tiny, "m-ga": unlearned}
            served = BackgroundServer(make_app(models), port=port)
        with served as url:
            spec = f"openai:m@{url}/v1"
            keys.append(model_key(spec))
            methods = [{"name": "ga", "model": f"openai:m-ga@{url}/v1"}]
            config = base | {"model": spec, "methods": methods}
            out = root / f"renamed-{n}"
            runs.append(run(config, out, cache_dir=root / "cache", progress=False).results)
    before = [r["methods"]["ga"]["forget_acc_before"] for r in runs]
    after = runs[0]["methods"]["ga"]["forget_acc_after"]
    assert before[0] != after, "the test needs two checkpoints that answer differently"
    assert before == [before[0], after, before[0]]  # the second run judged what was served
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_an_llm_judge_served_under_one_name_is_keyed_by_what_it_serves(tiny, tmp_path):
    """The LLM judge's verdicts were cached by its endpoint and model name: a judge server
    restarted with another model under the same name gave the first one's verdicts. The key
    holds the root of the name's card in /v1/models; without a root (OpenAI's API), the key
    is the settings' alone."""
    from unpact.judge import JudgeSettings, LLMJudgeSettings, served_cache_key
    from unpact.models import load_model, save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "other")
    other = load_model(str(tmp_path / "other"))
    first = BackgroundServer(make_app({"judge": tiny}))
    keys = []
    for served in (first, BackgroundServer(make_app({"judge": other}), port=first.port)):
        with served as url:
            llm = LLMJudgeSettings(base_url=f"{url}/v1", model="judge", api_key_env=None)
            settings = JudgeSettings(kind="llm", llm=llm)
            keys.append(served_cache_key(settings))
    assert keys[0] != keys[1]
    assert keys[0]["llm"]["served_root"] == tiny.spec
    assert {k: v for k, v in keys[1]["llm"].items() if k != "served_root"} == settings.cache_key()[
        "llm"
    ]
    with BackgroundServer(_NoRoot()) as url:  # OpenAI's API: cards without a root
        llm = LLMJudgeSettings(base_url=f"{url}/v1", model="judge", api_key_env=None)
        settings = JudgeSettings(kind="llm", llm=llm)
        assert served_cache_key(settings) == settings.cache_key()


class _NoRoot:
    """An endpoint whose model list is OpenAI's: ids, no root."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = {"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "x"}]}
        await _reply(send, 200, json.dumps(body).encode())


def test_unpact_serve_echoes_a_text_prompt_as_given_and_keeps_add_special_tokens(tiny):
    """vLLM echoes a text prompt as the text it was given (token ids: as the tokenizer
    decodes them) and tokenises it with special tokens unless the request's
    `add_special_tokens` is false. `unpact serve` echoed the decoded ids (a BOS the user
    never wrote, an unknown character as <unk>) and ignored `add_special_tokens`."""
    import httpx
    from tokenizers.processors import TemplateProcessing

    from unpact.models import LanguageModel
    from unpact.testing import tiny_sentencepiece_tokenizer

    tok: Any = tiny_sentencepiece_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert len(tok) <= tiny.model.config.vocab_size
    lm = LanguageModel(model=tiny.model, tokenizer=tok, spec="tiny-sp")
    text = "Paris , France ."  # "," is not in this vocabulary: <unk>
    plain = list(tok(text, add_special_tokens=False)["input_ids"])
    assert tok.decode(plain) != text
    body = {"model": "tiny", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
    with BackgroundServer(make_app(lm, "tiny")) as url:
        given = httpx.post(f"{url}/v1/completions", json=body).json()
        bare = httpx.post(f"{url}/v1/completions", json=body | {"add_special_tokens": False})
        as_ids = httpx.post(f"{url}/v1/completions", json=body | {"prompt": plain}).json()
    assert given["choices"][0]["text"] == text
    assert given["usage"]["prompt_tokens"] == len(plain) + 1  # the BOS first
    assert given["choices"][0]["logprobs"]["tokens"][0] == "<s>"
    assert bare.json()["choices"][0]["text"] == text
    assert bare.json()["usage"]["prompt_tokens"] == len(plain)
    assert as_ids["choices"][0]["text"] == tok.decode(plain)


def _shaped_greedy(
    tiny, ids, steps, bias=(), rep=1.0, presence=0.0, frequency=0.0, allowed=None, bad=()
):
    """The greedy tokens of the tiny model with vLLM's logit shaping, one full forward pass
    per token and the definitions written out (only `allowed` tokens, no `bad` word
    completed, `logit_bias` added, then the penalties)."""
    import torch

    seq, out = list(ids), []
    for _ in range(steps):
        with torch.no_grad():
            row = tiny.model(input_ids=torch.tensor([seq])).logits[0, -1].float().tolist()
        if allowed is not None:
            row = [v if t in allowed else -math.inf for t, v in enumerate(row)]
        for word in bad:
            if out[len(out) - len(word) + 1 :] == list(word[:-1]) or len(word) == 1:
                row[word[-1]] = -math.inf
        for t, b in bias:
            row[t] += b
        for t in set(seq):
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        for t in set(out):
            row[t] -= frequency * out.count(t) + presence
        token = max(range(len(row)), key=row.__getitem__)
        seq.append(token)
        out.append(token)
    return out


def test_unpact_serve_shapes_logits_as_vllm_does(tiny, served):
    """vLLM applies `logit_bias`, `presence_penalty`, `frequency_penalty` and the repetition
    penalty before it picks a token, greedy or sampled; `unpact serve` refused the first
    three and, greedy, ignored the repetition penalty (a request's, or one in the model's
    generation_config): another answer than vLLM's, silently."""
    import httpx

    url = served[1]
    ids = list(tiny.encode_prompt(PROMPTS[0]).input_ids)
    plain = _shaped_greedy(tiny, ids, 10)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 10, "temperature": 0, "logprobs": 0}
    body |= {"return_tokens_as_token_ids": True}

    def tokens(**asked: Any) -> list[int]:
        reply = httpx.post(f"{url}/completions", json=body | asked).json()
        return [int(t.split(":")[1]) for t in reply["choices"][0]["logprobs"]["tokens"]]

    assert tokens() == plain
    shaped = {
        "repetition_penalty": 3.0,
        "presence_penalty": 1.5,
        "frequency_penalty": 2.0,
        "logit_bias": {str(plain[1]): -4.5, "7": 2.0},
    }
    for asked in [{k: v} for k, v in shaped.items()] + [shaped]:
        bias = tuple((int(k), v) for k, v in asked.get("logit_bias", {}).items())
        want = _shaped_greedy(
            tiny,
            ids,
            10,
            bias,
            asked.get("repetition_penalty", 1.0),
            asked.get("presence_penalty", 0.0),
            asked.get("frequency_penalty", 0.0),
        )
        assert want != plain, asked
        assert tokens(**asked) == want, asked
    # one greedy token (answered from the scoring pass when nothing shapes it)
    assert tokens(max_tokens=1, logit_bias={"7": 100}) == [7]
    # sampling at a small temperature is the greedy choice, shaped
    want = _shaped_greedy(tiny, ids, 10, ((plain[1], -4.5), (7, 2.0)), 3.0, 1.5, 2.0)
    assert tokens(**shaped, temperature=0.01, seed=3) == want
    assert tokens(**shaped, temperature=1.0, top_k=1, seed=3) == want  # transformers' sampler


def test_unpact_serve_ignore_eos_and_logit_bias_errors_as_vllm(tiny, served):
    """`ignore_eos`: the EOS ends nothing (a stop token id still does; every stop id is
    still held back for `min_tokens`), as vLLM; out-of-range penalties and a bad
    `logit_bias` are vLLM's 400s."""
    import httpx

    url = served[1]
    eos = tiny.tokenizer.eos_token_id
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    body |= {"logit_bias": {str(eos): 100}, "logprobs": 0, "return_tokens_as_token_ids": True}

    def choice(**asked: Any) -> dict[str, Any]:
        reply = httpx.post(f"{url}/completions", json=body | asked)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]

    def ids(c: dict[str, Any]) -> list[int]:
        return [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]]

    stopped = choice()
    assert ids(stopped) == [eos] and stopped["finish_reason"] == "stop"
    assert stopped["stop_reason"] is None
    ignored = choice(ignore_eos=True)
    assert ids(ignored) == [eos] * 5 and ignored["finish_reason"] == "length"
    assert ignored["text"] == ""  # special tokens are left out of the text
    shown = choice(ignore_eos=True, skip_special_tokens=False)["text"]  # unless asked
    assert shown == tiny.tokenizer.decode([eos]) * 5 and shown
    held = choice(ignore_eos=True, min_tokens=2)
    assert eos not in ids(held)[:2] and ids(held)[2:] == [eos] * 3
    asked = choice(ignore_eos=True, stop_token_ids=[eos])  # the request's own stop id
    assert ids(asked) == [eos] and asked["stop_reason"] == eos
    vocab = tiny.model.config.vocab_size
    for field, value, said in (
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5."),
        ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3.0."),
        ("logit_bias", {"x": 1}, "invalid literal for int() with base 10: 'x'"),
        (
            "logit_bias",
            {str(vocab): 1, "-1": 2},
            f"token_id(s) [{vocab}, -1] in logit_bias contain out-of-vocab token ids. "
            f"Vocabulary size: {vocab}",
        ),
    ):
        refused = httpx.post(f"{url}/completions", json=body | {field: value})
        assert refused.status_code == 400, field
        assert refused.json()["error"]["message"] == said
    # the chat endpoint takes them too
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    reply = httpx.post(
        f"{url}/chat/completions",
        json=chat | {"temperature": 0, "ignore_eos": True, "logit_bias": {str(eos): 100}},
    ).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 4


def test_unpact_serve_scores_a_batch_of_prompts_in_one_pass(tiny, served):
    """lm-evaluation-harness sends its log-likelihood requests as one list of prompts;
    `unpact serve` scored them one forward pass each. Now one pass for the list (within
    the batcher's token budget), each prompt's numbers those of a pass of its own (float
    rounding apart), the choices in the prompts' order."""
    import httpx

    url = served[1]
    prompts = [list(tiny.encode_prompt(p).input_ids) for p in PROMPTS]
    body = {"model": "tiny", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    alone = [
        httpx.post(f"{url}/completions", json=body | {"prompt": p}).json()["choices"][0]
        for p in prompts
    ]
    passes = []
    hook = tiny.model.register_forward_hook(lambda *_: passes.append(1))
    try:
        together = httpx.post(f"{url}/completions", json=body | {"prompt": prompts}).json()
    finally:
        hook.remove()
    assert len(passes) == 1
    assert [c["index"] for c in together["choices"]] == list(range(len(prompts)))
    for one, batched in zip(alone, together["choices"], strict=True):
        assert batched["text"] == one["text"]
        a, b = one["logprobs"]["token_logprobs"][1:], batched["logprobs"]["token_logprobs"][1:]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_unpact_serve_keeps_to_allowed_token_ids_and_off_bad_words(tiny, served):
    """`allowed_token_ids` and `bad_words` were refused; vLLM rules out every token but the
    allowed ones, and a bad word's last token where the completion ends with the ones
    before it (each word tokenised alone and, where that gives other tokens of the same
    count, after a space). Its 400s for an empty or out-of-vocabulary allowed list."""
    import httpx

    url = served[1]
    tok = tiny.tokenizer
    ids = list(tiny.encode_prompt(PROMPTS[0]).input_ids)
    plain = _shaped_greedy(tiny, ids, 10)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 10, "temperature": 0, "logprobs": 0}
    body |= {"return_tokens_as_token_ids": True}

    def tokens(**asked: Any) -> list[int]:
        reply = httpx.post(f"{url}/completions", json=body | asked)
        assert reply.status_code == 200, reply.text
        return [int(t.split(":")[1]) for t in reply.json()["choices"][0]["logprobs"]["tokens"]]

    allowed = sorted({plain[3], 40, 41, 57})
    got = tokens(allowed_token_ids=allowed)
    assert set(got) <= set(allowed) and got == _shaped_greedy(tiny, ids, 10, allowed=allowed)
    word = tok.decode(plain[2:4])  # two tokens the model would say
    alone = tuple(tok.encode(word.lstrip(), add_special_tokens=False))
    inside = tuple(tok.encode(" " + word.lstrip(), add_special_tokens=False))
    bad = [alone] + ([inside] if inside[0] != alone[0] and len(inside) == len(alone) else [])
    want = _shaped_greedy(tiny, ids, 10, bad=bad)
    assert want != plain and tokens(bad_words=[word]) == want
    for value, said in (
        ([], "allowed_token_ids is not None and empty!"),
        ([5, len(tok)], "allowed_token_ids contains out-of-vocab token id!"),
    ):
        refused = httpx.post(f"{url}/completions", json=body | {"allowed_token_ids": value})
        assert refused.status_code == 400 and refused.json()["error"]["message"] == said


def test_unpact_serve_chat_continues_a_final_message_and_echoes_it(tiny, served):
    """vLLM's chat endpoint continues the last message (`continue_final_message`, the
    prefilled answer of a prefilling attack) and, with `echo`, puts the last message's
    content before the reply when their roles agree (the reply's role being the last
    message's without a generation prompt); `unpact serve` refused both."""
    import httpx

    url = served[1]
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital is"},
    ]
    body = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0}
    body |= {"add_generation_prompt": False, "continue_final_message": True}
    text = tiny.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ids = list(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])
    completion = {"model": "tiny", "prompt": ids, "max_tokens": 5, "temperature": 0}
    plain = httpx.post(f"{url}/completions", json=completion).json()["choices"][0]["text"]
    reply = httpx.post(f"{url}/chat/completions", json=body).json()
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": plain,
        "tool_calls": [],
    }
    echoed = httpx.post(f"{url}/chat/completions", json=body | {"echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == "The capital is" + plain
    # with a generation prompt the reply is the assistant's: a user's last message is not
    # echoed; without one, the reply takes the last message's role and echoes it
    asked = {"model": "tiny", "messages": messages[:1], "max_tokens": 3, "echo": True}
    with_prompt = httpx.post(f"{url}/chat/completions", json=asked).json()["choices"][0]
    assert with_prompt["message"]["role"] == "assistant"
    assert not with_prompt["message"]["content"].startswith(messages[0]["content"])
    bare = asked | {"add_generation_prompt": False}
    without = httpx.post(f"{url}/chat/completions", json=bare).json()["choices"][0]
    assert without["message"]["role"] == "user"
    assert without["message"]["content"].startswith(messages[0]["content"])
    both = httpx.post(f"{url}/chat/completions", json=body | {"add_generation_prompt": True})
    assert both.status_code == 400 and "Cannot set both" in both.json()["error"]["message"]


def test_unpact_serve_returns_token_ids_when_asked(tiny, served):
    """vLLM's `return_token_ids`: each choice carries the prompt's ids and its own (the
    stop token among them), and an echo then leaves the prompt's text out; `unpact serve`
    ignored the field."""
    import httpx

    url = served[1]
    ids = list(tiny.encode_prompt(PROMPTS[0]).input_ids)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    body |= {"return_tokens_as_token_ids": True, "return_token_ids": True}
    choice = httpx.post(f"{url}/completions", json=body).json()["choices"][0]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
    echoed = httpx.post(f"{url}/completions", json=body | {"echo": True}).json()["choices"][0]
    assert echoed["text"] == choice["text"] and echoed["token_ids"] == choice["token_ids"]
    plain = httpx.post(f"{url}/completions", json=body | {"return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]


def test_served_sampling_ignores_generation_settings_vllm_does_not_read(tiny, tmp_path):
    """vLLM takes top_p, top_k, min_p, repetition_penalty and temperature from a model's
    generation_config and nothing else; `unpact serve` sampled with top_p, top_k or min_p
    through transformers' generate on the whole generation_config, so a model's
    `no_repeat_ngram_size` (or typical_p, a forced EOS, ...) changed its samples."""
    import httpx

    lm = _model_with(tiny, tmp_path, no_repeat_ngram_size=1)
    ids = list(lm.encode_prompt(PROMPTS[0]).input_ids)
    plain = _shaped_greedy(tiny, ids, 24)
    assert len(set(plain)) < len(plain)  # the greedy answer repeats a token
    body = {"model": "tiny", "prompt": ids, "max_tokens": 24, "temperature": 1.0, "seed": 1}
    body |= {"top_k": 1, "logprobs": 0, "return_tokens_as_token_ids": True}
    with BackgroundServer(make_app(lm, "tiny")) as url:
        reply = httpx.post(f"{url}/v1/completions", json=body).json()
    tokens = [int(t.split(":")[1]) for t in reply["choices"][0]["logprobs"]["tokens"]]
    assert tokens == plain[: len(tokens)] and len(tokens) == 24


def test_served_completions_stop_at_the_generation_configs_max_new_tokens(tiny, tmp_path):
    """vLLM bounds every request by the generation_config's `max_new_tokens` (a
    server-wide limit, `get_max_tokens`); `unpact serve` made as many tokens as asked, and
    unpact's client took a served answer cut short as the model's answer."""
    import httpx

    lm = _model_with(tiny, tmp_path, max_new_tokens=3)
    ids = list(lm.encode_prompt(PROMPTS[0]).input_ids)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 10, "temperature": 0}
    with BackgroundServer(make_app(lm, "tiny")) as url:
        reply = httpx.post(f"{url}/v1/completions", json=body).json()
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
        chatted = httpx.post(f"{url}/v1/chat/completions", json=chat | {"temperature": 0})
        above = httpx.post(f"{url}/v1/completions", json=body | {"min_tokens": 5})
        # unpact's client: a served answer cut short is an error, not a shorter answer
        with pytest.raises(RemoteError, match="made 3 tokens where 6 were asked"):
            generate(_remote(f"{url}/v1"), PROMPTS[:1], max_new_tokens=6)
        assert (
            len(generate(_remote(f"{url}/v1"), PROMPTS[:1], max_new_tokens=3)[0][0].token_ids) == 3
        )
    assert reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["text"] == tiny.tokenizer.decode(_shaped_greedy(tiny, ids, 3))
    assert chatted.json()["usage"]["completion_tokens"] <= 3
    assert above.status_code == 400
    assert above.json()["error"]["message"] == (
        "min_tokens must be less than or equal to max_tokens=3, got 5."
    )


def test_unpact_serve_generation_config_vllm_leaves_the_models_defaults_out(tiny, tmp_path):
    """`--generation-config vllm` (vLLM's option, and make_app's `generation_config`):
    neither the sampling defaults nor the `max_new_tokens` bound of the model's
    generation_config apply; "auto" (the default) applies both."""
    import httpx

    lm = _model_with(tiny, tmp_path, max_new_tokens=3, top_k=1)
    ids = list(lm.encode_prompt(PROMPTS[0]).input_ids)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 1.0, "n": 6}
    body |= {"seed": 5}
    replies = {}
    for mode in ("auto", "vllm"):
        with BackgroundServer(make_app(lm, "tiny", mode)) as url:
            replies[mode] = httpx.post(f"{url}/v1/completions", json=body).json()
    auto, plain = replies["auto"], replies["vllm"]
    assert auto["usage"]["completion_tokens"] == 6 * 3
    assert len({c["text"] for c in auto["choices"]}) == 1  # top_k=1: the greedy answer
    assert plain["usage"]["completion_tokens"] == 6 * 8
    assert len({c["text"] for c in plain["choices"]}) > 1  # the plain softmax
    with pytest.raises(UnpactError, match="'auto' or 'vllm'"):
        make_app(lm, "tiny", "none")  # type: ignore[arg-type]


def test_a_model_served_while_it_trains_draws_no_dropout(tiny):
    """`make_app` on a model in training mode (a user's, just fine-tuned) served answers and
    log-probs with dropout drawn, each request its own: it serves the model in eval mode,
    as vLLM infers, and the replies are the model's own, the same every time."""
    import copy

    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from unpact.models import LanguageModel

    config = copy.deepcopy(tiny.model.config)
    config.attention_dropout = 0.5
    net = AutoModelForCausalLM.from_config(config)
    net.load_state_dict(tiny.model.state_dict())
    lm = LanguageModel(net.train(), tiny.tokenizer)
    ids = list(lm.encode_prompt(PROMPTS[0]).input_ids)
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 0}

    def ask(url: str) -> tuple[str, list[float]]:
        torch.manual_seed(0)  # the masks, were any drawn: the same on every run of the suite
        choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"][1:]

    with BackgroundServer(make_app(tiny, "m")) as url:
        expected = ask(url)
    with BackgroundServer(make_app(lm, "m")) as url:
        got = [ask(url), ask(url)]
    for text, lps in got:
        assert text == expected[0]
        assert torch.allclose(torch.tensor(lps), torch.tensor(expected[1]), atol=1e-5)
    assert not net.training  # and left so: requests run side by side


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_membership_statistics_of_a_served_model_equal_local(tiny, served, faults, mode):
    """A served model's membership statistics are the local ones where its server gives
    them: the token log-probs (LOSS, ZLib, Min-K%, the truth ratio) and, from the ranks of
    prompt_logprobs, the argmax (exact memorisation); an echo gives no ranks. VerbMem's
    continuations and truths, and MUSE's cut of a probe's truth, are the local ones."""
    from unpact.data.items import Document, VerbatimPrompt
    from unpact.membership_scores import document_stats, token_stats
    from unpact.run.membership import probe_rows, verbmem_rows

    remote = _remote(served[1], logprobs_mode=mode)
    texts = [
        "Mira Quintrell founded the Vostrand Glassworks in 1874 by the river. " * 2,
        "The harbour town of Quintrell has eleven bridges and one glassworks.",
    ]
    local_docs = document_stats(tiny, texts)
    for local, got in (
        (token_stats(tiny, PROMPTS, ANSWERS), token_stats(remote, PROMPTS, ANSWERS)),
        (local_docs, document_stats(remote, texts)),
    ):
        for a, b in zip(local, got, strict=True):
            assert len(b.logprobs) == len(a.logprobs) and b.zlib_bytes == a.zlib_bytes
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
            assert b.argmax == (a.argmax if mode == "prompt_logprobs" else None)
            assert b.mu is None and b.sigma is None
    assert any(any(s.argmax or ()) for s in local_docs)  # argmax read both ways
    docs = [Document(f"d{n}", t, "forget") for n, t in enumerate(texts)]
    assert verbmem_rows(remote, docs, 6, 5) == verbmem_rows(tiny, docs, 6, 5)
    probes = [VerbatimPrompt("p0", "Mira Quintrell founded", " the glassworks in 1874 .")]
    assert probe_rows(remote, probes, 4) == probe_rows(tiny, probes, 4)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Who \\ud800 is", "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\\udfff"}]}),
        ("/tokenize", {"prompt": "Who \\ud800 is"}),
    ],
)
def test_unpact_serve_answers_text_that_is_no_unicode_with_a_400(served, path, body):
    """A JSON escape of half a surrogate pair ("\\ud800") reaches the server as a string
    no tokenizer takes: unpact serve answered "Internal Server Error" in plain text, with
    a traceback in its log. Now a 400 in vLLM's error format, saying what is wrong; the
    whole pair (an emoji) is text and answered."""
    import httpx

    root = served[1].removesuffix("/v1")
    raw = json.dumps({"model": "tiny", **body}).replace("\\\\", "\\")  # the escape as sent
    headers = {"content-type": "application/json"}
    reply = httpx.post(root + path, content=raw, headers=headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "BadRequestError" and "lone UTF-16 surrogate" in error["message"]
    pair = raw.replace("\\ud800", "\\ud83d\\ude00").replace("\\udfff", "\\ud83d\\ude00")
    assert httpx.post(root + path, content=pair, headers=headers).status_code == 200


def test_an_api_key_an_http_header_cannot_carry_is_one_message(monkeypatch):
    """A key pasted with a curly quote or an invisible space was a UnicodeEncodeError
    traceback from inside httpx; the spaces or line end around a key read from a file
    are dropped."""
    lm = RemoteModel("m", "http://127.0.0.1:9/v1", RemoteSettings())
    monkeypatch.setenv("UNPACT_API_KEY", "sk-abc\u200bdef")
    with pytest.raises(UnpactError, match=r"^\$UNPACT_API_KEY: the API key holds '\\u200b' "):
        lm.post("http://127.0.0.1:9/v1/completions", {})
    monkeypatch.setenv("UNPACT_API_KEY", " sk-abc\n")
    assert lm._headers() == {"Authorization": "Bearer sk-abc"}


def test_a_text_the_served_tokenizer_makes_no_tokens_of_is_refused(tiny, tmp_path):
    """As locally (`test_a_text_the_tokenizer_makes_no_tokens_of_is_refused`): a prompt or
    answer a served tokenizer drops every character of is refused by name, not sent as
    the template alone."""
    from unpact.models import load_model, save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    tokenizer = json.loads((tmp_path / "m/tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokenizer["model"]["vocab"] = {k: v for k, v in vocab.items() if k.startswith("<")}
    tokenizer["model"]["merges"] = []
    (tmp_path / "m/tokenizer.json").write_text(json.dumps(tokenizer))
    with BackgroundServer(make_app(load_model(str(tmp_path / "m")), "tiny")) as url:
        remote = _remote(f"{url}/v1")
        for chat in (False, True):
            with pytest.raises(UnpactError, match=r"the prompt 'hi' is no tokens for this"):
                remote.encode_prompt("hi", chat_template=chat)
        with pytest.raises(UnpactError, match=r"the answer ' Paris' is no tokens for this"):
            remote.encode_answer(" Paris")


def _long_request(port: int, prompt: list[int]) -> Any:
    """A socket that has sent a 200-token completion request to the server on `port` (EOS
    ignored) and waits for its reply: closing it is the client disconnecting."""
    import socket

    body = json.dumps(
        {"model": "tiny", "prompt": prompt, "max_tokens": 200, "ignore_eos": True}
    ).encode()
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return client


def _next_reply(url: str) -> Any:
    """A 2-token completion, which waits for the model: answered once the requests before
    it have stopped."""
    import httpx

    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_a_client_that_disconnects_stops_its_request(tiny):
    """A client that gives up (unpact's remote client retries after 30 s) left its
    request generating to the end, and every request after it queued behind: vLLM
    cancels a request whose client has disconnected (`with_cancellation`), and so does
    `unpact serve`, between generated tokens. Its 200 tokens (each step slowed down here)
    stop within a few steps of the disconnection; the next request is answered."""
    import time

    steps: list[int] = []
    started = threading.Event()

    def slow(module: Any, args: Any, out: Any) -> None:
        steps.append(1)
        started.set()
        time.sleep(0.02)

    hook = tiny.model.register_forward_hook(slow)
    try:
        with BackgroundServer(make_app(tiny, "tiny")) as url:
            client = _long_request(int(url.rsplit(":", 1)[1]), [5, 6])
            assert started.wait(60)
            client.close()
            # waits for the model: answered once the first request has stopped
            reply = _next_reply(url)
            assert reply.status_code == 200
            assert len(steps) - 2 < 100, f"{len(steps) - 2} of 200 steps after the disconnection"
    finally:
        hook.remove()


def test_the_most_samples_a_request_may_ask_for_is_vllms_variable(tiny, monkeypatch):
    """VLLM_MAX_N_SEQUENCES bounds `n` as in vLLM, read per request; a value that is no
    number is refused when the app is made (the CLI's exit 2), not at the first request."""
    import httpx

    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "3")
    with BackgroundServer(make_app(tiny, "tiny")) as url:
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 1, "seed": 0}
        assert httpx.post(f"{url}/v1/completions", json=body | {"n": 3}).status_code == 200
        reply = httpx.post(f"{url}/v1/completions", json=body | {"n": 4})
        assert reply.status_code == 400
        assert reply.json()["error"]["message"].startswith("n must be at most 3, got 4.")
    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "many")
    with pytest.raises(UnpactError, match="VLLM_MAX_N_SEQUENCES must be an integer"):
        make_app(tiny, "tiny")


def test_a_queued_request_whose_client_has_gone_never_runs(tiny):
    """docs/remote.md: a request waiting for the model while its client disconnects does
    no work once it gets the model (`cancel.holding`), rather than generating one token
    and then stopping. Its prompt (three tokens) never reaches the model."""
    import time

    lengths: list[int] = []
    started = threading.Event()

    def slow(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        lengths.append(kwargs["input_ids"].shape[1])
        started.set()
        time.sleep(0.02)

    hook = tiny.model.register_forward_hook(slow, with_kwargs=True)
    try:
        with BackgroundServer(make_app(tiny, "tiny")) as url:
            port = int(url.rsplit(":", 1)[1])
            first = _long_request(port, [5, 6])
            assert started.wait(60)
            queued = _long_request(port, [7, 8, 9])  # waits for the model
            time.sleep(0.5)
            queued.close()
            time.sleep(0.5)  # its disconnection seen while the first still generates
            first.close()
            reply = _next_reply(url)
            assert reply.status_code == 200
            assert 3 not in lengths, lengths  # the queued prompt's first pass
    finally:
        hook.remove()


def test_a_timeout_names_the_settings_of_the_client_that_timed_out():
    """The LLM judge's client is set by judge.llm.*; its timeouts named remote.* (the
    run's served models'), which do not change it."""
    url = "http://127.0.0.1:1/v1"
    judge = RemoteModel("j", url, RemoteSettings(concurrency=8), model_option="judge.llm.model")
    assert "send fewer, judge.llm.concurrency, or wait longer, judge.llm.timeout)" in (
        judge._queued()
    )
    served = RemoteModel("m", url, RemoteSettings())
    assert "the 16 sent at once" in served._queued()
    assert "send fewer, remote.concurrency or `--concurrency`, or wait longer, remote.timeout)" in (
        served._queued()
    )
