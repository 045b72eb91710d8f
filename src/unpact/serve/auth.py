"""`unpact serve --api-key`: vLLM's `--api-key`, as its server checks it.

The definition is vLLM's `AuthenticationMiddleware` (vllm/entrypoints/openai/server_utils.py):
every route the app registers is guarded but the public ones (here `/health` and the
OpenAPI schema; vLLM's list adds routes this app does not have), guarded by its path's
prefix, with vLLM's floor `/v1`, `/v2`, `/inference`, `/cohere` always among them. A
guarded request must carry `Authorization: Bearer KEY` (the scheme in any case) with one of
the keys, compared by SHA-256 digest in constant time; else the reply is vLLM's 401
`{"error": "Unauthorized"}`. CORS preflights (OPTIONS) and paths under no guarded prefix
pass (the latter to their 404).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from unpact.errors import UnpactError, unsendable

# routes answered without a key (vLLM's PUBLIC_ENDPOINTS, of which this app has these)
PUBLIC = ("/health", "/ping", "/load", "/version", "/metrics", "/docs", "/redoc", "/openapi.json")
# always guarded, whatever the routes (vLLM's MIN_GUARDED_PREFIXES)
FLOOR = ("/v1", "/v2", "/inference", "/cohere")


def check_keys(keys: str | Sequence[str], option: str = "--api-key") -> list[str]:
    """The keys (one given as a string: that one), each refused in words when a client
    could not send it as a Bearer token (empty, a space, or a character an HTTP header
    cannot carry); `option` is where they were given."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    for n, key in enumerate(keys):
        bad = unsendable(key) or next(((i, c) for i, c in enumerate(key) if c == " "), None)
        if not key or bad is not None:
            what = f"holds {bad[1]!a}" if bad is not None else "is empty"
            raise UnpactError(
                f"{option} (number {n + 1}) {what}: a key is printable ASCII without spaces, "
                "as an HTTP Authorization header carries it"
            )
    return keys


def _public(path: str) -> bool:
    """Is `path` a public endpoint, exactly or below it (not merely sharing its letters)?"""
    return any(path == p or path.startswith(p + "/") for p in PUBLIC)


def guarded_prefixes(routes: Sequence[Any]) -> tuple[str, ...]:
    """The prefixes a key guards: the floor, and each non-public route's path up to its
    first parameter (vLLM's `build_guarded_prefixes`)."""
    found = set(FLOOR)
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str) and not _public(path):
            found.add(path.split("{", 1)[0] or "/")
    return tuple(sorted(found))


class ApiKeys:
    """Pure ASGI middleware refusing a request under one of the `guarded` prefixes
    (`guarded_prefixes`) without one of `keys` (checked by `check_keys`); see the module
    doc."""

    def __init__(self, app: Any, keys: Sequence[str], guarded: tuple[str, ...]) -> None:
        from starlette.responses import JSONResponse

        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.guarded = guarded
        self.refusal = JSONResponse({"error": "Unauthorized"}, status_code=401)

    def allowed(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        match = False
        for d in self.digests:  # every key compared, whichever matches
            match |= secrets.compare_digest(digest, d)
        return match

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            # the first Authorization header, as starlette's Headers.get reads it
            given = next(
                (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
            )
            if path.startswith(self.guarded) and not self.allowed(given):
                await self.refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
