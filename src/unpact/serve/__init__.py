"""A small OpenAI-compatible server for a local model, answering as vLLM's server does.

`unpact serve --model default` serves a local model on 127.0.0.1 with the endpoints
`unpact.remote` uses (`/v1/completions` with `echo`/`logprobs`/`prompt_logprobs`,
`/tokenize`, `/detokenize`, `/v1/models`) and the one an LLM judge asks
(`/v1/chat/completions`), in vLLM's reply formats. It is how the remote
backend is tested against real HTTP, and a way to try `openai:MODEL@URL` specs without a
GPU cluster; it is not a production server (vLLM is the thing to use at scale). Like vLLM
it batches what arrives together: scoring requests waiting at the same moment (up to a
token budget) run as one padded forward pass, and so do the log-probs a completion
reports; plain greedy completions waiting together (up to `--max-num-seqs`) are one padded
`generate` (`unpact.serve.batching`); other generation (samples, stop strings, logit
shaping) runs one request at a time.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import torch
from pydantic import BaseModel, ConfigDict, Field

from unpact.errors import UnpactError, check_text
from unpact.models import LanguageModel, text_config
from unpact.scoring import LOWEST_TEMPERATURE, generated_rows, stop_ids
from unpact.serve.auth import ApiKeys, check_keys, guarded_prefixes
from unpact.serve.batching import GenerateBatcher
from unpact.serve.cancel import check, holding, stopping, with_cancellation
from unpact.serve.scores import (
    ScoreBatcher,
    Scored,
    prompt_logprobs,
    scores_of,
    sequence_scores,
)
from unpact.serve.shaping import Shaping
from unpact.serve.stops import Finished, Stops, finish, step_texts
from unpact.serve.streaming import Stepped, chat_events, completion_events, event_stream

__all__ = [
    "BackgroundServer",
    "Finished",
    "ScoreBatcher",
    "Scored",
    "Shaping",
    "Stops",
    "finish",
    "make_app",
    "prompt_logprobs",
    "scores_of",
    "sequence_scores",
]


def _require_web() -> Any:
    try:
        import fastapi
    except ImportError:
        raise UnpactError(
            "serving needs FastAPI and uvicorn: pip install 'unpact[serve]'"
        ) from None
    return fastapi


# how many plain greedy completions in flight one `generate` answers together (vLLM's
# --max-num-seqs bounds its batch likewise, at 256 and more): unpact's remote client keeps
# 16 requests in flight
DEFAULT_MAX_NUM_SEQS = 16


def make_app(
    models: LanguageModel | dict[str, LanguageModel],
    name: str = "default",
    generation_config: Literal["auto", "vllm"] = "auto",
    api_keys: str | Sequence[str] = (),
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
) -> Any:
    """A FastAPI app serving `models` (name -> model; or one model under `name`).
    `generation_config`, as vLLM's option: "auto" takes the sampling defaults and the
    `max_new_tokens` bound from each model's generation_config, "vllm" leaves them out.
    `api_keys`, as vLLM's `--api-key`: when given, every route but the public ones
    (/health, /ping, /version) wants `Authorization: Bearer KEY` with one of them
    (`unpact.serve.auth`). `max_num_seqs`, as vLLM's option: how many plain greedy
    completions in flight one `generate` answers together (`unpact.serve.batching`; 1:
    each on its own).
    Each model is put in eval mode and left there: a server only infers (vLLM draws no
    dropout), and requests run side by side, so no one of them may switch the mode back."""
    if generation_config not in ("auto", "vllm"):
        raise UnpactError(f"generation_config: 'auto' or 'vllm', not {generation_config!r}")
    max_sequences()  # a VLLM_MAX_N_SEQUENCES that is no number: said before serving
    for lm in models.values() if isinstance(models, dict) else [models]:
        lm.model.eval()
    fastapi = _require_web()
    app = fastapi.FastAPI(title="unpact serve", docs_url=None, redoc_url=None)
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise UnpactError(f"max_num_seqs: a whole number of at least 1, not {max_num_seqs!r}")
    server = _Server(
        models if isinstance(models, dict) else {name: models},
        generation_config == "auto",
        max_num_seqs,
    )
    # vLLM's health check (an empty 200 once the model is loaded, as this app only exists
    # then): the URL scripts poll before they send the first request
    app.get("/health", response_class=fastapi.responses.Response)(_healthy)
    # vLLM's SageMaker ping (GET or POST, the health check's answer) and its version route
    # ({"version": ...}, here unpact's)
    app.api_route("/ping", methods=["GET", "POST"], response_class=fastapi.responses.Response)(
        _healthy
    )
    app.get("/version")(_version)
    app.get("/v1/models")(server.list_models)
    app.post("/tokenize")(_text_only(server.tokenize))
    app.post("/detokenize")(server.detokenize)
    # a client that disconnects stops its request's work, as in vLLM (`unpact.serve.cancel`)
    app.post("/v1/completions")(with_cancellation(_text_only(server.completions)))
    app.post("/v1/chat/completions")(with_cancellation(_text_only(server.chat_completions)))
    # a body that is not a JSON object: 400 in vLLM's format, as vLLM's
    # validation_exception_handler answers (FastAPI's own reply would be a 422)
    app.exception_handler(fastapi.exceptions.RequestValidationError)(_invalid_body)
    # a failure no check foresaw: vLLM's error shape, as its exception_handler answers,
    # not Starlette's plain-text 500. (A body FastAPI cannot parse past JSON's rules, e.g.
    # nested too deep, stays FastAPI's {"detail": ...} 400, as it does in vLLM: FastAPI
    # raises Starlette's HTTPException there, which vLLM's handler does not catch.)
    app.exception_handler(Exception)(_server_error)
    if api_keys:
        # every route is registered by now: the guarded prefixes are final
        app.add_middleware(ApiKeys, keys=check_keys(api_keys), guarded=guarded_prefixes(app.routes))
    return app


def _text_only(handler: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """`handler`, refusing a body whose text holds a lone UTF-16 surrogate (a JSON escape
    such as "\\ud800" without its pair) with a 400: the tokenizer failed on it, an
    "Internal Server Error" in plain text and a traceback in the server's log."""

    @functools.wraps(handler)
    def checked(body: dict[str, Any]) -> Any:
        try:
            check_text(body, "the request")
        except UnpactError as exc:
            return _error(400, str(exc))
        return handler(body)

    return checked


def _healthy() -> Any:
    from fastapi.responses import Response

    return Response(status_code=200)


def _version() -> dict[str, str]:
    from unpact.determinism import library_versions

    return {"version": library_versions()["unpact"]}


