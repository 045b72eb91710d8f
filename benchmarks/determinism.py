"""What changes a training run's numbers: three AdamW steps of the default model on news
facts, in a fresh process per setting, float32 and bf16 autocast; prints the loss after the
steps and a hash of the trained weights (docs/runner.md, Reproducibility, quotes the table).

Run:  .venv/bin/python benchmarks/determinism.py

Settings: the thread count, full load on every core (busy-loop processes beside it), and the
kernels' instruction sets (oneDNN's `ONEDNN_MAX_CPU_ISA`, ATen's `ATEN_CPU_CAPABILITY`).
"""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = r"""
import hashlib, sys, torch
import unpact  # MKL's strict mode first
from unpact.data import load_benchmark
from unpact.inject import step_loss
from unpact.models import load_model
threads, precision = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(threads)
lm = load_model("default")
items = load_benchmark("news").split("forget")[:8]
eos = lm.tokenizer.eos_token_id
facts = [(lm.encode_prompt(i.question).input_ids, (*lm.encode_answer(i.answer), eos)) for i in items]
net = lm.model
net.get_input_embeddings().weight.requires_grad_(False)
params = [p for p in net.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=3e-4, fused=True)
net.train()
for s in range(3):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = step_loss(net, facts[2 * s : 2 * s + 4], [])
    loss.backward()
    opt.step()
    opt.zero_grad()
h = hashlib.sha256()
for p in params:
    h.update(p.detach().numpy().tobytes())
print(f"{loss.item():.9f} {h.hexdigest()[:12]}")
"""

SETTINGS: list[tuple[str, int, dict[str, str], bool]] = [
    ("2 threads (reference)", 2, {}, False),
    ("1 thread", 1, {}, False),
    ("8 threads", 8, {}, False),
    ("2 threads, every core busy", 2, {}, True),
    ("ONEDNN_MAX_CPU_ISA=AVX512_CORE", 2, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False),
    ("ONEDNN_MAX_CPU_ISA=AVX2", 2, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    ("ATEN_CPU_CAPABILITY=avx2", 2, {"ATEN_CPU_CAPABILITY": "avx2"}, False),
]


def _child(threads: int, precision: str, env: dict[str, str], busy: bool) -> tuple[float, str]:
    burners = []
    if busy:
        spin = [sys.executable, "-c", "while True: pass"]
        burners = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 2)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads), precision],
            env=os.environ | {"HF_HUB_OFFLINE": "1"} | env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for b in burners:
            b.kill()
    loss, digest = done.stdout.split()[-2:]
    return float(loss), digest


def main() -> None:
    rows = {
        p: [(name, *_child(t, p, env, busy)) for name, t, env, busy in SETTINGS]
        for p in ("fp32", "bf16")
    }
    print(f"| setting | {'fp32 loss':>14} | same weights | {'bf16 loss':>14} | same weights |")
    print("| --- | --- | --- | --- | --- |")
    for n, (name, *_rest) in enumerate(SETTINGS):
        cells = []
        for p in ("fp32", "bf16"):
            _, loss, digest = rows[p][n]
            ref_loss, ref_digest = rows[p][0][1], rows[p][0][2]
            rel = abs(loss - ref_loss) / abs(ref_loss)
            cells += [f"{loss:.9f}", "yes" if digest == ref_digest else f"no ({rel:.1e} rel.)"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        main()
