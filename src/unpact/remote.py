"""A model served elsewhere: scoring, tokenising and generating over an OpenAI-compatible API.

unPact needs only log-probabilities, so attribution, judging and the attacks can run
against a model served by vLLM (or any server that returns prompt log-probs) instead of
local weights. A remote model is named by a spec `openai:MODEL@BASE_URL`, for example
`openai:meta-llama/Llama-3.1-70B-Instruct@http://gpu-node:8000/v1`; `load_model` returns a
`RemoteModel` for it, which offers what the local `LanguageModel` offers to scoring,
generation and attribution.

What it asks of the server (vLLM's OpenAI-compatible server offers all of it):

- `POST {BASE_URL}/completions` with a prompt of token ids. Scoring asks for the prompt's
  log-probs either with vLLM's `prompt_logprobs` (the reply names each position's token
  id, which is checked against what was sent) or with the classic `echo` + `logprobs` and
  `max_tokens=0`; `logprobs_mode: auto` tries the first and falls back to the second.
  Generation is a plain completion (`temperature` 0 for greedy, `n` seeded samples).
- `POST {ROOT}/tokenize` and `{ROOT}/detokenize` (vLLM's, at the server's root, beside
  `/v1`): scoring uses the server's own tokens, and attribution units are built from them.
  The chat template is the server's too: the template's tokens around a user message are
  found by tokenising two different messages and keeping what they share.

Requests run many at a time (`concurrency`); a timeout, a dropped connection, HTTP 429 or
5xx (but 501 and 505, which say the server does not offer the request, and a 500 repeating
its message), or a reply that is not JSON is retried with exponential backoff and full jitter
(honouring `Retry-After`) until `retries` or the per-request `deadline` runs out, and then
ends in one error naming the endpoint and the last failure. A reply that parses but lacks
prompt log-probs is not retried: it means the server cannot give them, and the error says
which feature is missing. The API key is read from the environment variable named by
`api_key_env` when a request is sent; it is never stored in a config, a run directory, a
log or an error message.
"""

from __future__ import annotations

import html
import math
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import torch
from pydantic import Field

from unpact.errors import UnpactError, check_text, no_tokens, unsendable
from unpact.progress import progress_bar
from unpact.scoring import check_pairs
from unpact.types import (
    BOUNDARY_PROBES,
    CHAT_TEMPLATE_KWARGS,
    REMOTE_PREFIX,
    EncodedPrompt,
    SettingsModel,
    TemplateSplit,
    check_chat_flag,
    joined_space,
    raw_prefix,
    short_repr,
    warn_if_split_differs,
    warn_if_template_thinks,
)

# Different user messages, no two sharing a first or last byte, to find the template by
# what their tokenisations share.
_MARKERS = ("\ue000", "\u00a7\u00a7", "Q")
T = TypeVar("T")
R = TypeVar("R")


# A server on this machine is reached directly, never through a proxy the environment
# names ($HTTP_PROXY and the like, common on clusters): the proxy's own loopback is not
# this machine's, and every request to `unpact serve` on 127.0.0.1 failed "connection failed".
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")


def _proxy_named() -> str:
    """The proxy variables set in the environment, as NAME=scheme://host:port (a user and
    password in the address left out)."""
    named = []
    for name in _PROXY_VARIABLES:
        value = os.environ.get(name) or os.environ.get(name.lower())
        if value:
            try:
                parts = urlsplit(value)
                shown = f"{parts.scheme}://{parts.hostname}" + (
                    f":{parts.port}" if parts.port else ""
                )
            except ValueError:
                shown = "(not an address)"
            named.append(f"{name}={shown}")
    return ", ".join(named) or "none"


def _through_proxy(url: str) -> str:
    """Where a request that could not connect went through a proxy of the environment, a
    sentence saying so; else nothing."""
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host in LOOPBACK_HOSTS or not (proxies.get(parts.scheme) or proxies.get("all")):
        return ""
    if urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return ""
    return (
        f", through the proxy the environment names ({_proxy_named()}): if the server is "
        f"reached directly, add its host to NO_PROXY (NO_PROXY={host})"
    )


