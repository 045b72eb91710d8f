"""The run config (SPEC section 8): typed, every field with a default and a one-line doc,
validated before any model loads; a mistake is one `UnpactError` naming the key's path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from unpact import configs as builtin_run_configs
from unpact.attacks import ATTACKS, get_attack
from unpact.attribution import ALPHA, BETA, MAX_WORK
from unpact.data.items import BUILTIN
from unpact.data.sources import load_benchmark
from unpact.errors import UnpactError, check_text
from unpact.judge import JudgeSettings
from unpact.models import DEFAULT_SPEC, DeviceName
from unpact.plugins import load_plugins
from unpact.remote import RemoteSettings
from unpact.types import PlainInput, Seed, is_remote_spec, plain_values
from unpact.unlearn.config import describe_errors, read_yaml_mapping

RUN_FORMAT = 1
DEFAULT_BENCHMARK = "news"  # data.benchmark when the config names none
PAPER_ATTACKS = ("focus_on_key", "probab", "focus_on_key_probab")


# ---------------------------------------------------------------------------- config


class DataSettings(PlainInput):
    """Which items the run uses."""

    benchmark: str = Field(DEFAULT_BENCHMARK, description="built-in benchmark name or a folder")
    general: str | None = Field("general", description="general-knowledge benchmark, or null")
    forget_items: int | None = Field(None, gt=0, description="use only the first N forget items")
    retain_items: int | None = Field(None, gt=0, description="use only the first N retain items")
    general_items: int | None = Field(None, gt=0, description="use only the first N general items")
    holdout_items: int | None = Field(
        None,
        gt=0,
        description="use only the first N holdout items (default: as many as forget items used)",
    )


class InjectSettings(PlainInput):
    """Teach the benchmark to the model first (as MUSE's target models were)."""

    enabled: bool = Field(True, description="inject; false: the model already knows the data")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="InjectConfig fields (lr, max_epochs, ...)"
    )

    @field_validator("settings")
    @classmethod
    def _known(cls, value: dict[str, Any]) -> dict[str, Any]:
        from unpact.inject import InjectConfig, training_precision

        try:
            training_precision(InjectConfig(**value))
        except UnpactError as exc:
            raise ValueError(str(exc).removeprefix("injection settings: ")) from None
        return value


class MethodSpec(PlainInput):
    """One unlearning run: a registered method and changes to its default settings; or an
    already unlearned model (`model`, local or served) to evaluate as it is."""

    method: str | None = Field(None, description="registered method, e.g. npo_kl")
    name: str | None = Field(None, description="label in the results (default: the method)")
    config: dict[str, Any] = Field(
        default_factory=dict, description="UnlearnConfig fields; method knobs under settings"
    )
    model: str | None = Field(
        None,
        description="instead of a method: an unlearned model's spec (folder or openai:...), "
        "evaluated as it is; needs a name",
    )
    sweep: dict[str, list[Any]] | None = Field(
        None,
        description="one setting over several values, e.g. {lr: [5e-6, 1e-5]} or "
        "{settings.gamma: [0, 1, 2]}: one unlearning run per value, named label[key=value]",
    )
    swept: dict[str, Any] | None = Field(
        None, description="set by the runner on each expanded run: {of, key, value}"
    )

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        return _shorthand(data, "method", "a method's name (ga) or a mapping (method: ga, ...)")

    @model_validator(mode="after")
    def _one_source(self) -> MethodSpec:
        if self.sweep is not None:
            if self.model is not None:
                raise ValueError("sweep goes with method, not with an unlearned model")
            if len(self.sweep) != 1 or not next(iter(self.sweep.values())):
                raise ValueError("sweep takes one setting and a non-empty list of values")
        if (self.method is None) == (self.model is None):
            raise ValueError("give either method (to unlearn) or model (already unlearned)")
        if self.model is not None and not self.name:
            raise ValueError("an already unlearned model needs a name")
        if self.model is not None and self.config:
            raise ValueError("config goes with method, not with an already unlearned model")
        return self

    @property
    def label(self) -> str:
        return self.name or self.method or ""

    def expand(self) -> list[MethodSpec]:
        """The runs of a sweep (this one alone if it sweeps nothing)."""
        if not self.sweep:
            return [self]
        ((key, values),) = self.sweep.items()
        runs = []
        for value in values:
            config, node, leaf = _copy_at(self.config, key)
            node[leaf] = value
            runs.append(
                self.model_copy(
                    update={
                        "name": f"{self.label}[{key}={value}]",
                        "config": config,
                        "sweep": None,
                        "swept": {"of": self.label, "key": key, "value": value},
                    }
                )
            )
        return runs


