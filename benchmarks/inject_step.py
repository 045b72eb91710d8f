"""One injection training step: float32 against bf16 autocast, in one process.

Run:  .venv/bin/python benchmarks/inject_step.py [--rehearsal 0 16] [--threads 2] [--repeats 5]

The step `unpact.inject` takes (default model, AdamW over every weight but the frozen
embeddings): 4 news facts and N held-out general questions with the base model's top-32
next-token targets, in one forward pass, answer-only NLL + the rehearsal KL, backward,
optimiser step. Timed with `precision` fp32 (the alternative: float32 matmuls) and bf16
(autocast; weights, gradients and AdamW state float32), median seconds per step after one
warm-up step, and the first step's loss under both (they should agree to ~1%).
bf16 pays off only where the CPU computes it natively: this script prints whether it does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from unpact.data.sources import load_benchmark
from unpact.determinism import native_bf16
from unpact.inject import _rehearsal_targets, step_loss
from unpact.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearsal", type=int, nargs="*", default=[0, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("default")
    eos = lm.tokenizer.eos_token_id
    facts = [
        (lm.encode_prompt(i.question).input_ids, (*lm.encode_answer(i.answer), eos))
        for i in load_benchmark("news").split("forget")[:4]
    ]
    held_out = {i.question for i in load_benchmark("general").items}
    rehearsal = _rehearsal_targets(lm, held_out, 32)[: max(args.rehearsal, default=0)]
    print(f"threads {args.threads}; native bf16 on this CPU: {native_bf16()}")
    print(
        f"{'rehearsal':>9} {'fp32 s/step':>12} {'bf16 s/step':>12} {'speed-up':>9} {'loss fp32':>10} {'loss bf16':>10}"
    )

    for n in args.rehearsal:
        picked = rehearsal[:n]
        result = {}
        for precision in ("fp32", "bf16"):
            net = copy.deepcopy(lm.model)  # every measurement starts from the base weights
            net.get_input_embeddings().weight.requires_grad_(False)
            params = [p for p in net.parameters() if p.requires_grad]
            optimiser = torch.optim.AdamW(params, lr=3e-4, fused=True)
            losses, times = [], []
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = step_loss(net, facts, picked)  # the step unpact.inject takes
                loss.backward()
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t)
                losses.append(loss.item())
            result[precision] = (statistics.median(times[1:]), losses[0])
        (f32, l32), (b16, lb16) = result["fp32"], result["bf16"]
        print(f"{n:>9} {f32:>12.3f} {b16:>12.3f} {f32 / b16:>8.2f}x {l32:>10.4f} {lb16:>10.4f}")


if __name__ == "__main__":
    main()