def _error(status: int, message: str, param: str | None = None) -> Any:
    """An error reply in vLLM's format (its ErrorResponse: {"error": {message, type, param,
    code}})."""
    from fastapi.responses import JSONResponse

    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}},
        status_code=status,
    )


async def _server_error(request: Any, exc: BaseException) -> Any:
    """A failure no check foresaw, as vLLM's create_error_response words it: a ValueError,
    TypeError or OverflowError (or a chat template's error) is the request's fault (400),
    a NotImplementedError a 501, anything else a 500; the traceback still goes to the
    server's log."""
    from fastapi.responses import JSONResponse

    template = any(k.__name__ == "TemplateError" for k in type(exc).__mro__)
    if isinstance(exc, (ValueError, TypeError, OverflowError)) or template:
        status, kind = 400, "BadRequestError"
    elif isinstance(exc, NotImplementedError):
        status, kind = 501, "NotImplementedError"
    else:
        status, kind = 500, "InternalServerError"
    error = {"message": str(exc), "type": kind, "param": None, "code": status}
    return JSONResponse({"error": error}, status_code=status)


async def _invalid_body(request: Any, exc: Any) -> Any:
    return _validation_error(exc.errors())


def _validation_error(errors: Any) -> Any:
    """pydantic's errors as vLLM words them ("N validation error(s):" then each), 400."""
    errors = list(errors)
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {e}\n" for e in errors)
    loc = errors[0].get("loc") if errors else None
    param = ".".join(str(x) for x in loc) if loc else None
    return _error(400, message.rstrip(), param)


_INT64 = 2**63


