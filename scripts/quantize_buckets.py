"""Why 4-bit quantization does or does not undo an unlearning: for each unlearned model, the
share of its linear weights (those the `quantize` attack rounds) that land on the same
4-bit level as the original model's, and how far apart the two models' quantized weights
are, in units of their full-precision distance (Zhang et al. 2024 explain the attack by
unlearning moving weights by less than a quantization step: nearly every level the same,
and a quantized distance well below 1).

    .venv/bin/python scripts/quantize_buckets.py ORIGINAL UNLEARNED [UNLEARNED ...]

Models are any local spec (`unpact run` writes the unlearned ones to OUT/models/METHOD).
Levels: at 4 bits torchao's asymmetric round to nearest (`rtn`, groups of 64) and
bitsandbytes' FP4 and NF4 (blocks of 64); at 8 bits round to nearest (`rtn8`) and
LLM.int8's rows (`llm_int8`): the formats of the attack.
"""

from __future__ import annotations

import argparse

import torch

from unpact.attacks.quantize import (
    INT8_STEP,
    float4_code,
    float4_levels,
    int8_rowwise_levels,
    quantizable,
    rtn_levels,
)
from unpact.models import load_model

FORMATS = ("rtn", "fp4", "nf4", "rtn8", "llm_int8")


def levels(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's level in the format, and the weight it stands for (flat)."""
    if kind in ("rtn", "rtn8"):
        q, zero, scale = rtn_levels(w, 4 if kind == "rtn" else 8, 64)
        return q.reshape(-1), ((q - zero) * scale).reshape(-1)
    if kind == "llm_int8":
        q, stats = int8_rowwise_levels(w)
        return q.reshape(-1), (q * stats.view(-1, 1) * INT8_STEP).reshape(-1)
    index, scale = float4_levels(w, kind, 64)  # type: ignore[arg-type]
    return index, float4_code(kind)[index] * scale  # type: ignore[arg-type]


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out, in): GPT-2's Conv1D stores it transposed."""
    w: torch.Tensor = layer.weight  # type: ignore[assignment]
    return w.detach() if isinstance(layer, torch.nn.Linear) else w.detach().t()


def compare(original: torch.nn.Module, unlearned: torch.nn.Module) -> dict[str, float]:
    theirs = dict(quantizable(unlearned))
    same = dict.fromkeys(FORMATS, 0)
    squared = dict.fromkeys(("full", *FORMATS), 0.0)
    count = 0
    with torch.no_grad():
        for name, layer in quantizable(original):
            a, b = _weight(layer), _weight(theirs[name])
            count += a.numel()
            squared["full"] += float((a.float() - b.float()).pow(2).sum())
            for kind in FORMATS:
                (qa, va), (qb, vb) = levels(a, kind), levels(b, kind)
                same[kind] += int((qa == qb).sum())
                squared[kind] += float((va - vb).pow(2).sum())
    out = {"changed_rms": (squared["full"] / count) ** 0.5}
    for kind in FORMATS:
        out[f"same_level_{kind}"] = same[kind] / count
        out[f"distance_{kind}"] = (squared[kind] / squared["full"]) ** 0.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("original", metavar="ORIGINAL", help="the model before unlearning")
    parser.add_argument("unlearned", nargs="+", metavar="UNLEARNED", help="an unlearned model")
    args = parser.parse_args()
    original = load_model(args.original).model
    names = " / ".join(FORMATS)
    print(f"model | RMS change | same level: {names} | quantized distance: {names}")
    for spec in args.unlearned:
        r = compare(original, load_model(spec).model)
        same = " / ".join(f"{r[f'same_level_{k}']:.1%}" for k in FORMATS)
        far = " / ".join(f"{r[f'distance_{k}']:.1f}" for k in FORMATS)
        print(f"{spec} | {r['changed_rms']:.2e} | {same} | {far}")


if __name__ == "__main__":
    main()
