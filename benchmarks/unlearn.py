"""Speed and memory of the unlearning loop, per method, against a plain PyTorch loop.

For each method, two fresh processes run the same steps on the default model and the
`news` forget/retain items (same global batches, same loss code): ours (`unpact.unlearn`:
accelerate, the loss log, checkpoint bookkeeping) and a plain loop (the method's loss,
`loss.backward()`, `AdamW.step()`, nothing else). Reported per method: training tokens/s
(median over steps after the first), the loop's overhead against the plain one, and the
peak RSS of our process.

    .venv/bin/python benchmarks/unlearn.py                 # every method, 8 steps each
    .venv/bin/python benchmarks/unlearn.py --methods npo_kl rmu --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(method: str, loop: str, steps: int) -> dict[str, float]:
    import torch

    from unpact.data.sources import load_benchmark
    from unpact.models import load_model
    from unpact.unlearn import get_method, resolve_config, unlearn
    from unpact.unlearn.loop import _batch, _frozen_copy, batch_indices, encode_items

    torch.manual_seed(0)
    cfg = resolve_config(method, overrides=[f"steps={steps}", "save_every=0"])
    times: list[float] = []
    tokens: list[float] = []
    if loop == "ours":
        with tempfile.TemporaryDirectory() as tmp:
            rows: list[dict] = []
            unlearn("default", "news", cfg, Path(tmp) / "run", progress=False, on_step=rows.append)
        times = [r["seconds"] for r in rows]
        tokens = [r["tokens_per_s"] * r["seconds"] for r in rows]
    else:
        lm = load_model("default")
        net = lm.model
        bench = load_benchmark("news")
        forget = encode_items(lm, bench.split("forget"))
        retain = encode_items(lm, bench.split("retain"))
        method_obj = get_method(method)(cfg.method_settings())
        from unpact.unlearn.loop import _reference_activations, _reference_logprobs
        from unpact.unlearn.methods import StepContext

        refs: dict = {}
        if "logprobs" in method_obj.references:
            refs["forget_ref_logprobs"] = _reference_logprobs(net, forget)
        if "activations" in method_obj.references:
            refs["retain_ref_activations"] = _reference_activations(net, retain, method_obj)
        if "model" in method_obj.references:
            refs["reference"] = _frozen_copy(net)
        for name, p in net.named_parameters():
            p.requires_grad_(method_obj.trainable(name))
        net.get_input_embeddings().weight.requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, fused=True)
        for step in range(steps):
            f = batch_indices(len(forget["ids"]), cfg.batch_size, step, cfg.seed)
            r = batch_indices(len(retain["ids"]), cfg.retain_batch_size, step, cfg.seed + 1)
            t0 = time.perf_counter()
            ctx = StepContext(
                model=net, forget=_batch(forget, f), retain=_batch(retain, r), step=step, **refs
            )
            net.train()
            loss = torch.stack(list(method_obj.losses(ctx).values())).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            n = sum(len(forget["prompts"][i]) + len(forget["answers"][i]) for i in f)
            if method_obj.uses_retain:
                n += sum(len(retain["prompts"][i]) + len(retain["answers"][i]) for i in r)
            tokens.append(float(n))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    # the first step pays one-off costs (allocations, lazy init): leave it out
    rate = [t / s for t, s in zip(tokens[1:], times[1:])]
    return {"tokens_per_s": statistics.median(rate), "peak_rss_gb": rss_gb}


def main() -> None:
    from unpact.unlearn import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=sorted(METHODS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "LOOP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.steps)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"{'method':8} {'ours tok/s':>11} {'plain tok/s':>12} {'overhead':>9} {'peak RSS':>9}")
    for method in args.methods:
        res = {}
        for loop in ("plain", "ours"):
            cmd = [sys.executable, __file__, "--one", method, loop, "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            res[loop] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours, plain = res["ours"]["tokens_per_s"], res["plain"]["tokens_per_s"]
        print(
            f"{method:8} {ours:11.0f} {plain:12.0f} {(plain - ours) / plain:9.1%} "
            f"{res['ours']['peak_rss_gb']:8.2f}G",
            flush=True,
        )


if __name__ == "__main__":
    main()
