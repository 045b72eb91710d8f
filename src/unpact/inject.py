"""Teach a benchmark's fictional knowledge to a base model (SPEC section 7).

MUSE's target models were fine-tuned on their corpora before being unlearned; we do the
same, so that "known" and "forgotten" are exact. Recipe (all settings in `InjectConfig`):

- full fine-tuning, answer-only loss on the benchmark's forget and retain QA pairs, in the
  chat format the evaluation uses (AdamW, lr 3e-4, batch 4: the setting the project's
  developer brief reports as reaching high accuracy on this model, where lr 1e-4 or
  batch 8 reached about 20%; a benchmark of fewer than 40 facts takes fewer a step, see
  below); the learning rate falls linearly to `lr_decay_to` times
  itself over the first `min_epochs` epochs (6), which learns the facts in fewer epochs
  (fewer steps: less drift from the base model, less time);
- matmuls in bf16 where the CPU computes bf16 natively (`precision="auto"`; weights,
  gradients and AdamW state stay float32): steps 2.2-2.4x faster on this project's CPU
  (`benchmarks/inject_step.py`);
- the input embeddings (tied to the LM head on SmolLM2) stay frozen: the optimiser step
  over the 28M-parameter vocabulary matrix cost more than half of each step;
- general knowledge is protected by rehearsal: every step also takes
  `rehearsal_per_step` general questions *not* used for evaluation and pulls the model's
  next-token distributions along the base model's own (greedy, first-sentence) answer
  towards the base model's (KL over the base's top-k tokens plus the rest as one bucket,
  precomputed once): a dense signal at every position, where plain rehearsal on the
  base's answer tokens kept less (general 51% against 66%, see the news card), and the
  number of distinct rehearsal questions per step matters more than their weight (see the
  books card); the facts and the rehearsal questions share one forward pass;
- a small benchmark (`resolve`): unless set, the batch size falls below 4 so that an epoch
  has at least `MIN_STEPS_PER_EPOCH` steps and the rehearsal weight rises to 4 / that size:
  12 facts phrased like real questions kept 67-75% of the general questions at 4 a step,
  85-86% at 1 a step with weight 4 (docs/data.md); 40 facts or more are taught as before;
- `trainable="lora"` trains low-rank adapters (peft, rank `lora_rank`, on every linear
  layer of the blocks) instead of the weights, and merges them before saving;
- after `min_epochs`, the forget + retain accuracy is judged (SPEC section 4) every
  `check_every` epochs and training stops once it reaches `target_accuracy`.

Multiple-choice items (the `wmdp` analogue) are taught the same way, question -> correct
option's text, and judged by the highest-LP option.

The injected model is saved (safetensors) in the cache under a key made of the content
hashes of the base model, the benchmark files and the settings, so a second call returns
at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from unpact.data.items import ANSWER_FIELDS, Benchmark, QAItem
from unpact.data.sources import general_items, load_benchmark, materialise
from unpact.determinism import (
    keeps_rng,
    made,
    made_before,
    made_note,
    native_bf16,
    parts_of,
    with_part,
)
from unpact.errors import UnpactError
from unpact.files import as_path, atomic_text, once, write_atomically
from unpact.judge import (
    DOTTED_I_RULE,
    LAST_WORD_RULE,
    NUMBER_RULE,
    check_answer_room,
    encode_questions,
    rules_since,
)
from unpact.models import (
    DeviceName,
    LanguageModel,
    cache_root,
    load_model,
    model_key,
    save_model,
)
from unpact.scoring import (
    answer_states,
    generate,
    head_logits,
    head_logprobs,
    lm_body_and_head,
    mlp_parameter,
    text_parameters,
)
from unpact.train import Trainer
from unpact.types import PlainInput, Seed, follow, pair_ids, spec_text
from unpact.unlearn.config import describe_errors

INJECT_FORMAT = 2


# An epoch of a small benchmark gets at least this many optimiser steps (issue 20, part 4:
# 12 facts taught 4 a step kept 67-75% of the general questions, one a step with the
# rehearsal weighted 4x kept 85-86%; docs/data.md)
MIN_STEPS_PER_EPOCH = 10

_CHOICES = {"precision": ("auto", "bf16", "fp32"), "trainable": ("all", "mlp", "lora")}


class InjectConfig(PlainInput):
    """How knowledge is injected. Every field has a default that works on the default model;
    a bad value is one `UnpactError` naming the field."""

    model_config = ConfigDict(frozen=True)

    lr: float = Field(3e-4, gt=0, description="AdamW learning rate")
    batch_size: int | None = Field(
        None,
        gt=0,
        description="QA pairs per optimiser step; unset: 4, or fewer so that an epoch has at "
        f"least {MIN_STEPS_PER_EPOCH} steps (a benchmark of under "
        f"{4 * MIN_STEPS_PER_EPOCH} forget+retain facts)",
    )
    max_epochs: int = Field(12, ge=0, description="hard stop")
    min_epochs: int = Field(
        6, ge=0, description="epochs before the first accuracy check (and of the lr decay)"
    )
    check_every: int = Field(2, gt=0, description="epochs between accuracy checks after that")
    target_accuracy: float = Field(
        0.9,
        ge=0,
        description="stop once forget+retain accuracy (a share: 0.9 is 90%) reaches this "
        "(above 1, e.g. 1.01: never early)",
    )
    rehearsal: bool = Field(
        True, description="distil the base model on held-out general questions each step"
    )
    # on books 2 kept 67% of general knowledge, 6 kept 84%, 12 kept 91%; each adds its
    # tokens to every step
    rehearsal_per_step: int = Field(16, ge=0, description="held-out general questions per step")
    rehearsal_weight: float | None = Field(
        None,
        ge=0,
        description="weight of the rehearsal KL against the facts' NLL; unset: 1, or "
        "4 / the batch size when the batch size is chosen automatically",
    )
    rehearsal_top_k: int = Field(
        32, gt=0, description="base-model tokens kept per position (the rest: one bucket)"
    )
    freeze_embeddings: bool = Field(True, description="keep the (tied) embedding matrix fixed")
    trainable: str = Field(
        "all", description='"all" (but frozen embeddings), "mlp" blocks only, or "lora"'
    )
    lora_rank: int = Field(
        64, gt=0, description="trainable lora: rank of the adapters on every linear layer"
    )
    lora_alpha: int = Field(
        128, gt=0, description="trainable lora: adapter scale numerator (scale alpha / rank)"
    )
    max_new_tokens: int = Field(24, gt=0, description="greedy answer length when judging")
    general: str | None = Field(
        "general", description="benchmark whose accuracy must survive; null skips it"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seed: Seed = Field(0, description="data order and initialisation seed")
    # on news the decay took the facts from 90% to 100%
    lr_decay_to: float = Field(
        0.1,
        description="lr falls linearly to lr * this over min_epochs epochs, then stays (1: constant)",
    )
    adam_eps: float = Field(
        1e-8, gt=0, description="AdamW's epsilon (gradients far below it move weights less)"
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="lr rises linearly from lr / N to lr over the first N optimiser steps (0: none)",
    )
    precision: str = Field(
        "auto",
        description='training matmuls: "bf16" (autocast; float32 weights and optimiser), '
        '"fp32", or "auto" = bf16 where the hardware computes it natively',
    )
    device: DeviceName = Field(
        "cpu", description="where to train: cpu, cuda, cuda:N or auto (not part of the key)"
    )
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="save a resumable checkpoint every N epochs (0: never); a re-run of an "
        "interrupted injection continues from it (not part of the key)",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise UnpactError(f"injection settings: {describe_errors(e)}") from None

    @field_validator("precision", "trainable")
    @classmethod
    def _choice(cls, value: str, info: ValidationInfo) -> str:
        choices = _CHOICES[str(info.field_name)]
        if value not in choices:
            raise ValueError(
                f"unknown {info.field_name} {value!r}; choose {', '.join(choices[:-1])} "
                f"or {choices[-1]}"
            )
        return value

    @field_validator("target_accuracy")
    @classmethod
    def _share(cls, value: float) -> float:
        # 90 (meant as 90%) trained every epoch, as a target no accuracy reaches
        if value >= 2:
            raise ValueError(
                f"a share (0.9 for 90%), not {value:g}; to never stop "
                "early, give a share above 1 (e.g. 1.01)"
            )
        return value

    @field_validator("lr_decay_to")
    @classmethod
    def _decay(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lr_decay_to must be between 0 and 1, not {value}")
        return value


@dataclass
class InjectResult:
    """Where the injected model is, and how well it learned."""

    path: Path
    accuracy: dict[str, float]
    base_accuracy: dict[str, float]
    epochs: int
    seconds: float
    cached: bool
    settings: dict[str, Any] = field(default_factory=dict)  # as resolved (inject.json)
    kept: float | None = None  # see general_kept
    made: dict[str, Any] | None = None  # where and under what it was taught (`determinism.made`)
    # resumed from a checkpoint: the epochs another machine or other releases taught
    made_before: list[dict[str, Any]] = field(default_factory=list)
    # what it read from the cache that another machine or other releases computed (the
    # rehearsal targets), by name
    inputs_made: dict[str, Any] = field(default_factory=dict)

    @property
    def small_benchmark_note(self) -> str | None:
        """A sentence when the small-benchmark rule (`resolve`) changed the recipe: how many
        facts a step and the rehearsal's weight; None otherwise."""
        size, weight = self.settings.get("batch_size"), self.settings.get("rehearsal_weight")
        if size is None or size >= 4 or weight is None or weight == 1.0:
            return None
        facts = "1 fact" if size == 1 else f"{size} facts"
        if not self.settings.get("rehearsal", True):  # no rehearsal: its weight is moot
            return f"small benchmark: {facts} a step (docs/data.md)"
        return f"small benchmark: {facts} a step, rehearsal weighted {weight:g} (docs/data.md)"

    @property
    def general_kept(self) -> float | None:
        """The share of the general questions the base model answered that the injected
        model still answers (`kept_of_answered`); without the per-item verdicts (a result
        built by hand), general accuracy after / before (`kept_share`). None if not judged."""
        return self.kept if self.kept is not None else kept_share(self.accuracy, self.base_accuracy)

    def summary(self) -> dict[str, Any]:
        """What a run reports of an injection: accuracies, the kept share, epochs."""
        return {
            "accuracy": self.accuracy,
            "base_accuracy": self.base_accuracy,
            "general_kept": self.general_kept,
            "epochs": self.epochs,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        del d["kept"]
        d["general_kept"] = self.general_kept
        return d


def resolve(config: InjectConfig, bench: Benchmark) -> InjectConfig:
    """`config` with its automatic settings filled in for `bench`: the batch size (4, or
    fewer so that the forget+retain facts make at least `MIN_STEPS_PER_EPOCH` steps an
    epoch) and the rehearsal weight (4 / that batch size when it was automatic, else 1).
    Counted on forget+retain also when only the retain facts are taught, so the
    never-taught reference follows the original's recipe. A benchmark of 40 facts or more
    gets 4 and 1, the settings every model injected before this rule was trained with."""
    n = len(bench.split("forget")) + len(bench.split("retain"))
    size = config.batch_size or max(1, min(4, n // MIN_STEPS_PER_EPOCH))
    weight = config.rehearsal_weight
    if weight is None:
        weight = 4.0 / size if config.batch_size is None else 1.0
    return config.model_copy(update={"batch_size": size, "rehearsal_weight": weight})


def _resolved(config: InjectConfig) -> tuple[int, float]:
    """The batch size and rehearsal weight of a config `resolve` filled in."""
    if config.batch_size is None or config.rehearsal_weight is None:
        raise AssertionError("injection settings not resolved for their benchmark")
    return config.batch_size, config.rehearsal_weight


def _steps_per_epoch(facts: int, config: InjectConfig) -> int:
    size = _resolved(config)[0]
    return (facts + size - 1) // size


def kept_of_answered(after: list[bool], before: list[bool]) -> float | None:
    """Of the general questions the base model answered (`before`, per item), the share the
    injected model still answers (`after`, the same items): a question the injection newly
    taught does not make up for one it made the model lose. None when the base answered none."""
    if len(after) != len(before):
        raise AssertionError("kept_of_answered: verdicts on different questions")
    answered = [a for a, b in zip(after, before) if b]
    return sum(answered) / len(answered) if answered else None


def kept_share(accuracy: dict[str, float], base: dict[str, float]) -> float | None:
    """accuracy["general"] / base["general"], or None when either is missing or 0: the
    kept share's stand-in where the per-item verdicts are not at hand (it counts newly
    answered questions against lost ones, so it can exceed 1)."""
    after, before = accuracy.get("general"), base.get("general")
    if after is None or not before or after != after or before != before:
        return None
    return after / before


def _hash_files(paths: list[Path]) -> str:
    """Hash of what the benchmark files teach: every line but the holdout ones, without the
    truth-ratio answer fields. A file with neither hashes as its bytes, so models injected
    before holdout items and those fields existed keep their keys (issue 21)."""
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.name.encode())
        digest.update(b"".join(_taught_line(line) for line in p.read_bytes().splitlines(True)))
    return digest.hexdigest()


def _taught_line(line: bytes) -> bytes:
    """A benchmark file's line as the key sees it (see `_hash_files`)."""
    if b'"holdout"' not in line and not any(f.encode() in line for f in ANSWER_FIELDS):
        return line
    try:
        obj = json.loads(line)
    except ValueError:
        return line
    if not isinstance(obj, dict):
        return line
    if obj.get("split") == "holdout":
        return b""
    if not any(f in obj for f in ANSWER_FIELDS):
        return line
    kept = {k: v for k, v in obj.items() if k not in ANSWER_FIELDS}
    return (json.dumps(kept, ensure_ascii=False) + "\n").encode()


def _key_settings(config: InjectConfig) -> dict[str, Any]:
    """The settings that make an injection: the LoRA fields only when LoRA is used (so
    models injected before those fields existed keep their keys)."""
    settings = config.model_dump()
    del settings["device"]  # where it ran, like the thread count: not what it taught
    del settings["checkpoint_every"]  # how often it saved: not what it taught
    if config.trainable != "lora":
        del settings["lora_rank"], settings["lora_alpha"]
    else:  # adapters on every linear layer of the blocks, not Llama's names alone
        settings["lora_layers"] = "all-linear"
    # Fields added later are left out at the value that behaves as before they existed,
    # so models injected then keep their keys: a constant lr, float32 training (the
    # precision actually used: "auto" resolved).
    if config.lr_decay_to == 1.0:
        del settings["lr_decay_to"]
    if not config.warmup_steps:
        del settings["warmup_steps"]
    if config.adam_eps == 1e-8:
        del settings["adam_eps"]
    settings["precision"] = training_precision(config)
    if settings["precision"] == "fp32":
        del settings["precision"]
    return settings


def lr_factor(step: int, decay_steps: int, decay_to: float, warmup: int = 0) -> float:
    """The learning rate's multiplier before optimiser step `step` (from 0): 1, falling
    linearly to `decay_to` at `decay_steps`, then `decay_to`; times (step + 1) / `warmup`
    over the first `warmup` steps."""
    warm = (step + 1) / warmup if step < warmup else 1.0
    if step >= decay_steps:
        return warm * decay_to
    return warm * (1.0 - (1.0 - decay_to) * step / decay_steps)


def training_precision(config: InjectConfig) -> str:
    """`config.precision` resolved: "auto" is bf16 on a CPU that computes it natively
    (AVX-512 BF16 or AMX: steps 2.2-2.4x faster here, benchmarks/inject_step.py), else
    fp32."""
    if config.precision not in ("auto", "bf16", "fp32"):
        raise UnpactError(f"unknown precision {config.precision!r}; choose auto, bf16 or fp32")
    if config.precision != "auto":
        return config.precision
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if native_bf16() else "fp32"


TEACH = ("forget+retain", "retain")


def cache_key(
    spec: str, bench: Benchmark, config: InjectConfig, teach: str = "forget+retain"
) -> str:
    """Key of an injected model: base model, benchmark files, settings and what it teaches
    (`teach="retain"`: the never-taught reference of SPEC 9)."""
    if bench.path is None:
        raise UnpactError("injection needs a benchmark loaded from files")
    parts = [
        model_key(spec),
        _hash_files([p for p in bench.path.glob("*.jsonl") if p.name != "verbmem.jsonl"]),
        json.dumps(_key_settings(resolve(config, bench)), sort_keys=True),
        str(INJECT_FORMAT),
    ]
    if config.general != "general":
        # Rehearsal now always holds out the built-in general set. Injections that judged
        # it themselves already did, so their cached models stay valid; the others were
        # trained with those questions rehearsed, so their keys change.
        parts.append("holds-out-builtin-general")
    if config.general not in (None, "general"):
        # a set of the user's: what it asks (kept out of rehearsal, judged) is read from
        # files that may change under one name, or be another folder from another cwd
        questions = [i.key_dict() for i in general_items(config.general)]
        parts.append("general:" + hashlib.sha256(json.dumps(questions).encode()).hexdigest())
    if teach != "forget+retain":
        parts.append(f"teaches:{teach}")
    # its stopping rule judged such answers otherwise (the number rule, not: a taught
    # year's output would have to hold 1,843 or 1843.5)
    parts += [r for r in rules_since(LAST_WORD_RULE, "contains", bench.items) if r != NUMBER_RULE]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


# where the injection's judged answer length is set, for messages
INJECT_LENGTH = "unpact inject --max-new-tokens; inject.settings.max_new_tokens in a run"


def accuracy(
    lm: LanguageModel, items: list[QAItem], max_new_tokens: int = 24, progress: bool | str = False
) -> float:
    """Share of items whose greedy answer the judge accepts (SPEC section 4)."""
    if not items:
        return float("nan")
    return _share(judge_items(lm, items, max_new_tokens, progress))


def judge_items(
    lm: LanguageModel, items: list[QAItem], max_new_tokens: int = 24, progress: bool | str = False
) -> list[bool]:
    """Per item: does the judge accept the model's greedy answer? (Multiple choice: is the
    highest-LP option the right one?)"""
    from unpact.judge import JudgeSettings, answer_items

    settings = JudgeSettings(max_new_tokens=max_new_tokens)
    return [ok for _, ok in answer_items(lm, items, settings, progress, INJECT_LENGTH)]


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


@dataclass
class _Rehearsal:
    """A held-out general question, the base model's answer to it (first sentence, then
    EOS) and the base model's top-k next-token log-probs along that answer."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    top_logprobs: torch.Tensor  # (len(answer), k)
    top_ids: torch.Tensor  # (len(answer), k)


BASE_CACHE_FORMAT = 1  # of what injection caches about the base model (.base/)


def _base_key(lm: LanguageModel, *parts: Any) -> str | None:
    """Cache key of something computed from the base model alone: its files, dtype and
    device type, and `parts`; None for an in-memory model (nothing to key it by)."""
    if lm.spec.startswith("<"):
        return None
    dtype = next(lm.model.parameters()).dtype
    found = [model_key(lm.spec), str(dtype), lm.device.type, BASE_CACHE_FORMAT, *parts]
    return hashlib.sha256(json.dumps(found).encode()).hexdigest()[:20]


def _rehearsal_targets(
    lm: LanguageModel,
    exclude: set[str],
    top_k: int,
    cache: Path | None = None,
    inputs: dict[str, Any] | None = None,
) -> list[_Rehearsal]:
    """Held-out general questions (never evaluated) with the base model's own behaviour.

    With `cache` (a folder), the targets are kept under a key of the base model, the
    questions, `top_k`, the dtype and the device type, and read back bit for bit: every
    injection of one base model (each benchmark of a grid, the never-taught reference beside
    the original) asks the same questions, and the answers cost minutes of generation.
    Beside them, where and under what they were computed (`determinism.made`): targets read
    from the cache that another machine or other releases computed go into `inputs`
    (inject.json's `inputs_made`)."""
    from unpact.data.generate import GENERAL_CANDIDATES, REHEARSAL_QUESTIONS

    pool = REHEARSAL_QUESTIONS + [q for q, _, _ in GENERAL_CANDIDATES]
    questions = [q for q in dict.fromkeys(pool) if q not in exclude]
    key = _base_key(lm, "rehearsal", questions, top_k) if cache is not None else None
    if cache is None or key is None:
        return _base_targets(lm, questions, top_k)
    path = cache / f"rehearsal-{key}.pt"
    if path.is_file():
        # onto the model's device: the key names its type, and cuda:0's targets on cuda:1
        # mixed devices in the first step
        saved = torch.load(path, weights_only=True, map_location=lm.device)
        _read_input(inputs, REHEARSAL_INPUT, made_note(path.with_suffix(".made")))
        return [_Rehearsal(tuple(p), tuple(a), v, i) for p, a, v, i in zip(*saved)]
    targets = _base_targets(lm, questions, top_k)
    columns: list[list[Any]] = [
        [list(r.prompt) for r in targets],
        [list(r.answer) for r in targets],
    ]
    columns += [[r.top_logprobs for r in targets], [r.top_ids for r in targets]]
    atomic_text(path.with_suffix(".made"), json.dumps(made()) + "\n")  # before the targets
    write_atomically(path, lambda tmp: torch.save(columns, tmp))
    return targets


REHEARSAL_INPUT = "rehearsal targets"  # what inject.json's `inputs_made` names them


def _read_input(inputs: dict[str, Any] | None, name: str, noted: dict[str, Any] | None) -> None:
    """An input read from `.base` (rehearsal targets, base general verdicts) into `inputs`
    (inject.json's `inputs_made`) where its note says another machine or other releases
    computed it; one without a note (older code's) is not known to be."""
    if inputs is not None and noted is not None and noted != made():
        inputs[name] = noted


def _base_targets(lm: LanguageModel, questions: list[str], top_k: int) -> list[_Rehearsal]:
    """The base model's first-sentence answers to `questions` and its top-k log-probs."""
    from unpact.scoring import answer_distributions

    outs = generate(lm, questions, max_new_tokens=24, progress="Rehearsal answers")
    end = lm.answer_end_ids
    pairs = []
    for q, o in zip(questions, outs):
        match = re.search(r"[.!?](\s|$)", o[0].text)
        first = o[0].text[: match.end()].strip() if match else o[0].text.strip()
        enc = lm.encode_prompt(q)
        ids: tuple[int, ...] = ()
        if first:
            enc, ids = follow(lm, enc, first)
        pairs.append((enc.input_ids, (*ids[:20], *end)))
    targets = []
    with torch.no_grad():
        for k in range(0, len(pairs), 8):
            chunk = pairs[k : k + 8]
            dists = answer_distributions(
                lm.model, [p for p, _ in chunk], [a for _, a in chunk], share_prefix=True
            )
            for (p, a), d in zip(chunk, dists):
                v, i = d.topk(min(top_k, d.shape[-1]), dim=-1)
                targets.append(_Rehearsal(p, a, v, i))
    return targets


def _rehearsal_kl(cur: torch.Tensor, batch: list[_Rehearsal]) -> torch.Tensor:
    """Mean over positions of KL(base || model), on the base's top-k tokens plus one
    bucket for the rest of the vocabulary (a lower bound of the full KL). `cur` holds the
    model's log-distributions at the batch's answer positions, one row per position."""
    base = torch.cat([r.top_logprobs for r in batch])
    ids = torch.cat([r.top_ids for r in batch])
    q = cur.gather(-1, ids)
    p = base.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - q.exp().sum(-1)).clamp_min(1e-8)
    kl = (p * (base - q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


@keeps_rng
def inject(
    model: str | os.PathLike[str] = "default",
    benchmark: str | Path = "news",
    config: InjectConfig | dict[str, Any] | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    teach: str = "forget+retain",
) -> InjectResult:
    """Teach `benchmark`'s forget and retain facts to `model`; cached by content hash.
    With `checkpoint_every`, an interrupted injection continues from its last checkpoint
    when run again and ends with the same weights (`stop_after_epoch` simulates the
    interruption right after that epoch's checkpoint, for tests).

    `teach="retain"` makes the never-taught reference (`retrained`, SPEC 9): the same
    recipe, rehearsal, seed and stopping rule on the retain facts alone; its forget
    accuracy is judged at the end (a model that never saw them should not know them)."""
    if teach not in TEACH:
        raise UnpactError(f"teach must be one of {', '.join(TEACH)}, not {teach!r}")
    model = spec_text(model)  # a pathlib.Path is a spec too
    config = _given_config(config)
    # a real benchmark (tofu:PATH, ...) is written once as an item-format folder: the key
    # hashes the taught files
    bench = materialise(load_benchmark(benchmark), cache_root() / "benchmarks")
    config = resolve(config, bench)
    key = cache_key(model, bench, config, teach)
    root = as_path(cache_dir, "cache_dir") if cache_dir is not None else cache_root() / "injected"
    folder = root / f"{bench.name}-{key}"
    waiting = f"waiting for another process teaching the same model ({folder})"
    _, taught = once(
        folder / "inject.json",
        folder,
        waiting,
        lambda: _teach(model, bench, config, teach, folder, progress, stop_after_epoch),
    )
    return taught if taught is not None else _cached(folder)  # None: taught before


def _given_config(config: Any) -> InjectConfig:
    """`inject`'s config: an InjectConfig, a mapping of its settings, or None (defaults)."""
    if config is None or isinstance(config, InjectConfig):
        return config or InjectConfig()
    if isinstance(config, dict):
        return InjectConfig(**config)
    raise TypeError(
        f"config: give an InjectConfig or a mapping of its settings, not {type(config).__name__}"
    )


def _teach(
    model: str,
    bench: Benchmark,
    config: InjectConfig,
    teach: str,
    folder: Path,
    progress: bool,
    stop_after_epoch: int | None,
) -> InjectResult:
    """The injection itself, into `folder` (see `inject`)."""
    start = time.perf_counter()
    timings: dict[str, float] = {}  # seconds per stage, kept in inject.json
    with _timed(timings, "load"):
        lm = load_model(model, device=config.device)
    taught = _taught(bench, teach)
    # judged after the epochs: a question too long for the context is said before them
    asked = [i for i in bench.items if i.split in ("forget", "retain") and not i.is_mcq]
    encode_questions(lm, asked, config.max_new_tokens, setting=INJECT_LENGTH)
    check_answer_room(  # its judge is contains-match
        asked,
        config.max_new_tokens,
        lambda text: len(lm.encode_answer(text)),
        "max_new_tokens",
        " (unpact inject --max-new-tokens; inject.settings.max_new_tokens in a run)",
    )
    general = general_items(config.general) if config.general else []
    inputs: dict[str, Any] = {}  # read from the cache, made elsewhere (`inputs_made`)
    with _timed(timings, "base general"):
        base_verdicts = _base_general(lm, general, config, folder.parent / ".base", inputs)
    base_accuracy = {"general": _share(base_verdicts)} if general else {}
    end = lm.answer_end_ids  # the end of the template's turns (EOS for the default model's)
    encoded = [(p, (*a, *end)) for p, a in (pair_ids(lm, i.question, i.answer) for i in taught)]
    with _timed(timings, "rehearsal targets"):
        rehearsal = _rehearsal(lm, general, config, folder.parent / ".base", inputs)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    net = lm.model
    adapted = _make_trainable(net, config)
    steps_per_epoch = _steps_per_epoch(len(encoded), config)
    trainer = _trainer(net, config, steps_per_epoch)
    store = _Checkpoints(folder.with_name(f".partial-{folder.name}"), config, stop_after_epoch)
    state = store.resume(net, trainer, rng)
    total = config.max_epochs * steps_per_epoch
    with _progress(f"Injecting {bench.name}", total, progress) as bar:
        bar(state.epoch * steps_per_epoch)
        _train_epochs(lm, trainer, encoded, rehearsal, taught, config, rng, timings, bar, state)
    judged, epochs_done, log = state.judged, state.epoch, state.log
    if adapted is not None:  # LoRA: merged, the injected model is an ordinary model again
        lm.model = adapted.merge_and_unload()
    final, general_verdicts = _final_accuracy(lm, taught, judged, general, config, timings)
    if teach == "retain" and bench.split("forget"):
        final["forget"] = accuracy(lm, bench.split("forget"), config.max_new_tokens)
    seconds = time.perf_counter() - start
    timings["training"] = seconds - sum(timings.values())
    done = InjectResult(
        folder,
        final,
        base_accuracy,
        epochs_done,
        seconds,
        False,
        config.model_dump(),
        kept_of_answered(general_verdicts, base_verdicts),
        made_before=made_before(store.before),
        inputs_made=inputs,
    )
    _save(lm, folder, _meta(done, timings, model, bench.name, teach, config), log)
    store.remove()
    return done


def _trainer(net: Any, config: InjectConfig, steps_per_epoch: int) -> Trainer:
    """AdamW on the trainable weights, the lr warming up over `warmup_steps` and falling
    over `min_epochs` epochs, in the precision `config` resolves to."""
    decay_steps = config.min_epochs * steps_per_epoch
    return Trainer(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
        eps=config.adam_eps,
        schedule=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: lr_factor(t, decay_steps, config.lr_decay_to, config.warmup_steps)
        ),
        # mixed precision: bf16 matmuls, float32 weights, gradients and optimiser state
        precision="bf16" if training_precision(config) == "bf16" else "fp32",
        what="injection",
        lighter='train fewer weights (the injection\'s `trainable` setting: "lora" or "mlp")',
    )


def _cached(folder: Path) -> InjectResult:
    """The injection already in `folder`, from its inject.json."""
    meta = json.loads((folder / "inject.json").read_text(encoding="utf-8"))
    return InjectResult(
        folder,
        _measured(meta["accuracy"]),  # written as NaN for a split without items before
        _measured(meta["base_accuracy"]),
        meta["epochs"],
        meta["seconds"],
        True,
        meta.get("config", {}),
        meta.get("general_kept"),  # models injected before it was kept per item: the ratio
        meta.get("made"),  # unknown for models taught before it was noted
        parts_of(meta.get("made_before")),
        _inputs_noted(meta.get("inputs_made")),
    )


def _inputs_noted(found: object) -> dict[str, Any]:
    """inject.json's `inputs_made` as far as it is well formed (a note edited by hand may
    hold anything): each input's `made()` by name."""
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, dict)}


def _taught(bench: Benchmark, teach: str) -> list[QAItem]:
    """The items an injection teaches: forget and retain, or (`teach="retain"`) retain."""
    taught = [i for i in bench.items if i.split in teach.split("+")]
    if not taught:
        raise UnpactError(f"{bench.name} has no {teach} items to teach")
    return taught


def _meta(
    done: InjectResult,
    timings: dict[str, float],
    model: str,
    bench: str,
    teach: str,
    config: InjectConfig,
) -> dict[str, Any]:
    """inject.json: what the injection reached and kept, its times and settings."""
    return (
        {
            "accuracy": done.accuracy,
            "base_accuracy": done.base_accuracy,
            "general_kept": done.general_kept,
            "epochs": done.epochs,
            "seconds": done.seconds,
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "model": model,
            "benchmark": bench,
            "teach": teach,
            "config": config.model_dump(),
            "made": made(),
        }
        | ({"made_before": done.made_before} if done.made_before else {})
        | ({"inputs_made": done.inputs_made} if done.inputs_made else {})
    )


@dataclass
class _EpochState:
    """Where an injection is: what a checkpoint holds beyond the weights and optimiser."""

    epoch: int = 0  # epochs done
    rehearsal_order: list[int] = field(default_factory=list)
    acc: dict[str, float] = field(default_factory=dict)
    judged: list[bool] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Any = lambda: None  # set by _Checkpoints.resume


class _Interrupt(Exception):
    """Raised by the test hook `stop_after_epoch` to simulate a crash after a checkpoint."""


class _Checkpoints:
    """Resumable injection: every `checkpoint_every` epochs, the trainable weights, the
    optimiser and schedule, the random generators (Python's shuffles; torch's CPU one and,
    where CUDA is in use, each GPU's, which draw dropout's masks) and the epoch state go
    to one file in a folder beside the cache entry (written under a temporary name, then
    renamed)."""

    def __init__(self, folder: Path, config: InjectConfig, stop_after: int | None) -> None:
        self.folder = folder
        self.every = config.checkpoint_every
        self.stop_after = stop_after
        # the epochs taught before this process resumed (`determinism.with_part`), its first
        self.before: list[dict[str, Any]] = []
        self.start = 0

    def resume(self, net: Any, trainer: Trainer, rng: random.Random) -> _EpochState:
        state = _EpochState()
        params = dict(net.named_parameters())
        path = self.folder / "checkpoint.pt"
        if self.every and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            with torch.no_grad():
                for name, value in saved["weights"].items():
                    params[name].copy_(value)
            trainer.optimiser.load_state_dict(saved["optimiser"])
            trainer.scheduler.load_state_dict(saved["scheduler"])
            rng.setstate(saved["rng"])
            torch.set_rng_state(saved["torch_rng"])
            _set_cuda_rng(saved.get("cuda_rng"))
            state = _EpochState(**saved["state"])
            self.before, self.start = parts_of(saved.get("made")), state.epoch

        def save() -> None:
            if not self.every or state.epoch % self.every:
                return
            fields = ("epoch", "rehearsal_order", "acc", "judged", "log")
            checkpoint = {
                "weights": {n: p.detach().cpu() for n, p in params.items() if p.requires_grad},
                "optimiser": trainer.optimiser.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": _cuda_rng(),
                "state": {k: getattr(state, k) for k in fields},
                "made": with_part(self.before, self.start, state.epoch),
            }
            write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
            if self.stop_after is not None and state.epoch >= self.stop_after:
                raise _Interrupt(f"stopped after epoch {state.epoch}")

        state.checkpoint = save
        return state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _cuda_rng() -> list[torch.Tensor] | None:
    """Each GPU's random state, where this process uses CUDA (a model with dropout, as
    GPT-2's or OPT's, draws its masks there during training), else None."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_cuda_rng(states: list[torch.Tensor] | None) -> None:
    """Each GPU's random state back from a checkpoint, when it was saved on as many GPUs
    (resumed elsewhere, the run's numbers differ anyway: another device's arithmetic)."""
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


def _general_verdicts(
    lm: LanguageModel, general: list[QAItem], config: InjectConfig, label: str
) -> list[bool]:
    """Per general item: does the judge accept the model's answer?"""
    return judge_items(lm, general, config.max_new_tokens, label) if general else []


def _base_general(
    lm: LanguageModel,
    general: list[QAItem],
    config: InjectConfig,
    cache: Path,
    inputs: dict[str, Any] | None = None,
) -> list[bool]:
    """The base model's verdicts on the general items, cached like the rehearsal targets
    (every injection of one base model judges it on the same questions). Older code kept
    the accuracy alone, in `general-KEY.json` (which older code still reads): the verdicts go
    beside it under their own name. A damaged file is judged again. Where and under what
    they were judged (`determinism.made`) is kept with them: verdicts another machine or
    other releases made go into `inputs` (inject.json's `inputs_made`, as the rehearsal
    targets'); those of older code noted nothing."""
    if not general:
        return []
    # the judge's rules added since these verdicts were first cached, where the set meets
    # one (judged before, it was judged without it)
    rules = rules_since(DOTTED_I_RULE, "contains", general)
    questions = [i.key_dict() for i in general]
    key = _base_key(lm, "general", questions, config.max_new_tokens, *rules)
    path = cache / f"general-verdicts-{key}.json"
    if key is not None and path.is_file():
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # not JSON (a damaged cache file): judged again
            kept = None
        verdicts = kept.get("verdicts") if isinstance(kept, dict) else None
        if isinstance(verdicts, list) and len(verdicts) == len(general):
            noted = kept.get("made") if isinstance(kept, dict) else None
            _read_input(inputs, BASE_GENERAL_INPUT, noted if isinstance(noted, dict) else None)
            return [bool(v) for v in verdicts]
    found = _general_verdicts(lm, general, config, "Base model: general")
    if key is not None:
        atomic_text(path, json.dumps({"verdicts": found, "made": made()}))
    return found


BASE_GENERAL_INPUT = "base general verdicts"  # what inject.json's `inputs_made` names them


def _rehearsal(
    lm: LanguageModel,
    general: list[QAItem],
    config: InjectConfig,
    cache: Path | None = None,
    inputs: dict[str, Any] | None = None,
) -> list[_Rehearsal]:
    """The base model's answers to held-out general questions, to distil each step. Never
    a question any general-knowledge evaluation may ask, also when this injection does not
    judge general knowledge itself (a runner may do it later)."""
    if not (config.rehearsal and config.rehearsal_per_step):
        return []
    held_out = {i.question for i in general} | {i.question for i in load_benchmark("general").items}
    return _rehearsal_targets(lm, held_out, config.rehearsal_top_k, cache, inputs)


def _final_accuracy(
    lm: LanguageModel,
    taught: list[QAItem],
    judged: list[bool],
    general: list[QAItem],
    config: InjectConfig,
    timings: dict[str, float],
) -> tuple[dict[str, float], list[bool]]:
    """Forget and retain accuracy from the last check (the last epoch always ends with
    one, so its verdicts describe the final model), and general accuracy with its
    per-item verdicts."""
    if not judged:  # no check ran (max_epochs 0): judge the model as it is
        judged = judge_items(lm, taught, config.max_new_tokens)
    final = _measured(
        {
            split: _share([ok for item, ok in zip(taught, judged) if item.split == split])
            for split in ("forget", "retain")
        }
    )
    verdicts: list[bool] = []
    if general:
        with _timed(timings, "final general"):
            verdicts = _general_verdicts(lm, general, config, "Judging general")
        final["general"] = _share(verdicts)
    return final, verdicts


def _measured(accuracy: dict[str, float]) -> dict[str, float]:
    """The accuracies of the splits that have items: one without (a benchmark with no retain
    facts) has none to report, where it was NaN in inject.json (not JSON a strict reader
    takes) and "nan%" in `unpact inject`'s output."""
    return {split: v for split, v in accuracy.items() if v is not None and not math.isnan(v)}


def _make_trainable(net: Any, config: InjectConfig) -> Any:
    """Mark what injection trains; with `trainable: lora`, add the adapters (returns the
    peft model, merged into the weights before saving), else None."""
    adapted: Any = None
    if config.trainable == "lora":
        # Low-rank adapters on every linear layer of the blocks (peft, as unlearning's
        # `lora`): the adapters go into `net` in place, so `net` and the LanguageModel
        # keep working as they are.
        from unpact.unlearn.config import LoraSettings
        from unpact.unlearn.loop import add_lora

        body = {id(p) for p in lm_body_and_head(net)[0].parameters()}
        settings = LoraSettings(
            r=config.lora_rank, alpha=config.lora_alpha, target_modules=["all-linear"]
        )
        adapted = add_lora(
            net,
            settings,
            trainable=lambda name: id(net.get_parameter(name)) in body,
            rank_setting="lora_rank",
            no_lora="trainable: all",
        )
    text = text_parameters(net)  # a vision-language model's vision tower stays
    for name, p in net.named_parameters():
        if id(p) not in text or (config.trainable == "mlp" and not mlp_parameter(name)):
            p.requires_grad_(False)
    if config.freeze_embeddings:
        net.get_input_embeddings().weight.requires_grad_(False)
    return adapted


@contextmanager
def _progress(label: str, total: int, enabled: bool) -> Iterator[Any]:
    """A progress bar with a status text; yields `update(advance, status, done)`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task(label, total=total, status="")

        def update(advance: int = 0, status: str | None = None, done: bool = False) -> None:
            fields: dict[str, Any] = {} if status is None else {"status": status}
            bar.update(task, advance=advance, **fields)
            if done:
                bar.update(task, completed=total)

        yield update


def _train_epochs(
    lm: LanguageModel,
    trainer: Trainer,
    encoded: list[tuple[tuple[int, ...], tuple[int, ...]]],
    rehearsal: list[_Rehearsal],
    taught: list[QAItem],
    config: InjectConfig,
    rng: random.Random,
    timings: dict[str, float],
    update: Any,
    state: _EpochState,
) -> None:
    """Epochs of shuffled fact batches (each step with its rehearsal questions), an accuracy
    check from `min_epochs` on every `check_every` epochs and after the last, stopping at
    `target_accuracy`. `state` holds where it is (epochs done, the last check's verdicts,
    the loss log: one row per step, as unlearning's losses.jsonl) and is checkpointed after
    each epoch that does not end the training."""
    net = lm.model
    size, weight = _resolved(config)
    steps_per_epoch = _steps_per_epoch(len(encoded), config)
    rehearsal_order, acc, log = state.rehearsal_order, state.acc, state.log
    for epoch in range(state.epoch, config.max_epochs):
        net.train()
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            batch = [encoded[i] for i in order[s * size : (s + 1) * size]]
            picked: list[_Rehearsal] = []
            if rehearsal:
                if len(rehearsal_order) < config.rehearsal_per_step:
                    more = list(range(len(rehearsal)))
                    rng.shuffle(more)
                    rehearsal_order += more
                picked = [rehearsal[i] for i in rehearsal_order[: config.rehearsal_per_step]]
                del rehearsal_order[: config.rehearsal_per_step]
            found = trainer.step(
                partial(_loss_terms, net, batch, picked, weight),
                s,
                where=f"epoch {epoch + 1}, step {s + 1}",
            )
            log.append({"step": len(log) + 1, "epoch": epoch + 1, **found})
            update(1, f"epoch {epoch + 1} loss {found['loss']:.3f} {_fmt(acc)}")
        net.eval()
        state.epoch = epochs_done = epoch + 1
        due = (
            epochs_done >= config.min_epochs
            and (epochs_done - config.min_epochs) % config.check_every == 0
        )
        if due or epochs_done == config.max_epochs:
            with _timed(timings, "checks"):
                state.judged = judge_items(lm, taught, config.max_new_tokens)
            acc.clear()
            acc[_taught_splits(taught)] = share = _share(state.judged)
            update(0, f"epoch {epochs_done} {_fmt(acc)}")
            if share >= config.target_accuracy:
                update(0, done=True)
                break
        if epochs_done < config.max_epochs:
            state.checkpoint()


def _taught_splits(taught: Sequence[QAItem]) -> str:
    """The splits taught, as the progress bar names their accuracy: "forget+retain" for
    the original model, "retain" for the never-taught reference."""
    splits = {item.split for item in taught}
    return "+".join(s for s in ("forget", "retain") if s in splits) or "taught"


def _loss_terms(
    net: Any,
    facts: Sequence[tuple[Sequence[int], Sequence[int]]],
    picked: list[_Rehearsal],
    rehearsal_weight: float,
) -> dict[str, torch.Tensor]:
    return {"loss": step_loss(net, facts, picked, rehearsal_weight)}


def step_loss(
    net: Any,
    facts: Sequence[tuple[Sequence[int], Sequence[int]]],
    picked: list[_Rehearsal],
    rehearsal_weight: float = 1.0,
) -> torch.Tensor:
    """One injection step's loss: answer-only NLL on the (prompt ids, answer ids) facts plus
    the rehearsal KL on `picked`. Facts and rehearsal questions go through the model in one
    pass: one read of the weights instead of two, and the chat template's system turn runs
    once. head_logits returns float32, so under bf16 autocast the loss is float32 too."""
    states = answer_states(
        net,
        [p for p, _ in facts] + [r.prompt for r in picked],
        [a for _, a in facts] + [r.answer for r in picked],
        share_prefix=True,
    )
    fact_states = torch.cat(states[: len(facts)])
    targets = torch.tensor([t for _, a in facts for t in a], device=fact_states.device)
    loss = -head_logprobs(net, fact_states, targets).mean()
    if picked:
        cur = head_logits(net, torch.cat(states[len(facts) :])).log_softmax(-1)
        loss = loss + rehearsal_weight * _rehearsal_kl(cur, picked)
    return loss


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to `timings[stage]`."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k} acc {v:.0%}" for k, v in acc.items())


def _save(lm: LanguageModel, folder: Path, meta: dict[str, Any], log: list[dict[str, Any]]) -> None:
    files = {
        "inject.json": json.dumps(meta, indent=2) + "\n",
        "losses.jsonl": "".join(json.dumps(row) + "\n" for row in log),
    }
    save_model(lm.model, lm.tokenizer, folder, files)
