"""The one training loop every unlearning method shares, built on `accelerate`.

The same code runs in one process or many (`accelerate launch -m unpact unlearn ...`
with DDP, FSDP or DeepSpeed): the global batch of forget (and retain) items of each step
is a fixed, seeded function of the step number and is split evenly over the processes;
every loss term is a mean over items, so the averaged gradient equals the one-process
gradient of the same global batch. The method's loss is computed inside the module that
`accelerate` wraps (`_Objective`), so the wrapper's forward hooks (DDP's gradient sync,
FSDP's unsharding) see every pass.

A run directory holds `config.yaml` (the resolved settings), `losses.jsonl` (one row per
step: each loss term, the total, the learning rate, tokens/s), `checkpoints/step-N/`
(written to a temporary name and renamed: never half-written), and, once finished,
`model/` (safetensors, also renamed into place) and `result.json`. `resume=True`
continues from the last checkpoint and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from unpact.data.items import QAItem
from unpact.data.sources import load_benchmark
from unpact.determinism import keeps_rng, made, made_before, note_text, parts_noted, with_part
from unpact.errors import UnpactError, items_named, said_of
from unpact.files import (
    as_path,
    atomic_text,
    check_folder_path,
    json_lines,
    make_folder,
    sole_writer,
)
from unpact.models import LanguageModel, load_model, parse_device, save_model
from unpact.progress import progress_bar
from unpact.scoring import decoder_layers, expert_parameters, lm_body_and_head, text_parameters
from unpact.train import Trainer
from unpact.types import follow, short_repr, spec_text
from unpact.unlearn.config import (
    ALL_LINEAR,
    LoraSettings,
    UnlearnConfig,
    is_unlearn_record,
    read_yaml_mapping,
    resolve_config,
)
from unpact.unlearn.methods import Batch, Method, StepContext, get_method, layer_activations

log = logging.getLogger(__name__)

RUN_FORMAT = 1


@dataclass
class UnlearnResult:
    """Where the unlearned model is, and how the run went."""

    out: Path
    model_dir: Path
    steps: int
    seconds: float
    final_losses: dict[str, float]
    made: dict[str, Any] | None = None  # where and under what (`determinism.made`)
    # resumed from a checkpoint: the steps another machine or other releases trained
    made_before: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        found = {
            "out": str(self.out),
            "model_dir": str(self.model_dir),
            "steps": self.steps,
            "seconds": self.seconds,
            "final_losses": self.final_losses,
            "made": self.made,
        }
        return found | ({"made_before": self.made_before} if self.made_before else {})


class _Objective(torch.nn.Module):
    """The module `accelerate` wraps: its forward is the method's loss on the step's batch."""

    def __init__(self, lm: Any, method: Method) -> None:
        super().__init__()
        self.lm = lm
        self.method = method
        self.ctx: StepContext | None = None

    def forward(self) -> dict[str, torch.Tensor]:
        assert self.ctx is not None
        return self.method.losses(self.ctx)


class _Interrupt(Exception):
    """Raised by the test hook `stop_after` to simulate a crash after a checkpoint."""


def encode_items(lm: LanguageModel, items: list[QAItem]) -> dict[str, Any]:
    """Chat-formatted prompt ids, answer ids (+ the end of an answer, `answer_end`) and
    the items' own-text spans; an item longer than the model's context is refused by name
    (the loss read it by its place in a batch)."""
    from unpact.scoring import check_fits

    end = lm.answer_end_ids
    prompts, answers, content, encoded = [], [], [], []
    for item in items:
        with said_of(item.label):
            enc, ids = follow(lm, lm.encode_prompt(item.question), item.answer)
        answer = (*ids, *end)
        check_fits(item.label, len(enc.input_ids) + len(answer), lm.max_length)
        prompts.append(enc.input_ids)
        answers.append(answer)
        content.append((enc.content_start, len(enc.input_ids) + len(answer)))
        encoded.append(enc)
    return {
        "ids": [i.id for i in items],
        "prompts": prompts,
        "answers": answers,
        "content": content,
        "encoded": encoded,  # the EncodedPrompts (units for attribution-based methods)
    }


def _batch(encoded: dict[str, Any], idx: list[int]) -> Batch:
    return Batch(
        tuple(encoded["ids"][i] for i in idx),
        tuple(encoded["prompts"][i] for i in idx),
        tuple(encoded["answers"][i] for i in idx),
        tuple(encoded["content"][i] for i in idx),
    )


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of step `step`: a window on a stream of seeded permutations of
    range(n), so it depends only on (n, batch size, step, seed): resumable for free."""
    start = step * batch_size
    out: list[int] = []
    epoch = start // n
    offset = start % n
    while len(out) < batch_size:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + batch_size - len(out)]
        out.extend(take)
        epoch += 1
        offset = 0
    return out