class RemoteError(UnpactError):
    """A remote model could not give an answer (after retries), or cannot give this one.

    For a refused request (HTTP 4xx), `status` is its code and `param` the request field
    the server named as the cause (OpenAI's `error.param`), when it named one."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class RemoteSettings(SettingsModel):
    """How to talk to a remote model server."""

    api_key_env: str = Field(
        "UNPACT_API_KEY",
        description="Environment variable holding the API key (sent as a Bearer token); "
        "unset = no key.",
    )
    concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    # A request's wait includes the server's queue: one that answers a request at a time
    # (`unpact serve`, a llama.cpp slot) serves the 16 in flight one after another. The
    # demo's NPO+KL model served here answers a 32-token request in 2.5 s, so the last of
    # 16 waited 40 s, past the 30 s this was, and an audit of a served pair gave up; a
    # retry joins the queue's end again. 600 s is the `openai` client's own default.
    timeout: float = Field(600.0, gt=0, description="Seconds to wait for one attempt.")
    deadline: float = Field(
        1800.0, gt=0, description="Seconds one request may take, retries included."
    )
    retries: int = Field(
        6, ge=0, description="Retries after a timeout, dropped connection, 429, 5xx or bad JSON."
    )
    backoff: float = Field(
        0.5, gt=0, description="First backoff in seconds; doubles per retry (full jitter)."
    )
    max_backoff: float = Field(20.0, gt=0, description="Longest single backoff in seconds.")
    logprobs_mode: Literal["auto", "prompt_logprobs", "echo"] = Field(
        "auto",
        description="How to ask for prompt log-probs: vLLM's prompt_logprobs, classic "
        "echo+logprobs with max_tokens=0, or auto (the first, else the second).",
    )


def parse_remote_spec(spec: str) -> tuple[str, str]:
    """`openai:MODEL@BASE_URL` -> (MODEL, BASE_URL without a trailing slash)."""
    rest = spec[len(REMOTE_PREFIX) :]
    # the model's name may hold an "@" (a served folder's path, /data/run@3, as vLLM
    # names it by default): the address starts at the last "@http://" or "@https://"
    at = max(rest.rfind("@http://"), rest.rfind("@https://"))
    model, sep, url = (rest[:at], "@", rest[at + 1 :]) if at > 0 else rest.partition("@")
    url = url.rstrip("/")
    why = ""
    if sep and model and url and not url.startswith(("http://", "https://")):
        why = "BASE_URL starts with http:// or https://; "
    elif sep and model and (end := _ENDPOINT.search(url)):
        why = f"BASE_URL is the server's address up to /v1, without the endpoint {end[0]}; "
    if why or not sep or not model or not url:
        raise UnpactError(
            f"remote model spec {spec!r}: {why}write it as openai:MODEL@BASE_URL, e.g. "
            "openai:meta-llama/Llama-3.1-8B-Instruct@http://127.0.0.1:8000/v1"
        )
    if said := address_problem(url):  # the spec, which holds it, is not repeated
        raise UnpactError(f"remote model spec {REMOTE_PREFIX}{model}@...: {said}")
    return model, url


def address_problem(url: str) -> str | None:
    """Why a server address holding a user name or password (`http://USER:PASS@host`) is
    refused, or None: httpx sent it, and results.json, config.yaml, the report and the
    log wrote it out, where the API key, read from the environment, is never stored; so
    is one with a query, which may hold a key too."""
    try:
        parts = urlsplit(url)
        secret = parts.username is not None or parts.password is not None
    except ValueError:  # not an address at all: the request says so
        return None
    if parts.query or parts.fragment:  # "?key=...": sent as ".../v1?key=.../completions"
        return (
            "the address holds a query (?...) or fragment (#...), which each endpoint's path "
            "would follow (.../v1?x=1/completions) and results.json would write out; BASE_URL "
            "is the server's address up to /v1, a key goes in the environment"
        )
    if not secret:
        return None
    return (
        f"the address holds a user name or password ({parts.scheme}://USER:PASSWORD@...), "
        "which results.json, config.yaml, the report and the log would write out; give the "
        "server's key in the environment instead (unpact's $UNPACT_API_KEY, the LLM judge's "
        "judge.llm.api_key_env), sent as a Bearer token and never stored"
    )


# An endpoint of an OpenAI-compatible server written into a spec's BASE_URL by mistake.
_ENDPOINT = re.compile(r"/(chat/completions|completions|models|tokenize|detokenize)$")


@dataclass
class RemoteModel:
    """A causal LM behind an OpenAI-compatible (vLLM) server; see the module docstring.
    The served backend (`unpact.types.Backend`): log-probs and generations, no weights."""

    has_weights: ClassVar[bool] = False
    model_name: str
    base_url: str
    settings: RemoteSettings = field(default_factory=RemoteSettings)
    spec: str = ""
    # where the user wrote the model's name, for the hint when the server has no such model
    model_option: str = field(default="MODEL in openai:MODEL@URL", repr=False)
    is_remote: bool = field(default=True, init=False)
    _client: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # as LanguageModel's: the template's tokens around the message and the leads
    _template: TemplateSplit | None = field(default=None, init=False, repr=False)
    _has_template: bool | None = field(default=None, init=False, repr=False)
    _max_length: int | None = field(default=None, init=False, repr=False)
    _mode: str | None = field(default=None, init=False, repr=False)
    _prefix: tuple[int, ...] | None = field(default=None, init=False, repr=False)
    _token_text: dict[int, str] = field(default_factory=dict, init=False, repr=False)
    _boundary_warned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.spec or f"{REMOTE_PREFIX}{self.model_name}@{self.base_url}"
        root = self.base_url
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.root_url = root

    # ------------------------------------------------------------------ transport

    def _http(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                n = self.settings.concurrency
                local = urlsplit(self.root_url).hostname in LOOPBACK_HOSTS
                try:
                    self._client = httpx.Client(
                        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                        trust_env=not local,  # a server on this machine: no proxy, no .netrc
                    )
                except ImportError as exc:  # a SOCKS proxy in the environment, no socksio
                    raise RemoteError(
                        f"{self.root_url}: the environment names a SOCKS proxy "
                        f"({_proxy_named()}), which needs httpx's SOCKS support: pip "
                        "install 'httpx[socks]', or unset it (NO_PROXY for this host)"
                    ) from exc
                # its kept-alive connections are closed when the model is dropped, not left
                # to the interpreter (a ResourceWarning per socket)
                weakref.finalize(self, self._client.close)
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.settings.api_key_env, "").strip()
        # a character an HTTP header cannot carry (a curly quote, an invisible space pasted
        # with the key) was a UnicodeEncodeError traceback from inside httpx
        bad = unsendable(key)
        if bad is not None:
            raise UnpactError(
                f"${self.settings.api_key_env}: the API key holds {bad[1]!a} (character "
                f"{bad[0] + 1}), which an HTTP header cannot carry: copy the key again (a "
                "quote or an invisible space may have come with it)"
            )
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON and return the JSON reply, retrying what may pass (see module doc)."""
        import httpx

        s = self.settings
        client = self._http()
        start = time.monotonic()
        failure = "no attempt"
        last_500, repeats = "", 0  # the last HTTP 500's message, and how often in a row
        for attempt in range(s.retries + 1):
            remaining = s.deadline - (time.monotonic() - start)
            if remaining <= 0:
                break
            wait: float | None = None
            try:
                limit = _timeout(min(s.timeout, remaining))
                reply = client.post(url, json=body, headers=self._headers(), timeout=limit)
            except httpx.ConnectTimeout:  # a host that drops the packets: no server's queue
                failure = f"no connection within {limit.connect:.1f} s"
            except httpx.TimeoutException:
                failure = f"no reply within {limit.read:.1f} s" + self._queued()
            except httpx.TransportError as exc:
                failure = f"connection failed ({type(exc).__name__}){_through_proxy(url)}"
            else:
                code = reply.status_code
                if code == 500:
                    message, _ = _server_error(reply)
                    repeats = repeats + 1 if message == last_500 else 1
                    last_500 = message
                    if repeats >= SAME_500_LIMIT:
                        # The same internal error each time: the server fails this request
                        # deterministically, so waiting out the deadline would change nothing.
                        raise RemoteError(
                            f"{url}: gave up after {attempt + 1} attempt(s): HTTP 500 "
                            f"{repeats} times with the same message, so not retried "
                            f"further: {message}"
                        )
                else:
                    repeats = 0
                if code == 429 or (code >= 500 and code not in NOT_TRANSIENT):
                    failure = f"HTTP {code}"
                    wait = _retry_after(reply.headers.get("retry-after"))
                elif code >= 400:
                    message, param = _server_error(reply)
                    raise RemoteError(
                        f"{url}: HTTP {code}: {message}" + self._hint(url, code, message),
                        status=code,
                        param=param,
                    )
                else:
                    try:
                        data = reply.json()
                    except ValueError:
                        if "html" in reply.headers.get("content-type", ""):
                            # a web page (a UI, a proxy's login page), not a passing fault
                            raise RemoteError(
                                f"{url}: HTTP {code} with a web page, not JSON: "
                                f"{_server_error(reply)[0][:120]}" + NOT_AN_API
                            ) from None
                        failure = "the reply is not valid JSON"
                    else:
                        if isinstance(data, dict):
                            return data
                        failure = "the reply is not a JSON object"
            if attempt == s.retries:
                break
            if wait is None:
                wait = random.uniform(0, min(s.max_backoff, s.backoff * 2**attempt))
            remaining = s.deadline - (time.monotonic() - start)
            if wait >= remaining:
                failure += f"; the next try would pass the {s.deadline:g} s deadline"
                break
            time.sleep(wait)
        raise RemoteError(
            f"{url}: gave up after {attempt + 1} attempt(s) in "
            f"{time.monotonic() - start:.1f} s: {failure}"
        )

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        label: str | bool = False,
    ) -> list[R]:
        """`fn` over `items` with `concurrency` in flight; results in order. The first
        error cancels what has not started and is raised."""
        if not items:
            return []
        text = label if isinstance(label, str) else "Requests"
        with (
            progress_bar(text, total=len(items), enabled=bool(label)) as advance,
            ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool,
        ):
            futures = [pool.submit(fn, x) for x in items]
            out: list[R] = []
            try:
                for f in futures:
                    out.append(f.result())
                    advance(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out

    # ---------------------------------------------------------------- tokenising

    def tokenize(self, text: str, add_special_tokens: bool = False) -> tuple[int, ...]:
        reply = self.post(
            f"{self.root_url}/tokenize",
            {"model": self.model_name, "prompt": text, "add_special_tokens": add_special_tokens},
        )
        self._note_max_length(reply)
        return _token_list(reply, f"{self.root_url}/tokenize")

    def detokenize(self, ids: Sequence[int]) -> str:
        reply = self.post(
            f"{self.root_url}/detokenize", {"model": self.model_name, "tokens": list(ids)}
        )
        text = reply.get("prompt")
        if not isinstance(text, str):
            raise RemoteError(f"{self.root_url}/detokenize: the reply has no 'prompt' text")
        return text

    def special_prefix(self) -> tuple[int, ...]:
        """The special tokens the server's tokenizer puts before a text (a Llama BOS)."""
        if self._prefix is None:
            self._prefix = raw_prefix(self.tokenize("x", True), self.tokenize("x"))
        return self._prefix

    def served_root(self) -> str | None:
        """What the server says it loaded under this model's name: the `root` of its card in
        `GET /v1/models` (vLLM's: the path or hub id `vllm serve` was given; a LoRA module's:
        its adapter, with the base as `parent`, both kept), or None where it says nothing (no
        list, no card of this name, no root: OpenAI's own API). One request, no retries: a
        server down now fails the first request that needs it, with the retries' message."""
        for card in self._model_cards() or []:
            if card.get("id") == self.model_name:
                root, parent = card.get("root"), card.get("parent")
                if not isinstance(root, str) or not root:
                    return None
                return root + (f" (on {parent})" if isinstance(parent, str) and parent else "")
        return None

    def _model_cards(self) -> list[dict[str, Any]] | None:
        """The cards of `GET /v1/models` (one request, no retries), or None where the
        server gives no such list."""
        import httpx

        try:
            reply = self._http().get(
                f"{self.base_url}/models",
                headers=self._headers(),
                timeout=_timeout(self.settings.timeout),
            )
            cards = reply.json()["data"] if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else None

    def _queued(self) -> str:
        """What a timeout may mean, and the settings to change: the run's `remote.*` (an
        LLM judge's own, `judge.llm.*`, where this is its client)."""
        n = self.settings.concurrency
        if self.model_option.endswith(".model"):  # a settings block's model: its siblings
            where = self.model_option.removesuffix("model")
            fewer, longer = f"{where}concurrency", f"{where}timeout"
        else:
            fewer, longer = "remote.concurrency or `--concurrency`", "remote.timeout"
        return _QUEUED.format(n=n, fewer=fewer, longer=longer)

    def _hint(self, url: str, code: int, message: str) -> str:
        """What to do about a 4xx: for a model name the server does not serve, the names
        it does serve (GET /v1/models, asked once, no retries)."""
        if code in (401, 403):
            return self._key_hint()
        if not _unknown_model(code, message):
            return _capability_hint(url, code)
        hint = f" — the server serves no model named {self.model_name!r} ({self.model_option})"
        # only a hint: the error it goes with is what matters
        names = [c["id"] for c in self._model_cards() or [] if isinstance(c.get("id"), str)]
        return hint + (f"; it serves {', '.join(repr(n) for n in names)}" if names else "")

    def _key_hint(self) -> str:
        """What to do about a refused request (401, 403): the variable the key is read
        from, by name, and whether it holds one (never the key)."""
        env = self.settings.api_key_env
        if not env:
            return (
                " — the server wants an API key: name the environment variable holding it "
                "in api_key_env"
            )
        if not os.environ.get(env, "").strip():
            return (
                f" — the server wants an API key, and ${env} (api_key_env) is not set: set it "
                "to the key"
            )
        return f" — the server refused the API key in ${env} (api_key_env): check it"

    def _note_max_length(self, reply: dict[str, Any]) -> None:
        n = reply.get("max_model_len")
        if isinstance(n, int) and n > 0:
            self._max_length = n

    @property
    def max_length(self) -> int:
        if self._max_length is None:
            self.tokenize("x")
        return self._max_length or 1 << 30

    @property
    def has_chat_template(self) -> bool:
        if self._has_template is None:
            try:
                self._chat_prefix_suffix()
                self._has_template = True
            except RemoteError as exc:
                # Only the server saying the tokenizer has no chat template means that; any
                # other 4xx (a wrong model name is a 404) is an error to show.
                if "HTTP 400" not in str(exc) or "template" not in str(exc).lower():
                    raise
                self._has_template = False
        return self._has_template

    def _chat_tokens(self, content: str, answer: str | None = None) -> tuple[int, ...]:
        """The server's tokens of one user message in its chat template, with the
        generation prompt (vLLM's chat /tokenize); with `answer`, followed by an assistant
        message of that content to continue instead (`continue_final_message`)."""
        url = f"{self.root_url}/tokenize"
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "add_generation_prompt": answer is None,
            "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        }
        if answer is not None:
            body["continue_final_message"] = True
        return _token_list(self.post(url, body), url)

    def _chat_prefix_suffix(self) -> TemplateSplit:
        if self._template is None:
            a, *others = (self._chat_tokens(m) for m in _MARKERS)
            shortest = min(len(a), *(len(b) for b in others))
            p = 0
            while p < shortest and all(a[p] == b[p] for b in others):
                p += 1
            s = 0
            while s < shortest - p and all(a[-1 - s] == b[-1 - s] for b in others):
                s += 1
            suffix_ids = a[len(a) - s :] if s else ()
            prefix_ids, lead = self._joined_prefix(a[:p], suffix_ids)
            suffix = ""
            if s:
                try:
                    suffix = self.detokenize(suffix_ids)
                except RemoteError:  # a server without /detokenize: nothing to say
                    suffix = ""
                said = ("thinks", self.root_url, self.model_name)
                warn_if_template_thinks(self.spec, suffix, said)
            tail, answer_lead = self._joined_answer(suffix_ids, suffix)
            if suffix and tail == suffix_ids and not answer_lead:
                answer_lead = self._gap_lead(a, suffix)
            lead_ids = self.tokenize(lead) if lead else ()
            self._template = TemplateSplit(
                prefix_ids, tail, lead, answer_lead, suffix_ids, lead_ids
            )
        return self._template

    def _joined_prefix(
        self, prefix: tuple[int, ...], suffix: tuple[int, ...]
    ) -> tuple[tuple[int, ...], str]:
        """The template's token prefix and the message's lead, as `LanguageModel.
        _joined_space` decides them locally, here from the server's tokenisations of the
        same probe messages: the shared token prefix of the markers may end in a lone
        space token (SentencePiece `[INST] `: dropped, the message's own `▁` stands for
        it) or stop before a space that byte-level BPE joins to the message's first word
        (`Question: `: the message is tokenised with a lead space)."""
        whole = {q: self._chat_tokens(q) for q in BOUNDARY_PROBES}
        alone: dict[str, tuple[int, ...]] = {}

        def fits(head: tuple[int, ...], lead: str) -> bool:
            for q in BOUNDARY_PROBES:
                if lead + q not in alone:
                    alone[lead + q] = self.tokenize(lead + q)
                if head + alone[lead + q] + suffix != whole[q]:
                    return False
            return True

        heads = [prefix, prefix[:-1]] if prefix else [prefix]
        for lead in ("", " "):
            for head in heads:
                if fits(head, lead):
                    return head, lead
        return prefix, ""

    def _joined_answer(self, suffix: tuple[int, ...], text: str) -> tuple[tuple[int, ...], str]:
        """The generation prompt's tokens and the answer's lead, as `LanguageModel.
        _joined_space` decides them locally, from the server's tokenisations of the
        generation prompt's text (`text`, its detokenised `suffix`) with and without the
        probes after it: a last lone space token that the answer's first word takes
        (open-unlearning's `Answer: `) leaves the prompt, and the answer carries it (its
        SentencePiece `▁`, or a lead space on byte-level BPE)."""
        if not suffix or not text.endswith(" "):
            return suffix, ""
        alone = self.tokenize(text)
        if not alone or alone[-1] != suffix[-1]:
            return suffix, ""
        whole = {q: self.tokenize(text + q) for q in BOUNDARY_PROBES}
        for lead in ("", " "):
            if all(alone[:-1] + self.tokenize(lead + q) == whole[q] for q in BOUNDARY_PROBES):
                return suffix[:-1], lead
        return suffix, ""

    def _gap_lead(self, asked: tuple[int, ...], text: str) -> str:
        """The answer's lead where the template writes a space between its generation
        prompt (`text`, ending `asked`: the first marker's tokens) and an assistant
        message's content (`models.answer_gap`: DeepSeek-LLM's `Assistant:`), as
        `LanguageModel` decides it locally: the server's tokens of the marker and an
        assistant message to continue start with `asked`, and the rest reads back as that
        space and the message; the lead is the space where the server's tokenisation
        joins it to the answer's first word (byte-level BPE), none where the word's own
        `▁` stands for it (SentencePiece): `joined_space` on the server's tokenisations,
        as locally. No lead where the server cannot say (a vLLM before
        `continue_final_message`, no `/detokenize`)."""
        if not text or text[-1].isspace():
            return ""
        word = "Probe"
        try:
            continued = self._chat_tokens(_MARKERS[0], word)
            if continued[: len(asked)] != asked:
                return ""
            if self.detokenize(continued[len(asked) :]) != " " + word:
                return ""
            head, lead = joined_space(self.tokenize, text + " ")
        except RemoteError:
            return ""
        return lead if head == text else ""

    def _resolve_chat(self, chat_template: bool | None) -> bool:
        check_chat_flag(chat_template)
        if chat_template is None:
            return self.has_chat_template
        if chat_template and not self.has_chat_template:
            raise UnpactError(
                f"model {self.spec!r}: the server applies no chat template; use raw prompts "
                "(--no-chat-template, or chat_template=False)"
            )
        return chat_template

    def encode_prompt(self, prompt: str, chat_template: bool | None = None) -> EncodedPrompt:
        """As `LanguageModel.encode_prompt`, with the server's tokenizer and template."""
        if not prompt or not prompt.strip():
            raise UnpactError("empty prompt: give some text to ask the model")
        check_text(prompt, "the prompt")
        chat = self._resolve_chat(chat_template)
        if chat:
            split = self._chat_prefix_suffix()
        else:
            raw = raw_prefix(self.tokenize("x", add_special_tokens=True), self.tokenize("x"))
            split = TemplateSplit(raw, ())
        encoded = split.around(prompt, chat, self.tokenize)
        if encoded.content_end <= encoded.content_start:
            raise no_tokens(f"the prompt {short_repr(prompt)}")
        if chat and not self._boundary_warned:
            templated = self._chat_tokens(prompt)
            as_template = encoded.input_ids[: encoded.content_end] + split.generation
            self._boundary_warned = warn_if_split_differs(
                self.spec, prompt, as_template, templated, (self.root_url, self.model_name)
            )
        return encoded

    def encode_answer(self, answer: str, prompt: EncodedPrompt | None = None) -> tuple[int, ...]:
        """As `LanguageModel.encode_answer`, with the server's tokenizer."""
        if not answer or not answer.strip():
            raise UnpactError("empty answer: give the text whose log-prob to compute")
        check_text(answer, "the answer")
        ids = self.tokenize(prompt.answer_text(answer) if prompt is not None else answer)
        if not ids:
            raise no_tokens(f"the answer {short_repr(answer)}")
        return ids

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (by detokenising it alone; cached)."""
        missing = sorted({i for i in ids if i not in self._token_text})
        for i, text in zip(missing, self.map(lambda t: self.detokenize([t]), missing)):
            self._token_text[i] = text
        return [self._token_text[i] for i in ids]

    def token_offsets(self, text: str) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
        """The server's tokens of `text` and each one's character span, found by
        detokenising growing prefixes. The byte-level pieces of one character all span
        that character, as a fast tokenizer's offsets do."""
        ids = self.tokenize(text)
        decoded = self.map(lambda k: self.detokenize(ids[: k + 1]), range(len(ids)))
        offsets: list[tuple[int, int]] = []
        end = 0
        pending: list[int] = []  # pieces of a character not complete yet
        for k, d in enumerate(decoded):
            offsets.append((end, end))
            if text.startswith(d) and len(d) >= end:
                # As fast tokenizers do: every piece of a split character spans all of it.
                for j in [*pending, k]:
                    offsets[j] = (offsets[pending[0] if pending else k][0], len(d))
                end = len(d)
                pending = []
            else:
                pending.append(k)
        if end != len(text):
            raise RemoteError(
                f"{self.root_url}/detokenize does not give back the prompt's text exactly, "
                "so the tokens' character spans are unknown; use token units on raw text"
            )
        return ids, offsets

    def default_baseline_token(self) -> int:
        raise UnpactError(
            f"model {self.spec!r} is remote and its unk/pad token is unknown here: give the "
            "baseline token id (--baseline-token-id, or baseline_token_id=...)"
        )

    # ------------------------------------------------------------------- scoring

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post(f"{self.base_url}/completions", {"model": self.model_name, **body})

    def sequence_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(x_t | x_<t) for t = 1..len(ids)-1, from the server (one request)."""
        return self.sequence_scores(ids)[0]

    def sequence_scores(self, ids: Sequence[int]) -> tuple[list[float], list[int] | None]:
        """`sequence_logprobs` and each token's rank in its next-token distribution (1: the
        model's argmax), where the server gives ranks (vLLM's prompt_logprobs do; an echo's
        log-probs do not: None)."""
        if len(ids) < 2:
            raise UnpactError("scoring needs at least two tokens")
        modes = [self._mode] if self._mode else _modes(self.settings.logprobs_mode)
        full = len(ids) + 1 > self.max_length and "prompt_logprobs" in modes
        if full:
            # prompt_logprobs asks for one generated token, so a sequence filling the whole
            # context has no room for it (vLLM refuses it): score it by echo instead.
            if self.settings.logprobs_mode == "prompt_logprobs":
                raise UnpactError(
                    f"{len(ids)} tokens fill the model's context of {self.max_length}, and "
                    "prompt_logprobs scoring needs one position more for the token it "
                    "generates; use remote.logprobs_mode: echo (or auto), or a shorter input"
                )
            modes = ["echo"]
        problems = []
        found: tuple[list[float], list[int] | None] | str
        for mode in modes:
            if mode == "prompt_logprobs":
                reply = self._completions(
                    {"prompt": list(ids), "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
                )
                found = _from_prompt_logprobs(reply, ids)
            else:
                reply = self._completions(
                    {
                        "prompt": list(ids),
                        "max_tokens": 0,
                        "echo": True,
                        "logprobs": 0,
                        "temperature": 0,
                        "return_tokens_as_token_ids": True,
                    }
                )
                echoed = _from_echo(reply, ids)
                found = echoed if isinstance(echoed, str) else (echoed, None)
            if isinstance(found, str):
                problems.append(found)
                continue
            if not full:  # a full-context sequence's echo says nothing about the others
                self._mode = mode
            return found
        raise RemoteError(
            f"{self.base_url}/completions returns no prompt log-probs ("
            + "; ".join(problems)
            + "). unPact needs them for scoring and attribution: serve the model with vLLM, "
            "or use a provider whose completions endpoint supports echo + logprobs"
        )

    def answer_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        progress: bool | str = False,
        token_budget: int | None = None,
    ) -> list[torch.Tensor]:
        """Per-token answer log-probs given each prompt (as `scoring.answer_logprobs`);
        one request per pair (the server batches; `token_budget` is a local notion)."""
        return [lp for lp, _ in self.answer_scores(prompts, answers, progress)]

    def answer_scores(
        self,
        prompts: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        progress: bool | str = False,
    ) -> list[tuple[torch.Tensor, list[int] | None]]:
        """`answer_logprobs` with each answer token's rank where the server gives ranks
        (`sequence_scores`), for what reads the model's argmax (exact memorisation)."""
        prompts, answers = check_pairs(prompts, answers, self.max_length)

        def one(pair: tuple[Sequence[int], Sequence[int]]) -> tuple[torch.Tensor, list[int] | None]:
            p, a = pair
            lps, ranks = self.sequence_scores([*p, *a])
            kept = None if ranks is None else ranks[len(p) - 1 :]
            return torch.tensor(lps[len(p) - 1 :], dtype=torch.float32), kept

        label = progress if isinstance(progress, str) else ("Scoring" if progress else False)
        return self.map(one, list(zip(prompts, answers)), label)

    # ---------------------------------------------------------------- generation

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        num_samples: int,
        temperature: float,
        seed: int,
        progress: bool | str = False,
        batch_size: int = 16,  # the server batches what is in flight; kept for the interface
    ) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Greedy (num_samples=0) or seeded sampled completions of token-id prompts."""
        import zlib

        def one(ids: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
            # logprobs + token ids as text: the generated tokens' ids come back as the
            # server has them (re-tokenising the text would not always give them).
            body: dict[str, Any] = {
                "prompt": list(ids),
                "max_tokens": max_new_tokens,
                "logprobs": 0,
                "return_tokens_as_token_ids": True,
            }
            # Every sampling parameter the local sampler uses, spelled out: vLLM fills the
            # unset ones from the model's generation_config (top_k, min_p,
            # repetition_penalty, ...), which would draw from another distribution.
            body.update(PLAIN_SAMPLING)
            if num_samples:
                prompt_seed = zlib.crc32(repr((seed, tuple(ids))).encode())
                body.update(temperature=temperature, n=num_samples, seed=prompt_seed)
            else:
                body.update(temperature=0, n=1)
            reply = self._completions(body)
            try:
                choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
                texts = [str(c["text"]) for c in choices]
            except (KeyError, TypeError) as exc:
                raise RemoteError(
                    f"{self.base_url}/completions: not a completions reply ({exc})"
                ) from None
            if len(texts) != max(num_samples, 1):
                raise RemoteError(
                    f"{self.base_url}/completions gave {len(texts)} choices for "
                    f"n={max(num_samples, 1)}"
                )
            for c in choices:
                self._check_length(c, max_new_tokens)
            return [(t.strip(), _answer_ids(self, c, t)) for c, t in zip(choices, texts)]

        label = progress if isinstance(progress, str) else ("Generating" if progress else False)
        return self.map(one, list(prompts), label)

    def _check_length(self, choice: dict[str, Any], asked: int) -> None:
        """A completion ended by its length before `asked` tokens was cut by the server:
        vLLM bounds every request by the model's generation_config `max_new_tokens`. The
        answer would be judged shorter than the local model's: an error, not a number."""
        ids = _generated_ids(choice)
        if choice.get("finish_reason") == "length" and ids is not None and len(ids) < asked:
            raise RemoteError(
                f"{self.base_url}/completions made {len(ids)} tokens where {asked} were "
                "asked: the server caps completions, as vLLM does at the model's "
                "generation_config max_new_tokens; start it with --generation-config vllm "
                "(or --override-generation-config '{\"max_new_tokens\": N}')"
            )


