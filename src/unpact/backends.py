"""From a model spec to a backend: local weights (`unpact.models`) or a served model
(`unpact.remote`). The only module that knows both."""

from __future__ import annotations

import os

from unpact.models import DEFAULT_SPEC, load_model
from unpact.remote import RemoteModel, RemoteSettings, parse_remote_spec
from unpact.types import AnyModel, is_remote_spec, spec_text


def open_model(
    spec: str | os.PathLike[str] = DEFAULT_SPEC,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool | None = None,
    remote: RemoteSettings | None = None,
) -> AnyModel:
    """`load_model`, or for `openai:MODEL@BASE_URL` a `RemoteModel`: a model served by
    vLLM or another OpenAI-compatible server (`unpact.remote`; `remote` says how to talk
    to it). Scoring, generation, judging and attribution accept either."""
    spec = spec_text(spec)
    if is_remote_spec(spec):
        name, url = parse_remote_spec(spec)
        return RemoteModel(name, url, remote or RemoteSettings(), spec=spec)
    return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
