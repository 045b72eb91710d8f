"""A request whose client has gone stops its work, as vLLM's server stops it.

vLLM wraps its completion routes in `with_cancellation` (vllm/entrypoints/utils.py): the
handler runs beside a task that waits for the request's `http.disconnect` message, and
when that comes first the handler is cancelled, which aborts the request in the engine.
`unpact serve`'s handlers run in threads (the model is PyTorch, one call at a time on
it), which a task cannot cancel, so a disconnection sets the request's event and the
thread stops at its next check (`check`): when it takes the model (a queued request of a
client that timed out never runs) and between generated tokens (`stopping`; in a batch of
greedy completions, `unpact.serve.batching`, its row alone). Without it a client that gave up (unpact's own remote client retries after 30 s) left its request
running, and its retry queued behind it: the longer requests took, the more of them ran
for nobody."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

_GONE: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "unpact_serve_gone", default=None
)


class Cancelled(Exception):
    """The client of the request being served has disconnected."""


def left(event: threading.Event | None) -> bool:
    """Whether the client whose disconnection event this is has gone (None: no client)."""
    return event is not None and event.is_set()


def gone() -> bool:
    """Whether the client of the request this thread serves has disconnected."""
    return left(_GONE.get())


def current_event() -> threading.Event | None:
    """The disconnection event of the request this thread serves (None outside a request):
    for work another thread does for it (`unpact.serve.batching`)."""
    return _GONE.get()


def check() -> None:
    """Raises `Cancelled` when the client of the request this thread serves has gone."""
    if gone():
        raise Cancelled


@contextmanager
def holding(lock: threading.Lock) -> Iterator[None]:
    """`lock` (the model's), then `check`: a request that waited for the model while its
    client gave up does no work."""
    with lock:
        check()
        yield


def stopping(rows: Sequence[threading.Event | None] | None = None) -> Any:
    """A transformers stopping criterion that ends every row once the client has gone
    (`check` after `generate` then ends the request); until then it stops nothing. With
    `rows` (a batch of requests, each row's client's event), each row once its own client
    has gone, the others going on."""
    from transformers.generation import StoppingCriteria

    class _Gone(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            stop = [gone()] * input_ids.shape[0] if rows is None else [left(e) for e in rows]
            return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    return _Gone()


async def _disconnected(request: Any) -> None:
    """Returns once the request's client has disconnected (its body is read already). A
    layer in front that answers `receive` at once with something else (an ASGI server
    waits for the next event) is asked again after a pause, not in a loop that never
    yields to the server."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def with_cancellation(handler: Callable[[dict[str, Any]], Any]) -> Callable[..., Any]:
    """`handler` (a JSON body → reply, run in a worker thread) as a route that stops it when
    the client disconnects first (vLLM's `with_cancellation`): the thread's event is set,
    `check` raises in it, and the route returns None to nobody."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    async def route(body: dict[str, Any], raw_request: Request) -> Any:
        event = threading.Event()

        def work() -> Any:
            token = _GONE.set(event)
            try:
                return handler(body)
            except Cancelled:
                return None
            finally:
                _GONE.reset(token)  # the worker thread serves other requests next

        task = asyncio.ensure_future(run_in_threadpool(work))
        listener = asyncio.ensure_future(_disconnected(raw_request))
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            listener.cancel()
            return task.result()
        event.set()  # the thread stops at its next check; its result goes nowhere
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return None

    # FastAPI reads the parameters from the signature: the JSON body and the request
    route.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dict[str, Any]
            ),
            inspect.Parameter(
                "raw_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request
            ),
        ]
    )
    route.__name__ = getattr(handler, "__name__", "route")
    route.__doc__ = handler.__doc__
    return route