# The local sampler draws from the plain softmax at the temperature: nothing else changes
# the distribution (vLLM's own defaults, for parameters a request leaves unset). top_k
# is off as -1: vLLM before 0.8, SGLang and others refuse 0 ("top_k must be -1 (disable),
# or at least 1"); vLLM today takes either.
PLAIN_SAMPLING = {
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def _answer_ids(model: RemoteModel, choice: dict[str, Any], text: str) -> tuple[int, ...]:
    """A completion's answer token ids, without the stop token: vLLM keeps the EOS or stop
    token id in a choice's token ids (and log-probs) when `finish_reason` is "stop", where
    the local generator ends before it."""
    ids = _generated_ids(choice)
    if ids is None:
        return model.tokenize(text) if text.strip() else ()
    if choice.get("finish_reason") == "stop" and ids:
        ids = ids[:-1]
    return ids


def _generated_ids(choice: dict[str, Any]) -> tuple[int, ...] | None:
    """The ids of a choice's generated tokens when the server reported them as
    `token_id:N` (vLLM's `return_tokens_as_token_ids`), else None."""
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, str) and t.startswith("token_id:") for t in tokens
    ):
        return None
    try:
        return tuple(int(t[len("token_id:") :]) for t in tokens)
    except ValueError:
        return None