class _Fields(BaseModel):
    """The scalar fields of a /v1/completions request this server reads, typed (and the
    seed bounded) as vLLM's CompletionRequest types them: a wrong type is a 400 there, not
    a server error."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = 16
    n: int = 1
    echo: bool | None = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    temperature: float | None = None
    seed: int | None = Field(None, ge=-_INT64, le=_INT64 - 1)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    min_tokens: int = 0
    add_special_tokens: bool = True
    skip_special_tokens: bool = True


@dataclass
class _Completion:
    """A validated /v1/completions request."""

    model: str
    ids: list[int]
    given: str | None  # the prompt's text as given (None: given as token ids)
    max_tokens: int
    n: int
    echo: bool
    logprobs: int | None  # how many most likely tokens beside each one (None: not asked)
    prompt_logprobs: int | None
    as_ids: bool
    with_ids: bool  # vLLM's return_token_ids: the prompt's and each choice's ids beside the text
    skip_special: bool  # special tokens left out of the text (vLLM's skip_special_tokens)
    temperature: float
    seed: int
    sampling: dict[str, float]  # top_p, top_k, min_p, repetition_penalty as vLLM resolves them
    stops: Stops
    shaping: Shaping

    @property
    def ends(self) -> bool:
        """Whether the model's EOS ends a completion (not with vLLM's `ignore_eos`)."""
        return not self.shaping.ignore_eos

    @property
    def top(self) -> int:
        """How many most likely tokens to find at each position."""
        return max(self.logprobs or 0, self.prompt_logprobs or 0)

    @property
    def plain(self) -> bool:
        """Whether nothing but the temperature (and `shaping`) shapes the distribution."""
        return all(self.sampling[k] == VLLM_DEFAULTS[k] for k in ("top_p", "top_k", "min_p"))


class _Server:
    """The endpoints over the served models: one model call at a time (torch uses every
    core for it), scoring requests batched by a `ScoreBatcher` per model, plain greedy
    completions by a `GenerateBatcher` per model."""

    def __init__(
        self,
        served: dict[str, LanguageModel],
        configured: bool = True,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    ) -> None:
        self.served = served
        self.lock = threading.Lock()
        self.batchers = {n: ScoreBatcher(m, self.lock) for n, m in served.items()}
        self.generators = {
            n: GenerateBatcher(m, self.lock, max_num_seqs) for n, m in served.items()
        }
        # what each model's generation_config gives a request (vLLM's
        # get_diff_sampling_param), nothing with --generation-config vllm
        self.defaults = {n: _config_defaults(m) if configured else {} for n, m in served.items()}

    def named(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The served model a request is for, and its generation_config defaults."""
        name = self.name(body)
        return name, self.defaults[name]

    def name(self, body: dict[str, Any]) -> str:
        """The served model a request is for: the one it names, or (vLLM: a request that
        names none) the first served one."""
        return str(body.get("model") or next(iter(self.served)))

    def pick(self, body: dict[str, Any]) -> Any:
        """The model the request is for, or the error reply vLLM gives."""
        found = self.served.get(self.name(body))
        if found is None:
            return None, _error(404, f"The model `{self.name(body)}` does not exist.")
        return found, None

    def list_models(self) -> dict[str, Any]:
        """vLLM's model list: a card per served model (its ModelCard's fields and defaults:
        `owned_by` "vllm", which clients read to tell vLLM from other servers; `root` the
        model it loaded, as vLLM's is the path or hub id it serves, here with a hub
        revision (`ORG/NAME@REV`) where one was given, which vLLM takes apart as
        --revision: a remote run keys a served model's stages by its root, and another
        revision under the same name is then another model)."""
        now = int(time.time())
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        cards = [
            {
                "id": n,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": m.spec,
                "parent": None,
                "max_model_len": m.max_length,
                "permission": [permission],
            }
            for n, m in self.served.items()
        ]
        return {"object": "list", "data": cards}

    def tokenize(self, body: dict[str, Any]) -> Any:
        lm, bad = self.pick(body)
        if bad is not None:
            return bad
        tok = lm.tokenizer
        if "messages" in body:
            ids = _chat_ids(lm, body)
            if not isinstance(ids, list):
                return ids  # an error reply
        elif isinstance(body.get("prompt"), str):
            ids = tok(
                body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True))
            )["input_ids"]
        else:
            return _error(400, "give 'prompt' (text) or 'messages'")
        # vLLM's TokenizeResponse: the tokens' strings only when `return_token_strs` asks
        strs = tok.convert_ids_to_tokens(list(ids)) if body.get("return_token_strs") else None
        return {
            "count": len(ids),
            "max_model_len": lm.max_length,
            "tokens": list(ids),
            "token_strs": strs,
        }

    def detokenize(self, body: dict[str, Any]) -> Any:
        lm, bad = self.pick(body)
        if bad is not None:
            return bad
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return _error(400, "'tokens' must be a list of token ids")
        bad = next((t for t in tokens if not 0 <= t < len(lm.tokenizer)), None)
        if bad is not None:  # the tokenizer's decode failed on it: a server error
            return _error(400, f"Token id {bad} is out of vocabulary")
        return {"prompt": lm.tokenizer.decode(tokens)}

    def completions(self, body: dict[str, Any]) -> Any:
        """vLLM's /v1/completions, of one prompt or of a list of them (each its choices, the
        choices numbered across the prompts, the usage summed, as vLLM answers a batch)."""
        lm, bad = self.pick(body)
        if bad is not None:
            return bad
        streaming = _streaming(body)
        if not isinstance(streaming, _Streaming):
            return streaming  # an error reply
        prompts = _prompts(body.get("prompt"))
        if prompts is None:
            return _error(
                400, "'prompt' must be text, a non-empty list of token ids, or a list of either"
            )
        reqs = []
        for prompt in prompts:  # every prompt checked before any is generated
            req = _parse_completion(lm, body | {"prompt": prompt}, *self.named(body))
            if not isinstance(req, _Completion):
                return req  # an error reply
            reqs.append(req)
        # the prompts only scored (lm-evaluation-harness's log-likelihoods) in one pass, the
        # plain greedy ones in one generation
        pending = self._submitted(reqs)
        choices: list[dict[str, Any]] = []
        finished: list[Finished] = []
        stepped: list[Stepped] = []
        for req, ahead in zip(reqs, pending, strict=True):
            done = self._complete(lm, req, len(choices), choices, ahead)
            finished += done
            stepped += _stepped(lm, req, done) if streaming.stream else []
        reply = _reply("cmpl", "text_completion", reqs, choices, finished)
        if not streaming.stream:
            return reply
        events = completion_events(reply, stepped, streaming.continuous)
        return event_stream(reply, events, streaming.usage)

    def _complete(
        self,
        lm: LanguageModel,
        req: _Completion,
        first: int,
        choices: list[dict[str, Any]],
        ahead: Future[Any] | None,
    ) -> list[Finished]:
        """One prompt's completions, their choices (numbered from `first`) added to
        `choices`; `ahead`: its work, submitted already (`_submitted`)."""
        prompt_scores, done = self._generate(lm, req, ahead)
        # the sequences whose scores the choices report (`_choice`), each scored once, all
        # in one pass with whatever else is waiting (as vLLM's sampler reports them with
        # its batch), unless scored on the way already (the prompt's, and its one greedy
        # token's)
        shown = [() if _hidden(req) else f.ids for f in done]
        wanted = req.logprobs is not None or req.prompt_logprobs is not None
        known = ((), (prompt_scores.next_id,)) if prompt_scores is not None else ()
        needed = list(dict.fromkeys(g for g in shown if wanted and g not in known))
        check()
        futures = self.batchers[req.model].submit([(req.ids + list(g), req.top) for g in needed])
        full = dict(zip(needed, futures, strict=True))

        def scores(g: tuple[int, ...]) -> Scored:
            """The scores of ids + g."""
            if prompt_scores is not None and g in known:
                return prompt_scores
            return full[g].result()

        for n, f in enumerate(done):
            choices.append(_choice(lm, req, first + n, f, prompt_scores, scores))
        return done

    def chat_completions(self, body: dict[str, Any]) -> Any:
        """vLLM's /v1/chat/completions: the messages in the model's chat template, then
        generated as a completion of its tokens (what an LLM judge asks)."""
        lm, bad = self.pick(body)
        if bad is not None:
            return bad
        refused = _unimplemented(body, _CHAT_UNIMPLEMENTED)
        if refused is not None:
            return refused
        streaming = _streaming(body)
        if not isinstance(streaming, _Streaming):
            return streaming  # an error reply
        ids = _chat_ids(lm, body)
        if not isinstance(ids, list):
            return ids  # an error reply
        top = _chat_top(body)
        if not isinstance(top, (int, type(None))):
            return top  # an error reply
        # vLLM: max_completion_tokens, else the deprecated max_tokens, else the room left
        length = body.get("max_completion_tokens")
        length = body.get("max_tokens") if length is None else length
        skip = ("max_tokens", "logprobs", "prompt_logprobs", "echo")
        asked = {k: body[k] for k in _Fields.model_fields if k in body and k not in skip}
        given = asked | {
            "prompt": ids,
            "max_tokens": max(0, lm.max_length - len(ids)) if length is None else length,
            "logprobs": top,
        }
        req = _parse_completion(lm, given, *self.named(body))
        if not isinstance(req, _Completion):
            return req
        _, done = self._generate(lm, req)
        role, echoed = _chat_role_and_echo(body)
        choices = [
            {
                "index": n,
                "message": {"role": role, "content": echoed + f.text, "tool_calls": []},
                "logprobs": None if req.logprobs is None else self._chat_logprobs(lm, req, f),
                "finish_reason": f.finish_reason,
                "stop_reason": f.stop_reason,
            }
            for n, f in enumerate(done)
        ]
        reply = _reply("chatcmpl", "chat.completion", [req], choices, done)
        if not streaming.stream:
            return reply
        events = chat_events(reply, _stepped(lm, req, done), echoed, streaming.continuous)
        return event_stream(reply, events, streaming.usage)

    def _chat_logprobs(self, lm: LanguageModel, req: _Completion, done: Finished) -> Any:
        """vLLM's chat `logprobs` (`_create_chat_logprobs`): for each generated token (the
        one that stopped it among them) its text, log-prob and UTF-8 bytes, and
        `top_logprobs` of them: the first `top_logprobs` of the token followed by the most
        likely ones (each token once), as vLLM lists its log-prob dictionary."""
        check()
        (scoring,) = self.batchers[req.model].submit([(req.ids + list(done.ids), req.top)])
        sc, k = scoring.result(), req.logprobs or 0

        def entry(t: int, lp: float) -> dict[str, Any]:
            text = _token_text(lm, req, t)
            return {"token": text, "logprob": max(lp, VLLM_FLOOR), "bytes": _utf8(text)}

        content = []
        for n, token in enumerate(done.ids, start=len(req.ids) - 1):
            found = {t: lp for t, lp, _ in _candidates(sc, n, token, k)}  # vLLM's dict
            listed = [entry(t, lp) for t, lp in list(found.items())[:k]]
            content.append(entry(token, sc.lps[n]) | {"top_logprobs": listed})
        return {"content": content}

    def _submitted(self, reqs: list[_Completion]) -> list[Future[Any] | None]:
        """Each request's work handed to its batcher ahead (None: generated on its own):
        the scores of the ones only scored, the rows of the plain greedy ones (`_batchable`),
        so that a list of prompts is batched as far as they allow."""
        scored = [(r.ids, r.top) for r in reqs if _scored_only(r)]
        futures = iter(self.batchers[reqs[0].model].submit(scored)) if scored else iter(())
        generators = self.generators[reqs[0].model]
        return [
            next(futures)
            if _scored_only(r)
            else generators.submit(r.ids, r.max_tokens)
            if _batchable(r)
            else None
            for r in reqs
        ]

    def _generate(
        self, lm: LanguageModel, req: _Completion, ahead: Future[Any] | None = None
    ) -> tuple[Scored | None, list[Finished]]:
        """The completions, and the prompt's scores when scored on the way (`ahead`: the
        future of its scores or its greedy row, if submitted already, `_submitted`)."""
        if _scored_only(req):
            # Scoring (echo without generation, or prompt_logprobs with one greedy token):
            # batched with whatever other scoring requests are waiting.
            if ahead is None:
                (ahead,) = self.batchers[req.model].submit([(req.ids, req.top)])
            scored = ahead.result()
            # an echo without generation too: vLLM makes the one greedy token it hides
            rows: list[list[int]] = [[scored.next_id]]
            prompt_scores: Scored | None = scored
        elif _batchable(req):  # generated with the other plain greedy requests waiting
            if ahead is None:
                ahead = self.generators[req.model].submit(req.ids, req.max_tokens)
            rows, prompt_scores = [ahead.result()], None
            check()
        else:
            with holding(self.lock), torch.no_grad():
                rows = _generate_rows(lm, req, req.temperature < GREEDY_BELOW)
                check()  # generation stopped early: the client has gone
            prompt_scores = None
        eos = lm.tokenizer.eos_token_id if req.ends else None
        decode = _decoder(lm, req.ids, req.skip_special)
        ends = set(stop_ids(lm)) if req.ends else set()
        return prompt_scores, [finish(r, decode, req.stops, ends, eos) for r in rows]