def _given_config(config: Any) -> UnlearnConfig:
    """`unlearn`'s config: an UnlearnConfig, or a mapping read as `unpact unlearn` reads a
    config file (the method's defaults under it; a bare key of the method's settings goes
    to `settings`). Anything else was "'dict' object has no attribute 'method'"."""
    if isinstance(config, UnlearnConfig):
        return config
    if isinstance(config, dict):
        return resolve_config(values=config)
    raise TypeError(
        f"config: give an UnlearnConfig or a mapping such as {{'method': 'npo_gd'}}, not "
        f"{type(config).__name__} {short_repr(config)}"
    )


def total_steps(config: UnlearnConfig, n_forget: int) -> int:
    if config.steps:
        return config.steps
    return max(1, math.ceil(config.epochs * n_forget / config.batch_size))


@keeps_rng
def unlearn(
    model: str | os.PathLike[str] | LanguageModel,
    benchmark: str | Path,
    config: UnlearnConfig | dict[str, Any],
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    device: str = "auto",
) -> UnlearnResult:
    """Unlearn `benchmark`'s forget split from `model` with `config`, writing to `out`.

    `model` is a spec (reloaded on resume) or an in-memory model (tests). `device` is where
    it trains (cpu, cuda, cuda:N; auto: a CUDA GPU if there is one); under a multi-process
    launch each process trains on accelerate's device for it. `stop_after` simulates a
    crash right after that step's checkpoint (for the resume test)."""
    from accelerate.utils import set_seed

    accelerator, where = _accelerator(device)
    out = as_path(out, "out")
    config = _given_config(config)
    if not isinstance(model, LanguageModel):
        model = spec_text(model)  # a pathlib.Path is a spec too
    method = get_method(config.method)(config.method_settings())
    forget_items, retain_items = _items(benchmark, method, config, accelerator.num_processes)
    resolved = {
        "format": RUN_FORMAT,
        "model": model if isinstance(model, str) else model.spec,
        "benchmark": str(benchmark),
        "processes": accelerator.num_processes,
        **config.model_dump(mode="json"),
        "settings": method.settings.model_dump(mode="json"),
    }
    with contextlib.ExitStack() as held:
        start_step = _prepare_out(out, resolved, resume, accelerator, held)
        set_seed(config.seed)
        lm = load_model(model) if isinstance(model, str) else model
        _check_depth(method, lm.model)
        net = _placed(lm.model, accelerator, where)
        forget = encode_items(lm, forget_items)
        retain = encode_items(lm, retain_items)
        steps = total_steps(config, len(forget_items))

        refs = _references(net, method, forget, retain)
        method.prepare(lm, forget)
        original = None
        if type(method).finalize is not Method.finalize:
            original = {n: p.detach().clone() for n, p in net.named_parameters()}

        net = _trainable(net, method, config)
        trainer = _trainer(net, config, steps, accelerator)
        objective = _Objective(net, method)
        wrapped = trainer.prepare(objective)
        before = _resumed(accelerator, out, start_step)

        losses_path = out / "losses.jsonl"
        if accelerator.is_main_process:
            _truncate_log(losses_path, start_step)
        began = time.perf_counter()
        loop = _Loop(
            accelerator, trainer, wrapped, objective, method, config, forget, retain, refs, where
        )
        loop.before, loop.start = before, start_step
        with progress_bar(
            f"Unlearning ({config.method})",
            total=steps,
            enabled=progress and accelerator.is_main_process,
        ) as advance:
            advance(start_step)
            for step in range(start_step, steps):
                loop.run_step(step, losses_path, out, steps, on_step, stop_after)
                advance(1)
        last = loop.last
        seconds = time.perf_counter() - began
        result = UnlearnResult(
            out, out / "model", steps, seconds, last, made(), made_before(before)
        )
        return _finish(accelerator, wrapped, method, config, original, lm, result)


