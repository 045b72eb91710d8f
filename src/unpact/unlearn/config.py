"""Unlearning settings: typed, with every default in one commented YAML file per method.

`resolve_config(method, file=..., overrides=["lr=2e-5", "beta=0.2"])` starts from
`configs/<method>.yaml`, applies a user's YAML file, then `key=value` overrides (a dotted
key reaches into a section; a bare key that is one of the method's own settings goes to
`settings`, in a file as in an override), and validates the lot: an unknown key or a bad
value is one `UnpactError` naming the key's path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from unpact.errors import UnpactError, check_text
from unpact.files import TOO_DEEP, parser_words, read_text
from unpact.types import PlainInput, Seed, describe_errors, short_repr, unknown_keys
from unpact.unlearn.methods import get_method

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(PlainInput):
    """LoRA adapters (peft) instead of full fine-tuning."""

    r: int = Field(16, gt=0, description="rank of the adapters")
    alpha: int = Field(32, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR),
        description='module names that get adapters; "all-linear" (as peft\'s option): every '
        "linear layer of the blocks, whatever the architecture calls them",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        """`target_modules: all-linear` (peft's spelling, a string) as a list of it."""
        return [value] if isinstance(value, str) else value

    merge: bool = Field(True, description="merge the adapters into the saved model")


MOST_PER_STEP = 100_000


class UnlearnConfig(PlainInput):
    """One unlearning run. `settings` holds the method's own knobs (see its class)."""

    method: str = Field(description="registered method name, e.g. npo_gd")
    epochs: float = Field(5.0, gt=0, description="passes over the forget set (if steps unset)")
    steps: int | None = Field(None, gt=0, description="optimiser steps; overrides epochs")
    # a batch larger than its set takes items again; one of 10**9 (a typo) was a list of
    # 10**9 indices built before the first step, the run silent for as long as it took
    batch_size: int = Field(4, gt=0, le=MOST_PER_STEP, description="forget items per step (global)")
    retain_batch_size: int = Field(
        4, gt=0, le=MOST_PER_STEP, description="retain items per step (global)"
    )
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule after warm-up"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(None, gt=0, description="clip gradients to this norm")
    freeze_embeddings: bool = Field(
        True, description="keep the input embeddings (tied to the LM head on SmolLM2) fixed"
    )
    seed: Seed = Field(0, description="seed of the data order and of any random init")
    save_every: int = Field(20, ge=0, description="checkpoint every N steps (0: never)")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters (peft)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: each step's forward and backward under bf16 autocast (weights and "
        "AdamW states stay float32), as injection's precision; meant for GPUs (not measured "
        "there; on a 2-core CPU with AMX no faster), numbers rounded differently",
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="the method's settings")

    def method_settings(self) -> Any:
        """The method's validated settings object."""
        cls = get_method(self.method)
        if keys := unknown_keys(cls.Settings, self.settings):
            raise UnpactError(f"invalid unlearning config: settings.{keys[0]}: unknown setting")
        try:
            return cls.Settings(**self.settings)
        except ValidationError as e:
            raise UnpactError(_message(e, prefix="settings")) from None


def defaults_path(method: str) -> Path:
    return Path(str(resources.files("unpact.unlearn") / "configs" / f"{method}.yaml"))


def method_defaults(method: str) -> dict[str, Any]:
    get_method(method)  # unknown method: one clear message
    path = defaults_path(method)
    if not path.is_file():
        return {"method": method}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data["method"] = method
    return data


