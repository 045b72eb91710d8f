"""The one optimisation step that unlearning, injection and relearning share.

A `Trainer` owns the optimiser (AdamW) and learning-rate schedule and runs one step on the
named loss terms a caller computes: under bf16 autocast if asked, the terms summed, a
non-finite term stopping the run with its name and step, the backward pass (through
`accelerate` when the caller runs under it, so DDP/FSDP see it), optional gradient
clipping, the optimiser and scheduler steps; on a GPU under torch's deterministic algorithms
(`unpact.determinism.deterministic_kernels`: the same training gives the same weights).
What differs between the three uses is only
the loss (and the data each step sees): unlearning's method terms, injection's NLL plus
rehearsal KL, relearning's NLL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from unpact.determinism import Kernels, kernels_for, reproducibly
from unpact.errors import UnpactError

Precision = Literal["fp32", "bf16"]


def check_training_memory(params: Sequence[torch.nn.Parameter], what: str, lighter: str) -> None:
    """Refuse, before the first step on a CPU (or Apple's unified memory), a training whose
    gradients and AdamW's two moments (three tensors the size of each trainable weight, in
    its dtype) would not fit in the memory free: the first step allocated them and the
    system killed the process without a word, after the model had loaded (which
    `models.load_model` checks) and the caller's preparation had run. On a CUDA GPU torch's
    allocator raises, which `errors.out_of_memory` words. Activations are not counted: the
    check says what cannot fit, not what will (`lighter`: what the caller's settings offer
    instead)."""
    import psutil

    if params[0].device.type not in ("cpu", "mps"):
        return
    weights = sum(p.numel() for p in params)
    need = 3 * sum(p.numel() * p.element_size() for p in params)
    free = psutil.virtual_memory().available
    if need > free:
        raise UnpactError(
            f"{what}: training {weights / 1e9:.2f}B weights needs {need / 2**30:.1f} GiB for "
            f"their gradients and AdamW's two moments, more than the {free / 2**30:.1f} GiB "
            f"of memory free on this machine; {lighter}, or free memory"
        )


class Trainer:
    """AdamW, a schedule and the step loop's one step (see the module docstring)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.0,
        schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
        precision: Precision = "fp32",
        max_grad_norm: float | None = None,
        eps: float = 1e-8,
        fused: bool | None = None,
        accelerator: Any = None,
        what: str = "training",
        lighter: str = "train LoRA adapters (a `lora` setting)",
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise UnpactError(f"{what}: no trainable parameters under these settings")
        check_training_memory(self.params, what, lighter)
        if fused is None:  # the fused kernel: 0.03 s instead of 0.23 s per step on 2 cores
            fused = all(p.device.type == "cpu" or p.is_cuda for p in self.params) and all(
                p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in self.params
            )
        self.optimiser: Any = torch.optim.AdamW(
            self.params, lr=lr, weight_decay=weight_decay, eps=eps, fused=fused
        )
        self.scheduler: Any = schedule(self.optimiser) if schedule is not None else None
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.accelerator = accelerator
        self.what = what
        self.device_type = self.params[0].device.type
        # "strict" on a GPU (see step), "loose" once torch refused an operation there
        self.kernels: Kernels = kernels_for(self.device_type, what)

    def prepare(self, module: torch.nn.Module) -> Any:
        """Under `accelerate`: wrap the module that computes the loss, the optimiser and
        the scheduler (once, before the first step); returns the wrapped module."""
        wrapped, self.optimiser, self.scheduler = self.accelerator.prepare(
            module, self.optimiser, self.scheduler
        )
        return wrapped

    def step(
        self, losses: Callable[[], dict[str, torch.Tensor]], step: int, where: str = ""
    ) -> dict[str, float]:
        """One optimiser step on the sum of the terms `losses()` returns (computed under
        autocast when training in bf16). Returns each term's value (averaged over processes
        under accelerate) and the learning rate the step used.

        On a GPU the step runs under torch's deterministic algorithms. When the model uses an
        operation that has none (torch refuses it), the step is done again with that
        operation's own kernel, and so is every later one: said once, as the training is
        then not bit-reproducible."""
        found, self.kernels = reproducibly(
            lambda: self._step(losses, step, where),
            self.kernels,
            self.what,
            again=lambda: self.optimiser.zero_grad(set_to_none=True),
        )
        return found

    def _step(
        self, losses: Callable[[], dict[str, torch.Tensor]], step: int, where: str
    ) -> dict[str, float]:
        bf16 = self.precision == "bf16"
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=bf16):
            terms = losses()
        _check_terms(terms, self.what)
        loss = torch.stack(list(terms.values())).sum()
        values = torch.stack([t.detach().float() for t in terms.values()])
        if self.accelerator is not None:
            values = self.accelerator.reduce(values, reduction="mean")
        found = dict(zip(terms, values.tolist()))
        for name, v in found.items():
            if not math.isfinite(v):
                at = where or f"step {step + 1}"
                raise UnpactError(
                    f"{self.what}: loss term {name} is {v} at {at}: the run stops and no "
                    "model is saved (lower lr, or set max_grad_norm)"
                )
        if self.accelerator is not None:
            self.accelerator.backward(loss)
            if self.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            loss.backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        lr = float(self.optimiser.param_groups[0]["lr"])
        self.optimiser.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimiser.zero_grad(set_to_none=True)
        return {**found, "lr": lr}


def _check_terms(terms: object, what: str) -> None:
    """A method's `losses()` (a plugin's, typically) must give named scalar tensors."""
    if not isinstance(terms, dict) or not terms:
        got = "an empty dict" if isinstance(terms, dict) else type(terms).__name__
        raise UnpactError(
            f"{what}: losses() must return a non-empty dict of named scalar tensors, not {got}"
        )
    for name, t in terms.items():
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise UnpactError(f"{what}: loss term {name!r} is {shape}, not a scalar tensor")
    if torch.is_grad_enabled() and not any(t.requires_grad for t in terms.values()):
        raise UnpactError(
            f"{what}: no loss term depends on the trained weights ({', '.join(terms)} "
            "carry no gradient): compute them from ctx.model's outputs, outside "
            "torch.no_grad() and without .detach() or .item()"
        )