def _accelerator(device: str) -> tuple[Any, torch.device]:
    """accelerate's `Accelerator` and the device this process trains on: the one asked
    for, or under a multi-process launch accelerate's (cuda:N by the process's rank; one
    index asked of every process is refused). accelerate places nothing itself (its
    `prepare` knows no cuda:1): `_placed` does."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    asked = parse_device(device)
    _state_for(asked)
    accelerator = Accelerator(
        cpu=asked.type == "cpu",
        device_placement=False,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        **_settings_not_from_the_environment(),
    )
    if accelerator.num_processes == 1:
        return accelerator, asked
    if asked.index is not None:
        raise UnpactError(
            f"device {device!r} under a multi-process launch: each process trains on its own "
            "device (accelerate's); give cuda, or leave the device out"
        )
    return accelerator, torch.device(accelerator.device)


_SAID_UNUSED: set[str] = set()


def _settings_not_from_the_environment() -> dict[str, Any]:
    """Settings given to accelerate so that it does not read them from the environment,
    where `accelerate launch` puts its config file's: $ACCELERATE_MIXED_PRECISION=bf16
    trained other weights than the method's fp32, which neither the saved config nor a
    run's cache key recorded; $ACCELERATE_GRADIENT_ACCUMULATION_STEPS divided each loss;
    $ACCELERATE_DYNAMO_BACKEND compiled the model. The method's settings decide (its
    `precision`); a setting so left unused is said, once (by the first of several launched
    processes). Under DeepSpeed its own config sets the precision and the accumulation
    (accelerate refuses a mixed precision that disagrees with it): those are left to it."""
    from accelerate.utils import GradientAccumulationPlugin

    given: dict[str, tuple[str, str, Any]] = {  # variable: (argument, inert value, given)
        "ACCELERATE_DYNAMO_BACKEND": ("dynamo_backend", "no", "no"),
    }
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() != "true":
        accumulation = GradientAccumulationPlugin(num_steps=1)
        given["ACCELERATE_MIXED_PRECISION"] = ("mixed_precision", "no", "no")
        given["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = (
            "gradient_accumulation_plugin",
            "1",
            accumulation,
        )
    unused = [
        f"{name}={os.environ[name]}"
        for name, (_, inert, _) in given.items()
        if os.environ.get(name, inert).strip().lower() not in (inert, "")
        and name not in _SAID_UNUSED
    ]
    if unused and os.environ.get("RANK", "0") == "0":
        _SAID_UNUSED.update(u.split("=", 1)[0] for u in unused)
        log.warning(
            "not used: %s (accelerate's, from `accelerate launch`'s config or the "
            "environment): unpact trains as the method's settings say (precision: fp32, or "
            "bf16 for bf16 autocast; batch_size), which its saved config and cache keys record",
            ", ".join(unused),
        )
    return {argument: value for argument, _, value in given.values()}


def _state_for(asked: torch.device) -> None:
    """accelerate keeps one state per process, made by its first `Accelerator`: made on a
    GPU machine for the GPU, a later training on the CPU in the same process (a second
    `unlearn` call, a run's `device: cpu` after an `auto` one) was accelerate's ValueError
    "AcceleratorState has already been initialized ... pass `cpu=True`"; made for the CPU,
    a later GPU training was told its device was the CPU. A process that was not launched
    as one of several starts the state afresh when the device kind changes."""
    from accelerate.state import AcceleratorState, PartialState

    made = PartialState._shared_state.get("device")  # AcceleratorState copies it from here
    if made is None or PartialState._shared_state.get("num_processes", 1) > 1:
        return
    if (made.type == "cpu") != (asked.type == "cpu"):
        AcceleratorState._reset_state(reset_partial_state=True)


def _placed(net: Any, accelerator: Any, where: torch.device) -> Any:
    """`net` on the device it trains on, before the references are made from it: a KL
    method's frozen copy of a model loaded on the CPU stayed there while accelerate's
    `prepare` moved the trained model alone to the GPU, and the first step mixed devices.
    Under FSDP or DeepSpeed, which place each process's shard themselves (a whole copy on
    every GPU is what they save), the model stays where it loaded."""
    from accelerate.utils import DistributedType

    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    return net if accelerator.distributed_type in sharded else net.to(where)


def _check_depth(method: Method, model: Any) -> None:
    """A method's layer settings (RMU's) against the model's decoder blocks, before anything
    is trained. A method that names no layer does not look for them: a model without one
    list of decoder blocks (XLM's attentions and ffns side by side) unlearns by GA or NPO
    as any other."""
    if type(method).check_depth is not Method.check_depth:
        method.check_depth(len(decoder_layers(model)))


def _finish(
    accelerator: Any,
    wrapped: Any,
    method: Method,
    config: UnlearnConfig,
    original: dict[str, torch.Tensor] | None,
    lm: LanguageModel,
    result: UnlearnResult,
) -> UnlearnResult:
    """The unlearned model: LoRA merged, the method's finalize (Task Vector), saved with
    result.json (the run's mark of completion); checkpoints removed."""
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(wrapped).lm
    if config.lora is not None and config.lora.merge:
        final = final.merge_and_unload()
    if original is not None:
        method.finalize(final, original)
    out = result.out
    if accelerator.is_main_process:
        save_model(final, lm.tokenizer, result.model_dir)
        atomic_text(out / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return result


def _trainer(net: Any, config: UnlearnConfig, steps: int, accelerator: Any) -> Trainer:
    """AdamW on what the method trains, with the configured schedule, under accelerate."""
    from transformers import get_scheduler

    return Trainer(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
        schedule=lambda opt: get_scheduler(
            config.scheduler, opt, num_warmup_steps=config.warmup_steps, num_training_steps=steps
        ),
        max_grad_norm=config.max_grad_norm,
        precision=config.precision,
        accelerator=accelerator,
        what=config.method,
        lighter="train LoRA adapters (the method's `lora` setting: --set lora.r=8; "
        "docs/unlearning.md)",
    )


def _items(
    benchmark: str | Path, method: Method, config: UnlearnConfig, world: int
) -> tuple[list[QAItem], list[QAItem]]:
    """The forget and retain items, after checking the run can use them."""
    for name, size in (
        ("batch_size", config.batch_size),
        ("retain_batch_size", config.retain_batch_size),
    ):
        if size % world:
            raise UnpactError(f"{name} {size} does not split evenly over {world} processes")
    bench = load_benchmark(benchmark)
    forget_items, retain_items = bench.split("forget"), bench.split("retain")
    if not forget_items:
        raise UnpactError(f"benchmark {bench.name} has no forget items")
    if method.uses_retain and not retain_items:
        raise UnpactError(f"{config.method} needs retain items; {bench.name} has none")
    return forget_items, retain_items


@dataclass
class _References:
    """What a method compares against, from the model before any step (also when
    resuming: the model was just reloaded from its spec)."""

    model: Any = None  # a frozen copy ("model")
    forget_logprobs: dict[str, float] = field(default_factory=dict)  # ("logprobs")
    retain_activations: dict[str, torch.Tensor] = field(default_factory=dict)  # ("activations")


def _references(
    net: Any, method: Method, forget: dict[str, Any], retain: dict[str, Any]
) -> _References:
    refs = _References()
    if "logprobs" in method.references:
        refs.forget_logprobs = _reference_logprobs(net, forget)
    if "activations" in method.references:
        refs.retain_activations = _reference_activations(net, retain, method)
    if "model" in method.references:
        refs.model = _frozen_copy(net)
    net.eval()
    return refs


def _trainable(net: Any, method: Method, config: UnlearnConfig) -> Any:
    """Mark what the method trains (embeddings frozen if asked); with LoRA, the peft model.
    Only the text model and its head train: a vision-language model's vision tower stays
    as it is (RMU's `layers.1.mlp` named the vision encoder's too)."""
    embeddings = net.get_input_embeddings().weight
    text = text_parameters(net)
    for name, p in net.named_parameters():
        p.requires_grad_(id(p) in text and method.trainable(name))
    if config.freeze_embeddings:
        embeddings.requires_grad_(False)
    if not any(p.requires_grad for p in net.parameters()):
        raise UnpactError(
            f"{method.name}: no weight of {type(net).__name__} is left to train (the method "
            "trains only some modules, which this architecture names otherwise)"
        )
    if config.lora is not None:
        net = add_lora(net, config.lora, method.trainable)
    return net


@dataclass
class _Loop:
    """One unlearning step: this process's share of the step's global batch, the method's
    loss through the wrapped objective, the Trainer's step, the loss log's row."""

    accelerator: Any
    trainer: Trainer
    wrapped: Any
    objective: _Objective
    method: Method
    config: UnlearnConfig
    forget: dict[str, Any]
    retain: dict[str, Any]
    refs: _References
    device: torch.device  # this process's: where its share of a step's token count is summed
    last: dict[str, float] = field(default_factory=dict)
    # the steps trained before this process resumed (`determinism.with_part`), and its first
    before: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0

    def run_step(
        self,
        step: int,
        losses_path: Path,
        out: Path,
        steps: int,
        on_step: Callable[[dict[str, Any]], None] | None,
        stop_after: int | None,
    ) -> None:
        """One step, its row in the loss log, and a checkpoint when one is due."""
        row = self.step(step)
        if self.accelerator.is_main_process:
            with losses_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        if on_step:
            on_step(row)
        done = step + 1
        if self.config.save_every and done % self.config.save_every == 0 and done < steps:
            _checkpoint(self.accelerator, out, done, with_part(self.before, self.start, done))
        if stop_after is not None and done >= stop_after:
            raise _Interrupt(f"stopped after step {done}")

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        config, world = self.config, self.accelerator.num_processes
        rank = self.accelerator.process_index
        n_forget, n_retain = len(self.forget["ids"]), len(self.retain["ids"])
        f_idx = batch_indices(n_forget, config.batch_size, step, config.seed)
        r_idx = batch_indices(n_retain or 1, config.retain_batch_size, step, config.seed + 1)
        f_local = _shard(f_idx, world, rank)
        r_local = _shard(r_idx, world, rank) if n_retain else []
        self.objective.ctx = StepContext(
            model=self.objective.lm,
            forget=_batch(self.forget, f_local),
            retain=_batch(self.retain, r_local),
            step=step,
            reference=self.refs.model,
            forget_ref_logprobs=self.refs.forget_logprobs,
            retain_ref_activations=self.refs.retain_activations,
        )
        self.objective.lm.train()
        found = self.trainer.step(self.wrapped, step)
        lr = found.pop("lr")
        uses_retain = self.method.uses_retain
        tokens = torch.tensor(  # on the training device: NCCL reduces only GPU tensors
            float(_tokens(self.forget, f_local) + _tokens(self.retain, r_local) * uses_retain),
            device=self.device,
        )
        tokens = self.accelerator.reduce(tokens, reduction="sum")
        seconds = time.perf_counter() - t0
        self.last = found
        return {
            "step": step + 1,
            **found,
            "loss": sum(found.values()),
            "lr": lr,
            "tokens_per_s": float(tokens) / seconds,
            "seconds": seconds,
        }


def _shard(idx: list[int], world: int, rank: int) -> list[int]:
    per = len(idx) // world
    return idx[rank * per : (rank + 1) * per]


def _tokens(encoded: dict[str, Any], idx: list[int]) -> int:
    return sum(len(encoded["prompts"][i]) + len(encoded["answers"][i]) for i in idx)


def _frozen_copy(net: Any) -> Any:
    import copy

    ref = copy.deepcopy(net).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def _reference_logprobs(net: Any, encoded: dict[str, Any]) -> dict[str, float]:
    from unpact.scoring import answer_logprobs

    with items_named(lambda n: f"item {encoded['ids'][n]}"):
        lps = answer_logprobs(net.eval(), encoded["prompts"], encoded["answers"])
    return {i: float(lp.sum()) for i, lp in zip(encoded["ids"], lps)}


@torch.no_grad()
def _reference_activations(
    net: Any, encoded: dict[str, Any], method: Method
) -> dict[str, torch.Tensor]:
    layer = method.settings.layer  # type: ignore[attr-defined]
    out: dict[str, torch.Tensor] = {}
    n = len(encoded["ids"])
    net.eval()
    for k in range(0, n, 8):
        batch = _batch(encoded, list(range(k, min(n, k + 8))))
        for i, h in zip(batch.ids, layer_activations(net, batch, layer)):
            out[i] = h.clone()
    return out


def add_lora(
    net: Any,
    settings: LoraSettings,
    trainable: Callable[[str], bool] | None = None,
    *,
    rank_setting: str = "lora.r",
    no_lora: str = "no lora",
) -> Any:
    """Wrap `net` with peft LoRA adapters on the linear modules named in
    `settings.target_modules` (and, if given, whose weight `trainable` accepts). peft puts
    the adapters into `net` in place; the returned model's `merge_and_unload()` gives back
    a plain model. Shared by unlearning and injection (whose messages name its settings:
    `rank_setting`, and `no_lora`, how to train without adapters)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UnpactError("LoRA needs peft: pip install peft") from None
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers; peft adapts them

    linear = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and n]
    targets = settings.target_modules
    if "all-linear" in targets:
        targets = [*block_linear_names(net), *targets]
    names = [
        n
        for n in linear
        if n.rsplit(".", 1)[-1] in targets and (trainable is None or trainable(n + ".weight"))
    ]
    experts = [n for n in _expert_parameters(net, targets) if trainable is None or trainable(n)]
    if not names and not experts:
        own = sorted({n.rsplit(".", 1)[-1] for n in linear} - {"lm_head", "embed_out"})
        raise UnpactError(
            f"LoRA: no module matches {settings.target_modules} for this method; set "
            f"lora.target_modules to some of this model's linear layers: {', '.join(own)} "
            "(or all-linear)"
        )
    shapes = [net.get_submodule(n).weight.shape for n in names]
    shapes += [net.get_parameter(n).shape for n in experts]  # (experts, ., .)
    widest = max(min(shape[-2:]) for shape in shapes)
    if settings.r > widest:  # above it every update is full rank already, memory wasted
        raise UnpactError(
            f"LoRA: rank {settings.r} is above the largest rank an update of these layers "
            f"can have ({widest}: their smaller dimension); lower {rank_setting}, or train "
            f"the weights themselves ({no_lora})"
        )
    if experts and settings.dropout:
        raise UnpactError(
            "LoRA: this mixture of experts keeps its experts in 3-D parameters, whose "
            "adapters (peft's target_parameters) take no dropout; set lora.dropout to 0, or "
            "leave the experts' projections out of lora.target_modules"
        )
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        target_parameters=experts or None,
        # Conv1D stores its weight transposed; peft would say so in a warning and set it
        fan_in_fan_out=any(isinstance(net.get_submodule(n), Conv1D) for n in names),
    )
    with warnings.catch_warnings():
        # peft asks transformers' deprecated `is_gradient_checkpointing` (transformers 5.x);
        # the user can do nothing about it, so it stays out of their output
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        try:
            return get_peft_model(net, lora)
        except ValueError as exc:  # a layer peft will not adapt (Mamba's out_proj)
            said = re.sub(r"^\[PEFT:[\w.]+\]\s*", "", str(exc))
            raise UnpactError(f"LoRA: {said} (lora.target_modules)") from None


def block_linear_names(net: Any) -> list[str]:
    """What `lora.target_modules: all-linear` adapts (and LoRA injection): the names (last
    part) of every linear layer of the text model's blocks, the LM head aside, whatever the
    architecture calls them (GPT-2's c_attn, c_fc, c_proj; Falcon's query_key_value;
    Phi-3's fused qkv_proj and gate_up_proj), and Llama's names besides, by which a mixture
    of experts' 3-D expert projections are reached (`_expert_parameters`)."""
    from transformers.pytorch_utils import Conv1D

    body, _ = lm_body_and_head(net)
    own = {
        n.rsplit(".", 1)[-1]
        for n, m in body.named_modules()
        if n and isinstance(m, (torch.nn.Linear, Conv1D))
    }
    if getattr(net.config, "model_type", None) in _PEFT_MAMBA_TYPES:
        own -= {"out_proj", "conv1d"}  # peft refuses them there (their fused kernels)
    return list(dict.fromkeys([*ALL_LINEAR, *sorted(own)]))


# the model types whose `out_proj` and `conv1d` peft refuses to adapt
# (`peft.tuners.tuners_utils._check_lora_target_modules_mamba`)
_PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}


def _expert_parameters(net: Any, target_modules: list[str]) -> list[str]:
    """The 3-D expert parameters of a mixture of experts (Mixtral, Qwen-MoE, OLMoE, GPT-OSS
    in transformers 5: one (experts, ., .) tensor per projection on a module with
    `num_experts`) that `target_modules` names: `down_proj` by its own name, the fused
    `gate_up_proj` by `gate_proj` or `up_proj`. LoRA reaches them through peft's
    `target_parameters`; `target_modules` alone sees Linear layers only, i.e. attention."""
    found = []
    for name, _, attr in expert_parameters(net):
        parts = {f"{part}_proj" for part in attr.removesuffix("_proj").split("_")}
        if attr in target_modules or parts & set(target_modules):
            found.append(f"{name}.{attr}" if name else attr)
    return found


def _prepare_out(
    out: Path,
    resolved: dict[str, Any],
    resume: bool,
    accelerator: Any,
    held: contextlib.ExitStack,
) -> int:
    """Check or create the run directory; return the step to start from. The main
    process takes the folder's lock (`files.sole_writer`, held in `held` while it trains)
    before it writes config.yaml: two `unpact unlearn`s into one --out at once (a run
    resumed twice, or started twice by a script) wrote checkpoints over each other, and
    with the lock taken after the config the second still wrote its config.yaml over the
    first's before it was refused."""
    if out.exists() and not out.is_dir():
        raise UnpactError(f"--out {out}: a file is there; give a folder for the run")
    check_folder_path(out, "--out")
    config_path = out / "config.yaml"
    start = 0
    if resume:
        if not config_path.is_file():
            raise UnpactError(f"--resume: {out} holds no run to resume")
        try:
            saved = read_yaml_mapping(config_path)
        except UnpactError as exc:  # edited by hand, or damaged
            raise UnpactError(
                f"--resume: {exc}; it is the run's own record, needed to resume"
            ) from None
        if not is_unlearn_record(saved):  # a run's or an audit's: 20 settings said to differ
            raise UnpactError(
                f"--resume: {out} holds no `unpact unlearn` run (its config.yaml is not one: "
                "a run's or an audit's?); give the folder `unpact unlearn --out` wrote"
            )
        saved.setdefault("precision", "fp32")  # a run from before the setting was fp32
        # The process count may change on resume: batches are global, the curve is not.
        diff = sorted(
            k
            for k in set(saved) | set(resolved)
            if k != "processes" and saved.get(k) != resolved.get(k)
        )
        if diff:
            raise UnpactError(
                f"--resume: {out} holds a run with different settings ({', '.join(diff)})"
            )
        start = _last_checkpoint(out)
    elif (out / "model").exists() or config_path.exists():
        if config_path.is_file() and not _holds_unlearn_record(config_path):
            # --resume would be refused there: a run's or an audit's folder
            raise UnpactError(
                f"--out {out}: holds a `unpact run` or `unpact audit` output, not an unlearn "
                "run; give a new or empty folder"
            )
        raise UnpactError(f"{out} already holds a run; pick a new --out or pass --resume")
    elif out.is_dir() and any(not f.name.startswith(".") for f in out.iterdir()):
        # the run's files (model/, checkpoints/ ...) would go in among someone else's
        raise UnpactError(
            f"--out {out}: a folder holding other files, not a run; give a new or empty folder"
        )
    # Every process checks before the main one writes: otherwise a slower process would
    # find the config just written and refuse (a race seen with 2 CPU processes).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        make_folder(out, "--out")
        held.enter_context(sole_writer(out, "--out"))
        if not resume:
            if config_path.exists():  # another run began here since the check above
                raise UnpactError(f"{out} already holds a run; pick a new --out or pass --resume")
            atomic_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
    accelerator.wait_for_everyone()
    return start


def _holds_unlearn_record(path: Path) -> bool:
    """Whether config.yaml is one `unpact unlearn` wrote (a damaged one counts: --resume
    then says what is wrong with it)."""
    try:
        return is_unlearn_record(read_yaml_mapping(path))
    except UnpactError:
        return True


def _last_checkpoint(out: Path) -> int:
    steps = [
        int(p.name.split("-", 1)[1])
        for p in (out / "checkpoints").glob("step-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    ]
    return max(steps, default=0)


# in a checkpoint's folder: where and under what each part of its steps was trained
MADE_NOTE = "unpact-made.json"


def _resumed(accelerator: Any, out: Path, step: int) -> list[dict[str, Any]]:
    """The state of the checkpoint after `step` loaded (none at step 0), and the parts of
    its steps as it noted where they were trained (`determinism.with_part`)."""
    if not step:
        return []
    checkpoint = out / "checkpoints" / f"step-{step}"
    accelerator.load_state(str(checkpoint))
    return parts_noted(note_text(checkpoint / MADE_NOTE))


def _checkpoint(accelerator: Any, out: Path, step: int, parts: list[dict[str, Any]]) -> None:
    """accelerate's state after `step`, with the note of where its `parts` were trained
    (`MADE_NOTE`), renamed into place complete; the one before removed."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".tmp-step-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    # Tied input/output embeddings are saved once; accelerate warns about it on every save.
    # The tie is structural (one Parameter), so resuming restores it: the warning is noise.
    shared_warning = logging.getLogger("accelerate.utils.other")
    level = shared_warning.level
    shared_warning.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        shared_warning.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MADE_NOTE).write_text(json.dumps(parts) + "\n", encoding="utf-8")
        tmp.rename(final)
        for old in (out / "checkpoints").glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for _, line in json_lines(path.read_text(encoding="utf-8"))]
    keep = [r for r in rows if json.loads(r)["step"] <= step]
    atomic_text(path, "".join(r + "\n" for r in keep))