def resolve_config(
    method: str | None = None,
    *,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> UnlearnConfig:
    """Defaults of the method, then a YAML file (or `values`, the same mapping given
    directly), then `key=value` overrides; validated."""
    user: dict[str, Any] = _settings_of(dict(values or {}))
    if file is not None:
        path = Path(file)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise UnpactError(f"config file {path} {what}")
        user = _merge(user, _settings_of(read_yaml_mapping(path)))
    name = method or user.get("method")
    if not name:
        raise UnpactError("no method given: pass --method or set `method:` in the config file")
    if method and user.get("method") not in (None, method):
        raise UnpactError(f"--method {method} but the config file says {user['method']}")
    settings_fields = set(get_method(name).Settings.model_fields)
    # a bare key that is one of the method's own settings goes to `settings`, as with --set
    bare = {k for k in user if k in settings_fields and k not in UnlearnConfig.model_fields}
    if bare:
        user = _merge(
            {k: v for k, v in user.items() if k not in bare},
            {"settings": {k: user[k] for k in sorted(bare)}},
        )
    data = _merge(method_defaults(name), user)
    for item in overrides or []:
        key, value = parse_override(item)
        parts = key.split(".")
        if len(parts) == 1 and key not in UnlearnConfig.model_fields and key in settings_fields:
            parts = ["settings", key]
        if parts[0] not in UnlearnConfig.model_fields:
            known = sorted(set(UnlearnConfig.model_fields) | settings_fields)
            raise UnpactError(f"--set {key}: unknown setting for {name}; known: {', '.join(known)}")
        target = data
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    try:
        config = UnlearnConfig(**data)
    except ValidationError as e:
        raise UnpactError(_message(e)) from None
    # every method setting written out (its class's defaults filled in): the resolved
    # config saved with a run, and what cache keys hash
    settings = config.method_settings().model_dump(mode="json")
    return config.model_copy(update={"settings": settings})


# what a run's record (its config.yaml) says beside the settings: the run's, not a setting
RECORD_KEYS = ("format", "model", "benchmark", "processes")


def _settings_of(given: dict[str, Any]) -> dict[str, Any]:
    """The settings of a config file, or of the config.yaml an `unpact unlearn` run wrote
    (its `format` says so): that file's model, benchmark and process count describe the
    old run (the new one's are --model's, --benchmark's and its launcher's), and were
    refused as unknown settings."""
    if "format" in given and is_unlearn_record(given):
        return {k: v for k, v in given.items() if k not in RECORD_KEYS}
    return given


def parse_override(item: str) -> tuple[str, Any]:
    """`--set key=value` as (key, value): the value read as YAML (`2e-5`, `true`, `null`,
    `[1, 2]`), nothing after `=` as null; one message when there is no `=` or no key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UnpactError(f"--set {item!r}: expected key=value")
    try:
        return key, load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        why = " ".join(str(getattr(exc, "problem", None) or exc or "not a YAML value").split())
        raise UnpactError(
            f"--set {short_repr(item)}: the value after = cannot be read ({why})"
        ) from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
    silently: a second `methods:` block would replace the first). Keys a merge (`<<:`)
    brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the constructor below says so
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {first} and {line})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys; a text nested too deeply for the parser
    (a few hundred levels), or a value its constructors refuse, a `YAMLError` like any
    other unreadable YAML."""
    try:
        loaded = yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader subclass: safe
        _check_aliases(loaded)
        return loaded
    except RecursionError:
        raise yaml.YAMLError(TOO_DEEP) from None
    except ValueError as exc:  # an integer of more digits than Python converts, a date
        # that is none (2024-13-45)
        raise yaml.YAMLError(parser_words(exc)) from None


# the most values a YAML text may hold once its aliases are repeated: a config holds hundreds
MOST_VALUES = 1_000_000


def _check_aliases(loaded: Any) -> None:
    """Refuse a YAML value whose aliases (`*a`, the value `&a` names, repeated) make it
    hold more than MOST_VALUES values, or hold itself: nine levels of nine aliases (a
    "billion laughs") are 387 million strings, which every check and copy of a config
    read one by one past 100 s without an end in sight, and `&a [*a]` is without end."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise yaml.YAMLError(
                "an alias (*name) inside the value it names: a value holding itself"
            )
        open_.add(key)
        inner = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[key] = 1 + sum(map(size, inner))
        open_.discard(key)
        return sizes[key]

    if size(loaded) > MOST_VALUES:
        raise yaml.YAMLError(
            f"its aliases (*name) repeat values into more than {MOST_VALUES:,} of them"
        )


def is_unlearn_record(config: object) -> bool:
    """Whether a folder's config.yaml (read) is the record `unpact unlearn` writes: one
    `method`, not a run's or an audit's `methods`."""
    return isinstance(config, dict) and "method" in config and "methods" not in config


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or one UnpactError saying what is wrong."""
    try:
        loaded = load_yaml(read_text(path))
    except yaml.YAMLError as e:
        raise UnpactError(f"{path}: not valid YAML ({e})") from None
    if loaded is None:  # an empty file: no settings
        return {}
    if not isinstance(loaded, dict):
        raise UnpactError(f"{path}: expected a mapping of settings at the top level")
    check_text(loaded, str(path))
    return loaded


def _message(error: ValidationError, prefix: str = "") -> str:
    return "invalid unlearning config: " + describe_errors(error, prefix)