def _modes(mode: str) -> list[str]:
    return ["prompt_logprobs", "echo"] if mode == "auto" else [mode]


def _from_prompt_logprobs(
    reply: dict[str, Any], ids: Sequence[int]
) -> tuple[list[float], list[int] | None] | str:
    """The sent tokens' log-probs and, when every entry has one, their ranks (vLLM's
    `Logprob.rank`: how many tokens are at least as likely; 1 is the argmax)."""
    try:
        entries = reply["choices"][0].get("prompt_logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return "no choices in the reply"
    if not isinstance(entries, list):
        return "no 'prompt_logprobs' in the reply"
    if len(entries) != len(ids):
        raise RemoteError(
            f"the server scored {len(entries)} prompt tokens but {len(ids)} were sent"
        )
    out: list[float] = []
    ranks: list[int] | None = []
    for t, (token, entry) in enumerate(zip(ids[1:], entries[1:]), start=1):
        try:
            value = entry[str(token)]
            lp = float(value["logprob"] if isinstance(value, dict) else value)
        except (KeyError, TypeError, ValueError):
            raise RemoteError(
                f"prompt_logprobs position {t}: no log-prob for the token sent ({token}); "
                "the server's tokens differ from what was sent"
            ) from None
        out.append(_finite(lp, t))
        rank = value.get("rank") if isinstance(value, dict) else None
        if ranks is not None and isinstance(rank, int) and not isinstance(rank, bool):
            ranks.append(rank)
        else:
            ranks = None  # a server without ranks: no argmax to read
    return out, ranks


def _from_echo(reply: dict[str, Any], ids: Sequence[int]) -> list[float] | str:
    try:
        logprobs = reply["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return "no choices in the reply"
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or len(values) < len(ids):
        return "echo + logprobs gave no log-prob per prompt token"
    tokens = logprobs.get("tokens")
    if isinstance(tokens, list):
        for t, (sent, got) in enumerate(zip(ids, tokens)):
            if isinstance(got, str) and got.startswith("token_id:") and got != f"token_id:{sent}":
                raise RemoteError(
                    f"echo position {t}: the server reports token {got} where {sent} was sent"
                )
    out = []
    for t in range(1, len(ids)):
        try:
            lp = float(values[t])
        except (TypeError, ValueError):
            raise RemoteError(f"echo position {t}: the log-prob is not a number") from None
        out.append(_finite(lp, t, echo=True))  # its own message (a RemoteError is a ValueError)
    return out


# An HTTP 500 with the same message this many times in a row is a deterministic failure.
SAME_500_LIMIT = 3
# An attempt's connection is made within this many seconds (at most its timeout): the
# long wait is for the reply, behind the server's queue, not for a host that drops the
# packets (a firewall, a wrong address), which would take the whole timeout each attempt.
CONNECT_TIMEOUT = 30.0


def _timeout(seconds: float) -> Any:
    """httpx's timeout of an attempt that may take `seconds`."""
    import httpx

    return httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT))