def _scored_only(req: _Completion) -> bool:
    """Whether one scoring pass answers the request: one greedy token (or an echo without
    generation, `_hidden`, for which vLLM makes one), the most likely after the prompt
    (nothing shaping it)."""
    greedy = req.temperature < GREEDY_BELOW
    one = req.max_tokens <= 1 and greedy and req.n == 1 and not req.stops.min_tokens
    return one and req.shaping.neutral


def _batchable(req: _Completion) -> bool:
    """Whether the request is a plain greedy completion, generated with others waiting
    (`unpact.serve.batching`): one choice, greedy, nothing shaping the logits or stopping
    it but the model's EOS and its length."""
    greedy = req.temperature < GREEDY_BELOW and req.n == 1 and req.ends
    stops = req.stops
    return (
        greedy
        and req.shaping.neutral
        and not (stops.strings or stops.token_ids or stops.min_tokens)
    )


def _hidden(req: _Completion) -> bool:
    """An echo without generation (`max_tokens` 0): vLLM's `echo_without_generation`, which
    it serves as a one-token completion (`max_tokens=1` in its sampling parameters) whose
    token it leaves out of the text and log-probs but counts in the usage, lists in
    `token_ids` and reads the finish reason from, one such completion per `n`."""
    return req.echo and req.max_tokens == 0


