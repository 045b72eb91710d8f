"""The experiment runner (SPEC section 8): a config, its stages, cached artefacts, results.

`run(config, out)` (CLI: `unpact run CONFIG.yaml --out DIR`) does the paper end to end:

1. data: the benchmark, or a subset of it (the first N items of each split);
2. original model: the base model with the benchmark's facts injected (`unpact.inject`);
3. unlearning: one run per configured method (`unpact.unlearn`);
4. evaluation: every item's greedy answer (or, for multiple choice, the highest-LP option)
   and its verdict, for the original and every unlearned model;
5. attribution: unPact on every forget item under the original and every unlearned model;
6. attacks: every configured attack on every forgotten item;
7. results: per-item records, the metrics as functions of them, the report.

Every stage's artefact is cached under `cache_dir` by a hash of what it depends on (model,
data, settings) and written atomically, so an interrupted run redoes only what was not
finished (an interrupted unlearning run resumes from its last checkpoint) and ends with
the same numbers. The run directory gets `config.yaml` (resolved), `results.json`,
`results.csv`, `items.jsonl`, `models/` (links to the safetensors models) and `report.html`;
`results.json` is written last, so a directory holding it is a finished run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from unpact import configs as builtin_run_configs
from unpact.attacks import ATTACKS, AttackContext, get_attack
from unpact.attribution import (
    ALPHA,
    BETA,
    Attribution,
    attribute_many,
    contribution_similarity,
    keytoken_similarity,
    keyword_units,
)
from unpact.data.items import Benchmark, QAItem, load_benchmark, write_folder
from unpact.errors import UnpactError
from unpact.judge import JudgeSettings, answer_items
from unpact.metrics import ItemRecord
from unpact.models import AnyModel, LanguageModel, cache_root, open_model
from unpact.plugins import load_plugins
from unpact.remote import RemoteSettings, is_remote_spec
from unpact.results import (
    csv_text,
    finite,
    markdown_table,
    method_metrics,
    recovery_columns,
    results_table,
)
from unpact.unlearn.config import describe_errors, read_yaml_mapping

RUN_FORMAT = 1
PAPER_ATTACKS = ("focus_on_key", "probab", "focus_on_key_probab")


# ---------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    """Which items the run uses."""

    benchmark: str = Field("news", description="built-in benchmark name or a folder")
    general: str | None = Field("general", description="general-knowledge benchmark, or null")
    forget_items: int | None = Field(None, gt=0, description="use only the first N forget items")
    retain_items: int | None = Field(None, gt=0, description="use only the first N retain items")
    general_items: int | None = Field(None, gt=0, description="use only the first N general items")


class InjectSettings(_Strict):
    """Teach the benchmark to the model first (as MUSE's target models were)."""

    enabled: bool = Field(True, description="inject; false: the model already knows the data")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="InjectConfig fields (lr, max_epochs, ...)"
    )

    @field_validator("settings")
    @classmethod
    def _known(cls, value: dict[str, Any]) -> dict[str, Any]:
        from unpact.inject import InjectConfig, training_precision

        known = {f.name for f in fields(InjectConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown injection setting(s) {', '.join(unknown)}")
        try:
            training_precision(InjectConfig(**value))
        except UnpactError as exc:
            raise ValueError(str(exc)) from None
        return value


class MethodSpec(_Strict):
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


def _copy_at(config: dict[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A deep copy of a method config, and the mapping and name that dotted `key` (e.g.
    settings.gamma) points to in the copy (parents created as needed)."""
    copy = json.loads(json.dumps(config))
    *parents, leaf = key.split(".")
    node = copy
    for part in parents:
        node = node.setdefault(part, {})
    return copy, node, leaf


class ModelSpec(_Strict):
    """A base model of a multi-model run, with the name its results go under."""

    name: str = Field(description="label and sub-folder of this model's results")
    model: str = Field(description="model spec: default, a folder, a hub id, or openai:...")


class AttackSpec(_Strict):
    name: str = Field(description="registered attack: focus_on_key, probab, ...")
    settings: dict[str, Any] = Field(default_factory=dict, description="the attack's settings")


class AttributionSettings(_Strict):
    unit: Literal["token", "word"] = Field("token", description="attribution unit")
    baseline: Literal["delete", "token", "mask"] = Field(
        "delete", description="how a unit is taken out"
    )
    alpha: float = Field(ALPHA, gt=0, lt=1, description="KeyToken share threshold")
    beta: float = Field(BETA, gt=0, le=1, description="KeyToken sparsity threshold")
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
    "heatmaps",
    "gradient",
    "ig_steps",
    "ig_baseline",
    "top_k",
    "stability",
    "sweep_checks",
}


class StatisticsSettings(_Strict):
    """Confidence intervals and tests that come with every figure."""

    resamples: int = Field(1000, ge=0, description="bootstrap resamples over items (0: none)")
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    seed: int = Field(0, description="bootstrap seed")
    alpha: float = Field(0.05, gt=0, lt=1, description="McNemar significance level")
    baseline_attack: str = Field("probab", description="attack the others are tested against")


class RunConfig(_Strict):
    """One experiment. Every field has a default except the methods."""

    plugins: list[str] = Field(
        default_factory=list,
        description="Python files (relative to this config) or module names imported first: "
        "the attacks, metrics and methods they define are usable by name below",
    )
    model: str = Field("default", description="base model spec")
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


def load_config(source: str | Path | dict[str, Any]) -> RunConfig:
    """Read and validate a run config (a YAML file, a built-in name, or a mapping).

    Any problem is one `UnpactError` naming the key's path, e.g. `methods.1.method`."""
    where = "config"
    if isinstance(source, dict):
        data = source
    else:
        path = builtin_run_configs.path(str(source)) or Path(source)
        where = str(path)
        if not path.is_file():
            raise UnpactError(
                f"no run config {source}: not a file and not a built-in one "
                f"({', '.join(builtin_run_configs.names())})"
            )
        data = read_yaml_mapping(path)
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


def _check_references(config: RunConfig, where: str) -> None:
    """The names a config refers to exist and the settings under them are valid."""
    from unpact.unlearn.config import resolve_config

    benchmarks = [("data.benchmark", config.data.benchmark), ("data.general", config.data.general)]
    benchmarks += [(f"benchmarks.{n}", b) for n, b in enumerate(config.benchmarks or [])]
    grid_names: set[str] = set()
    for key, name in benchmarks:
        if name is None:
            continue
        try:
            loaded = load_benchmark(name).name
        except UnpactError as e:
            raise UnpactError(f"{where}: {key}: {e}") from None
        if key.startswith("benchmarks."):
            if loaded in grid_names:
                raise UnpactError(f"{where}: {key}: a second benchmark named {loaded!r}")
            grid_names.add(loaded)
    bases = [("model", config.model)]
    if config.models:
        bases = [(f"models.{n}.model", m.model) for n, m in enumerate(config.models)]
        if len({m.name for m in config.models}) < len(config.models):
            raise UnpactError(f"{where}: models: two models share a name")
    served = [key for key, base in bases if is_remote_spec(base)]
    for key, base in bases:
        _check_spec(base, f"{where}: {key}")
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
        labels.add(spec.label)
    names: set[str] = set()
    for n, attack in enumerate(config.attacks):
        if attack.name not in ATTACKS:
            raise UnpactError(
                f"{where}: attacks.{n}.name: unknown attack {attack.name!r}; "
                f"choose from {', '.join(sorted(ATTACKS))}"
            )
        try:
            get_attack(attack.name, attack.settings)
        except UnpactError as e:
            raise UnpactError(f"{where}: attacks.{n}.settings: {e}") from None
        if attack.name in names:
            raise UnpactError(f"{where}: attacks.{n}.name: {attack.name!r} is listed twice")
        names.add(attack.name)
    if config.judge.kind == "llm" and config.judge.llm is None:
        raise UnpactError(f"{where}: judge.llm: needed when judge.kind is llm")
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
                f"{where}: attacks.{n}: {attack.name} fine-tunes the model's weights, and "
                f"{served_any[0]} is served; run it on local models"
            )
    if any(is_remote_spec(b) for b in specs) and config.attribution.baseline == "mask":
        raise UnpactError(
            f"{where}: attribution.baseline: 'mask' cannot be asked of a served model; "
            "use delete or token"
        )


def _check_spec(spec: str, where: str) -> None:
    from unpact.remote import parse_remote_spec

    if is_remote_spec(spec):
        try:
            parse_remote_spec(spec)
        except UnpactError as e:
            raise UnpactError(f"{where}: {e}") from None


# ----------------------------------------------------------------------- the cache


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Stage:
    """A cached artefact: rows of JSON under `cache_dir/kind/key.jsonl`."""

    def __init__(self, cache: Path, kind: str, key: str) -> None:
        self.path = cache / kind / f"{key}.jsonl"

    def done(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path)

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _atomic_text(self.path, _jsonl(rows))
        return rows


# ------------------------------------------------------------------------ the stages


def _subset(bench: Benchmark, data: DataSettings, cache: Path) -> Benchmark:
    """The first N items of each limited split, as a benchmark folder in the cache."""
    limits = {"forget": data.forget_items, "retain": data.retain_items}
    if not any(limits.values()):
        return bench
    kept: list[QAItem] = []
    for split in ("forget", "retain", "general"):
        items = bench.split(split)
        kept += items[: limits.get(split) or len(items)]
    docs = {i.document for i in kept}
    documents = [d for d in bench.documents if d.id in docs]
    key = _hash([i.to_dict() for i in kept], [d.to_dict() for d in documents])
    folder = cache / "subsets" / f"{bench.name}-{key}"
    if not (folder / "qa.jsonl").is_file():
        tmp = folder.with_name(f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}")
        write_folder(tmp, kept, documents)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    return Benchmark(bench.name, kept, documents, folder)


def _evaluate(
    lm: AnyModel, items: list[QAItem], judge: JudgeSettings, label: str
) -> list[dict[str, Any]]:
    """Per item: the model's answer and whether the judge accepts it."""
    return [
        {"id": i.id, "output": output, "correct": ok}
        for i, (output, ok) in zip(items, answer_items(lm, items, judge, label))
    ]


def _attribute(
    lm: AnyModel, items: list[QAItem], settings: AttributionSettings
) -> list[dict[str, Any]]:
    records = attribute_many(
        lm,
        [i.question for i in items],
        [i.answer for i in items],
        unit=settings.unit,
        baseline=settings.baseline,
        alpha=settings.alpha,
        beta=settings.beta,
        progress=True,
    )
    return [{"id": i.id, **r.to_dict()} for i, r in zip(items, records)]


def _attribution_checks(
    lm: AnyModel,
    items: list[QAItem],
    unpact: dict[str, dict[str, Any]],
    settings: AttributionSettings,
) -> list[dict[str, Any]]:
    """Per forget item: each gradient attribution's agreement with unPact (Spearman, top-k
    overlap) and the KeyTokens' stability across paraphrases (Jaccard of their texts)."""
    from unpact.attacks import PARAPHRASES
    from unpact.gradient import check_unpact

    rows: list[dict[str, Any]] = [{"id": i.id} for i in items]
    records = [Attribution.from_dict(unpact[i.id]) for i in items]
    for method in settings.gradient:
        if not isinstance(lm, LanguageModel):
            raise UnpactError(f"{method} needs the model's weights; {lm.spec} is served")
        found = check_unpact(
            lm,
            records,
            method,
            steps=settings.ig_steps,
            ig_baseline=settings.ig_baseline,
            top_k=settings.top_k,
            progress=True,
        )
        for row, check in zip(rows, found, strict=True):
            row[method] = {k: check[k] for k in ("scores", "spearman", "top_k_overlap")}
    if settings.stability:
        variants = [
            t.format(question=i.question, keywords=", ".join(i.keywords) or i.question)
            for i in items
            for t in PARAPHRASES
        ]
        records = attribute_many(
            lm,
            variants,
            [i.answer for i in items for _ in PARAPHRASES],
            unit=settings.unit,
            baseline=settings.baseline,
            alpha=settings.alpha,
            beta=settings.beta,
        )
        for n, row in enumerate(rows):
            base = _key_set(Attribution.from_dict(unpact[row["id"]]).key_token_texts)
            mine = records[n * len(PARAPHRASES) : (n + 1) * len(PARAPHRASES)]
            row["stability"] = [_jaccard(base, _key_set(r.key_token_texts)) for r in mine]
            row["paraphrase_key_tokens"] = [r.key_token_texts for r in mine]
    return rows


def _at_default(spec: MethodSpec) -> bool:
    """Whether a swept run's value is what its method would use without the sweep."""
    from unpact.unlearn.config import resolve_config

    assert spec.method is not None and spec.swept is not None
    without, node, leaf = _copy_at(spec.config, spec.swept["key"])
    node.pop(leaf, None)
    swept = resolve_config(spec.method, values=spec.config).model_dump(mode="json")
    return swept == resolve_config(spec.method, values=without).model_dump(mode="json")


def _key_set(texts: list[str]) -> set[str]:
    return {t.strip().lower() for t in texts if t.strip()}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else math.nan


def checks_summary(rows: list[dict[str, Any]], gradient: list[str]) -> dict[str, Any]:
    """Means over forget items of a model's attribution checks (NaNs left out)."""

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None and math.isfinite(v)]
        return sum(kept) / len(kept) if kept else None

    out: dict[str, Any] = {}
    for method in gradient:
        out[f"spearman.{method}"] = mean([r[method]["spearman"] for r in rows])
        out[f"top_k_overlap.{method}"] = mean([r[method]["top_k_overlap"] for r in rows])
    if rows and "stability" in rows[0]:
        per_item = [mean(r["stability"]) for r in rows]
        out["keytoken_stability"] = mean([v for v in per_item if v is not None])
    return out


def _link_model(src: Path, dst: Path) -> None:
    """`dst` gets the files of the model folder `src`: hard links (no copy) where the file
    system allows, copies otherwise; renamed into place when complete (a re-run relinks, so
    a changed method's new model replaces the old one)."""
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


# ----------------------------------------------------------------------- the result


@dataclass
class RunResult:
    """What a run produced: its directory, the results document and the per-item records."""

    out: Path
    results: dict[str, Any]
    records: list[ItemRecord]

    @property
    def report(self) -> Path:
        return self.out / "report.html"


def _attribution_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    a = Attribution.from_dict(record)
    return {
        "units": [u.text for u in a.units],
        "contributions": a.contributions,
        "key_tokens": a.key_tokens,
        "prompt_sensitivity": a.prompt_sensitivity,
        "lp": a.lp,
    }


# ------------------------------------------------------------------------ the runner


def run(
    config: RunConfig | str | Path | dict[str, Any],
    out: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Any = None,
) -> RunResult:
    """Run an experiment end to end into `out`; cached stages are reused (see the module
    docstring). `log(text)` receives one line per stage (default: silent)."""
    from unpact.inject import InjectConfig, inject
    from unpact.inject import cache_key as inject_key
    from unpact.unlearn.config import resolve_config
    from unpact.unlearn.loop import unlearn

    say = log or (lambda text: None)
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    out = Path(out)
    if cfg.models or cfg.benchmarks:
        return _run_grid(cfg, out, cache_dir, progress, say)
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "stages"
    began = time.perf_counter()
    if (out / "results.json").is_file():
        (out / "results.json").unlink()  # re-running re-derives the results
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump(mode="json")
    _atomic_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    # 1. data
    bench = _subset(load_benchmark(cfg.data.benchmark), cfg.data, cache)
    general = load_benchmark(cfg.data.general).items if cfg.data.general else []
    general = general[: cfg.data.general_items or len(general)]
    items = bench.split("forget") + bench.split("retain") + general
    forget = bench.split("forget")
    if not forget:
        raise UnpactError(f"benchmark {bench.name} has no forget items")
    items_key = _hash([i.to_dict() for i in items])

    # 2. the original model
    if cfg.inject.enabled:
        inject_cfg = InjectConfig(**cfg.inject.settings)
        say(f"original model: {cfg.model} taught {bench.name} (reused if cached)")
        injected = inject(cfg.model, bench.path or bench.name, inject_cfg, progress=progress)
        original_spec = str(injected.path)
        original_key = "inject:" + inject_key(cfg.model, bench, inject_cfg)
    else:
        from unpact.inject import _model_key

        original_spec = cfg.model
        original_key = "model:" + _model_key(cfg.model)

    # 3. unlearning
    unlearned: dict[str, tuple[str, str, dict[str, Any]]] = {}  # label -> spec, key, info
    for spec in cfg.methods:
        if spec.model is not None:
            from unpact.inject import _model_key

            unlearned[spec.label] = (spec.model, "model:" + _model_key(spec.model), {})
            continue
        assert spec.method is not None
        ucfg = resolve_config(spec.method, values=spec.config)
        key = _hash(original_key, items_key, ucfg.model_dump(mode="json"), RUN_FORMAT)
        # Named by method, not label: a sweep value equal to the default reuses that run.
        folder = cache / "unlearned" / f"{spec.method}-{key}"
        if not (folder / "result.json").is_file():
            resume = (folder / "config.yaml").is_file()
            say(f"unlearning: {spec.label}" + (" (resuming)" if resume else ""))
            unlearn(
                original_spec,
                bench.path or bench.name,
                ucfg,
                folder,
                resume=resume,
                progress=progress,
            )
        info = json.loads((folder / "result.json").read_text())
        unlearned[spec.label] = (str(folder / "model"), "unlearn:" + key, info)

    # 4-6. evaluation, attribution and attacks, one model at a time
    judge_key = cfg.judge.model_dump(mode="json")
    attr_key = cfg.attribution.model_dump(mode="json", exclude=_CHECK_FIELDS)
    checks_key = cfg.attribution.model_dump(mode="json", exclude={"heatmaps", "sweep_checks"})
    unchecked = (
        {s.label for s in cfg.methods if s.swept and not _at_default(s)}
        if cfg.attribution.sweep_checks == "default"
        else set()
    )
    checks: dict[str, list[dict[str, Any]]] = {}
    evals: dict[str, dict[str, dict[str, Any]]] = {}
    attrs: dict[str, dict[str, dict[str, Any]]] = {}
    attack_rows: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    models = {"original": (original_spec, original_key)} | {
        label: (s, k) for label, (s, k, _) in unlearned.items()
    }
    attacks = [get_attack(a.name, a.settings) for a in cfg.attacks]
    demonstrations = tuple((i.question, i.answer) for i in bench.split("retain"))
    for label, (spec_str, model_key) in models.items():
        eval_stage = _Stage(cache, "evals", _hash(model_key, items_key, judge_key))
        attr_stage = _Stage(cache, "attributions", _hash(model_key, items_key, attr_key))
        lm: AnyModel | None = None

        def model() -> AnyModel:
            nonlocal lm
            if lm is None:
                lm = open_model(spec_str, remote=cfg.remote)  # noqa: B023 - this iteration only
            return lm

        if not eval_stage.done():
            say(f"evaluating: {label}")
            eval_stage.write(_evaluate(model(), items, cfg.judge, f"Judging {label}"))
        evals[label] = {r["id"]: r for r in eval_stage.read()}
        if not attr_stage.done():
            say(f"attributing: {label}")
            attr_stage.write(_attribute(model(), forget, cfg.attribution))
        attrs[label] = {r["id"]: r for r in attr_stage.read()}
        if cfg.attribution.checks and label not in unchecked:
            check_stage = _Stage(cache, "checks", _hash(model_key, items_key, checks_key))
            if not check_stage.done():
                say(f"checking attributions: {label}")
                check_stage.write(
                    _attribution_checks(model(), forget, attrs[label], cfg.attribution)
                )
            checks[label] = check_stage.read()
        if label == "original":
            continue
        forgotten = [
            i
            for i in forget
            if evals["original"][i.id]["correct"] and not evals[label][i.id]["correct"]
        ]
        attack_rows[label] = {}
        for attack_spec, attack in zip(cfg.attacks, attacks):
            source = "original" if attack.keys_from != "unlearned" else label
            ctx = AttackContext(
                model=model,
                spec=spec_str,
                items=forgotten,
                keys={
                    i.id: Attribution.from_dict(attrs[source][i.id]).key_token_texts
                    for i in forgotten
                },
                retain=bench.split("retain"),
                judge=cfg.judge,
                label=label,
                demonstrations=demonstrations if attack.uses_demonstrations else (),
            )
            key_parts: list[Any] = [
                model_key,
                attack_spec.name,
                attack.settings.model_dump(mode="json"),
                [i.id for i in forgotten],
                ctx.keys,
                judge_key,
                *attack.key_parts(ctx),
            ]
            stage = _Stage(cache, "attacks", _hash(*key_parts))
            if not stage.done():
                say(f"attacking: {label} with {attack_spec.name} ({len(forgotten)} items)")
                stage.write(attack.run(ctx))
            attack_rows[label][attack_spec.name] = {r["id"]: r for r in stage.read()}
        lm = None

    # 7. records, metrics, files
    attack_names = [a.name for a in cfg.attacks]
    records: list[ItemRecord] = []
    methods: dict[str, Any] = {}
    for label, (spec_str, _, info) in unlearned.items():
        mine = []
        for item in items:
            before, after = evals["original"][item.id], evals[label][item.id]
            pre, post = attrs["original"].get(item.id), attrs[label].get(item.id)
            rec = ItemRecord(
                id=item.id,
                split=item.split,
                correct_before=before["correct"],
                correct_after=after["correct"],
                method=label,
                question=item.question,
                answer=item.answer,
                output_before=before["output"],
                output_after=after["output"],
            )
            if pre is not None and post is not None:
                a, b = Attribution.from_dict(pre), Attribution.from_dict(post)
                rec.keytoken_similarity = keytoken_similarity(a, b)
                rec.contribution_similarity = contribution_similarity(a, b)
                rec.prompt_sensitivity_after = b.prompt_sensitivity
                rec.attribution_before = _attribution_summary(pre)
                rec.attribution_after = _attribution_summary(post)
                rec.keyword_units = keyword_units(
                    a.prompt, [u.text for u in a.units], item.keywords
                )
            for name in attack_names:
                row = attack_rows[label][name].get(item.id)
                if row is not None:
                    rec.recovered[name] = row["recovered"]
                    rec.attacks[name] = {
                        "prompt": row["prompt"],
                        "prompts": row.get("prompts", [row["prompt"]]),
                        "outputs": row["outputs"],
                    }
                    if "trained_on" in row:  # relearning: the items it fine-tuned on
                        rec.attacks[name]["trained_on"] = row["trained_on"]
            mine.append(rec)
        records += mine
        if info:  # unlearned by this run: its model goes with the results
            _link_model(Path(spec_str), out / "models" / label)
        methods[label] = {
            **method_metrics(mine, attack_names, cfg.collapse_threshold, cfg.statistics),
            "model": str(out / "models" / label) if info else spec_str,
            "unlearn_seconds": info.get("seconds"),
        }
        swept = next((m.swept for m in cfg.methods if m.label == label and m.swept), None)
        if swept is not None:
            methods[label]["sweep"] = swept
    if cfg.inject.enabled:
        _link_model(Path(original_spec), out / "models" / "original")
    results = finite(
        {
            "format": RUN_FORMAT,
            "benchmark": bench.name,
            "model": cfg.model,
            "original_model": original_spec,
            "counts": {
                s: sum(i.split == s for i in items) for s in ("forget", "retain", "general")
            },
            "attacks": attack_names,
            "methods": methods,
            "attribution_checks": {
                label: checks_summary(rows, list(cfg.attribution.gradient))
                for label, rows in checks.items()
            },
            "seconds": time.perf_counter() - began,
        }
    )
    _atomic_text(out / "items.jsonl", _jsonl([finite(r.to_dict()) for r in records]))
    if checks:  # per model and forget item: gradient scores, agreement, stability
        rows = [{"model": label, **row} for label, rs in checks.items() for row in rs]
        _atomic_text(out / "checks.jsonl", _jsonl([finite(r) for r in rows]))
    _atomic_text(out / "results.csv", csv_text(results))
    _atomic_text(out / "results.md", markdown_table(results))
    from unpact.report import write_report

    write_report(out / "report.html", results, records, attrs, cfg)
    _atomic_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    say(f"done in {results['seconds']:.0f} s")
    return RunResult(out, results, records)


def _run_grid(
    cfg: RunConfig, out: Path, cache_dir: str | Path | None, progress: bool, say: Any
) -> RunResult:
    """The same experiment on each base model of `cfg.models` and each benchmark of
    `cfg.benchmarks`, into `out/<model>/<benchmark>/` (a level is left out when it is not a
    list); `out/results.{json,csv,md}` gather the tables and `out/report.html` sets the
    models side by side."""
    began = time.perf_counter()
    if (out / "results.json").is_file():
        (out / "results.json").unlink()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    bases = [(m.name, m.model) for m in cfg.models] if cfg.models else [(None, cfg.model)]
    sources = cfg.benchmarks or [cfg.data.benchmark]
    per: dict[str, Any] = {}  # "model/benchmark" (or either alone) -> that run's results
    records: list[ItemRecord] = []
    for base_name, base in bases:
        for source in sources:
            name = load_benchmark(source).name  # a folder's name, not its path
            parts = ([base_name] if base_name else []) + ([name] if cfg.benchmarks else [])
            key = "/".join(parts)
            say(f"run {key}")
            one = cfg.model_copy(
                update={
                    "model": base,
                    "models": None,
                    "benchmarks": None,
                    "data": cfg.data.model_copy(update={"benchmark": source}),
                }
            )
            result = run(one, out.joinpath(*parts), cache_dir=cache_dir, progress=progress, log=say)
            per[key] = result.results
            records += result.records
    lines = []
    for n, (key, results) in enumerate(per.items()):
        text = csv_text(results).splitlines()
        lines += ([f"run,{text[0]}"] if n == 0 else []) + [f"{key},{r}" for r in text[1:]]
    _atomic_text(out / "results.csv", "\n".join(lines) + "\n")
    sections = []
    for key, results in per.items():
        c = results["counts"]
        sections.append(
            f"### {key} ({results['model']}; {c['forget']} forget / {c['retain']} retain / "
            f"{c['general']} general items; {results['seconds'] / 60:.0f} min in this run, "
            "stages reused from the cache not counted)\n\n"
            f"{markdown_table(results)}"
        )
    _atomic_text(out / "results.md", "\n".join(sections))
    from unpact.report import write_comparison

    write_comparison(out / "report.html", per)
    results = {
        "format": RUN_FORMAT,
        "runs": per,
        "seconds": time.perf_counter() - began,
    }
    if cfg.benchmarks and not cfg.models:
        results["benchmarks"] = per  # the key grids had before multi-model runs
    _atomic_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return RunResult(out, results, records)


__all__ = [
    "RunConfig",
    "RunResult",
    "load_config",
    "markdown_table",
    "method_metrics",
    "recovery_columns",
    "results_table",
    "run",
]
