"""Weight-only quantization through torchao, the attack of Zhang et al. 2024 ("Catastrophic
Failure of LLM Unlearning via Quantization", arXiv:2410.16454): unlearning moves weights
by less than a quantization step, so rounding them back to the grid can restore what the
original model knew.

Why torchao (measured once on this 2-core CPU with SmolLM2-135M, 2026-11-29, each library
installed beside the others; they are not dependencies, so there is no benchmark script):
it is PyTorch's own maintained library; quantizing the model took 0.16-0.23 s and a forward
pass ran at float32 speed (0.067 s against 0.072 s) where optimum-quanto took 0.25-0.65 s
to quantize and 0.10-0.13 s per forward pass and hqq 1.9-5.4 s and 0.10-0.12 s; its
round-to-nearest matches a hand round-trip exactly (tests/unit/test_weight_attacks.py); and
it offers HQQ's optimised scales (`algorithm: hqq`, calibration-free) on the CPU.
GPTQ/AWQ need calibration data and, in the maintained libraries, a GPU at 4 bits: tried
again with torchao 0.18 on this CPU (2026-12-05), its prototype AWQ (`AWQConfig`) ran
over `Int8WeightOnlyConfig` but not 4 bits (`Int4PlainInt32Tensor does not support device
'cpu' yet`; `IntxWeightOnlyConfig`'s tensors take no activation scale), and its prototype
GPTQ's int4 needs the `mslk` kernels, whose PyPI package is an empty placeholder.

The quantized copy is returned as a plain float model holding the dequantized weights
(`q * scale + zero` per group, exactly the values torchao's own linear kernels multiply
by on the CPU), so every path of unpact (batched scoring, generation, attribution) runs
on it unchanged.

The paper's own code (github.com/zzwjames/FailureLLMUnlearning, `utils.load_model`) loads
the unlearned model through bitsandbytes, `BitsAndBytesConfig(load_in_4bit=True)`: its
FP4 data type (not integers) with one absmax scale per block of 64 weights. `algorithm:
fp4` (and `nf4`, QLoRA's NormalFloat, the other 4-bit type of bitsandbytes) rounds to
those grids (`float4_round_trip`, the arithmetic of bitsandbytes' reference CPU kernel,
which a test compares with the library itself), so the attack can be run as published.
Its 8-bit runs load LLM.int8 (`load_in_8bit`): `algorithm: llm_int8` rounds the weights as
that stores them (`int8_rowwise_round_trip`: one absmax scale per output row), and the
inputs of those layers as its inference does (`quantize_activations`: each token's
features rounded to 8 bits of their absolute maximum, all but the outliers at or above
the threshold, which stay in full precision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from unpact.errors import UnpactError


def quantizable(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """The linear layers that weight-only quantization rounds: all but the LM head (which
    most models tie to the embeddings; the published attacks leave it in full precision).
    GPT-2's `Conv1D` (a linear layer with its weight stored transposed) counts too."""
    from transformers.pytorch_utils import Conv1D

    _, head = _body_head(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head
    ]


def expert_weights(model: Any) -> list[tuple[str, torch.nn.Module, str]]:
    """The experts of a mixture-of-experts model (Mixtral, Qwen-MoE, OLMoE, GPT-OSS): each
    projection is one 3-D parameter of (experts, out, in), or (experts, in, out) where the
    module says `is_transposed`, on a module with `num_experts`. Each expert's matrix is a
    linear layer to round; they hold most of such a model's weights, and torchao's
    `quantize_` sees only `Linear` modules. The router stays in full precision, as in
    the published quantized MoE checkpoints."""
    from unpact.scoring import expert_parameters

    body, _ = _body_head(model)
    return [(f"{name}.{attr}", module, attr) for name, module, attr in expert_parameters(body)]


def _experts_out_in(module: torch.nn.Module, attr: str) -> torch.Tensor:
    """An expert parameter as (experts, out features, in features)."""
    w: torch.Tensor = getattr(module, attr)
    return w.transpose(1, 2) if getattr(module, "is_transposed", False) else w