# what a timeout may mean, and what to change (`RemoteModel._queued`)
_QUEUED = (
    " (a server that answers one request at a time, as a llama.cpp slot does, and "
    "`unpact serve` does all but plain greedy completions, makes the {n} sent at once "
    "wait for each other: send fewer, {fewer}, or wait longer, {longer})"
)
# 5xx codes that no retry can change (RFC 9110): the server does not implement the method
# (501: a plain web server, not an API) or the HTTP version (505). Failed at once.
NOT_TRANSIENT = (501, 505)

# vLLM writes a log-prob of -inf (a token the model gives no probability, e.g. one a
# logits processor masked) as this clamped value: not a log-prob to average. Its
# prompt_logprobs clamp -inf alone (`clamp_prompt_logprobs`): a lower value is a real one,
# which a model with blown-up logits (gradient ascent's) gives. Its echo floors every
# log-prob there (`max(logprob, -9999.0)` in `_create_completion_logprobs`): -9999.0 from
# it may be a real value below; another server's lower value is taken as given.
VLLM_CLAMPED_LOGPROB = -9999.0


def _finite(lp: float, position: int, echo: bool = False) -> float:
    if math.isnan(lp) or lp > 1e-3:
        raise RemoteError(f"position {position}: the server returned an impossible log-prob {lp}")
    if lp in (VLLM_CLAMPED_LOGPROB, -math.inf):
        floored = (
            "; vLLM's echo floors every log-prob there, so it may be a lower one: "
            "remote.logprobs_mode: prompt_logprobs (or auto) gives it as it is"
            if echo
            else ""
        )
        raise RemoteError(
            f"position {position}: the server returned log-prob {lp}, vLLM's clamp of -inf "
            "(the token has no probability under the served model, e.g. masked by a logits "
            f"processor or a quantized vocabulary){floored}; it cannot be averaged into a score"
        )
    return lp


