"""Pulling a taught model back toward its base model, on a small benchmark (docs/data.md).

Run:  .venv/bin/python benchmarks/inject_pull_to_base.py wise [--alphas 1,0.9,0.8,0.7,0.6,0.5]
      .venv/bin/python benchmarks/inject_pull_to_base.py l2sp [--lambdas 30,100,300]

Two ways to keep more of the base model's general knowledge when `small_facts` (12 invented
facts phrased like real questions) is taught with today's defaults, neither kept in unpact:

- `wise`: teach once, then interpolate every weight, `alpha * taught + (1 - alpha) * base`
  (WiSE-FT, Wortsman et al. 2022), and judge the facts and the general questions per alpha
  (one injection, ~4 minutes here, then ~1 minute per alpha);
- `l2sp`: after each optimiser step, decay the trained weights toward the base model's,
  `w -= lr * lambda * (w - w_base)` (the decoupled form of L2-SP, Li et al. 2018), one
  injection per lambda (~4 minutes each).

Each line prints the facts learned and the share of the general questions the base model
answers that the model still answers, counted per question (`general_kept`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from unpact.data.sources import load_benchmark
from unpact.inject import InjectConfig, inject, judge_items, kept_of_answered
from unpact.models import load_model
from unpact.train import Trainer

DATA = Path(__file__).parent / "data" / "small_facts"


def wise(alphas: list[float], scratch: str) -> None:
    done = inject("default", DATA, InjectConfig(), cache_dir=scratch, progress=False)
    base, taught = load_model("default"), load_model(str(done.path))
    start = {k: v.clone() for k, v in base.model.state_dict().items()}
    end = taught.model.state_dict()
    facts = [i for i in load_benchmark(DATA).items if i.split in ("forget", "retain")]
    general = load_benchmark("general").items
    before = judge_items(base, general)
    for alpha in alphas:
        base.model.load_state_dict(
            {
                k: v + alpha * (end[k].to(v.dtype) - v) if v.is_floating_point() else v
                for k, v in start.items()
            }
        )
        learned = sum(judge_items(base, facts))
        kept = kept_of_answered(judge_items(base, general), before) or 0.0
        print(f"alpha {alpha:g}: facts {learned}/{len(facts)}, general kept {kept:.1%}", flush=True)


@contextmanager
def decay_toward_start(strength: float) -> Iterator[None]:
    """Every Trainer made inside decays its weights toward their values at its making."""
    made, stepped = Trainer.__init__, Trainer.step

    def init(self: Trainer, params: Any, **kwargs: Any) -> None:
        made(self, params, **kwargs)
        self.start = [p.detach().clone() for p in self.params]  # type: ignore[attr-defined]

    def step(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, float]:
        out = stepped(self, *args, **kwargs)
        with torch.no_grad():
            for p, p0 in zip(self.params, self.start):  # type: ignore[attr-defined]
                p.sub_(out["lr"] * strength * (p - p0))
        return out

    Trainer.__init__, Trainer.step = init, step  # type: ignore[method-assign]
    try:
        yield
    finally:
        Trainer.__init__, Trainer.step = made, stepped  # type: ignore[method-assign]


def l2sp(lambdas: list[float], scratch: str) -> None:
    for strength in lambdas:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=scratch) as cache, decay_toward_start(strength):
            done = inject("default", DATA, InjectConfig(), cache_dir=cache, progress=False)
        acc = {k: f"{v:.0%}" for k, v in done.accuracy.items()}
        print(
            f"lambda {strength:g}: {acc}, general kept {done.general_kept:.1%} "
            f"({done.epochs} epochs, {time.perf_counter() - start:.0f} s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("way", choices=("wise", "l2sp"))
    parser.add_argument("--alphas", default="1,0.9,0.8,0.7,0.6,0.5")
    parser.add_argument("--lambdas", default="30,100,300")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.way == "wise":
            wise([float(a) for a in args.alphas.split(",")], scratch)
        else:
            l2sp([float(x) for x in args.lambdas.split(",")], scratch)


if __name__ == "__main__":
    main()