def _decoder(lm: LanguageModel, prompt: list[int], skip: bool) -> Callable[[list[int]], str]:
    """A completion's text as vLLM gives it: special tokens left out (`skip`), and the ids
    decoded after the prompt's last tokens (`_primer`), as vLLM's detokenizer is primed
    with them, so a word's first token keeps the space a tokenizer's lone decode drops
    (SentencePiece's `▁`)."""

    def text(of: list[int]) -> str:  # vLLM's detokenizers clean no spaces up
        return str(
            lm.tokenizer.decode(of, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        )

    after = _primer(lm, prompt)
    before = text(after)

    def decode(ids: list[int]) -> str:
        whole = text(after + ids)
        return whole[len(before) :] if whole.startswith(before) else text(ids)

    return decode


def _primer(lm: LanguageModel, prompt: list[int]) -> list[int]:
    """The prompt's last tokens vLLM's fast detokenizer decodes before a completion: the
    shortest of 4 to 23 whose text has no unfinished character, else the whole prompt."""
    if len(prompt) > 4:
        for n in range(4, min(len(prompt) + 1, 24)):
            if "\ufffd" not in lm.tokenizer.decode(prompt[-n:], skip_special_tokens=True):
                return prompt[-n:]
    return prompt


def _generate_rows(lm: LanguageModel, req: _Completion, greedy: bool) -> list[list[int]]:
    """The request's generated rows (up to max_tokens, each as it came: a stopped one's
    stop id kept): greedy, the local sampler seeded by the request's seed as vLLM seeds a
    request (unpact's client sends the per-prompt seed its local sampler would use), with
    the request's top_p / top_k / min_p as vLLM resolves them (the model's generation_config
    filling what the request leaves unset; its other settings left out, as vLLM reads
    none of them) and its `Shaping`. The request's stop token ids stop a row as the EOS
    does, and its stop strings stop it early."""
    extra: dict[str, Any] = {"nan_watch": False}  # vLLM serves what the model generates
    # a stop id outside the vocabulary is never generated (and transformers warns of it)
    asked = {t for t in req.stops.token_ids if 0 <= t < len(lm.tokenizer)}
    held = sorted(set(stop_ids(lm)) | asked)  # every stop id, vLLM's all_stop_token_ids
    if asked or not req.ends:
        extra["eos_token_id"] = (held if req.ends else sorted(asked)) or None
    least = req.stops.min_tokens  # no stop id before them, as vLLM's MinTokens processor
    if least and req.ends:
        extra["min_new_tokens"] = least
    shape = req.shaping.processor(len(req.ids), held, 0 if req.ends else least)
    if shape is not None:
        extra["logits_processor"] = shape
    extra["stopping_criteria"] = _stopping(lm, req)
    length = max(req.max_tokens, 1)  # an echo without generation makes one (`_hidden`)
    if greedy:
        return generated_rows(lm, [req.ids], length, None, 1.0, 1, **extra)
    if not req.plain:  # transformers' warpers, after the processors, as vLLM's order has them
        s = req.sampling
        extra |= {"top_p": s["top_p"], "top_k": int(s["top_k"]), "min_p": s["min_p"] or None}
    return generated_rows(lm, [req.ids], length, req.seed, req.temperature, req.n, **extra)


def _stopping(lm: LanguageModel, req: _Completion) -> Any:
    """transformers stopping criteria: every row once the client has gone
    (`cancel.stopping`), and with the request's stop strings a row once its text holds
    one of them (`finish` then cuts it where vLLM does); the rows they end draw their
    samples as before, so the others' samples are the same."""
    from transformers.generation import StoppingCriteria, StoppingCriteriaList

    if not req.stops.strings:
        return StoppingCriteriaList([stopping()])

    width, strings = len(req.ids), req.stops.strings
    decode = _decoder(lm, req.ids, req.skip_special)
    least = req.stops.min_tokens

    def stopped(row: list[int]) -> bool:
        """Whether `finish` finds a stop string in the row: after `least` tokens, in the
        text after theirs (from the string's length before)."""
        if len(row) <= least:
            return False
        text, held = decode(row), len(decode(row[:least])) if least else 0
        return any(s in text[max(held - len(s), 0) :] for s in strings)

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            found = [stopped(row) for row in input_ids[:, width:].tolist()]
            return torch.tensor(found, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([stopping(), _StopStrings()])


# vLLM's _SAMPLING_EPS: a temperature below it is greedy decoding. Only 0 reaches it: a
# temperature between 0 and LOWEST_TEMPERATURE is raised to it first (`_raised`).
GREEDY_BELOW = 1e-5


def _raised(temperature: float) -> float:
    """The temperature vLLM samples at: SamplingParams.__post_init__ raises one in (0, 0.01)
    to 0.01 (its _MAX_TEMP; lower ones risk nan or inf) before it checks for greedy
    decoding, so such a temperature is not greedy."""
    return LOWEST_TEMPERATURE if 0 < temperature < LOWEST_TEMPERATURE else temperature


# vLLM's default --max-logprobs: a request asking for more top log-probs is refused.
MAX_LOGPROBS = 20

# Sampling parameters vLLM takes from the model's generation_config when a request leaves
# them unset (CompletionRequest.to_sampling_params: user, then server default, then OpenAI's).
_FROM_CONFIG = ("top_p", "top_k", "min_p", "repetition_penalty")
# vLLM's defaults for them (its protocol's _DEFAULT_SAMPLING_PARAMS): the plain softmax
VLLM_DEFAULTS = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _config_defaults(lm: LanguageModel) -> dict[str, Any]:
    """What vLLM reads from a model's generation_config (`get_diff_sampling_param`): the
    sampling parameters a request leaves unset, and `max_new_tokens`, a bound on every
    request."""
    config = lm.model.generation_config
    names = (*_FROM_CONFIG, "temperature", "max_new_tokens")
    return {k: v for k in names if (v := getattr(config, k, None)) is not None}


def _sampling_value(defaults: dict[str, Any], fields: _Fields, name: str, default: float) -> Any:
    if getattr(fields, name) is not None:
        return getattr(fields, name)
    return defaults.get(name, default)


def _sampling(defaults: dict[str, Any], fields: _Fields) -> dict[str, float]:
    """The request's top_p / top_k / min_p / repetition_penalty as vLLM resolves them, top_k
    off as 0 (vLLM takes -1 for it as well)."""
    s = {k: float(_sampling_value(defaults, fields, k, VLLM_DEFAULTS[k])) for k in _FROM_CONFIG}
    s["top_k"] = max(s["top_k"], 0.0)
    return s


# vLLM's /v1/completions fields that change the output and that this server does not
# implement: asked for (any value but an empty or zero one, which changes nothing), the
# request is refused; ignored, a `stop` or `stream` gave another output than vLLM's, silently
_UNIMPLEMENTED = (
    "suffix",  # vLLM's own 400
    "best_of",
    "use_beam_search",
    "truncate_prompt_tokens",
    "logprob_token_ids",
    "prompt_embeds",
    "repetition_detection",
    "thinking_token_budget",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "response_format",
)


# and those of /v1/chat/completions beside them
_CHAT_UNIMPLEMENTED = (
    *_UNIMPLEMENTED,
    "tools",
    "tool_choice",
)


def _unimplemented(body: dict[str, Any], fields: tuple[str, ...] = _UNIMPLEMENTED) -> Any:
    """The error reply for a field that would change the output and that this server does
    not implement, or None."""
    if "suffix" in fields and body.get("suffix") is not None:  # vLLM refuses it too
        return _error(400, "suffix is not currently supported")
    for field in fields:
        value = body.get(field)
        if field == "best_of" and value == body.get("n", 1):
            continue  # as many candidates as choices: nothing to pick among
        if value:
            return _error(
                400,
                f"unpact serve does not implement `{field}` (it serves what unpact's remote "
                "backend asks; docs/remote.md): serve the model with vLLM for it",
                field,
            )
    return None


def _parse_completion(
    lm: LanguageModel, body: dict[str, Any], name: str, defaults: dict[str, Any]
) -> Any:
    """The request's fields (`name`: the served model's; `defaults`: what its
    generation_config gives), or the error reply vLLM gives for a bad one (and ours for a
    field this server does not implement)."""
    from pydantic import ValidationError

    try:
        fields = _Fields.model_validate(body)
    except ValidationError as exc:
        return _validation_error(exc.errors(include_url=False, include_context=False))
    refused = _unimplemented(body)
    if refused is not None:
        return refused
    for field, said in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        asked = getattr(fields, field)
        if asked is not None and asked < 0 and asked != -1:
            return _error(400, f"`{field}` must be a positive value or -1.", field)
        asked = len(lm.tokenizer) if asked == -1 else asked  # -1: the whole vocabulary
        if asked is not None and asked > MAX_LOGPROBS:  # vLLM's _validate_logprobs
            return _error(
                400,
                f"Requested {said} logprobs of {asked}, which is greater than max allowed: "
                f"{MAX_LOGPROBS}",
                field,
            )
    tok = lm.tokenizer
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        ids = list(tok(prompt, add_special_tokens=fields.add_special_tokens)["input_ids"])
    elif _token_ids(prompt):
        ids = list(prompt)
    else:
        return _error(400, "'prompt' must be text or a non-empty list of token ids")
    if not ids:  # text of no tokens (a tokenizer without BOS): a 500 from inside the model
        return _error(400, "The decoder prompt cannot be empty")
    vocab = len(tok)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:  # as vLLM's input processing refuses it
        return _error(400, f"Token id {bad} is out of vocabulary")
    sampling = _sampling(defaults, fields)
    shaping = _shaping(lm, fields, sampling["repetition_penalty"])
    if not isinstance(shaping, Shaping):
        return shaping  # an error reply
    req = _Completion(
        model=name,
        ids=ids,
        given=prompt if isinstance(prompt, str) else None,
        max_tokens=16 if fields.max_tokens is None else fields.max_tokens,
        n=fields.n,
        echo=bool(fields.echo),
        logprobs=fields.logprobs,
        # vLLM's to_sampling_params: an echo scores the prompt with `logprobs` if no
        # `prompt_logprobs` is asked
        prompt_logprobs=fields.logprobs
        if fields.prompt_logprobs is None and fields.echo
        else fields.prompt_logprobs,
        as_ids=bool(fields.return_tokens_as_token_ids),
        with_ids=bool(fields.return_token_ids),
        skip_special=fields.skip_special_tokens,
        temperature=_raised(float(_sampling_value(defaults, fields, "temperature", 1.0))),
        # vLLM: no seed (or -1) draws from the engine's random state; here a fresh seed
        seed=secrets.randbits(63) if fields.seed in (None, -1) else fields.seed,
        sampling=sampling,
        stops=Stops(
            tuple([fields.stop] if isinstance(fields.stop, str) else fields.stop or []),
            tuple(fields.stop_token_ids or []),
            bool(fields.include_stop_str_in_output),
            fields.min_tokens,
        ),
        shaping=shaping,
    )
    refused = _request_error(lm, req, fields.top_k)
    return refused if refused is not None else _capped(req, defaults.get("max_new_tokens"))


def _capped(req: _Completion, cap: int | None) -> Any:
    """The request with at most the model's generation_config `max_new_tokens` (`cap`) to
    make, as vLLM bounds every request by it (`get_max_tokens`), or vLLM's 400 for a
    `min_tokens` then above it."""
    if cap is None or req.max_tokens <= cap:
        return req
    req.max_tokens = int(cap)
    return _above_max_tokens(req) if req.stops.min_tokens > req.max_tokens else req


def _above_max_tokens(req: _Completion) -> Any:
    """vLLM's 400 for a `min_tokens` above `max_tokens` (1 for an echo without generation,
    `_hidden`, as vLLM's sampling parameters have it)."""
    return _error(
        400,
        f"min_tokens must be less than or equal to max_tokens={max(req.max_tokens, 1)}, "
        f"got {req.stops.min_tokens}.",
    )


def _shaping(lm: LanguageModel, fields: _Fields, repetition: float) -> Any:
    """The request's `Shaping`, or vLLM's error reply for a bad `logit_bias` or
    `allowed_token_ids` (its input processor's words)."""
    bias = _logit_bias(lm, fields.logit_bias)
    if not isinstance(bias, tuple):
        return bias
    words = fields.bad_words or []
    if any(not word for word in words):  # SamplingParams._verify_args
        return _error(400, f"bad_words cannot contain an empty string. Got bad_words={words}")
    banned = _bad_words(lm, words)
    if banned is None:  # SamplingParams.update_from_tokenizer
        return _error(400, "bad_words entries must tokenize to at least one token.", "bad_words")
    allowed = fields.allowed_token_ids
    if allowed is not None and not allowed:
        return _error(400, "allowed_token_ids is not None and empty!", "allowed_token_ids")
    if allowed is not None and not all(0 <= t < len(lm.tokenizer) for t in allowed):
        return _error(400, "allowed_token_ids contains out-of-vocab token id!", "allowed_token_ids")
    return Shaping(
        bias,
        repetition,
        fields.presence_penalty or 0.0,  # vLLM's defaults: none from generation_config
        fields.frequency_penalty or 0.0,
        fields.ignore_eos,
        None if allowed is None else tuple(sorted(set(allowed))),
        banned,
    )


def _bad_words(lm: LanguageModel, words: list[str]) -> tuple[tuple[int, ...], ...] | None:
    """`bad_words` as vLLM's `SamplingParams.update_from_tokenizer` makes token ids of them:
    each word (leading spaces stripped) as it starts a text, and with a space before it
    where that gives another first token and as many tokens (a word inside a text). None
    for a word of no tokens (" "), which vLLM refuses (it was taken as banning nothing)."""
    found: list[tuple[int, ...]] = []
    for word in words:
        alone = tuple(lm.tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not alone:
            return None
        found.append(alone)
        inside = tuple(lm.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if inside and inside[0] != alone[0] and len(inside) == len(alone):
            found.append(inside)
    return tuple(found)


def _logit_bias(lm: LanguageModel, given: dict[str, float] | None) -> Any:
    """A request's `logit_bias` as vLLM takes it: each key an int (`int()` of it), each
    bias clamped to [-100, 100] (`SamplingParams.from_optional`), a token outside the
    model's vocabulary refused (its input processor's words); or the error reply."""
    try:
        bias = {int(k): min(100.0, max(-100.0, v)) for k, v in (given or {}).items()}
    except ValueError as exc:
        return _error(400, str(exc), "logit_bias")
    size = int(text_config(lm.model).vocab_size)
    bad = [t for t in bias if not 0 <= t < size]
    if bad:
        return _error(
            400,
            f"token_id(s) {bad} in logit_bias contain out-of-vocab token ids. "
            f"Vocabulary size: {size}",
            "logit_bias",
        )
    return tuple(bias.items())


def max_sequences() -> int:
    """The most samples (`n`) one request may ask for: vLLM's `VLLM_MAX_N_SEQUENCES`
    (its environment variable, read as vLLM's `envs` reads it: 16384 unset)."""
    given = os.environ.get("VLLM_MAX_N_SEQUENCES", "16384")
    try:
        return int(given)
    except ValueError:
        raise UnpactError(f"VLLM_MAX_N_SEQUENCES must be an integer, not {given!r}") from None


def _request_error(lm: LanguageModel, req: _Completion, top_k: int | None) -> Any:
    """vLLM's 400 for a request that does not fit in the context (its renderer's
    `TokenizeParams`, which runs first), then for values out of range
    (`SamplingParams._verify_args`, in its order and words: `n`, the sampling values,
    `max_tokens` (0 only with `echo`, which vLLM turns into one token it drops),
    `min_tokens`, `stop`), or None."""
    too_long = _length_error(lm, len(req.ids), req.max_tokens)
    if too_long is not None:
        return too_long
    if req.n < 1:
        return _error(400, f"n must be at least 1, got {req.n}.")
    most = max_sequences()
    if req.n > most:  # vLLM's `_verify_num_sequences`: a million samples filled the memory
        return _error(
            400,
            f"n must be at most {most}, got {req.n}. To increase this limit, set the "
            "VLLM_MAX_N_SEQUENCES environment variable.",
        )
    out_of_range = _sampling_error(req, top_k)
    if out_of_range is not None:
        return out_of_range
    if req.max_tokens < 1 and not (req.max_tokens == 0 and req.echo):
        message = f"max_tokens must be at least 1, got {req.max_tokens}."
        return _error(400, message, "max_tokens")
    least = req.stops.min_tokens
    if least < 0:
        return _error(400, f"min_tokens must be greater than or equal to 0, got {least}.")
    if least > max(req.max_tokens, 1):  # 0 only with echo, one token made (`_hidden`)
        return _above_max_tokens(req)
    if any(not string for string in req.stops.strings):
        return _error(400, "stop cannot contain an empty string.")
    return None


def _length_error(lm: LanguageModel, prompt: int, wanted: int) -> Any:
    """vLLM's 400 for a prompt and `max_tokens` that do not fit in the context (its
    renderer's words, `TokenizeParams`), or None."""
    room = lm.max_length
    if wanted > room:
        message = (
            f"max_tokens={wanted} cannot be greater than max_model_len={room}. "
            "Please request fewer output tokens."
        )
        return _error(400, message, "max_tokens")
    if prompt + wanted > room:
        message = (
            f"You passed {prompt} input tokens and requested {wanted} output tokens. However, "
            f"the model's context length is only {room} tokens, resulting in a maximum input "
            f"length of {room - wanted} tokens. Please reduce the length of the input prompt."
        )
        return _error(400, message, "input_tokens")
    return None


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _chat_top(body: dict[str, Any]) -> Any:
    """How many most likely tokens a chat request asks beside each generated one (vLLM:
    `top_logprobs` when `logprobs` is true, 0 without it, None when `logprobs` is not),
    or vLLM's 400."""
    top, wanted = body.get("top_logprobs"), body.get("logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)):
        return _error(400, "`top_logprobs` must be an integer.", "top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        return _error(400, "`logprobs` must be true or false.", "logprobs")
    if top is not None and top < 0 and top != -1:
        return _error(400, "`top_logprobs` must be a positive value or -1.", "top_logprobs")
    if top is not None and top != 0 and not wanted:
        return _error(400, "when using `top_logprobs`, `logprobs` must be set to true.")
    return (top or 0) if wanted else None


class _StreamOptions(BaseModel):
    """vLLM's StreamOptions."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Streaming(BaseModel):
    """A request's `stream` and `stream_options`, typed as vLLM types them."""

    model_config = ConfigDict(extra="ignore")
    stream: bool | None = False
    stream_options: _StreamOptions | None = None

    @property
    def usage(self) -> bool:
        """A last chunk with the usage (`include_usage`)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous(self) -> bool:
        """The usage so far in every chunk (vLLM: `include_usage` and
        `continuous_usage_stats` both)."""
        return self.usage and bool(
            self.stream_options and self.stream_options.continuous_usage_stats
        )


def _streaming(body: dict[str, Any]) -> Any:
    """The request's `_Streaming`, or vLLM's 400 for a wrong type or for what cannot go
    with (or without) `stream`."""
    from pydantic import ValidationError

    try:
        asked = _Streaming.model_validate(body)
    except ValidationError as exc:
        return _validation_error(exc.errors(include_url=False, include_context=False))
    if asked.stream_options is not None and not asked.stream:
        return _error(400, "Stream options can only be defined when `stream=True`.")
    scored = body.get("prompt_logprobs")
    if asked.stream and isinstance(scored, int) and (scored > 0 or scored == -1):
        return _error(
            400, "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
        )
    return asked


def _stepped(lm: LanguageModel, req: _Completion, done: list[Finished]) -> list[Stepped]:
    """Each completion of `req` cut into the pieces vLLM streams, one per generated token."""
    decode = _decoder(lm, req.ids, req.skip_special)
    echoed = len(req.ids) if req.echo else 0
    return [
        Stepped(
            [] if _hidden(req) else step_texts(decode, f, req.stops),
            len(req.ids),
            echoed,
            len(f.ids),
        )
        for f in done
    ]


def _reply(
    prefix: str,
    kind: str,
    reqs: list[_Completion],
    choices: list[dict[str, Any]],
    done: list[Finished],
) -> dict[str, Any]:
    """A completion reply in vLLM's format around its choices, with the token usage."""
    made = sum(len(f.ids) for f in done)
    read = sum(len(r.ids) for r in reqs)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": reqs[0].model,
        "choices": choices,
        "usage": {"prompt_tokens": read, "completion_tokens": made, "total_tokens": read + made},
    }


def _prompts(prompt: Any) -> list[str | list[int]] | None:
    """A request's prompts as vLLM's CompletionRequest takes them: text, token ids, or a
    non-empty list of texts or of token-id lists (a batch); None for anything else."""
    if isinstance(prompt, str) or _token_ids(prompt):
        return [prompt]
    texts = isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)
    if isinstance(prompt, list) and prompt and (texts or all(_token_ids(p) for p in prompt)):
        return list(prompt)
    return None


def _token_ids(value: Any) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _chat_role_and_echo(body: dict[str, Any]) -> tuple[str, str]:
    """A chat reply's role and the text `echo` puts before each choice's, as vLLM's chat
    server gives them: the role is the assistant's with a generation prompt, else the last
    message's; an echo repeats the last message's content where its role is the reply's
    (text parts joined by newlines). `body`'s messages are valid (`_chat_ids`)."""
    last = body["messages"][-1]
    role = "assistant" if body.get("add_generation_prompt", True) else str(last["role"])
    if not body.get("echo") or last["role"] != role:
        return role, ""
    return role, _content_text(last.get("content") or "")


def _content_text(content: Any) -> Any:
    """A message's content as text: text parts joined by newlines, as vLLM's "string"
    content format joins them (anything else as it is)."""
    parts = isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    )
    return "\n".join(p["text"] for p in content) if parts else content


def _chat_ids(lm: LanguageModel, body: dict[str, Any]) -> Any:
    """The token ids of a request's `messages` in the model's chat template with its
    generation prompt, or continuing the last message (`continue_final_message`, which
    /tokenize takes; vLLM: no special tokens added beyond the template's), or the error
    reply. A message's content is text, or a list of text parts (joined by newlines, as
    vLLM's "string" content format joins them)."""
    if not lm.has_chat_template:
        return _error(400, "this model has no chat template: give one with --chat-template")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "'messages' must be a non-empty list of {role, content} objects")
    rendered = []
    for m in messages:
        content = _content_text(m.get("content")) if isinstance(m, dict) else None
        if not isinstance(content, str) or not isinstance(m.get("role"), str):
            return _error(400, "'messages' must be a non-empty list of {role, content} objects")
        rendered.append({**m, "content": content})
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        return _error(400, "'chat_template_kwargs' must be an object")
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        # vLLM's `check_generation_prompt`, on the request as sent (a default True
        # add_generation_prompt beside it fails in the template call instead)
        return _error(
            400,
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        )
    try:
        text = lm.tokenizer.apply_chat_template(
            rendered,
            tokenize=False,
            add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)),
            **kwargs,  # as vLLM passes them to the template
        )
    except Exception as exc:  # the template refused these messages (a role it has no turn for)
        return _error(400, f"the chat template cannot render these messages: {exc}")
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _sampling_error(req: _Completion, top_k: int | None) -> Any:
    """vLLM's 400 for a sampling value out of its range, in the order and words of its
    `SamplingParams._verify_args` (the values as resolved, `top_k` as given), or None. A
    negative temperature reached the sampler: a server error."""
    t, s, shaping = req.temperature, req.sampling, req.shaping
    penalty = s["repetition_penalty"]
    checks = (
        *(
            (None, -2 <= value <= 2, f"{name}_penalty must be in [-2, 2], got {value}.")
            for name, value in (("presence", shaping.presence), ("frequency", shaping.frequency))
        ),
        (
            None,
            math.isfinite(penalty),
            f"repetition_penalty must be a finite number, got {penalty}.",
        ),
        (None, penalty > 0, f"repetition_penalty must be greater than zero, got {penalty}."),
        ("temperature", math.isfinite(t), f"temperature must be a finite number, got {t}."),
        ("temperature", t >= 0, f"temperature must be non-negative, got {t}."),
        ("temperature", t <= 2, f"temperature must be in [0, 2], got {t}."),
        ("top_p", 0 < s["top_p"] <= 1, f"top_p must be in (0, 1], got {s['top_p']}."),
        (
            None,
            top_k is None or top_k >= -1,
            f"top_k must be 0 (disable), or at least 1, got {top_k}.",
        ),
        (None, 0 <= s["min_p"] <= 1, f"min_p must be in [0, 1], got {s['min_p']}."),
    )
    for param, ok, message in checks:
        if not ok:
            return _error(400, message, param)
    if t < GREEDY_BELOW and req.n > 1:  # SamplingParams._verify_greedy_sampling
        return _error(400, f"n must be 1 when using greedy sampling, got {req.n}.")
    return None


