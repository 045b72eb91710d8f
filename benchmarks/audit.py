"""What `unpact audit --preset laptop` costs on news with the default model, stage by stage.

Run:  .venv/bin/python benchmarks/audit.py [--method npo_kl] [--threads 2]

Takes the pair a user would bring from a demo run (`unpact demo`, run once and cached): the
default model taught news's first 20 forget and 20 retain facts (models/original), the same
injection of the retain facts alone (models/retrained: the never-taught reference) and the
demo's `--method` run (models/<method>). Then audits the pair with
an empty stage cache, so every stage of the audit is computed, and prints the seconds of
each (model loads and judging included) and the total; the issue's target is 20 minutes on
a 2-core machine. Each attack's cost is its `attacking` stage on the unlearned model plus its
`control` stage on the reference (and `attack baseline` on the original, where it has one).
The named alternative in the same run: the demo's per-model evaluation (the `evaluating`
stages), which every figure needs anyway.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import unpact  # noqa: F401  (MKL's reproducible mode before torch runs)
from unpact.models import cache_root
from unpact.run import run
from unpact.run.audit import audit


def pair(method: str) -> tuple[str, str, str]:
    """The original, the unlearned model and the reference: the models of a demo run (run
    once, then reused from the cache), as a user holding `unpact demo`'s output would."""
    demo = cache_root() / "benchmarks" / "audit-demo"
    if not (demo / "results.json").is_file():
        run("demo", demo, progress=False)
    models = demo / "models"
    if not (models / method).exists():
        raise SystemExit(f"--method {method}: the demo has no such method ({models})")
    return str(models / "original"), str(models / method), str(models / "retrained")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--method", default="npo_kl")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    original, unlearned, reference = pair(args.method)
    marks: list[tuple[float, str]] = []
    start = time.perf_counter()

    def log(text: str) -> None:
        marks.append((time.perf_counter() - start, text.strip()))
        print(f"{marks[-1][0]:7.0f} s  {text}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        result = audit(
            original,
            unlearned,
            "news",
            Path(tmp) / "out",
            reference=reference,
            cache_dir=Path(tmp) / "stages",
            log=log,
            progress=False,
        )
    total = time.perf_counter() - start
    by_kind: dict[str, float] = defaultdict(float)
    rows = []
    for (t, text), (t_next, _) in zip(marks, [*marks[1:], (total, "")]):
        kind, _, what = text.partition(": ")
        rows.append((t_next - t, kind, what))
        by_kind[kind] += t_next - t
    print(f"\n{'seconds':>8}  stage")
    for secs, kind, what in rows:
        print(f"{secs:8.1f}  {kind}: {what}")
    print(f"\n{'seconds':>8}  stage kind")
    for kind, secs in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{secs:8.1f}  {kind}")
    per_attack: dict[str, float] = defaultdict(float)
    for secs, kind, what in rows:
        if kind in ("attacking", "control", "attack baseline"):
            name = what.split(" with ")[-1].split(" (")[0]
            per_attack[name] += secs
    print(f"\n{'seconds':>8}  attack (on the unlearned model + its control + its baseline)")
    for name, secs in sorted(per_attack.items(), key=lambda kv: -kv[1]):
        print(f"{secs:8.1f}  {name}")
    target = "met" if total <= 20 * 60 else "NOT met"
    print(f"\ntotal {total / 60:.1f} min for the laptop audit (target 20 min: {target})")
    print("verdicts:")
    for v in result.results["verdicts"]["unlearned"]:
        print(f"  {v['test']}: {v['verdict']} — {v['detail']}")


if __name__ == "__main__":
    main()