def _out_in(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as (out features, in features), the layout quantization groups."""
    w: torch.Tensor = layer.weight  # type: ignore[assignment]
    return w if isinstance(layer, torch.nn.Linear) else w.t()


def _body_head(model: Any) -> tuple[Any, Any]:
    from unpact.scoring import lm_body_and_head

    return lm_body_and_head(model)


def quantize_weights(
    model: Any,
    bits: int,
    group_size: int | None = 64,
    algorithm: Literal["rtn", "hqq", "fp4", "nf4", "llm_int8"] = "rtn",
    symmetric: bool = False,
) -> int:
    """Round `model`'s linear weights (in place) to a `bits`-bit grid, group-wise along
    the input dimension (`group_size` columns share a scale; None: one per output row; a
    layer whose width the group does not divide: one per row, and a group dividing no
    layer's width is refused),
    and put back the dequantized float weights; a mixture of experts' matrices too
    (`expert_weights`). Returns how many matrices were quantized.

    `rtn`: round to nearest with the group's min/max (asymmetric: a zero point; symmetric:
    scale = max |w| / (2^(bits-1) - 1)). `hqq`: HQQ's optimised scales (symmetric).
    `fp4`, `nf4`: bitsandbytes' 4-bit data types (`float4_round_trip`; bits 4, and
    `group_size` its block size: blocks of the flattened matrix, which need not divide a
    row). `llm_int8`: LLM.int8's weights (`int8_rowwise_round_trip`; bits 8, one scale per
    row whatever `group_size` says)."""
    if problem := format_problem(algorithm, bits):
        raise UnpactError(f"quantize: {problem}")
    layers = quantizable(model)
    experts = expert_weights(model)
    if not layers and not experts:
        raise UnpactError(f"quantize: {type(model).__name__} has no linear layer to quantize")
    if algorithm in ("rtn", "hqq"):  # bitsandbytes' blocks run across rows: any size does
        _check_groups(layers, experts, group_size)
    rounded = _rounder(bits, group_size, algorithm, symmetric)
    for _, layer in layers:  # one at a time
        dequantized = rounded(_out_in(layer).detach())
        if not isinstance(layer, torch.nn.Linear):
            dequantized = dequantized.t().contiguous()
        layer.weight = torch.nn.Parameter(dequantized, requires_grad=False)
    count = len(layers)
    for _, module, attr in experts:  # each expert's matrix as its own layer
        stacked = torch.stack([rounded(w) for w in _experts_out_in(module, attr).detach()])
        if getattr(module, "is_transposed", False):
            stacked = stacked.transpose(1, 2)
        setattr(module, attr, torch.nn.Parameter(stacked.contiguous(), requires_grad=False))
        count += stacked.shape[0]
    return count


def format_problem(algorithm: str, bits: int) -> str | None:
    """What is wrong with quantizing to `bits` bits by `algorithm`, or None (the attack's
    settings and `quantize_weights` refuse the same)."""
    if not 2 <= bits <= 8:
        return f"bits must be between 2 and 8, not {bits}"
    if algorithm in FLOAT4 and bits != 4:
        return f"{algorithm} is a 4-bit data type: bits must be 4, not {bits}"
    if algorithm == "llm_int8" and bits != 8:
        return f"llm_int8 stores 8-bit weights: bits must be 8, not {bits}"
    return None


def _check_groups(
    layers: list[tuple[str, torch.nn.Module]],
    experts: list[tuple[str, torch.nn.Module, str]],
    group_size: int | None,
) -> None:
    """A group size that divides no layer's input features is refused (a layer it does
    not divide alone gets one scale per row)."""
    widths = [(name, _out_in(layer).shape[1]) for name, layer in layers]
    widths += [(name, _experts_out_in(m, attr).shape[2]) for name, m, attr in experts]
    if group_size is not None and all(width % group_size for _, width in widths):
        name, width = widths[0]
        raise UnpactError(
            f"quantize: group_size {group_size} divides the input features of none of the "
            f"model's linear layers ({name}'s are {width}); choose a divisor (e.g. 32) or "
            "group_size: null (one scale per row)"
        )


def _rounder(
    bits: int, group_size: int | None, algorithm: str, symmetric: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function rounding one (out, in) matrix: in bitsandbytes' formats by unpact's
    arithmetic, else through a plain Linear holding it, quantized by torchao; a layer the
    group does not divide (Mamba's dt_proj, a few dozen columns) gets one scale per row,
    as llama.cpp gives such a tensor another type."""
    if algorithm in FLOAT4:
        return lambda w: float4_round_trip(w, algorithm, group_size or w.shape[1])  # type: ignore[arg-type]
    if algorithm == "llm_int8":
        return int8_rowwise_round_trip
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    configs = {  # by whether the layer's width takes the groups
        grouped: IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerGroup(group_size) if grouped and group_size else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC
            if symmetric or algorithm == "hqq"
            else MappingType.ASYMMETRIC,
            intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY
            if algorithm == "hqq"
            else IntxChooseQParamsAlgorithm.AFFINE,
        )
        for grouped in (True, False)
    }

    def rounded(w: torch.Tensor) -> torch.Tensor:
        # built on the meta device: a real one drew its throwaway initial weights from the
        # caller's random stream (and took the time to)
        shadow = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        shadow.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
        quantize_(shadow, configs[group_size is not None and w.shape[1] % group_size == 0])
        return shadow.weight.dequantize().to(w.dtype)

    return rounded