def _choice(
    lm: LanguageModel,
    req: _Completion,
    index: int,
    done: Finished,
    prompt_scores: Scored | None,
    scores: Any,
) -> dict[str, Any]:
    """One completion choice in vLLM's format: text, finish and stop reasons, log-probs as
    asked (of every generated token, the one that stopped it among them, as vLLM gives
    them: a stop string cuts the text, not the tokens). `scores(g)`: the `Scored` of the
    prompt followed by generated ids g; `prompt_scores`: the prompt's, when known."""
    tok, ids, hidden = lm.tokenizer, req.ids, _hidden(req)
    g = () if hidden else done.ids  # the ids shown
    echoed = ""  # with return_token_ids the ids say it (vLLM)
    if req.echo and not req.with_ids:  # a text prompt as given, token ids decoded (vLLM)
        echoed = req.given if req.given is not None else tok.decode(ids)
    choice: dict[str, Any] = {
        "index": index,
        "text": echoed + ("" if hidden else done.text),
        "logprobs": None,
        "finish_reason": done.finish_reason,
        "stop_reason": done.stop_reason,
    }
    if req.with_ids:
        choice |= {"prompt_token_ids": list(ids), "token_ids": list(done.ids)}
    seq = (ids + list(g)) if req.echo else list(g)
    if req.logprobs is not None and seq:
        start = 0 if req.echo else len(ids)
        choice["logprobs"] = _logprobs(lm, req, ids + list(g), scores(g), start)
    if req.prompt_logprobs is not None:
        sc = prompt_scores if prompt_scores is not None else scores(g)
        choice["prompt_logprobs"] = [None] + [
            {
                str(t): {"logprob": _clamped(lp), "rank": rank, "decoded_token": tok.decode([t])}
                for t, lp, rank in _candidates(sc, n, ids[n + 1], req.prompt_logprobs)
            }
            for n in range(len(ids) - 1)
        ]
    return choice