def _shorthand(data: Any, key: str, expected: str) -> Any:
    """A bare name in a list of methods or attacks (`methods: [ga, npo]`) stands for a
    mapping with only that name; anything else but a mapping is refused in words."""
    if isinstance(data, str):
        return {key: data}
    if isinstance(data, dict | PlainInput):
        return data
    raise ValueError(f"expected {expected}, not {type(data).__name__} {data!r}")


def _copy_at(config: dict[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A deep copy of a method config, and the mapping and name that dotted `key` (e.g.
    settings.gamma) points to in the copy (parents created as needed)."""
    copy = json.loads(json.dumps(config))
    *parents, leaf = key.split(".")
    node = copy
    for part in parents:
        node = node.setdefault(part, {})
    return copy, node, leaf


class ModelSpec(PlainInput):
    """A base model of a multi-model run, with the name its results go under."""

    name: str = Field(description="label and sub-folder of this model's results")
    model: str = Field(description="model spec: default, a folder, a hub id, or openai:...")


class AttackSpec(PlainInput):
    name: str = Field(description="registered attack: focus_on_key, probab, quantize, ...")
    settings: dict[str, Any] = Field(default_factory=dict, description="the attack's settings")
    label: str | None = Field(
        None,
        description="its name in the results (default: the attack's); lets one attack run "
        "twice with different settings, e.g. quantize at 8 and at 4 bits",
    )
    control: bool | None = Field(
        None,
        description="also run it on the never-taught reference, as the control of its "
        "recovery (default: yes for the attacks on weights and hidden states)",
    )

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        return _shorthand(data, "name", "an attack's name (probab) or a mapping (name: ...)")

    @property
    def column(self) -> str:
        """Its key in the results (`methods.<m>.recovery.<column>`)."""
        return self.label or self.name

    def controlled(self) -> bool:
        return ATTACKS[self.name].control if self.control is None else self.control


class AttributionSettings(PlainInput):
    unit: Literal["token", "word"] = Field("token", description="attribution unit")
    baseline: Literal["delete", "token", "mask"] = Field(
        "delete", description="how a unit is taken out"
    )
    alpha: float = Field(ALPHA, gt=0, lt=1, description="KeyToken share threshold")
    beta: float = Field(BETA, gt=0, le=1, description="KeyToken sparsity threshold")
    max_work: int = Field(
        MAX_WORK,
        gt=0,
        description="refuse a prompt whose attribution scores more token positions than this "
        "((units + 1) x tokens; the work grows with the square of the prompt)",
    )
    heatmaps: int = Field(4, ge=0, description="forgotten items shown as heatmaps per method")
    gradient: list[Literal["grad_x_input", "integrated_gradients"]] = Field(
        default_factory=list,
        description="gradient attributions to compare with unPact on every forget item",
    )
    ig_steps: int = Field(64, ge=1, description="integrated gradients: midpoints on the path")
    ig_baseline: Literal["mean", "zero", "pad"] = Field(
        "mean", description="integrated gradients: baseline embedding of the content tokens"
    )
    top_k: int = Field(3, ge=1, description="k of the top-k overlap with unPact")
    stability: bool = Field(
        False, description="KeyToken stability across keyword-keeping paraphrases"
    )
    sweep_checks: Literal["all", "default"] = Field(
        "all",
        description="which runs of a swept method get the checks above: all, or only the one "
        "at the method's default value (none if no swept value is the default)",
    )

    @property
    def checks(self) -> bool:
        return bool(self.gradient) or self.stability


# Settings of the attribution checks: outside the attribution stage's cache key.
_CHECK_FIELDS = {
    "max_work",  # a guard: what passes it gives the same numbers
    "heatmaps",
    "gradient",
    "ig_steps",
    "ig_baseline",
    "top_k",
    "stability",
    "sweep_checks",
}


class StatisticsSettings(PlainInput):
    """Confidence intervals and tests that come with every figure."""

    resamples: int = Field(
        1000,
        ge=0,
        le=100_000,  # each is a Python loop over the items; more changes no printed digit
        description="bootstrap resamples over items (0: none)",
    )
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    seed: Seed = Field(0, description="bootstrap seed")
    alpha: float = Field(0.05, gt=0, lt=1, description="McNemar significance level")
    baseline_attack: str = Field("probab", description="attack the others are tested against")


class MembershipSettings(PlainInput):
    """Is each model like one that never learned the forget set? (SPEC 9: membership
    inference, PrivLeak, truth ratio and forget quality, memorisation, fluency.)"""

    enabled: bool = Field(
        True, description="compute them (needs holdout items; skipped with the reason if none)"
    )
    reference: str | None = Field(
        None,
        description="the never-taught reference model's spec, where the run cannot build it "
        "(inject disabled, served models); default: the injection of the retain facts only",
    )
    base: str | None = Field(
        None,
        description="the model before it learned the benchmark, for the Reference attack and "
        "fluency (default: the run's model when the run injects, else the reference: with "
        "inject disabled the run's model is the taught original)",
    )
    k: float = Field(0.4, gt=0, le=1, description="Min-K% and Min-K%++: the share of tokens")
    privleak_attack: str = Field(
        "min_k", description="the attack PrivLeak is computed with (MUSE: Min-K%)"
    )
    gradnorm: bool = Field(
        True, description="GradNorm (a backward pass per 8 texts, the costliest statistic)"
    )
    document_tokens: int = Field(
        512,
        gt=1,
        description="membership inference on documents: each forget and holdout document is "
        "scored on its first N tokens (at most the model's context)",
    )
    documents: int | None = Field(
        None,
        gt=0,
        description="membership inference on documents: at most this many forget and as many "
        "holdout documents (default: those of the run's items, or all where items name none)",
    )
    verbmem_prefix: int = Field(
        32,
        gt=0,
        description="VerbMem: tokens of each forget document given as the prompt (a "
        "benchmark's own probes, verbmem.jsonl, give theirs)",
    )
    verbmem_new_tokens: int = Field(
        48, gt=0, description="VerbMem: greedy tokens compared with the true continuation"
    )
    degenerate_logprob: float = Field(
        -4.0,
        description="fluency: an answer whose mean token log-prob under the untaught base "
        "model is this far below the true answer's (nats) is degenerate",
    )
    degenerate_repetition: float = Field(
        0.4,
        ge=0,
        le=1,
        description="fluency: an answer whose most repeated character run or word covers "
        "more than this share of it is degenerate",
    )

    @field_validator("privleak_attack")
    @classmethod
    def _attack(cls, value: str) -> str:
        from unpact.membership import MIA_ATTACKS

        if value not in MIA_ATTACKS:
            raise ValueError(f"unknown attack {value!r}; choose one of {', '.join(MIA_ATTACKS)}")
        return value


class ReportSettings(PlainInput):
    """What the report shows."""

    dilemma_attack: str | None = Field(
        None,
        description="the recovery on the dilemma plot's y axis: an attack's name, or any "
        "(default: any, the union of the attacks; with one attack, that one)",
    )


EvalDtype = Literal["float32", "bfloat16", "float16"]  # float32 first: the default


class RunConfig(PlainInput):
    """One experiment. Every field has a default except the methods."""

    plugins: list[str] = Field(
        default_factory=list,
        description="Python files (relative to this config) or module names imported first: "
        "the attacks, metrics and methods they define are usable by name below",
    )
    model: str = Field(DEFAULT_SPEC, description="base model spec")
    trust_remote_code: bool = Field(
        False,
        description="run the Python code a checkpoint brings (auto_map in its config.json) "
        "for every model of the run: only for checkpoints you trust",
    )
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template (a file, or the template itself) that every model "
        "of the run uses in place of its own (a checkpoint fine-tuned in another prompt format, as open-unlearning's "
        "TOFU models: docs/audit.md); served models render their server's",
    )
    device: DeviceName = Field(
        "cpu",
        description="where local models run (cpu, cuda, cuda:N, auto): injection, unlearning, "
        "evaluation, attribution, attacks; not part of any cache key",
    )
    dtype: EvalDtype = Field(
        "float32",
        description="the dtype local models are evaluated in (judging, attribution, attacks, "
        "membership inference): bfloat16 halves a large model's memory on a GPU, at the "
        "cost of scores rounded to ~3 digits; training (injection, unlearning, relearning) "
        "keeps float32 weights",
    )
    models: list[ModelSpec] | None = Field(
        None,
        description="several base models, each run into DIR/<name>/ and compared side by side "
        "(replaces model)",
    )
    benchmarks: list[str] | None = Field(
        None, description="a grid: the same run on each benchmark, into DIR/<benchmark>/"
    )
    data: DataSettings = Field(default_factory=DataSettings)
    inject: InjectSettings = Field(default_factory=InjectSettings)
    methods: list[MethodSpec] = Field(min_length=1, description="unlearning runs")
    attacks: list[AttackSpec] = Field(
        default_factory=lambda: [AttackSpec(name=n) for n in PAPER_ATTACKS],
        description="recovery attacks run on every forgotten item",
    )
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    attribution: AttributionSettings = Field(default_factory=AttributionSettings)
    statistics: StatisticsSettings = Field(default_factory=StatisticsSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    membership: MembershipSettings = Field(default_factory=MembershipSettings)
    collapse_threshold: float = Field(
        0.1, ge=0, description="prompt_sensitivity (nats) below which a model ignores the prompt"
    )
    remote: RemoteSettings = Field(
        default_factory=RemoteSettings, description="how to talk to served (openai:...) models"
    )

    @model_validator(mode="after")
    def _expand_sweeps(self) -> RunConfig:
        self.methods = [run for spec in self.methods for run in spec.expand()]
        return self

    def model_specs(self) -> dict[str, str]:
        """Every model the config names, by its key (`model` or `models.N.model`, the
        methods' given models, the membership reference and base)."""
        named: dict[str, str | None] = {"model": self.model} if not self.models else {}
        named |= {f"models.{n}.model": m.model for n, m in enumerate(self.models or [])}
        named |= {f"methods.{n}.model": m.model for n, m in enumerate(self.methods)}
        named |= {f"membership.{k}": getattr(self.membership, k) for k in ("reference", "base")}
        return {key: spec for key, spec in named.items() if spec is not None}


_REAL_SPEC = re.compile(r"((?:muse-news|muse-books|tofu|wmdp)(?:\[[^\]]*\])?:)(.+)", re.S)


def _beside(value: Any, base: Path) -> Any:
    """`value` (a model or benchmark spec) as a path beside the config file when it names
    nothing from the working directory and something there; otherwise as it is."""
    if not isinstance(value, str) or value in BUILTIN or value == DEFAULT_SPEC:
        return value
    match = _REAL_SPEC.fullmatch(value)
    kind, where = match.groups() if match else ("", value)
    try:
        if Path(where).is_absolute() or Path(where).exists() or not (base / where).exists():
            return value
    except OSError:  # a chat template given as text, too long for a file name
        return value
    return kind + str((base / where).resolve())


def _paths_beside(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A config file's relative paths (models, benchmarks, the chat template) are read from
    the working directory; one that names nothing there but a file or folder beside the
    config is read from there (a config kept with its data, run from elsewhere)."""
    data = dict(data)
    for key in ("model", "chat_template"):
        if key in data:
            data[key] = _beside(data[key], base)
    if isinstance(data.get("benchmarks"), list):
        data["benchmarks"] = [_beside(b, base) for b in data["benchmarks"]]
    for key in ("models", "methods"):
        if isinstance(data.get(key), list):
            data[key] = [
                {**m, "model": _beside(m["model"], base)}
                if isinstance(m, dict) and "model" in m
                else m
                for m in data[key]
            ]
    for key, names in (("data", ("benchmark", "general")), ("membership", ("reference", "base"))):
        if isinstance(data.get(key), dict):
            data[key] = {k: _beside(v, base) if k in names else v for k, v in data[key].items()}
    return data


def load_config(source: str | Path | dict[str, Any]) -> RunConfig:
    """Read and validate a run config (a YAML file, a built-in name, or a mapping).

    Any problem is one `UnpactError` naming the key's path, e.g. `methods.1.method`."""
    where = "config"
    if not isinstance(source, (dict, str, os.PathLike)):
        raise TypeError(
            "config: give a RunConfig, a mapping, a YAML file or a built-in config's name ("
            f"{', '.join(builtin_run_configs.names())}), not {type(source).__name__}"
        )
    if isinstance(source, dict):
        data = plain_values(source)  # a config built in Python may hold paths and numpy numbers
        check_text(data, where)
    else:
        path = builtin_run_configs.path(str(source)) or Path(source)
        where = str(path)
        if not path.is_file():
            raise UnpactError(
                f"no run config {source}: not a file and not a built-in one "
                f"({', '.join(builtin_run_configs.names())})"
            )
        data = _paths_beside(read_yaml_mapping(path), path.parent)
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise UnpactError(f"{where}: plugins: a list of .py files or module names")
    load_plugins(plugins, base=None if isinstance(source, dict) else Path(where).parent)
    try:
        config = RunConfig(**data)
    except ValidationError as e:
        raise UnpactError(f"{where}: " + describe_errors(e, unknown="unknown key")) from None
    _check_references(config, where)
    return config


def check_served_dtype(dtype: str, specs: list[str], option: str) -> None:
    """Refuse an evaluation dtype when every model is served: a served model's dtype is
    its server's, and results.json would name one nobody evaluated in."""
    if dtype != "float32" and specs and all(map(is_remote_spec, specs)):
        raise UnpactError(
            f"{option}: {dtype} applies to local models, and every model of this run is served "
            "(a served model's dtype is its server's: vLLM --dtype); leave it out"
        )


def _check_references(config: RunConfig, where: str) -> None:
    """The names a config refers to exist and the settings under them are valid."""
    _check_benchmarks(config, where)
    specs = config.model_specs()
    if config.chat_template is not None:
        from unpact.models import read_chat_template

        try:
            read_chat_template(config.chat_template)
        except UnpactError as e:
            raise UnpactError(f"{where}: chat_template: {e}") from None
        for key, spec in specs.items():
            if is_remote_spec(spec):
                raise UnpactError(
                    f"{where}: chat_template: {key} ({spec}) is served and renders its "
                    "server's template; start the server with --chat-template FILE, or "
                    "leave chat_template out"
                )
    check_served_dtype(config.dtype, list(specs.values()), f"{where}: dtype")
    bases = _check_models(config, where)
    names = _check_attacks(config, where)
    shown = config.report.dilemma_attack
    if shown is not None and shown != "any" and shown not in names:
        raise UnpactError(
            f"{where}: report.dilemma_attack: {shown!r} is not one of this run's attacks "
            f"({', '.join(sorted(names)) or 'none'}) or any"
        )
    baseline = config.statistics.baseline_attack
    # its default is let be, as written by the run's own config.yaml (every key resolved):
    # a run without probab tests no attack against a baseline
    default = StatisticsSettings.model_fields["baseline_attack"].default
    if baseline != default and baseline not in names:
        raise UnpactError(
            f"{where}: statistics.baseline_attack: {baseline!r} is not one of this run's "
            f"attacks ({', '.join(sorted(names)) or 'none'})"
        )
    llm = config.judge.llm
    if config.judge.kind == "llm" and llm is None:
        raise UnpactError(f"{where}: judge.llm: needed when judge.kind is llm")
    if (
        config.judge.kind == "llm"
        and llm
        and llm.api_key_env
        and not os.environ.get(llm.api_key_env)
    ):
        # said now, not at the first judging, after the injection
        raise UnpactError(
            f"{where}: judge.llm.api_key_env: ${llm.api_key_env}, where the LLM judge reads "
            "its key, is not set (null: an endpoint without a key)"
        )
    _check_served(config, where, bases)


def _check_benchmarks(config: RunConfig, where: str) -> None:
    """Every benchmark loads, and a grid's benchmarks have different names."""
    if config.benchmarks and "benchmark" in config.data.model_fields_set:
        _check_replaced(
            "data.benchmark", config.data.benchmark, config.benchmarks, where, DEFAULT_BENCHMARK
        )
    benchmarks = [("data.benchmark", config.data.benchmark), ("data.general", config.data.general)]
    benchmarks += [(f"benchmarks.{n}", b) for n, b in enumerate(config.benchmarks or [])]
    grid_names: set[str] = set()
    for key, name in benchmarks:
        if name is None:
            continue
        try:
            bench = load_benchmark(name)
        except UnpactError as e:
            raise UnpactError(f"{where}: {key}: {e}") from None
        loaded = bench.name
        if key != "data.general":
            _check_splits(config, f"{where}: {key}", bench)
        if key.startswith("benchmarks."):
            if loaded in grid_names:
                raise UnpactError(f"{where}: {key}: a second benchmark named {loaded!r}")
            grid_names.add(loaded)


def _check_splits(config: RunConfig, where: str, bench: Any) -> None:
    """A benchmark to unlearn has forget items, and retain items when a method reads them
    (said before the injection, not after it)."""
    from unpact.unlearn.methods import METHODS

    if not bench.split("forget"):
        raise UnpactError(f"{where}: benchmark {bench.name} has no forget items")
    if bench.split("retain"):
        return
    for n, spec in enumerate(config.methods):
        cls = METHODS.get(spec.method or "")
        if cls is not None and cls.uses_retain:
            raise UnpactError(
                f"{where}: methods.{n}: {spec.method} needs retain items; {bench.name} has none"
            )


def _check_replaced(key: str, given: str, grid: list[str], where: str, default: str) -> None:
    """A model or benchmark written beside the list that replaces it (`models`,
    `benchmarks`) must be in that list: the run would silently leave it out. Its default
    value is let be (a line kept from a config copied as a start, as the built-in grids
    write `model: default`)."""
    if given != default and given not in grid:
        lists = "models" if key == "model" else "benchmarks"
        raise UnpactError(
            f"{where}: {key}: {given!r} is not run: {lists} replaces it; add it to {lists}, "
            f"or leave {key} out"
        )


def _check_models(config: RunConfig, where: str) -> list[tuple[str, str]]:
    """The base models' and the methods' specs and settings; returns (key, spec) of the
    base models."""
    from unpact.unlearn.config import resolve_config

    bases = [("model", config.model)]
    if config.models:
        bases = [(f"models.{n}.model", m.model) for n, m in enumerate(config.models)]
        if "model" in config.model_fields_set:
            _check_replaced("model", config.model, [b for _, b in bases], where, DEFAULT_SPEC)
        if len({m.name for m in config.models}) < len(config.models):
            raise UnpactError(f"{where}: models: two models share a name")
        for n, m in enumerate(config.models):
            _check_folder_name(m.name, f"{where}: models.{n}.name")
    served = [key for key, base in bases if is_remote_spec(base)]
    for key, base in bases:
        _check_spec(base, f"{where}: {key}")
    for key in ("reference", "base"):
        named = getattr(config.membership, key)
        if named is not None:
            _check_spec(named, f"{where}: membership.{key}")
    labels: set[str] = set()
    for n, spec in enumerate(config.methods):
        if spec.model is not None:
            _check_spec(spec.model, f"{where}: methods.{n}.model")
        elif served:
            raise UnpactError(
                f"{where}: methods.{n}: {served[0]} is a served model, and unlearning needs "
                "local weights; give served unlearned models as `model:` entries instead"
            )
        try:
            if spec.method is not None:
                resolve_config(spec.method, values=spec.config)
        except UnpactError as e:
            raise UnpactError(f"{where}: methods.{n}: {e}") from None
        if spec.label in labels:
            raise UnpactError(f"{where}: methods.{n}.name: {spec.label!r} is used twice")
        _check_folder_name(spec.label, f"{where}: methods.{n}.name")
        if spec.label in RESERVED_MODEL_NAMES:
            raise UnpactError(
                f"{where}: methods.{n}.name: {spec.label!r} names the run's own "
                f"{spec.label} model (models/{spec.label}, `references`); choose another name"
            )
        labels.add(spec.label)
    return bases


# the run's own models: their folders under models/ and their keys under `references`
RESERVED_MODEL_NAMES = ("original", "retrained")


def _check_folder_name(name: str, where: str) -> None:
    """A name that becomes a folder of the run (models/<method>, DIR/<model>) is one plain
    path component: nothing that leaves the run directory or hides from a listing."""
    bad = (
        not name.strip()
        or name.startswith(".")  # . and .. among them
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        raise UnpactError(
            f"{where}: {name!r} cannot name a folder of the run (it becomes models/<name>): "
            "use letters, digits and punctuation other than / and \\, not starting with '.'"
        )


def _check_attacks(config: RunConfig, where: str) -> set[str]:
    """Every attack is registered, listed once, with valid settings; returns their names."""
    names: set[str] = set()
    for n, attack in enumerate(config.attacks):
        if attack.name not in ATTACKS:
            raise UnpactError(
                f"{where}: attacks.{n}.name: unknown attack {attack.name!r}; "
                f"choose from {', '.join(sorted(ATTACKS))}"
            )
        try:
            made = get_attack(attack.name, attack.settings)
        except UnpactError as e:
            raise UnpactError(f"{where}: attacks.{n}.settings: {e}") from None
        if "general" in made.needs_splits and config.data.general is None:
            raise UnpactError(
                f"{where}: attacks.{n}: {attack.name} reads general-knowledge items, and "
                "data.general is null (name a general benchmark, or change its settings)"
            )
        if attack.column in names:
            what = "label" if attack.label else "name"
            raise UnpactError(
                f"{where}: attacks.{n}.{what}: {attack.column!r} is listed twice"
                + ("" if attack.label else "; give each a label to run it twice")
            )
        if attack.column == "any":
            raise UnpactError(f"{where}: attacks.{n}.label: 'any' names the union of attacks")
        names.add(attack.column)
    return names


def _check_served(config: RunConfig, where: str, bases: list[tuple[str, str]]) -> None:
    """What a served model cannot do: be taught, be fine-tuned, mask attention."""
    served = [key for key, base in bases if is_remote_spec(base)]
    if served and config.inject.enabled:
        raise UnpactError(
            f"{where}: inject.enabled: {served[0]} is a served model and injection trains "
            "weights; set inject.enabled: false (the served model must know the data already)"
        )
    specs = [b for _, b in bases] + [m.model or "" for m in config.methods]
    served_any = [b for b in specs if is_remote_spec(b)]
    for n, attack in enumerate(config.attacks):
        if served_any and ATTACKS[attack.name].changes_weights:
            raise UnpactError(
                f"{where}: attacks.{n}: {attack.name} needs the model's weights, and "
                f"{served_any[0]} is served; run it on local models"
            )
    if served_any and config.attribution.baseline == "mask":
        raise UnpactError(
            f"{where}: attribution.baseline: 'mask' cannot be asked of a served model; "
            "use delete or token"
        )


def _check_spec(spec: str, where: str) -> None:
    """A served spec parses; a local one names something loadable (checked without
    loading: a mistyped second model is refused before the first one loads)."""
    from unpact.models import check_spec
    from unpact.remote import parse_remote_spec

    try:
        if is_remote_spec(spec):
            parse_remote_spec(spec)
        else:
            check_spec(spec)
    except UnpactError as e:
        raise UnpactError(f"{where}: {e}") from None
