"""A small OpenAI-compatible server for a local model, answering as vLLM's server does.

`unpact serve --model default` serves a local model on 127.0.0.1 with the endpoints
`unpact.remote` uses (`/v1/completions` with `echo`/`logprobs`/`prompt_logprobs`,
`/tokenize`, `/detokenize`, `/v1/models`), in vLLM's reply formats. It is how the remote
backend is tested against real HTTP, and a way to try `openai:MODEL@URL` specs without a
GPU cluster; it is not a production server (vLLM is the thing to use at scale). Like vLLM
it batches what arrives together: scoring requests waiting at the same moment (up to a
token budget) run as one padded forward pass; generation runs one request at a time.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

import torch

from unpact.errors import UnpactError
from unpact.models import LanguageModel
from unpact.scoring import _stop_ids, right_padded
from unpact.types import EncodedPrompt


def _require_web() -> Any:
    try:
        import fastapi
    except ImportError:
        raise UnpactError(
            "serving needs FastAPI and uvicorn: pip install 'unpact[serve]'"
        ) from None
    return fastapi


def prompt_logprobs(lm: LanguageModel, ids: list[int]) -> list[float]:
    """log p(x_t | x_<t) for t >= 1, from one forward pass over the whole sequence."""
    with torch.no_grad():
        inp = torch.tensor([ids], device=lm.device)
        logits = lm.model(input_ids=inp).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, inp[0, 1:, None]).squeeze(-1).tolist()


class ScoreBatcher:
    """Scores token sequences (per-token log-probs and the greedy next token) in batches:
    a worker thread takes whatever requests are waiting, up to `token_budget` padded
    tokens, and runs them through the model in one pass."""

    def __init__(self, lm: LanguageModel, lock: threading.Lock, token_budget: int = 4096):
        self.lm = lm
        self.lock = lock
        self.budget = token_budget
        self.waiting: queue.Queue[tuple[list[int], Future[Any]]] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def score(self, ids: list[int]) -> tuple[list[float], int]:
        done: Future[Any] = Future()
        self.waiting.put((ids, done))
        result: tuple[list[float], int] = done.result()
        return result

    def _work(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while True:
                longest = max(len(ids) for ids, _ in batch)
                try:
                    nxt = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if (len(batch) + 1) * max(longest, len(nxt[0])) > self.budget:
                    self.waiting.put(nxt)  # starts the next batch
                    break
                batch.append(nxt)
            try:
                with self.lock:
                    results = self._run([ids for ids, _ in batch])
                for (_, done), r in zip(batch, results):
                    done.set_result(r)
            except Exception as exc:  # handed to the requests waiting for it
                for _, done in batch:
                    done.set_exception(exc)

    def _run(self, seqs: list[list[int]]) -> list[tuple[list[float], int]]:
        lm = self.lm
        ids, mask = right_padded(seqs)
        with torch.no_grad():
            logits = lm.model(
                input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)
            ).logits.float()
        out = []
        for r, s in enumerate(seqs):
            logp = torch.log_softmax(logits[r, : len(s)], -1)
            lps = logp[:-1].gather(-1, ids[r, 1 : len(s), None].to(lm.device)).squeeze(-1)
            out.append((lps.tolist(), int(logits[r, len(s) - 1].argmax())))
        return out


def make_app(models: LanguageModel | dict[str, LanguageModel], name: str = "default") -> Any:
    """A FastAPI app serving `models` (name -> model; or one model under `name`)."""
    fastapi = _require_web()
    from fastapi.responses import JSONResponse

    from unpact.scoring import generate

    app = fastapi.FastAPI(title="unpact serve", docs_url=None, redoc_url=None)
    served = models if isinstance(models, dict) else {name: models}
    lock = threading.Lock()  # one model call at a time; torch uses every core for it
    batchers = {n: ScoreBatcher(m, lock) for n, m in served.items()}

    def error(status: int, message: str) -> Any:
        return JSONResponse(
            {"object": "error", "message": message, "type": "BadRequestError", "code": status},
            status_code=status,
        )

    def pick(body: dict[str, Any]) -> Any:
        """The model the request names, or the error reply vLLM gives."""
        found = served.get(str(body.get("model")))
        if found is None:
            return None, error(404, f"The model `{body.get('model')}` does not exist.")
        return found, None

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "max_model_len": m.max_length}
                for n, m in served.items()
            ],
        }

    @app.post("/tokenize")
    def tokenize(body: dict[str, Any]) -> Any:
        lm, bad = pick(body)
        if bad is not None:
            return bad
        tok = lm.tokenizer
        if "messages" in body:
            if not lm.has_chat_template:
                return error(400, "this model has no chat template")
            text = tok.apply_chat_template(
                body["messages"],
                tokenize=False,
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
        elif isinstance(body.get("prompt"), str):
            ids = tok(
                body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True))
            )["input_ids"]
        else:
            return error(400, "give 'prompt' (text) or 'messages'")
        return {"tokens": list(ids), "count": len(ids), "max_model_len": lm.max_length}

    @app.post("/detokenize")
    def detokenize(body: dict[str, Any]) -> Any:
        lm, bad = pick(body)
        if bad is not None:
            return bad
        tok = lm.tokenizer
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return error(400, "'tokens' must be a list of token ids")
        return {"prompt": tok.decode(tokens)}

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        lm, bad = pick(body)
        if bad is not None:
            return bad
        tok = lm.tokenizer
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            return error(400, "'prompt' must be text or a non-empty list of token ids")
        max_tokens = int(body.get("max_tokens", 16))
        n = int(body.get("n", 1))
        echo = bool(body.get("echo", False))
        want_logprobs = body.get("logprobs") is not None
        want_prompt_logprobs = body.get("prompt_logprobs") is not None
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        temperature = float(body.get("temperature", 1.0))
        if max_tokens < 0 or n < 1:
            return error(400, "max_tokens must be >= 0 and n >= 1")
        if max_tokens == 0 and not echo:
            return error(400, "max_tokens=0 is only allowed with echo")
        if len(ids) + max_tokens > lm.max_length:
            return error(400, f"prompt + max_tokens exceeds max_model_len {lm.max_length}")
        prompt_lps: list[float] | None = None
        if max_tokens == 0 or (max_tokens == 1 and temperature == 0 and n == 1):
            # Scoring (echo without generation, or prompt_logprobs with one greedy token):
            # batched with whatever other scoring requests are waiting.
            prompt_lps, nxt = batchers[body["model"]].score(ids)
            stop = max_tokens == 0 or nxt in _stop_ids(lm)
            gens: list[tuple[int, ...]] = [()] if stop else [(nxt,)]
        else:
            with lock:
                sampled = temperature > 0
                (outs,) = generate(
                    lm,
                    [EncodedPrompt(tuple(ids), 0, len(ids), "", False)],
                    max_new_tokens=max_tokens,
                    num_samples=n if sampled else 0,
                    temperature=temperature if sampled else 1.0,
                    seed=int(body.get("seed") or 0),
                )
            gens = [g.token_ids for g in outs] * (1 if sampled else n)
        full: dict[tuple[int, ...], list[float]] = {}

        def sequence_lps(g: tuple[int, ...]) -> list[float]:
            """log-probs of ids + g after the first token."""
            if not g and prompt_lps is not None:
                return prompt_lps
            if g not in full:
                with lock:
                    full[g] = prompt_logprobs(lm, ids + list(g))
            return full[g]

        def show(t: int) -> str:
            return f"token_id:{t}" if as_ids else tok.decode([t])

        choices = []
        for index, g in enumerate(gens):
            text = tok.decode(list(g), skip_special_tokens=True)
            choice: dict[str, Any] = {
                "index": index,
                "text": (tok.decode(ids) if echo else "") + text,
                "logprobs": None,
                "finish_reason": "length" if len(g) == max_tokens else "stop",
            }
            seq = (ids + list(g)) if echo else list(g)
            if want_logprobs and seq:
                lps = sequence_lps(g)
                offset = 0 if echo else len(ids)
                values: list[float | None] = [None, *lps] if echo else list(lps[len(ids) - 1 :])
                choice["logprobs"] = {
                    "tokens": [show(t) for t in seq],
                    "token_logprobs": values[: len(seq)],
                    "top_logprobs": None,
                    "text_offset": list(range(offset, offset + len(seq))),
                }
            if want_prompt_logprobs:
                lps = prompt_lps if prompt_lps is not None else sequence_lps(g)
                choice["prompt_logprobs"] = [None] + [
                    {str(t): {"logprob": lp, "rank": None, "decoded_token": tok.decode([t])}}
                    for t, lp in zip(ids[1:], lps)
                ]
            choices.append(choice)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": sum(len(g) for g in gens),
                "total_tokens": len(ids) + sum(len(g) for g in gens),
            },
        }

    return app


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