def _candidates(sc: Scored, n: int, token: int, k: int) -> list[tuple[int, float, int]]:
    """Position n + 1's token, its log-prob and rank, then the k most likely tokens with
    theirs (ranks 1..k), in the order vLLM lists them (a token listed twice: once, where it
    comes first, with its last values, as vLLM builds the dictionary)."""
    top = [(t, lp, r + 1) for r, (t, lp) in enumerate(sc.tops[n][:k])]
    return [(token, sc.lps[n], sc.ranks[n]), *top]


def _token_text(lm: LanguageModel, req: _Completion, t: int) -> str:
    """A token as vLLM's log-probs name it: its text, or `token_id:N` when the request asks
    `return_tokens_as_token_ids`."""
    return f"token_id:{t}" if req.as_ids else str(lm.tokenizer.decode([t]))


def _clamped(lp: float) -> float:
    """A prompt log-prob as vLLM's `clamp_prompt_logprobs` writes it: -inf as -9999."""
    return VLLM_FLOOR if lp == float("-inf") else lp


# the log-prob vLLM writes for -inf (JSON has no infinity), and the floor of a sampled one
VLLM_FLOOR = -9999.0


def _logprobs(
    lm: LanguageModel, req: _Completion, full: list[int], sc: Scored, start: int
) -> dict[str, Any]:
    """vLLM's completion `logprobs` for the tokens full[start:] (`_create_completion_logprobs`):
    each token (text, or `token_id:N`), its log-prob (None for the first token of the
    sequence, which has none), the token and the `logprobs` most likely ones with theirs
    (keyed by their text), and each token's character offset in the concatenated tokens."""
    k = req.logprobs or 0

    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for n in range(start, len(full)):
        token = _token_text(lm, req, full[n])
        if n == 0:
            values.append(None)
            tops.append(None)
        else:
            values.append(max(sc.lps[n - 1], VLLM_FLOOR))
            # a prompt token's list is its prompt log-probs', cut to `logprobs`
            shown_k = min(k, req.prompt_logprobs or 0) if n < len(req.ids) else k
            found = _candidates(sc, n - 1, full[n], shown_k)
            tops.append({_token_text(lm, req, t): max(lp, VLLM_FLOOR) for t, lp, _ in found})
        offsets.append(offsets[-1] + len(tokens[-1]) if tokens else 0)
        tokens.append(token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


class BackgroundServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a thread (tests, benchmarks):
    `with BackgroundServer(app) as url: ...` gives `http://127.0.0.1:PORT`."""

    def __init__(self, app: Any, port: int = 0) -> None:
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