def _token_list(reply: dict[str, Any], url: str) -> tuple[int, ...]:
    tokens = reply.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise RemoteError(f"{url}: the reply has no list of token ids ('tokens')")
    return tuple(tokens)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _server_error(reply: Any) -> tuple[str, str | None]:
    """An error reply's message (OpenAI's `error.message`, FastAPI's `detail`, else the
    body, on one line) and the request field it names as its cause (`error.param`)."""
    try:
        data = reply.json()
    except ValueError:
        text = reply.text
        if text.lstrip()[:1] == "<":  # a web server's HTML error page: its words, no markup
            text = html.unescape(re.sub(r"(?s)<(head|style|script)\b.*?</\1>|<[^>]*>", " ", text))
        return " ".join(text.split())[:300] or "(no message)", None
    msg = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    param = msg.get("param") if isinstance(msg, dict) and "error" in data else None
    if isinstance(msg, dict):
        msg = msg.get("message", msg)
    text = " ".join(str(msg).split())[:300] or "(no message)"
    return text, param if isinstance(param, str) else None


def _unknown_model(code: int, message: str) -> bool:
    """vLLM's answer to a request naming a model it does not serve (`_check_model` in its
    serving engine): HTTP 404 and the message "The model `NAME` does not exist." """
    return code == 404 and "does not exist" in message and "model" in message.lower()


def _capability_hint(url: str, code: int) -> str:
    if code == 404 and url.endswith(("/completions", "/models")) and "/v1/" not in url:
        return (
            " — the server has no such route; an OpenAI-compatible server's BASE_URL usually "
            "ends in /v1 (vLLM's: http://HOST:8000/v1)"
        )
    if url.endswith(("/tokenize", "/detokenize")) and code in (404, 405, 501):
        return (
            " — the server has no vLLM-style /tokenize and /detokenize; unpact scores with the "
            "server's own tokens and needs them"
        )
    return NOT_AN_API if code in NOT_TRANSIENT else ""


NOT_AN_API = (
    " — the server does not offer this request; is BASE_URL an OpenAI-compatible "
    "server's API root (vLLM's: http://HOST:8000/v1)?"
)
