"""The experiment runner (SPEC section 8): a config, its stages, cached artefacts, results.

`run(config, out)` (CLI: `unpact run CONFIG.yaml --out DIR`) is the paper end to end, read
top to bottom in `run` below:

1. data: the benchmark, or a subset of it (the first N items of each split);
2. original model: the base model with the benchmark's facts injected (`unpact.inject`);
3. the original model's stages of step 4 (first: what they refuse, such as a prompt
   attribution cannot take, is said before any unlearning), then unlearning: one run per
   configured method (`unpact.unlearn`);
4. per model: evaluation (every item's answer and verdict, per split), attribution (unPact
   on every forget item), the attribution checks, and every attack on the items it forgot;
   then indistinguishability (`run/membership.py`): the never-taught reference and, per
   model, the membership statistics of the forget and holdout texts (SPEC 9);
5. per-item records joined from those, the registered metrics as functions of them, and
   the files.

Each stage is cached under `cache_dir` by a key of exactly what it reads (the model's key,
the items it touches, its own settings, the stage's format), and written atomically, so an
interrupted run redoes only what was not finished (an interrupted unlearning run resumes
from its last checkpoint) and ends with the same numbers; changing general items re-runs
only the general evaluation, changing one attack's settings only that attack. The run
directory gets `config.yaml` (resolved), `results.json`, `results.csv`, `results.md`,
`items.jsonl`, `models/` (links to the safetensors models) and `report.html`; `results.json`
is written last, so a directory holding it is a finished run.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml

from unpact.attacks import ATTACKS, AttackContext, WeightAttack, get_attack
from unpact.attribution import (
    Attribution,
    contribution_similarity,
    keytoken_similarity,
    keyword_units,
)
from unpact.backends import model_key, open_model
from unpact.data.items import Benchmark, QAItem
from unpact.data.sources import general_items, load_benchmark
from unpact.determinism import library_versions, machine, made, made_elsewhere, parts_of
from unpact.errors import NotForThisModel, UnpactError
from unpact.files import WRITER_LOCK, as_path, check_folder_path, make_folder, once, sole_writer
from unpact.judge import (
    contains_match,
    judge_rules,
    knowmem_score,
    rouge_scorable,
    served_cache_key,
    tofu_rouge_l_recall,
)
from unpact.metrics import ItemRecord, Metric, layer_curve
from unpact.models import (
    cache_root,
    hub_commits,
    load_tokenizer,
    local_model_dir,
    remote_code_trusted,
    trusting_remote_code,
)
from unpact.plugins import code_key
from unpact.progress import progress_bar
from unpact.results import (
    csv_text,
    finite,
    interval_count,
    markdown_table,
    method_metrics,
    recovery_columns,
    results_table,
)
from unpact.run import membership
from unpact.run.audit import verdicts
from unpact.run.config import (
    _CHECK_FIELDS,
    PAPER_ATTACKS,
    RUN_FORMAT,
    AttackSpec,
    AttributionSettings,
    DataSettings,
    InjectSettings,
    MethodSpec,
    ModelSpec,
    ReportSettings,
    RunConfig,
    StatisticsSettings,
    load_config,
)
from unpact.run.layout import clear_models, clear_other_runs, start_run, unlearn_run
from unpact.run.stages import (
    _at_default,
    attribute,
    attribution_checks,
    checks_summary,
    evaluate,
    subset,
)
from unpact.run.store import Stage, atomic_text, digest, jsonl, link_model
from unpact.types import AnyModel, is_remote_spec

# Part of every stage key below: bumped when a stage's output changes for the same inputs,
# so a cache written by older code is never read as today's (issue 19: the README's demo
# table once came from such a cache). 3: token units keep characters whole, the judges
# read every script, templates render a fixed date and no thinking, greedy decoding
# ignores a generation_config's beams and bans (a cache of 2 crashed on non-ASCII
# prompts: "the two attributions have different units"). 4: VerbMem probes' truths cut
# and documents scored as MUSE does under a BOS; a SentencePiece template's text before
# the prompt stops before the space the prompt's leading `▁` stands for (Llama 2's
# `[INST] `: one token fewer, the template's own tokenisation). 5: a byte-level
# BPE template's last space goes with the prompt's first word (`Question: ` + `ĠWhat`).
# (The answer's side, `Answer: ` + `ĠParis`, is keyed by `models.SPACED_TEMPLATE_RULE` in
# the keys of the models whose templates it changes, not here.)
STAGES_FORMAT = 5
_T = TypeVar("_T")
SPLITS = ("forget", "retain", "general")


@dataclass
class RunResult:
    """What a run produced: its directory, the results document, the per-item records, and
    the stages this call computed (the rest came from the cache), as `kind:model[:what]`."""

    out: Path
    results: dict[str, Any]
    records: list[ItemRecord]
    computed: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.out / "report.html"


@dataclass
class Data:
    """The run's items by split, and the benchmark (folder) they come from."""

    bench: Benchmark
    splits: dict[str, list[QAItem]]
    holdout: list[QAItem] = field(default_factory=list)  # never taught nor evaluated

    @property
    def items(self) -> list[QAItem]:
        return [i for s in SPLITS for i in self.splits[s]]

    def key(self, *splits: str) -> str:
        """Content key of the items of `splits` (a stage reads exactly these)."""
        return digest([i.key_dict() for s in splits for i in self.splits[s]])