def round_trip(
    weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False
) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of one weight matrix, written out by hand (the
    slow, obvious reference the tests compare the library with). It multiplies by the
    reciprocal scale as torchao does: a group's extreme lands on a rounding tie otherwise."""
    if symmetric:
        x = _groups(weight, group_size)
        top = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(-1, keepdim=True) / ((2 * top + 1) / 2)).clamp_min(1e-12)
        q = torch.clamp(torch.round(x * (1.0 / scale)), -top - 1, top)
        return (q * scale).reshape(weight.shape).to(weight.dtype)
    q, zero, scale = rtn_levels(weight, bits, group_size)
    return ((q - zero) * scale).reshape(weight.shape).to(weight.dtype)


def _groups(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """A (rows, cols) matrix as (rows, groups, group size) in float32: one group per row
    when `group_size` is None or does not divide the row."""
    rows, cols = weight.shape
    g = group_size if group_size and cols % group_size == 0 else cols
    return weight.float().reshape(rows, cols // g, g)


def rtn_levels(
    weight: torch.Tensor, bits: int, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round to nearest of one weight matrix: each weight's integer level q, and
    its group's zero point and scale (the weight stands for (q - zero) * scale), shaped
    (rows, groups, group size) and (rows, groups, 1)."""
    x = _groups(weight, group_size)
    top = 2**bits - 1
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / top).clamp_min(torch.finfo(torch.float32).eps)
    zero = torch.clamp(-torch.round(lo / scale), 0, top)
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero, 0, top), zero, scale


# bitsandbytes' 4-bit data types, as `bitsandbytes.functional.get_4bit_type` defines them:
# FP4 (1 sign, 2 exponent, 1 mantissa bits; its values, normalised by the largest) and NF4
# (QLoRA, Dettmers et al. 2023: quantiles of N(0, 1), 0 and +-1 exact)
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FLOAT4 = ("fp4", "nf4")
INT8_STEP = 7.874015718698502e-3  # 1/127 in float32, as bitsandbytes multiplies by it
LLM_INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig(llm_int8_threshold=6.0)


def float4_code(kind: Literal["fp4", "nf4"]) -> torch.Tensor:
    """The values a 4-bit code of `kind` stands for, in [-1, 1], sorted (float32)."""
    if kind == "fp4":
        half = torch.tensor(_FP4, dtype=torch.float32)
        values = torch.cat([half, -half]) / 12.0  # as bitsandbytes normalises them
    else:
        values = torch.tensor(_NF4, dtype=torch.float32)
    return torch.unique(values)  # sorted; FP4's -0 and +0 are one value


def float4_round_trip(
    weight: torch.Tensor, kind: Literal["fp4", "nf4"], block: int
) -> torch.Tensor:
    """Quantize-dequantize of one weight matrix to bitsandbytes' `kind` with blocksize
    `block`, as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind)` stores
    it (`float4_levels`), multiplied back in float32."""
    index, scale = float4_levels(weight, kind, block)
    picked = float4_code(kind).to(weight.device)[index] * scale
    return picked.reshape(weight.shape).to(weight.dtype)


def float4_levels(
    weight: torch.Tensor, kind: Literal["fp4", "nf4"], block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's code (its index into `float4_code(kind)`) and its block's scale, both
    flat: the flattened weight cut into blocks of `block` (the last may be shorter), each
    scaled by its absolute maximum into [-1, 1] and rounded to the nearest code value (a
    value halfway between two goes to the lower). The arithmetic of bitsandbytes'
    reference kernel (`backends/default/ops.py`, 0.50): full blocks multiplied by the
    reciprocal of their absmax, the shorter last one divided by its own."""
    code = float4_code(kind).to(weight.device)
    midpoints = (code[:-1] + code[1:]) / 2
    flat = weight.detach().reshape(-1).float()
    full = flat.numel() - flat.numel() % block
    blocks = flat[:full].reshape(-1, block)
    absmax = blocks.abs().amax(-1, keepdim=True)
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38))).reshape(-1)]
    scales = [absmax.expand(-1, block).reshape(-1)]
    if full < flat.numel():
        tail = flat[full:]
        top = tail.abs().amax().clamp(min=1e-38)
        scaled.append(tail / top)
        scales.append(top.expand(tail.numel()))
    return torch.bucketize(torch.cat(scaled).clamp(-1, 1), midpoints), torch.cat(scales)


def quantize_activations(model: Any, threshold: float) -> int:
    """LLM.int8's inference (Dettmers et al. 2022; bitsandbytes' `MatMul8bitLt`) on the
    layers `quantize_weights` rounds: each layer's input rounded as
    `int8_activation_round_trip` before it multiplies the layer's weights, which hold
    LLM.int8's dequantized levels (`int8_rowwise_round_trip`). The product is then
    bitsandbytes' (integer products scaled by the two absolute maxima, plus the outlier
    features times the dequantized weight columns) within float rounding. Returns how many
    layers were hooked; the hooks stay with the model."""
    layers = quantizable(model)

    def rounded(_: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (int8_activation_round_trip(args[0], threshold), *args[1:])

    for _, layer in layers:
        layer.register_forward_pre_hook(rounded)
    return len(layers)


def int8_activation_round_trip(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """A linear layer's input as LLM.int8 multiplies it, quantized and dequantized: per
    token (row of the last dimension), the features below `threshold` in absolute value
    cast to float16 and rounded to integers of their absolute maximum / 127 (bitsandbytes'
    `int8_vectorwise_quant`, 0.50), the others, the outliers, kept as they are (its
    mixed-precision decomposition; `threshold` 0: none kept). bitsandbytes finds outlier
    features over all the rows of a forward pass, so that its own numbers depend on what
    else is in the batch; found per token they do not, and they are what it computes when
    it decodes one token at a time."""
    half = x.to(torch.float16)
    outlier = half.abs() >= threshold if threshold > 0 else torch.zeros_like(half, dtype=torch.bool)
    kept = half.masked_fill(outlier, 0)
    stats = kept.abs().amax(-1, keepdim=True).float()
    inverse = torch.where(stats > 0, 127.0 / stats, torch.zeros_like(stats))
    levels = torch.round(kept * inverse)
    return torch.where(outlier, x, (levels * stats * INT8_STEP).to(x.dtype))


def int8_rowwise_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize of one (out, in) weight matrix as LLM.int8 (Dettmers et al.
    2022; `BitsAndBytesConfig(load_in_8bit=True)`) stores it (`int8_rowwise_levels`),
    multiplied back by each row's absolute maximum and 1/127 in float32, as bitsandbytes'
    `int8_vectorwise_dequant` (0.50)."""
    from unpact.models import bnb_int8_weight

    q, stats = int8_rowwise_levels(weight)
    return bnb_int8_weight(q, stats).to(weight.dtype)


def int8_rowwise_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8's integer levels of one (out, in) weight matrix and each row's absolute
    maximum: the weight in float16 (bitsandbytes' `Int8Params` casts it so), each row
    scaled by its absolute maximum to integers in [-127, 127], as bitsandbytes'
    `int8_vectorwise_quant` (0.50). A row of zeros has levels 0."""
    half = weight.detach().to(torch.float16)
    stats = half.abs().amax(-1).float()
    inverse = torch.where(stats > 0, 127.0 / stats, torch.zeros_like(stats))
    return torch.round(half * inverse.unsqueeze(-1)), stats
