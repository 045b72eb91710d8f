"""A small OpenAI-compatible server for a local model, answering as vLLM's server does.

`unpact serve --model default` serves a local model on 127.0.0.1 with the endpoints
`unpact.remote` uses (`/v1/completions` with `echo`/`logprobs`/`prompt_logprobs`,
`/tokenize`, `/detokenize`, `/v1/models`), in vLLM's reply formats. It is how the remote
backend is tested against real HTTP, and a way to try `openai:MODEL@URL` specs without a
GPU cluster; it is not a production server (one model call at a time, no batching across
requests; vLLM is the thing to use at scale).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import torch

from unpact.errors import UnpactError
from unpact.models import EncodedPrompt, LanguageModel


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


def make_app(lm: LanguageModel, name: str = "default") -> Any:
    """A FastAPI app serving `lm` under the model name `name`."""
    fastapi = _require_web()
    from fastapi.responses import JSONResponse

    from unpact.scoring import generate

    app = fastapi.FastAPI(title="unpact serve", docs_url=None, redoc_url=None)
    tok = lm.tokenizer
    lock = threading.Lock()  # one model call at a time; torch uses every core for it

    def error(status: int, message: str) -> Any:
        return JSONResponse(
            {"object": "error", "message": message, "type": "BadRequestError", "code": status},
            status_code=status,
        )

    def unknown(body: dict[str, Any]) -> Any:
        if body.get("model") != name:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        return None

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "max_model_len": lm.max_length}],
        }

    @app.post("/tokenize")
    def tokenize(body: dict[str, Any]) -> Any:
        if (bad := unknown(body)) is not None:
            return bad
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
        if (bad := unknown(body)) is not None:
            return bad
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return error(400, "'tokens' must be a list of token ids")
        return {"prompt": tok.decode(tokens)}

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        if (bad := unknown(body)) is not None:
            return bad
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
        with lock:
            gens: list[tuple[int, ...]] = [()] * n
            if max_tokens > 0:
                enc = EncodedPrompt(tuple(ids), 0, len(ids), "", False)
                sampled = temperature > 0
                (outs,) = generate(
                    lm,
                    [enc],
                    max_new_tokens=max_tokens,
                    num_samples=n if sampled else 0,
                    temperature=temperature if sampled else 1.0,
                    seed=int(body.get("seed") or 0),
                )
                gens = [g.token_ids for g in outs] * (1 if sampled else n)
            need_scores = want_prompt_logprobs or (echo and want_logprobs)
            scored = (
                {g: prompt_logprobs(lm, ids + list(g)) for g in set(gens)} if need_scores else {}
            )

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
                lps = scored.get(g) or prompt_logprobs(lm, ids + list(g))
                offset = 0 if echo else len(ids)
                values: list[float | None] = [None, *lps] if echo else list(lps[len(ids) - 1 :])
                choice["logprobs"] = {
                    "tokens": [show(t) for t in seq],
                    "token_logprobs": values[: len(seq)],
                    "top_logprobs": None,
                    "text_offset": list(range(offset, offset + len(seq))),
                }
            if want_prompt_logprobs:
                lps = scored[g]
                choice["prompt_logprobs"] = [None] + [
                    {str(t): {"logprob": lp, "rank": None, "decoded_token": tok.decode([t])}}
                    for t, lp in zip(ids[1:], lps)
                ]
            choices.append(choice)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
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