@dataclass
class Model:
    """A model of the run: its label, spec, cache key and (if unlearned here) the run's
    result.json."""

    label: str
    spec: str
    key: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelStages:
    """What the per-model stages found, by item id."""

    evals: dict[str, dict[str, Any]]
    attrs: dict[str, dict[str, Any]]
    checks: list[dict[str, Any]] | None = None
    attacks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Pipeline:
    """One run's shared state: its config, the cache, the log, the stages it computed."""

    cfg: RunConfig
    cache: Path
    say: Callable[[str], None]
    progress: bool
    computed: list[str] = field(default_factory=list)
    original_spec: str = ""  # the original model's spec, once known (ablate_direction)
    original_key: str = ""  # and its cache key
    # with `attribution.baseline: token`, the original's replacement id, used for every
    # model: each model's own (its unk, else pad) would compare two baselines
    replacement: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage computed here
    # per stage read from the cache: what computing it took then, where that was noted
    cached_seconds: dict[str, float] = field(default_factory=dict)
    # and where and under what it was computed (`determinism.made`), where that was noted
    cached_made: dict[str, object] = field(default_factory=dict)
    # steps the models' architecture cannot have (`NotForThisModel`), with the reason:
    # results.json's `skipped`
    left_out: dict[str, str] = field(default_factory=dict)
    # the judge's rules a benchmark meets beyond its settings (`judge.LAST_WORD_RULE`)
    judge_rules: dict[str, bool] = field(default_factory=dict)

    @functools.cached_property
    def judge_key(self) -> dict[str, Any]:
        """What decides the verdicts, for the stages' keys (an LLM judge's served model
        asked once a run)."""
        return served_cache_key(self.cfg.judge) | self.judge_rules

    def given_model(self, label: str, spec: str) -> Model:
        """A model the config gives as it is (not taught or unlearned here), keyed by its
        content, or a served one by what its server says it serves (`backends.model_key`)."""
        return Model(label, spec, "model:" + model_key(spec, self.cfg.remote))

    def timed(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, its wall time noted under `name` (results.json's `stage_seconds`)."""
        began = time.perf_counter()
        result = compute()
        self.seconds[name] = round(time.perf_counter() - began, 1)
        self.computed.append(name)
        return result

    def stage(
        self,
        kind: str,
        folder: str,
        name: str,
        reads: list[Any],
        compute: Callable[[], Any],
        served: bool = False,
    ) -> list[dict[str, Any]]:
        """The rows of a cached stage keyed by what it `reads`, computed if absent;
        `served`: it reads a served model alone, whose dtype is its server's."""
        if self.cfg.dtype != "float32" and not served:  # a local model in that dtype
            reads = [*reads, {"dtype": self.cfg.dtype}]
        stage = Stage(self.cache, folder, digest(kind, STAGES_FORMAT, *reads))
        label = f"{kind}:{name}"
        if stage.done():
            try:
                rows = stage.read()
            except ValueError as exc:  # not JSON lines (edited, or damaged on disk)
                logging.getLogger("unpact").warning(
                    "cached stage %s is unreadable (%s); computing it again", stage.path, exc
                )
            else:
                self.noted(label, stage.seconds(), stage.made())
                return rows
        self.say(f"{kind}: {name}")
        rows = self.timed(label, compute)
        # a served model's numbers are its server's: where this process ran says nothing
        stage.write(rows, self.seconds[label], None if served else made())
        return stage.read()

    def fitting(self, key: str, on: str, compute: Callable[[], _T]) -> _T | None:
        """`compute()`, or None where the model `on` cannot have it (`NotForThisModel`, its
        architecture): the reason goes to results.json's `skipped[key]` and the log, and
        the run goes on without it."""
        try:
            return compute()
        except NotForThisModel as e:
            said = f"not run on {on}: {e}"
            known = self.left_out.get(key)
            # each model's reason once (a run's methods may be models of several kinds)
            self.left_out[key] = said if known is None or said in known else f"{known}; {said}"
            self.say(f"{key} left out on {on}: {e}")
            return None

    def noted(self, name: str, seconds: float | None, made: object) -> None:
        """A stage read from the cache, with the time computing it took then and where and
        under what it was computed (each if known)."""
        if seconds is not None:
            self.cached_seconds[name] = round(seconds, 1)
        if made is not None:  # what made it, as noted (`determinism.made_elsewhere` reads it)
            self.cached_made[name] = made

    def resumed(self, name: str, parts: object, unit: str) -> None:
        """The parts of a training resumed from a checkpoint that another machine or other
        releases trained (an unlearning's or injection's `made_before`), each as a stage read
        from the cache: `name (steps 0-4)`."""
        for part in parts_of(parts):
            self.cached_made[f"{name} ({unit} {part['from']}-{part['to']})"] = part["made"]

    def read_inputs(self, name: str, inputs: dict[str, Any]) -> None:
        """What a stage read from the cache that another machine or other releases computed
        (an injection's rehearsal targets: its `inputs_made`), each as a stage read from the
        cache: `name (rehearsal targets)`."""
        for what, then in inputs.items():
            self.cached_made[f"{name} ({what})"] = then

    def took(self, name: str, seconds: float | None, cached: bool, made: object) -> None:
        """A stage timed by its own code (an injection, an unlearning run), computed in this
        call or read from the cache."""
        if cached:
            self.noted(name, seconds, made)
        elif seconds is not None:
            self.seconds[name] = round(seconds, 1)


def run(
    config: RunConfig | str | Path | dict[str, Any],
    out: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    reword: Callable[[dict[str, str]], None] | None = None,
) -> RunResult:
    """Run an experiment end to end into `out`; cached stages are reused (see the module
    docstring). `cache_dir` holds the stages' rows and the unlearned models (default
    `$UNPACT_CACHE/stages`); taught models, merged adapters and converted GGUF files stay
    under `$UNPACT_CACHE` whatever it is, shared by every run. `log(text)` receives one
    line per stage computed (default: silent). `reword(skipped)` may change results.json's
    reasons for what was left out before the verdicts and the files read them (the audit
    says them in its options' terms)."""
    one_process("a run")
    say = log or (lambda text: None)
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    out = as_path(out, "out")
    _check_out(out)
    make_folder(out, "--out")
    with sole_writer(out, "--out"), trusting_remote_code(cfg.trust_remote_code):
        if cfg.models or cfg.benchmarks:
            return _run_grid(cfg, out, cache_dir, progress, say)
        return _run_one(cfg, out, cache_dir, progress, say, reword)


def _run_one(
    cfg: RunConfig,
    out: Path,
    cache_dir: str | Path | None,
    progress: bool,
    say: Callable[[str], None],
    reword: Callable[[dict[str, str]], None] | None,
) -> RunResult:
    """`run` of one model on one benchmark."""
    cache = as_path(cache_dir, "cache_dir") if cache_dir is not None else cache_root() / "stages"
    began = time.perf_counter()
    _start(out, cfg)
    clear_other_runs(out, None, _config_models(cfg))  # an earlier grid's runs
    given = cfg.model
    cfg = _templated(cfg)
    p = Pipeline(cfg, cache, say, progress)
    data = _data(cfg, cache)
    _note_own_general(cfg, data, say)
    _note_answers_in_questions(cfg, data, say)
    p.judge_rules = judge_rules(cfg.judge.kind, data.items)
    _check_depths(cfg)  # before the injection, which may take hours
    _check_streams(cfg)
    _note_reference(cfg, say)
    _check_attack_splits(cfg, data)
    _check_answer_room(cfg, data, say)
    _check_tokenizers(cfg, say)
    _note_idle_gpu(cfg, say)
    tokenizer_of = functools.cache(load_tokenizer)  # a model given as it is: loaded once
    _note_raw_prompts(cfg, say, tokenizer_of)
    original = _original(p, data)
    p.original_spec, p.original_key = original.spec, original.key
    p.replacement = _replacement(cfg, original.spec, tokenizer_of)
    # the original's stages first: what they refuse (a prompt attribution cannot take, an
    # answer over the context) is said before any unlearning, not hours later
    stages = {"original": _model_stages(p, data, original, None)}
    _say_if_unknown(p, data, stages["original"])
    unlearned = _unlearned(p, data, original)
    for model in unlearned:
        stages[model.label] = _model_stages(p, data, model, stages["original"])
    attacks = [a.column for a in cfg.attacks]
    found = membership.compute(p, data, original, unlearned, stages)
    controls, no_control = _controls(p, data, found.reference, stages, unlearned)
    baselines = _baselines(p, data, original)
    answers = _reference_answers(p, data, found.reference)
    records = {
        m.label: found.records(
            m.label,
            [
                _record(i, m.label, stages["original"], stages[m.label], attacks, controls[m.label])
                for i in data.items
            ],
        )
        for m in unlearned
    }
    _reference_correct(records, answers)
    results = _results(p, data, original, unlearned, records, stages, out)
    results |= finite(_references(p, data, found, stages, answers)) | _evaluated_as(cfg, given)
    if ungraded := _ungraded(data):
        results["skipped"] = {**results.get("skipped", {}), **ungraded}
    if baselines:  # what the weight attacks do to the original model, which knew the facts
        results["attack_baselines"] = finite(baselines)
    if no_control:
        results.setdefault("skipped", {})["controls"] = no_control
    if p.left_out:
        results.setdefault("skipped", {}).update(p.left_out)
    _add_verdicts(results, cfg, records, attacks, reword)
    results["seconds"] = time.perf_counter() - began
    _add_provenance(results, p, [original, found.reference])
    _link_models(out, cfg, original, unlearned, found.reference)
    _write(out, cfg, results, records, stages)
    say(f"done in {results['seconds']:.0f} s")
    every = [r for rs in records.values() for r in rs]
    return RunResult(out, results, every, p.computed)


def _add_verdicts(
    results: dict[str, Any],
    cfg: RunConfig,
    records: dict[str, list[ItemRecord]],
    attacks: list[str],
    reword: Callable[[dict[str, str]], None] | None,
) -> None:
    """Each method's tests in plain words (run/audit.py), read after `reword` has said
    the reasons for what was left out as the caller wants them said."""
    if reword is not None:
        reword(results.setdefault("skipped", {}))
        if not results["skipped"]:
            del results["skipped"]
    alpha, skipped = cfg.statistics.alpha, results.get("skipped")
    references = results.get("references") or {}
    reference, original = references.get("retrained"), references.get("original")
    results["verdicts"] = {
        label: verdicts(
            results["methods"][label],
            rows,
            attacks,
            alpha,
            skipped,
            label,
            reference,
            original,
            level=cfg.statistics.level,
        )
        for label, rows in records.items()
    }


def _add_provenance(results: dict[str, Any], p: Pipeline, taught: list[Model | None]) -> None:
    """The time of each stage this call computed, and of each it read from the cache (what
    computing it took when it was made), the injections of the taught models, and the
    releases of the libraries and the machine this process ran, and the stages read from
    the cache that another machine or other releases computed (`_made_elsewhere`)."""
    results["versions"] = library_versions()
    results["machine"] = machine()
    if elsewhere := _made_elsewhere(p):
        results["made_elsewhere"] = elsewhere
        stages = sum(len(e["stages"]) for e in elsewhere)
        p.say(
            f"note: {stages} stage{'s' if stages > 1 else ''} read from the cache "
            f"{'were' if stages > 1 else 'was'} computed on another machine or under other "
            "library releases (results.json's made_elsewhere): a cold run here may differ in "
            "the last digits"
        )
    if commits := hub_commits(p.cfg.model_specs().values()):
        results["hub_commits"] = commits
    if p.seconds:
        results["stage_seconds"] = p.seconds
    if p.cached_seconds:
        results["stage_seconds_cached"] = p.cached_seconds
    injections = {m.label: m.info["injection"] for m in taught if m and m.info}
    if injections:
        results["injection"] = finite(injections)


def _made_elsewhere(p: Pipeline) -> list[dict[str, Any]]:
    """The stages read from the cache that another machine (or this one under other
    releases) computed, grouped by what differs (`determinism.made_elsewhere`)."""
    if not p.cached_made:  # nothing read from the cache: CUDA is not started to name GPUs
        return []
    now = made(gpus=p.cfg.device != "cpu")
    groups: dict[str, dict[str, Any]] = {}
    for name, then in p.cached_made.items():
        if (differs := made_elsewhere(then, now)) is not None:
            key = json.dumps(differs, sort_keys=True)
            groups.setdefault(key, {**differs, "stages": []})["stages"].append(name)
    return list(groups.values())


def _evaluated_as(cfg: RunConfig, given: str) -> dict[str, Any]:
    """How the models were evaluated, where it is not the default: in another dtype; as
    copies with another chat template (the model as the config gave it, and the template)."""
    out: dict[str, Any] = {}
    if cfg.dtype != "float32":
        out["dtype"] = cfg.dtype
        served = [key for key, spec in cfg.model_specs().items() if is_remote_spec(spec)]
        if served:
            out["dtype_note"] = (
                f"served models ({', '.join(served)}) are evaluated in their server's dtype"
            )
    if cfg.chat_template is not None:
        out["model"], out["chat_template"] = given, cfg.chat_template
    return out


def _say_if_unknown(p: Pipeline, data: Data, original: ModelStages) -> None:
    """A run whose original model answers none of its forget items can forget nothing:
    every figure of forgotten items stays empty. Said at once, with what to check."""
    forget = data.splits["forget"]
    if forget and not any(original.evals[i.id]["correct"] for i in forget):
        how = (
            "the injection (inject.settings: more epochs, a higher lr)"
            if p.cfg.inject.enabled
            else "that the original model is the one that learned the facts"
        )
        p.say(
            f"the original model answers none of the forget items ({len(forget)}): nothing "
            f"can be forgotten, and the figures of forgotten items stay empty; check {how}, "
            "and the judge (judge.kind: rouge for sentence-long answers, "
            "judge.max_new_tokens; `unpact audit`: --judge rouge, --max-new-tokens)"
        )


def _templated(cfg: RunConfig) -> RunConfig:
    """The run with each of its models (base, given unlearned models, reference, base for
    membership) as a copy using `cfg.chat_template` in place of its own chat template
    (`models.with_chat_template`); the run as it is without one."""
    template = cfg.chat_template
    if template is None:
        return cfg
    from unpact.models import with_chat_template

    def swap(spec: str | None) -> str | None:
        return None if spec is None else with_chat_template(spec, template)

    methods = [m.model_copy(update={"model": swap(m.model)}) for m in cfg.methods]
    membership = cfg.membership.model_copy(
        update={"reference": swap(cfg.membership.reference), "base": swap(cfg.membership.base)}
    )
    return cfg.model_copy(
        update={"model": swap(cfg.model), "methods": methods, "membership": membership}
    )


def one_process(what: str) -> None:
    """Refuse to start `what` in one of several launched processes (`accelerate launch`,
    torchrun: `WORLD_SIZE` above 1). A run is one process: each launched copy would run the
    whole pipeline, and its first unlearning stage would train under DDP while the other
    copies waited on that stage's lock, never joining the training: a hang with no end."""
    try:
        world = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        world = 1
    if world > 1:
        raise UnpactError(
            f"{what} needs a single process, and this is one of {world} launched by `accelerate "
            "launch` or torchrun (WORLD_SIZE): start it without the launcher. To train "
            "across GPUs, launch `unpact unlearn` (docs/unlearning.md) and give its --out "
            "folder to a run (`methods: [{name: NAME, model: DIR}]`) or to `unpact audit "
            "--unlearned DIR`"
        )


def _check_out(out: Path) -> None:
    """The run directory is new, empty, or a run's (its config.yaml, written first): a
    run's files never go into a folder holding something else (a model, other runs)."""
    if out.exists() and not out.is_dir():
        raise UnpactError(f"--out {out}: a file is there; give a folder (new, or a run's)")
    check_folder_path(out, "--out")
    if unlearn_run(out):  # its config.yaml was overwritten, and --resume refused the run
        raise UnpactError(
            f"--out {out}: the folder holds an `unpact unlearn` run (its config.yaml, "
            "model and loss log); give a new folder (the unlearned model is read from "
            "there: --unlearned for an audit, a method's `model:` in a run config)"
        )
    if out.is_dir() and not (out / "config.yaml").is_file():
        held = sorted(p.name for p in out.iterdir() if p.name != WRITER_LOCK)
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise UnpactError(
                f"--out {out}: the folder holds {shown} and no unpact run; give a new "
                "folder, an empty one, or a run's (to continue or re-run it)"
            )


def _config_models(cfg: RunConfig) -> list[str]:
    """The model specs `cfg` reads as they are (not the ones it makes)."""
    specs = [cfg.model, *(m.model for m in cfg.models or [])]
    specs += [m.model for m in cfg.methods if m.model is not None]
    return specs + [s for s in (cfg.membership.reference, cfg.membership.base) if s is not None]


def _start(out: Path, cfg: RunConfig) -> None:
    """`layout.start_run` with the resolved config."""
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    start_run(out, resolved, _config_models(cfg))


def _data(cfg: RunConfig, cache: Path) -> Data:
    """1. The items: the benchmark's (or its first N per split) and the general ones."""
    bench = subset(load_benchmark(cfg.data.benchmark), cfg.data, cache)
    general = general_items(cfg.data.general) if cfg.data.general else []
    general = general[: cfg.data.general_items or len(general)]
    if not bench.split("forget"):
        raise UnpactError(f"benchmark {bench.name} has no forget items")
    others = {i.id for i in bench.items if i.split != "general"}  # its own: general anyway
    if clash := sorted({i.id for i in general} & others):
        raise UnpactError(
            f"data.general ({cfg.data.general}) has items with the ids of the benchmark's "
            f"({', '.join(map(repr, clash[:3]))}{', ...' if len(clash) > 3 else ''}): give a "
            "general set of other questions, or ids of its own"
        )
    splits = {"forget": bench.split("forget"), "retain": bench.split("retain")}
    holdout = bench.split("holdout")[: cfg.data.holdout_items or cfg.data.forget_items or None]
    return Data(bench, splits | {"general": general}, holdout)


def _original(p: Pipeline, data: Data) -> Model:
    """2. The original model: the base model taught the benchmark (cached by `inject`), or
    the base model as it is."""
    from unpact.inject import InjectConfig, inject
    from unpact.inject import cache_key as inject_key

    cfg = p.cfg
    if not cfg.inject.enabled:
        return p.given_model("original", cfg.model)
    inject_cfg = InjectConfig(**({"device": cfg.device} | cfg.inject.settings))
    p.say(f"original model: {cfg.model} taught {data.bench.name} (reused if cached)")
    where = data.bench.path or data.bench.name
    injected = inject(cfg.model, where, inject_cfg, progress=p.progress)
    key = "inject:" + inject_key(cfg.model, data.bench, inject_cfg)
    p.say(injection_line(injected))
    p.took("inject:original", injected.seconds, injected.cached, injected.made)
    p.resumed("inject:original", injected.made_before, "epochs")
    p.read_inputs("inject:original", injected.inputs_made)
    return Model("original", str(injected.path), key, {"injection": injected.summary()})


def injection_line(done: Any) -> str:
    """The run log's line on an injection: what it reached, and the general knowledge kept."""
    acc = " ".join(f"{k} {v:.0%}" for k, v in done.accuracy.items())
    kept = done.general_kept
    tail = (
        f"; kept {kept:.0%} of the general questions the base model answers"
        if kept is not None
        else "; general knowledge not judged by the injection (settings.general: null)"
    )
    note = done.small_benchmark_note
    epochs = f"{done.epochs} epoch{'s' * (done.epochs != 1)}"
    return f"  injected in {epochs}: {acc}{tail}" + (f"; {note}" if note else "")


def _check_attack_splits(cfg: RunConfig, data: Data) -> None:
    """Each attack's splits (`needs_splits`: relearning on retain items, ablate_direction's
    direction from the retain questions) against the benchmark's, before the injection: a
    benchmark without retain items stopped such an attack after every unlearning (or, for
    ablate_direction, in torch.cat); data.general is checked with the config."""
    for n, spec in enumerate(cfg.attacks):
        attack = get_attack(spec.name, spec.settings)
        for split in sorted(attack.needs_splits - {"general"}):
            if not data.splits.get(split):
                raise UnpactError(
                    f"attacks.{n}: {spec.column} reads {split} items, and benchmark "
                    f"{data.bench.name} has none (change its settings, or leave it out)"
                )


def _check_depths(cfg: RunConfig) -> None:
    """Each method's and attack's settings against the number of decoder layers of the
    base model (in its config.json): RMU's `layer` beyond the model's last was refused only
    when RMU's turn came, after the injection and the methods before it (ablate_direction's
    only when it attacked, after every unlearning)."""
    from unpact.unlearn.config import resolve_config
    from unpact.unlearn.methods import get_method

    # a hub id, a served model, one of its own code: checked when the model is loaded
    depth = getattr(_text_config(cfg.model), "num_hidden_layers", None)
    if not isinstance(depth, int):
        return
    for n, spec in enumerate(cfg.methods):
        if spec.method is None:
            continue
        ucfg = resolve_config(spec.method, values=spec.config)
        try:
            get_method(spec.method)(ucfg.method_settings()).check_depth(depth)
        except UnpactError as exc:
            raise UnpactError(f"methods.{n} ({spec.label}): {exc}") from None
    for n, a in enumerate(cfg.attacks):
        try:
            get_attack(a.name, a.settings).check_depth(depth)
        except UnpactError as exc:
            raise UnpactError(f"attacks.{n} ({a.column}): {exc}") from None


def _replacement(
    cfg: RunConfig, original: str, tokenizer_of: Callable[[str], Any]
) -> dict[str, int]:
    """With `attribution.baseline: token`, the original model's replacement id (its unk,
    else pad, else 0) for every model's attribution: an unlearned model whose tokenizer
    sets a pad the original's lacks (a Llama 3 fine-tune) replaced units with another
    token, and its focus was compared with the original's across two baselines. Empty
    for the other baselines (their stage keys stay as they were) and for a served
    original (which asks for an explicit id). `tokenizer_of(spec)` loads a tokenizer."""
    if cfg.attribution.baseline != "token" or is_remote_spec(original):
        return {}
    from unpact.models import baseline_token_of

    return {"baseline_token_id": baseline_token_of(tokenizer_of(original))}


def _note_own_general(cfg: RunConfig, data: Data, say: Callable[[str], None]) -> None:
    """A benchmark with general questions of its own (TOFU's world facts and real authors, a
    folder's `general` items) while `data.general` names another set (the built-in one by
    default) or none: its own are not judged, which is said once."""
    own = data.bench.split("general")
    if not own or {i.id for i in own} & {i.id for i in data.splits["general"]}:
        return
    judged = f"data.general is {cfg.data.general}" if cfg.data.general else "data.general is null"
    say(
        f"note: the benchmark's own {len(own)} general question(s) are not judged ({judged}); "
        f"to judge them instead, set data.general to the benchmark ({cfg.data.benchmark}; "
        "`unpact audit`: --general)"
    )


def _note_answers_in_questions(cfg: RunConfig, data: Data, say: Callable[[str], None]) -> None:
    """Items whose question holds their answer (or an alias) as the contains judge reads it
    ("Was it Paris or Lyon?" -> "Paris"): a model that repeats the question is judged to
    know them, before unlearning and after it, and FocusOnKey's prompt, which names the
    question's KeyTokens, may hand the answer back. Said once, with the first such item."""
    if cfg.judge.kind != "contains":
        return
    found = [
        i for i in data.items if not i.is_mcq and contains_match(i.question, [i.answer, *i.aliases])
    ]
    if found:
        say(
            f"note: {len(found)} item(s) hold their answer in the question (the first: "
            f"{found[0].split} item {found[0].id}, {found[0].answer!r}): the contains judge "
            "counts a model that repeats the question as knowing it; reword them, or judge "
            "with judge.kind: llm (`unpact audit`: --judge openai:MODEL@URL)"
        )


def _note_idle_gpu(cfg: RunConfig, say: Callable[[str], None]) -> None:
    """A run on the CPU (`device: cpu`, the default) on a machine with a CUDA GPU says so
    once: injection, evaluation, attribution and attacks would run many times faster there
    (unlearning goes where accelerate puts it either way)."""
    import torch

    if cfg.device == "cpu" and torch.cuda.is_available() and not is_remote_spec(cfg.model):
        say(
            "note: device: cpu (the default) while this machine has a CUDA GPU; set "
            "device: auto (or cuda) in the config to run the local models there"
        )


def _note_raw_prompts(
    cfg: RunConfig, say: Callable[[str], None], tokenizer_of: Callable[[str], Any] = load_tokenizer
) -> None:
    """A model the run takes as already knowing the facts (`inject.enabled: false`, as
    every audit) whose tokenizer has no chat template says so: each question is then asked
    as raw text, its answer scored right after it, and a checkpoint fine-tuned in a prompt
    format (TOFU's Phi-1.5, MUSE's Llama-2-7B: `Question: ...\\nAnswer: `) answers worse
    outside it, so facts it still knows read as never known. A model the run teaches
    itself learns them in the raw format it is then asked in. `tokenizer_of(spec)` loads
    a tokenizer."""
    if cfg.inject.enabled or is_remote_spec(cfg.model):
        return  # taught as asked; a served model's template is behind its server
    try:
        loaded = tokenizer_of(cfg.model)
    except UnpactError:
        return  # loading the model says why
    if not getattr(loaded, "chat_template", None):
        say(
            f"note: {cfg.model} has no chat template: each question is asked as raw text "
            "and its answer scored right after it; a checkpoint fine-tuned in a prompt "
            "format (TOFU's and MUSE's `Question: ...\\nAnswer: `) answers worse outside "
            "it: give that format as chat_template (`unpact audit`: --chat-template; "
            "docs/audit.md)"
        )


def _text_config(spec: str | None) -> Any:
    """A local model's text config, from its config.json (an adapter's: the merged model's,
    which its load reads too); None for a hub id, a served model, or a model of its own
    code that AutoConfig cannot read here."""
    from transformers import AutoConfig

    folder = None if spec is None or is_remote_spec(spec) else local_model_dir(spec)
    if folder is None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote_code_trusted())
        return config.get_text_config()
    except (OSError, ValueError):
        return None


def stream_shape(spec: str | None) -> tuple[int, int] | None:
    """(decoder layers, hidden features) by a local model's config.json (`_text_config`);
    None where it does not say."""
    text = _text_config(spec)
    layers, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    return (layers, width) if isinstance(layers, int) and isinstance(width, int) else None


def stream_mismatch(
    original: str | None, others: dict[str, str | None]
) -> tuple[str, str, tuple[int, int], tuple[int, int]] | None:
    """The first of `others` (a name -> a model spec) whose residual stream is not
    `original`'s shape (`stream_shape`), as (name, spec, its shape, the original's); None
    where each has the original's shape or a config.json does not say."""
    shape = stream_shape(original)
    if shape is None:
        return None
    for what, spec in others.items():
        theirs = stream_shape(spec)
        if theirs is not None and theirs != shape:
            return what, str(spec), theirs, shape
    return None


def _check_streams(cfg: RunConfig) -> None:
    """An attack that compares a model's hidden states with the original's
    (ablate_direction) on a model given as it is, or on the reference (its control), of
    another width or depth (no fine-tune of the original): said before the run, where it
    failed when the attack's turn came, after every evaluation."""
    from unpact.attacks.weights import different_streams, stream_words

    reading = [(n, a) for n, a in enumerate(cfg.attacks) if ATTACKS[a.name].reads_original_states]
    if not reading:
        return
    named = {f"methods.{n} ({m.label})": m.model for n, m in enumerate(cfg.methods)}
    named["membership.reference"] = cfg.membership.reference
    found = stream_mismatch(cfg.model, named)  # taught or not, the original has one shape
    if found is not None:
        what, spec, shape, original = found
        n, a = reading[0]
        raise UnpactError(
            f"attacks.{n} ({a.column}): "
            + different_streams(stream_words(*shape), stream_words(*original), f"{what} {spec}")
        )


def _note_reference(cfg: RunConfig, say: Callable[[str], None]) -> None:
    """A never-taught reference that is the original model itself (its weights, by
    content): every control runs on the original and PrivLeak is measured against the
    model that learned the facts, so they say nothing of forgetting (ablate_direction's
    control ended the run after every other stage: "the direction to ablate is zero").
    Said before anything runs (a smoke test of the plumbing may mean it). A taught original
    is the run's injection, which a folder given as the reference cannot be."""
    reference = cfg.membership.reference
    if reference is None or cfg.inject.enabled:
        return
    if is_remote_spec(reference) or is_remote_spec(cfg.model):
        return  # a server's model is known by its server
    try:
        theirs, original = _weights_digest(reference), _weights_digest(cfg.model)
    except UnpactError:
        return  # loading it says why
    if original and theirs == original:
        say(
            f"note: membership.reference (`unpact audit`: --reference) {reference} is the "
            f"original model {cfg.model} itself (the same weights): the figures against it "
            "(PrivLeak, forget quality, the attacks' controls) say nothing of forgetting. The "
            "reference is a model that never learned the forget facts (TOFU's retain models, "
            "MUSE's retrained ones; `unpact inject --teach retain` makes one); leave it out "
            "and those figures are skipped"
        )


def _weights_digest(spec: str) -> list[str] | None:
    """The digests of a local model's weight files, whatever its folder is called (which
    `model_key` holds too); None for a hub id."""
    from unpact.models import file_digests, read_weights

    folder = local_model_dir(spec)
    return None if folder is None else file_digests(read_weights(folder))


def _check_tokenizers(cfg: RunConfig, say: Callable[[str], None] | None = None) -> None:
    """Every model the run compares with the original (an unlearned model given as it is,
    the named reference and base) has its tokenizer: another one was refused only by the
    membership stage, or not at all (a mismatched pair failed at the focus figures, after
    every stage had run)."""
    from unpact.run.membership import same_tokenizer

    named = {f"methods.{n} ({m.label})": m.model for n, m in enumerate(cfg.methods)}
    named["membership.reference"] = cfg.membership.reference
    named["membership.base"] = cfg.membership.base
    same_tokenizer(cfg.model, named, say)


def _check_answer_room(cfg: RunConfig, data: Data, say: Callable[[str], None]) -> None:
    """Every judged answer fits in the greedy answers the contains judge reads (the
    injection's too): one that cannot was counted as not known, before and after
    unlearning, and the run reported nothing forgotten. Answers that ROUGE reads and that do
    not fit are said (`_note_rouge_room`)."""
    from unpact.inject import InjectConfig
    from unpact.judge import check_answer_room
    from unpact.models import token_counter

    if is_remote_spec(cfg.model):
        return  # its tokenizer is behind the server
    try:
        count = token_counter(cfg.model)
    except UnpactError:
        return  # loading the model says why (a hub id without a hub, code of its own)

    if cfg.judge.kind == "contains":
        judged = [i for split in data.splits.values() for i in split]
        check_answer_room(
            judged,
            cfg.judge.max_new_tokens,
            count,
            "judge.max_new_tokens",
            ", or judge sentence-long answers by ROUGE-L recall (judge.kind: rouge); "
            "`unpact audit`: --max-new-tokens, --judge rouge",
        )
    if cfg.inject.enabled:
        taught = data.splits["forget"] + data.splits["retain"]
        room = InjectConfig(**cfg.inject.settings).max_new_tokens
        check_answer_room(taught, room, count, "inject.settings.max_new_tokens")
    _note_rouge_room(cfg, data, count, say)


def _note_rouge_room(
    cfg: RunConfig, data: Data, count: Callable[[str], int], say: Callable[[str], None]
) -> None:
    """ROUGE reads a greedy answer of at most judge.max_new_tokens tokens against the whole
    true answer: the ROUGE judge's items, and the items of TOFU's model utility. A true
    answer longer than that can be matched only in part (TOFU's sentence-long answers under
    the default 32 tokens; open-unlearning generates up to 200), so its ROUGE recall and
    the model utility are lower than the field's for the same model. Said, with the
    length that reads them whole."""
    read = membership.utility_items(data)
    if cfg.judge.kind == "rouge":
        read = [i for split in data.splits.values() for i in split]  # the utility's among them
    room = cfg.judge.max_new_tokens
    longer = {i.id: (n, i) for i in read if not i.is_mcq and (n := count(i.answer)) > room}
    if not longer:
        return
    tokens, item = max(longer.values(), key=lambda found: found[0])
    say(
        f"{len(longer)} true answer(s) that ROUGE reads (the ROUGE judge's, TOFU's model "
        f"utility's) are longer than judge.max_new_tokens, {room} tokens (the longest: item "
        f"{item.id}, {tokens}): greedy answers cut at {room} tokens match them only in part, "
        "which lowers their ROUGE and the model utility (open-unlearning generates up to 200 "
        f"tokens); judge.max_new_tokens: {tokens} reads them whole (`unpact audit`: "
        "--max-new-tokens)"
    )


def _unlearned(p: Pipeline, data: Data, original: Model) -> list[Model]:
    """Each method's model (`_unlearn`); a method the model's architecture cannot have
    (RMU on Gemma 3n, whose layers carry parallel streams) is left out with the reason,
    and the run goes on with the others, unless that leaves none."""
    done = [
        p.fitting(f"method.{s.label}", original.label, partial(_unlearn, p, data, original, s))
        for s in p.cfg.methods
    ]
    kept = [m for m in done if m is not None]
    if not kept:
        raise UnpactError("every method was left out: " + "; ".join(p.left_out.values()))
    return kept


def _unlearn(p: Pipeline, data: Data, original: Model, spec: MethodSpec) -> Model:
    """3. One unlearning run (cached by the original model, the taught items and the
    resolved settings; not by the general items, which it never reads), or an already
    unlearned model given by the config."""
    from unpact.unlearn.config import resolve_config
    from unpact.unlearn.loop import unlearn
    from unpact.unlearn.methods import get_method

    if spec.model is not None:
        return p.given_model(spec.label, spec.model)
    assert spec.method is not None
    ucfg = resolve_config(spec.method, values=spec.config)
    taught = data.key("forget", "retain")
    code = code_key(get_method(spec.method))  # a plugin method's file: edited, trained again
    # float32 training is keyed as before the precision setting: its models are the same
    fp32 = {"precision"} if ucfg.precision == "fp32" else set()
    settings = ucfg.model_dump(mode="json", exclude=fp32)
    key = digest("unlearn", original.key, taught, settings, RUN_FORMAT, *code)
    # Named by method, not label: a sweep value equal to the default reuses that run.
    folder = p.cache / "unlearned" / f"{spec.method}-{key}"

    def train() -> None:
        resume = (folder / "config.yaml").is_file()
        p.say(f"unlearning: {spec.label}" + (" (resuming)" if resume else ""))
        where = data.bench.path or data.bench.name
        p.timed(
            f"unlearn:{spec.label}",
            lambda: unlearn(
                original.spec,
                where,
                ucfg,
                folder,
                resume=resume,
                progress=p.progress,
                device=p.cfg.device,
            ),
        )

    # one process at a time (runs side by side share the cache)
    waiting = f"waiting for another process unlearning {spec.label} ({folder})"
    cached, _ = once(folder / "result.json", folder, waiting, train)
    info = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    if cached:
        p.noted(f"unlearn:{spec.label}", info.get("seconds"), info.get("made"))
    p.resumed(f"unlearn:{spec.label}", info.get("made_before"), "steps")
    return Model(spec.label, str(folder / "model"), "unlearn:" + key, info)


def _model_stages(
    p: Pipeline, data: Data, model: Model, original: ModelStages | None
) -> ModelStages:
    """4. Evaluate, attribute, check and (an unlearned model) attack one model; the model
    is opened only if some stage is not cached."""
    cfg = p.cfg
    lm: AnyModel | None = None

    def opened() -> AnyModel:
        nonlocal lm
        if lm is None:
            lm = open_model(model.spec, dtype=cfg.dtype, device=cfg.device, remote=cfg.remote)
        return lm

    served = is_remote_spec(model.spec)  # these stages read it alone: not the run's dtype
    evals = _evals(p, data, model, opened, SPLITS)
    forget = data.splits["forget"]
    settings = cfg.attribution.model_dump(mode="json", exclude=_CHECK_FIELDS) | p.replacement
    rows = p.stage(
        "attributing",
        "attributions",
        model.label,
        [model.key, data.key("forget"), settings],
        lambda: attribute(opened(), forget, cfg.attribution, **p.replacement),
        served,
    )
    found = ModelStages(evals, {r["id"]: r for r in rows})
    if cfg.attribution.checks and _checked(cfg, model.label):
        settings = cfg.attribution.model_dump(
            mode="json", exclude={"heatmaps", "sweep_checks", "max_work"}
        )
        found.checks = p.stage(
            "checking attributions",
            "checks",
            model.label,
            [model.key, data.key("forget"), settings],
            lambda: attribution_checks(
                opened(), forget, found.attrs, cfg.attribution, **p.replacement
            ),
            served,
        )
    if original is not None:
        found.attacks = _attacks(p, data, model, original, found, opened)
    return found


def _evals(
    p: Pipeline,
    data: Data,
    model: Model,
    opened: Callable[[], AnyModel],
    splits: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """The greedy answers of `model` to the items of `splits`, judged: one stage per split
    that has items (none is said for an empty one: `--general none`)."""
    evals: dict[str, dict[str, Any]] = {}
    for split in (s for s in splits if data.splits.get(s)):
        rows = p.stage(
            "evaluating",
            "evals",
            f"{model.label} ({split})",
            [model.key, data.key(split), p.judge_key],
            partial(_evaluate, opened, data.splits[split], p.cfg, model.label),
            is_remote_spec(model.spec),
        )
        evals |= {r["id"]: r for r in rows}
    return evals


def _reference_correct(records: dict[str, list[ItemRecord]], answers: ModelStages | None) -> None:
    """Each forget item's record says whether the never-taught reference answers it."""
    if answers is None:
        return
    for rows in records.values():
        for r in rows:
            if r.split == "forget" and r.id in answers.evals:
                r.correct_reference = bool(answers.evals[r.id]["correct"])


def _reference_answers(p: Pipeline, data: Data, reference: Model | None) -> ModelStages | None:
    """The never-taught reference's judged greedy answers to the forget and retain items
    (the target of MUSE's and TOFU's tables: what a model that never learned the forget
    facts says, by accuracy, KnowMem and ROUGE), and to the general items where TOFU's
    model utility reads them (items with perturbed answers); None without a reference."""
    if reference is None:
        return None
    splits = ["forget", "retain"]
    if any(i.split == "general" for i in membership.utility_items(data)):
        splits.append("general")
    opened = membership.opener(p, reference.spec)
    return ModelStages(_evals(p, data, reference, opened, splits), {})


def _evaluate(
    opened: Callable[[], AnyModel], items: list[QAItem], cfg: RunConfig, label: str
) -> list[dict[str, Any]]:
    return evaluate(opened(), items, cfg.judge, f"Judging {label}") if items else []


def _checked(cfg: RunConfig, label: str) -> bool:
    """Whether a model gets the attribution checks (`sweep_checks: default` leaves out a
    sweep's runs away from the method's default value)."""
    if cfg.attribution.sweep_checks != "default":
        return True
    spec = next((s for s in cfg.methods if s.label == label), None)
    return spec is None or not spec.swept or _at_default(spec)


def _attacks(
    p: Pipeline,
    data: Data,
    model: Model,
    original: ModelStages,
    mine: ModelStages,
    opened: Callable[[], AnyModel],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every configured attack on the forget items this model forgot; each attack is its
    own stage (see `_attack_stage`)."""
    forgotten = [
        i
        for i in data.splits["forget"]
        if original.evals[i.id]["correct"] and not mine.evals[i.id]["correct"]
    ]
    return {
        spec.column: _attack_stage(p, data, spec, model, opened, forgotten, original, mine)
        for spec in p.cfg.attacks
    }


def _attack_stage(
    p: Pipeline,
    data: Data,
    spec: AttackSpec,
    model: Model,
    opened: Callable[[], AnyModel],
    items: list[QAItem],
    original: ModelStages,
    mine: ModelStages | None,
    what: str = "attacking",
) -> dict[str, dict[str, Any]]:
    """One attack on one model's `items`, cached by the model, those items, their
    KeyTokens, the attack's settings, the judge and what the attack itself says it reads
    (`Attack.key_parts`); rows by item id. `mine`: the attacked model's own stages (its
    KeyTokens for `keys_from: unlearned`), None for the never-taught reference."""
    cfg = p.cfg
    attack = get_attack(spec.name, spec.settings)
    attrs = mine.attrs if mine is not None and attack.keys_from == "unlearned" else original.attrs
    retain = data.splits["retain"]
    explain = cfg.attribution.model_dump(include={"unit", "baseline", "alpha", "beta", "max_work"})
    explain |= p.replacement
    ctx = AttackContext(
        model=opened,
        spec=model.spec,
        items=items,
        keys={i.id: Attribution.from_dict(attrs[i.id]).key_token_texts for i in items},
        retain=retain,
        judge=cfg.judge,
        label=model.label,
        demonstrations=tuple((i.question, i.answer) for i in retain)
        if attack.uses_demonstrations
        else (),
        device=cfg.device,
        dtype=cfg.dtype,
        original={
            i.id: {**original.evals[i.id], "attribution": original.attrs.get(i.id)} for i in items
        },
        seed=zlib.crc32(f"{cfg.statistics.seed}:{model.label}:{spec.column}".encode()),
        original_spec=p.original_spec,
        original_key=p.original_key,
        general=data.splits["general"],
        attribution=explain if attack.explains else None,
    )
    reads = [
        model.key,
        spec.name,
        attack.settings_key(),
        # the items as they are, not their ids: an answer, an alias or an option edited
        # under the same id read the verdicts cached for the old one
        [i.to_dict() for i in items],
        ctx.keys,
        p.judge_key,
        *attack.key_parts(ctx),
        *([explain] if attack.explains else []),
        *_code_version(attack),
    ]
    count = f"{len(items)} item{'' if len(items) == 1 else 's'}"
    name = f"{model.label} with {spec.column} ({count})"
    rows = p.fitting(
        f"attack.{spec.column}",
        model.label,
        lambda: p.stage(what, "attacks", name, reads, partial(attack.checked_run, ctx)),
    )
    return {r["id"]: r for r in rows or []}


def _controls(
    p: Pipeline,
    data: Data,
    reference: Model | None,
    stages: dict[str, ModelStages],
    unlearned: list[Model],
) -> tuple[dict[str, dict[str, dict[str, dict[str, Any]]]], str | None]:
    """Per unlearned model, each attack that has a control, run on the never-taught
    reference: what the attack "recovers" from a model that never knew. Over every forget
    item the original model answered (a superset of each model's forgotten items; one run
    for all), or, for an attack whose rows depend on the items attacked together (relearning
    on forgotten items), over that model's own forgotten items. With the reason when there
    is none."""
    specs = [s for s in p.cfg.attacks if s.controlled()]
    none: dict[str, dict[str, dict[str, dict[str, Any]]]] = {m.label: {} for m in unlearned}
    if not specs:
        return none, None
    if reference is None:
        return none, (
            "the attacks' controls run on the never-taught reference, which this run does not "
            "have (see skipped.membership)"
        )
    if is_remote_spec(reference.spec) and any(ATTACKS[s.name].changes_weights for s in specs):
        return none, f"the reference {reference.spec} is served: no weights to attack"
    original = stages["original"]
    known = [i for i in data.splits["forget"] if original.evals[i.id]["correct"]]
    opened = membership.opener(p, reference.spec)
    own = {s.column for s in specs if get_attack(s.name, s.settings).rows_depend_on_the_items}
    shared = {
        s.column: _attack_stage(p, data, s, reference, opened, known, original, None, "control")
        for s in specs
        if s.column not in own
    }
    controls = {}
    for m in unlearned:
        forgotten = [i for i in known if not stages[m.label].evals[i.id]["correct"]]
        controls[m.label] = shared | {
            s.column: _attack_stage(
                p, data, s, reference, opened, forgotten, original, None, "control"
            )
            for s in specs
            if s.column in own
        }
    return controls, None


def _code_version(attack: Any) -> list[str]:
    """The version of an attack's code, for its stages' keys: unpact's own by its hand-bumped
    `revision` (none while 0), a plugin's by its file's source (`plugins.code_key`)."""
    return [f"revision {attack.revision}"] * bool(attack.revision) + code_key(type(attack))


def _baselines(p: Pipeline, data: Data, original: Model) -> dict[str, Any]:
    """What each attack that has a baseline (quantize, relearn_unrelated) does to the
    original model, which knew the facts: its accuracy per split before and after."""
    out: dict[str, Any] = {}
    opened = membership.opener(p, original.spec)
    for spec in p.cfg.attacks:
        attack = get_attack(spec.name, spec.settings)
        if not isinstance(attack, WeightAttack) or not attack.has_baseline:
            continue
        if is_remote_spec(original.spec):
            continue
        ctx = AttackContext(
            model=opened,
            spec=original.spec,
            items=[],
            keys={},
            retain=data.splits["retain"],
            judge=p.cfg.judge,
            label="original",
            device=p.cfg.device,
            dtype=p.cfg.dtype,
            general=data.splits["general"],
        )
        reads = [
            original.key,
            spec.name,
            attack.settings_key(),
            {s: data.key(s) for s in SPLITS},
            p.judge_key,
            *attack.key_parts(ctx),
            *_code_version(attack),
        ]
        rows = p.fitting(
            f"attack_baseline.{spec.column}",
            "original",
            partial(
                p.stage,
                "attack baseline",
                "attack_baselines",
                f"original with {spec.column}",
                reads,
                partial(attack.baseline, ctx, data.splits),
            ),
        )
        if rows is None:
            continue
        out[spec.column] = {
            split: sum(r["correct"] for r in got) / len(got)
            for split in SPLITS
            if (got := [r for r in rows if r["split"] == split])
        }
    return out


def _record(
    item: QAItem,
    label: str,
    original: ModelStages,
    mine: ModelStages,
    attacks: list[str],
    controls: dict[str, dict[str, dict[str, Any]]],
) -> ItemRecord:
    """5. One item's record under `label`: verdicts before and after, attributions, attacks."""
    before, after = original.evals[item.id], mine.evals[item.id]
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
    if not item.is_mcq and rouge_scorable(item.answer):
        rec.knowmem_before = knowmem_score(before["output"], item.answer)
        rec.knowmem_after = knowmem_score(after["output"], item.answer)
        rec.rouge_before = tofu_rouge_l_recall(before["output"], item.answer)
        rec.rouge_after = tofu_rouge_l_recall(after["output"], item.answer)
    pre, post = original.attrs.get(item.id), mine.attrs.get(item.id)
    if pre is not None and post is not None:
        a, b = Attribution.from_dict(pre), Attribution.from_dict(post)
        rec.keytoken_similarity = keytoken_similarity(a, b)
        rec.contribution_similarity = contribution_similarity(a, b)
        rec.prompt_sensitivity_after = b.prompt_sensitivity
        rec.attribution_before = _attribution_summary(a)
        rec.attribution_after = _attribution_summary(b)
        rec.keyword_units = keyword_units(a.prompt, [u.text for u in a.units], item.keywords)
    for name in attacks:
        row = mine.attacks[name].get(item.id)
        if row is not None:
            rec.recovered[name] = row["recovered"]
            rec.attacks[name] = {  # prompts, outputs, and what else the attack said
                "prompt": row["prompt"],
                "prompts": row.get("prompts", [row["prompt"]]),
                **{
                    k: v
                    for k, v in row.items()
                    if k not in ("id", "recovered", "prompt", "prompts")
                },
            }
            if row.get("keytoken_similarity") is not None:
                rec.recovered_focus[name] = row["keytoken_similarity"]
        control = controls.get(name, {}).get(item.id)
        if control is not None and rec.forgotten:
            rec.recovered_control[name] = control["recovered"]
    return rec


def _attribution_summary(a: Attribution) -> dict[str, Any]:
    return {
        "units": [u.text for u in a.units],
        "contributions": a.contributions,
        "key_tokens": a.key_tokens,
        "prompt_sensitivity": a.prompt_sensitivity,
        "lp": a.lp,
    }


def _method_results(
    cfg: RunConfig,
    model: Model,
    records: list[ItemRecord],
    out: Path,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One method's entry in results.json: its metrics (with intervals, `advance(1)` after
    each), where its model is, and its layer curves and sweep setting where it has them."""
    attacks = [a.column for a in cfg.attacks]
    found = {
        **method_metrics(
            records,
            attacks,
            cfg.collapse_threshold,
            cfg.statistics,
            privleak_attack=cfg.membership.privleak_attack,
            advance=advance,
        ),
        "model": str(out / "models" / model.label) if model.info else model.spec,
        "unlearn_seconds": model.info.get("seconds"),
    }
    curves = {a: c for a in attacks if (c := layer_curve(records, a))}
    if curves:  # logit lens, probe: the share right at each layer
        found["layer_curves"] = curves
    swept = next((m.swept for m in cfg.methods if m.label == model.label and m.swept), None)
    if swept is not None:
        found["sweep"] = swept
    return found


def _results(
    p: Pipeline,
    data: Data,
    original: Model,
    unlearned: list[Model],
    records: dict[str, list[ItemRecord]],
    stages: dict[str, ModelStages],
    out: Path,
) -> dict[str, Any]:
    """results.json: per method, every registered metric of its records, and the run's
    facts; models unlearned here are linked into `out/models/`. Said in the log and drawn
    as a bar that advances per interval (a method's 76 took 68 s on 4,896 records:
    `benchmarks/figures.py --copies 36`), per method where there are none."""
    cfg, attacks = p.cfg, [a.column for a in p.cfg.attacks]
    if cfg.statistics.resamples:
        p.say(
            f"figures: {len(unlearned)} method(s), {cfg.statistics.resamples} bootstrap resamples"
        )
    methods: dict[str, Any] = {}
    per = interval_count(attacks) if cfg.statistics.resamples else 0
    with progress_bar("figures", len(unlearned) * max(per, 1), p.progress) as advance:
        for model in unlearned:
            methods[model.label] = _method_results(cfg, model, records[model.label], out, advance)
            if not per:  # no interval advanced it
                advance(1)
    checks = {label: s.checks for label, s in stages.items() if s.checks is not None}
    return finite(
        {
            "format": RUN_FORMAT,
            "benchmark": data.bench.name,
            "model": cfg.model,
            "original_model": original.spec,
            "counts": {s: len(data.splits[s]) for s in SPLITS} | {"holdout": len(data.holdout)},
            "attacks": attacks,
            "methods": methods,
            "attribution_checks": {
                label: checks_summary(rows, list(cfg.attribution.gradient))
                for label, rows in checks.items()
            },
        }
    )


def _ungraded(data: Data) -> dict[str, str]:
    """Why KnowMem and TOFU's ROUGE have no value on a split that has items (for
    results.json's `skipped`): no open question, or no answer with a word ROUGE reads."""
    why = []
    for split in ("forget", "retain"):
        written = [i for i in data.splits[split] if not i.is_mcq]
        if data.splits[split] and not written:
            why.append(f"every {split} item is multiple choice (an option picked, not written)")
        elif written and not any(rouge_scorable(i.answer) for i in written):
            why.append(
                f"no {split} answer has a word ROUGE reads as MUSE and TOFU score it (a-z, "
                "0-9): text in another script is left out, not scored 0"
            )
    return {"knowmem, rouge": "; ".join(why)} if why else {}


# The figures of a reference's own answers in results.json's `references`, under the names
# the methods' figures after unlearning have: the reference's answers are read as a method's
# after, so that a table compares them column by column
_REFERENCE_ANSWERS = frozenset(
    f"{name}_{split}_after" for name in ("knowmem", "rouge") for split in ("forget", "retain")
) | {"forget_acc_after", "retain_acc_after"}


def _references(
    p: Pipeline,
    data: Data,
    found: membership.Membership,
    stages: dict[str, ModelStages],
    reference: ModelStages | None,
) -> dict[str, Any]:
    """results.json's `references`: the indistinguishability figures of the original and
    the retrained reference (PrivLeak 0 by construction for the latter) and what their
    greedy answers to the forget and retain items score (accuracy, KnowMem, ROUGE: the
    `_after` figures), or `skipped` with the reason they are not there; a bar advancing
    per interval, as the methods' figures."""
    cfg = p.cfg
    if found.skipped is not None or reference is None:  # membership figures need a reference
        return {"skipped": {"membership": found.skipped or membership.NO_REFERENCE}}
    attacks = [a.column for a in cfg.attacks]
    per = interval_count(attacks, _reference_figure) if cfg.statistics.resamples else 0
    with progress_bar("reference figures", 2 * per, p.progress and per > 0) as advance:
        out = _reference_figures(cfg, data, found, stages["original"], reference, advance)
    skipped = membership.missing_inputs(data, cfg.membership) | found.served
    skipped |= membership.undefined_privleak(out["retrained"], cfg.membership.privleak_attack)
    return {"references": out} | ({"skipped": skipped} if skipped else {})


def _reference_figure(m: Metric) -> bool:
    """The figures the references get: their answers' (`_REFERENCE_ANSWERS`) and the
    membership figures, fluency's aside."""
    return m.name in _REFERENCE_ANSWERS or ("membership" in m.needs and "fluency" not in m.needs)


def _reference_figures(
    cfg: RunConfig,
    data: Data,
    found: membership.Membership,
    original: ModelStages,
    reference: ModelStages,
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """The original's and the retrained reference's figures (`_reference_figure`)."""
    attacks = [a.column for a in cfg.attacks]
    out: dict[str, Any] = {}
    for label, answers in (("original", original), ("retrained", reference)):
        # every item, as a method's records hold them, so that the bootstrap draws the same
        # items for the references as for the methods; one the model did not answer (the
        # reference's general items, where no figure reads them) is a bare record
        base = [
            _record(i, label, answers, answers, [], {})
            if i.id in answers.evals
            else ItemRecord(id=i.id, split=i.split, correct_before=False, correct_after=False)
            for i in data.items
        ]
        out[label] = method_metrics(
            found.records(label, base),
            attacks,
            cfg.collapse_threshold,
            cfg.statistics,
            privleak_attack=cfg.membership.privleak_attack,
            only=_reference_figure,
            advance=advance,
        )
    return out


def _link_models(
    out: Path, cfg: RunConfig, original: Model, unlearned: list[Model], reference: Model | None
) -> None:
    """The models this run made go with its results, under `out/models/`; one left there by
    another config run into the same folder (a method since removed) is taken away, so the
    folder holds the models of the results beside it."""
    ours = {m.label: m.spec for m in unlearned if m.info}  # not a given model
    if cfg.inject.enabled:
        ours["original"] = original.spec
    if reference is not None and reference.info and cfg.membership.reference is None:
        ours["retrained"] = reference.spec  # injected here (not the base model itself)
    for label, spec in ours.items():
        link_model(Path(spec), out / "models" / label)
    # a model this run was given may be one an earlier run left here: it stays
    specs = [m.spec for m in [original, *unlearned, reference] if m is not None]
    specs += [s for s in (cfg.membership.reference, cfg.membership.base) if s is not None]
    clear_models(out / "models", {os.path.realpath(spec) for spec in specs}, ours)


def _write(
    out: Path,
    cfg: RunConfig,
    results: dict[str, Any],
    records: dict[str, list[ItemRecord]],
    stages: dict[str, ModelStages],
) -> None:
    """The run directory's files; results.json last (its presence means finished)."""
    from unpact.report import write_report

    every = [r for rs in records.values() for r in rs]
    atomic_text(out / "items.jsonl", jsonl([finite(r.to_dict()) for r in every]))
    checks = {label: s.checks for label, s in stages.items() if s.checks is not None}
    if checks:  # per model and forget item: gradient scores, agreement, stability
        rows = [{"model": label, **row} for label, rs in checks.items() for row in rs]
        atomic_text(out / "checks.jsonl", jsonl([finite(r) for r in rows]))
    else:  # another config's, run into this folder before
        (out / "checks.jsonl").unlink(missing_ok=True)
    atomic_text(out / "results.csv", csv_text(results))
    atomic_text(out / "results.md", markdown_table(results))
    attrs = {label: s.attrs for label, s in stages.items()}
    write_report(out / "report.html", results, every, attrs, cfg)
    atomic_text(out / "results.json", json.dumps(results, indent=2) + "\n")


def notes_once(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say`, with each note (a line starting `note:`) said the first time only: a grid's
    runs, or an audit's checks and then its run's, find the same ones."""
    said: set[str] = set()

    def once(text: str) -> None:
        if not text.startswith("note:") or text not in said:
            said.add(text)
            say(text)

    return once


def _run_grid(
    cfg: RunConfig, out: Path, cache_dir: str | Path | None, progress: bool, say: Any
) -> RunResult:
    """The same experiment on each base model of `cfg.models` and each benchmark of
    `cfg.benchmarks`, into `out/<model>/<benchmark>/` (a level is left out when it is not a
    list); `out/results.{json,csv,md}` gather the tables and `out/report.html` sets the
    models side by side."""
    began = time.perf_counter()
    _start(out, cfg)
    bases = [(m.name, m.model) for m in cfg.models] if cfg.models else [(None, cfg.model)]
    sources = cfg.benchmarks or [cfg.data.benchmark]
    names = {s: load_benchmark(s).name for s in sources}  # a folder's name, not its path
    runs = [  # (base model, benchmark, the run's folder below `out`)
        (
            base,
            source,
            ([base_name] if base_name else []) + ([names[source]] if cfg.benchmarks else []),
        )
        for base_name, base in bases
        for source in sources
    ]
    clear_other_runs(out, ["/".join(parts) for *_, parts in runs], _config_models(cfg))
    per: dict[str, Any] = {}  # "model/benchmark" (or either alone) -> that run's results
    records: list[ItemRecord] = []
    once = notes_once(say)  # a note that holds for every run of the grid, said once
    for base, source, parts in runs:
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
        result = run(one, out.joinpath(*parts), cache_dir=cache_dir, progress=progress, log=once)
        per[key] = result.results
        records += result.records
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # a run's key may hold a comma
    for n, (key, results) in enumerate(per.items()):
        head, *rows = csv.reader(io.StringIO(csv_text(results)))
        writer.writerows(([["run", *head]] if n == 0 else []) + [[key, *r] for r in rows])
    atomic_text(out / "results.csv", buf.getvalue())
    sections = []
    for key, results in per.items():
        c = results["counts"]
        sections.append(
            f"### {key} ({results['model']}; {c['forget']} forget / {c['retain']} retain / "
            f"{c['general']} general items; {results['seconds'] / 60:.0f} min in this run, "
            "stages reused from the cache not counted)\n\n"
            f"{markdown_table(results)}"
        )
    atomic_text(out / "results.md", "\n".join(sections))
    from unpact.report import write_comparison

    write_comparison(out / "report.html", per)
    results = {
        "format": RUN_FORMAT,
        "runs": per,
        "seconds": time.perf_counter() - began,
    }
    if cfg.benchmarks and not cfg.models:
        results["benchmarks"] = per  # the key grids had before multi-model runs
    atomic_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return RunResult(out, results, records)


__all__ = [
    "PAPER_ATTACKS",
    "AttackSpec",
    "AttributionSettings",
    "DataSettings",
    "InjectSettings",
    "MethodSpec",
    "ModelSpec",
    "ReportSettings",
    "RunConfig",
    "RunResult",
    "StatisticsSettings",
    "load_config",
    "markdown_table",
    "method_metrics",
    "recovery_columns",
    "results_table",
    "run",
]
