"""From a model spec to a backend: local weights (`unpact.models`) or a served model
(`unpact.remote`). The only module that knows both."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from pydantic import ValidationError

from unpact import models
from unpact.errors import UnpactError
from unpact.models import DEFAULT_SPEC, load_model
from unpact.remote import RemoteModel, RemoteSettings, parse_remote_spec
from unpact.types import AnyModel, describe_errors, is_remote_spec, spec_text


def open_model(
    spec: str | os.PathLike[str] = DEFAULT_SPEC,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool | None = None,
    remote: RemoteSettings | dict[str, Any] | None = None,
) -> AnyModel:
    """`load_model`, or for `openai:MODEL@BASE_URL` a `RemoteModel`: a model served by
    vLLM or another OpenAI-compatible server (`unpact.remote`; `remote` says how to talk
    to it). Scoring, generation, judging and attribution accept either."""
    spec = spec_text(spec)
    if is_remote_spec(spec):
        name, url = parse_remote_spec(spec)
        return RemoteModel(name, url, _remote_settings(remote), spec=spec)
    return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _remote_settings(remote: Any) -> RemoteSettings:
    """`open_model`'s `remote`: RemoteSettings, a mapping of its fields, or None."""
    if remote is None or isinstance(remote, RemoteSettings):
        return remote or RemoteSettings()
    if isinstance(remote, dict):
        try:
            return RemoteSettings(**remote)
        except ValidationError as e:
            raise UnpactError("remote: " + describe_errors(e)) from None
    raise TypeError(f"remote: give RemoteSettings or a mapping, not {type(remote).__name__}")


def model_key(spec: str, remote: RemoteSettings | None = None) -> str:
    """`unpact.models.model_key` (a local model's content), and for a served model its spec
    with what its server says it serves (`RemoteModel.served_root`): one name on one URL
    serves whatever the server was last started with (`--served-model-name model` for each
    checkpoint in turn), and its cached answers must not be read for another. A checkpoint
    overwritten in place under the same path is not seen; a server that names no root
    (OpenAI's API) is keyed by its spec alone."""
    key = models.model_key(spec)
    if not is_remote_spec(spec):
        return key
    lm = open_model(spec, remote=remote)
    assert isinstance(lm, RemoteModel)
    try:
        root = lm.served_root()
    finally:
        lm.close()
    return key if root is None else hashlib.sha256(f"{key}\0{root}".encode()).hexdigest()
