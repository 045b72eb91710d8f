"""The attacks on the weights and the hidden states (issue 22): each one's maths against a
slow obvious reference, on small matrices and the tiny random model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unpact.attacks import AttackContext, get_attack
from unpact.attacks.hidden import (
    ablated,
    continuation_states,
    last_states,
    lens_logits,
    mean_difference,
    probe_accuracy,
    project_out,
    residual_size,
    token_ranks,
)
from unpact.attacks.quantize import (
    float4_code,
    float4_round_trip,
    int8_activation_round_trip,
    int8_rowwise_round_trip,
    quantizable,
    quantize_activations,
    quantize_weights,
    round_trip,
)
from unpact.data.items import QAItem
from unpact.errors import UnpactError
from unpact.judge import JudgeSettings, answer_items
from unpact.models import save_model
from unpact.testing import tiny_model


class _Two(torch.nn.Module):
    """A linear layer and an LM head, shaped like a causal LM for `quantizable`."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(cols, rows, bias=False)
        self.head = torch.nn.Linear(rows, 8, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    @property
    def base_model(self) -> torch.nn.Module:
        return self


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [16, None])
@pytest.mark.parametrize("positive", [False, True])
def test_quantization_through_torchao_is_the_hand_round_trip(bits, symmetric, group, positive):
    """`positive`: every weight above 0, where the asymmetric grid still holds 0 exactly
    (torchao's `preserve_zero`: the range is widened to take it in)."""
    torch.manual_seed(bits)
    m = _Two(6, 64)
    if positive:
        with torch.no_grad():
            m.lin.weight.abs_().add_(0.01)
    w = m.lin.weight.detach().clone()
    head = m.head.weight.detach().clone()
    assert quantize_weights(m, bits, group, symmetric=symmetric) == 1
    assert torch.equal(m.lin.weight, round_trip(w, bits, group, symmetric))
    assert torch.equal(m.head.weight, head)  # the LM head is left in full precision
    # the hand reference itself: 2^bits levels per group at most, error within half a step
    q = round_trip(w, bits, group, symmetric).reshape(6, -1, group or 64)
    assert all(len(torch.unique(g)) <= 2**bits for g in q.reshape(-1, group or 64))
    x = w.reshape(6, -1, group or 64)
    # the grid spans the group's range widened to take in 0
    step = (x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)).max() / (2**bits - 1)
    err_bound = step if symmetric else step / 2 + 1e-6
    assert (q - x).abs().max() <= err_bound


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "fp4", "nf4", "llm_int8"])
def test_quantizing_draws_nothing_from_the_callers_random_stream(algorithm):
    """torchao's layers were built as real `nn.Linear`s, whose throwaway initial weights
    came from the global generator: an audit moved the caller's torch random stream."""
    torch.manual_seed(0)
    m = _Two(6, 64)
    bits = {"fp4": 4, "nf4": 4, "llm_int8": 8}.get(algorithm, 4)
    state = torch.random.get_rng_state()
    quantize_weights(m, bits, 16, algorithm)  # type: ignore[arg-type]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_quantize_refuses_a_group_that_does_not_divide_the_layer():
    with pytest.raises(UnpactError, match="group_size 48 divides the input features of none"):
        quantize_weights(_Two(4, 64), 4, 48)


def test_a_layer_the_group_does_not_divide_gets_one_scale_per_row():
    """Mamba's dt_proj reads a few dozen columns (48 in Mamba-130m): a 64-column group
    divides none of its rows, and the attack stopped the whole audit. Such a layer is
    quantized with one scale per row (the hand reference does the same); the others keep
    their groups."""

    class Three(_Two):
        def __init__(self) -> None:
            super().__init__(6, 128)
            self.narrow = torch.nn.Linear(48, 6, bias=False)

    torch.manual_seed(0)
    m = Three()
    wide, narrow = m.lin.weight.detach().clone(), m.narrow.weight.detach().clone()
    assert quantize_weights(m, 4, 64) == 2
    assert torch.equal(m.lin.weight, round_trip(wide, 4, 64))
    assert torch.equal(m.narrow.weight, round_trip(narrow, 4, None))
    assert not torch.equal(m.narrow.weight, narrow)


def test_bitsandbytes_4bit_types_on_a_hand_computed_block():
    """FP4 and NF4 as bitsandbytes stores them (the paper's code loads the unlearned model
    with `load_in_4bit`): each block scaled by its absmax, each weight the nearest code."""
    w = torch.tensor([[0.12, -0.06, 0.03, 0.0005, 0.0, 0.2, -0.2, 0.1]])
    # block 1: absmax 0.12, scaled 1, -0.5, 0.25, 0.0042 (nearer 1/192 than 0)
    # block 2: absmax 0.2, scaled 0, 1, -1, 0.5
    fp4 = [0.12, -0.06, 0.03, 0.12 / 192, 0.0, 0.2, -0.2, 0.1]
    assert torch.allclose(float4_round_trip(w, "fp4", 4), torch.tensor([fp4]), atol=1e-9)
    nf4 = [0.12, -0.5250730514526367 * 0.12, 0.24611230194568634 * 0.12, 0.0]
    nf4 += [0.0, 0.2, -0.2, 0.44070982933044434 * 0.2]
    assert torch.allclose(float4_round_trip(w, "nf4", 4), torch.tensor([nf4]), atol=1e-9)
    # FP4: 1 sign, 2 exponent, 1 mantissa bits: 15 values (0 is signed twice), NF4 16
    assert float4_code("fp4").mul(12).tolist() == [-12, -8, -6, -4, -3, -2, -0.0625, 0,
                                                   0.0625, 2, 3, 4, 6, 8, 12]  # fmt: skip
    assert len(float4_code("nf4")) == 16
    # a block running past the end of a row, and a shorter last one
    w = torch.randn(3, 10)
    flat = w.reshape(-1)
    by_hand = torch.cat([float4_round_trip(flat[k : k + 8][None], "nf4", 8)[0] for k in (0, 8, 16)])
    tail = float4_round_trip(flat[24:][None], "nf4", 6)[0]
    assert torch.equal(float4_round_trip(w, "nf4", 8).reshape(-1), torch.cat([by_hand, tail]))


@pytest.mark.parametrize("kind", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitsandbytes_4bit_types_are_bitsandbytes_own(kind, dtype):
    """`float4_round_trip` against bitsandbytes' quantize_4bit / dequantize_4bit (its CPU
    kernels), weights of each dtype, blocks within rows and a shorter last block."""
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    for shape, block in [((8, 128), 64), ((4, 256), 128), ((7, 50), 64), ((3, 100), 32)]:
        w = (torch.randn(*shape) * 0.02).to(dtype)
        w[0, :3] = 0.0  # a zero weight, and a block holding zeros
        packed, state = functional.quantize_4bit(w, blocksize=block, quant_type=kind)
        expected = functional.dequantize_4bit(packed, state)
        assert torch.equal(float4_round_trip(w, kind, block), expected), (shape, block)


def test_llm_int8_weights_by_hand_and_by_bitsandbytes():
    """LLM.int8 (the paper's `load_in_8bit`) stores each row as integers of its absmax/127
    (the weight cast to float16 first); a row of zeros stays zero (it was NaN)."""
    w = torch.tensor([[0.5, -0.25, 0.0019, 0.0], [0.0, 0.0, 0.0, 0.0]])
    step = 0.5 / 127  # 0.0019 is 0.48 steps: rounds to 0; -0.25 is -63.5 steps: to -64
    expected = torch.tensor([[0.5, -64 * step, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(int8_rowwise_round_trip(w), expected, atol=1e-6)
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(8, 100) * 0.02).to(dtype)
        packed, stats, _ = functional.int8_vectorwise_quant(w.half())
        expected = functional.int8_vectorwise_dequant(packed, stats).to(dtype)
        assert torch.equal(int8_rowwise_round_trip(w), expected), dtype


def test_llm_int8_activations_by_hand():
    """Per token: features at or above the threshold kept, the rest rounded to integers of
    their absolute maximum / 127 in float16 (a row of zeros stays zero)."""
    x = torch.tensor([[1.0, -0.5, 0.0039, 9.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, -7.0, 0.3]])
    step1, step2 = 1.0 / 127, 2.0 / 127  # the rows' absmax, outliers left out
    expected = torch.tensor(
        [
            [1.0, -64 * step1, 0.0, 9.0],  # -0.5 is -63.5 steps: to -64; 0.0039 is 0.495: 0
            [0.0, 0.0, 0.0, 0.0],
            [2.0, 64 * step2, -7.0, 19 * step2],  # 1.0 is 63.5 steps: to 64; 0.3 is 19.05
        ]
    )
    assert torch.allclose(int8_activation_round_trip(x, 6.0), expected, atol=1e-6)
    # at the threshold itself an outlier (bitsandbytes: `A.abs() >= threshold`)
    edge = torch.tensor([[1.0, 6.0]])
    assert torch.equal(int8_activation_round_trip(edge, 6.0), edge)
    # threshold 0: nothing kept, 9.0 sets the first row's scale
    assert torch.allclose(
        int8_activation_round_trip(x[:1], 0.0),
        torch.tensor([[14 * 9 / 127, -7 * 9 / 127, 0.0, 9.0]]),
        atol=1e-6,
    )


def test_llm_int8_layers_compute_what_bitsandbytes_does_token_by_token():
    """A layer hooked by `quantize_activations`, holding LLM.int8's weights, against
    bitsandbytes' own inference product (`MatMul8bitLt`, which finds outliers over the
    rows it is given: one token at a time, as it decodes), within float rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.autograd._functions import MatmulLtState

    torch.manual_seed(0)
    m = _Two(24, 40)
    m.lin.bias = torch.nn.Parameter(torch.randn(24) * 0.1)
    w = m.lin.weight.detach().clone()
    x = torch.randn(5, 40) * 2
    x[1, 3], x[2, 7], x[3] = 9.0, -7.5, 0.0
    quantize_weights(m, 8, None, "llm_int8")
    for threshold in (6.0, 0.0):
        hooked = copy.deepcopy(m)
        assert quantize_activations(hooked, threshold) == 1
        levels, stats, _ = bnb.functional.int8_vectorwise_quant(w.half())
        for row in x:
            state = MatmulLtState()
            state.has_fp16_weights, state.is_training, state.threshold = False, False, threshold
            state.CB, state.SCB = levels, stats
            with torch.no_grad():
                theirs = bnb.matmul(row[None], levels, state=state, bias=m.lin.bias)
                mine = hooked.lin(row[None])
            assert torch.allclose(mine, theirs, atol=5e-5), threshold


def test_quantize_llm_int8_settings():
    """LLM.int8 rounds the activations with bitsandbytes' threshold unless told otherwise;
    null: the weights alone (the rows cached before, whose key has no threshold); a
    threshold for another format is refused, and is out of that format's key."""
    assert get_attack("quantize", {"algorithm": "llm_int8"}).settings.threshold == 6.0
    alone = get_attack("quantize", {"algorithm": "llm_int8", "threshold": None})
    assert "threshold" not in alone.settings_key()
    assert get_attack("quantize", {"algorithm": "llm_int8"}).settings_key()["threshold"] == 6.0
    assert "threshold" not in get_attack("quantize", {}).settings_key()
    with pytest.raises(UnpactError, match=r"threshold is LLM\.int8's outlier threshold"):
        get_attack("quantize", {"algorithm": "rtn", "threshold": 6.0})


def test_quantize_weights_in_a_bitsandbytes_type_rounds_each_layer_but_the_head():
    torch.manual_seed(0)
    m = _Two(6, 96)  # 96 columns: blocks of 64 run across rows, as bitsandbytes' do
    w, head = m.lin.weight.detach().clone(), m.head.weight.detach().clone()
    assert quantize_weights(m, 4, 64, "fp4") == 1
    assert torch.equal(m.lin.weight, float4_round_trip(w, "fp4", 64))
    assert torch.equal(m.head.weight, head)
    with pytest.raises(UnpactError, match="nf4 is a 4-bit data type: bits must be 4, not 8"):
        quantize_weights(_Two(6, 96), 8, 64, "nf4")
    # and a config asking for it is refused before anything runs, in one plain sentence
    with pytest.raises(UnpactError, match=r"^attack quantize: fp4 is a 4-bit data type: bits"):
        get_attack("quantize", {"algorithm": "fp4", "bits": 8})
    # LLM.int8: 8 bits unless told otherwise, one scale per row
    m = _Two(6, 96)
    w = m.lin.weight.detach().clone()
    assert quantize_weights(m, 8, 64, "llm_int8") == 1
    assert torch.equal(m.lin.weight, int8_rowwise_round_trip(w))
    assert get_attack("quantize", {"algorithm": "llm_int8"}).settings.bits == 8
    with pytest.raises(UnpactError, match="llm_int8 stores 8-bit weights: bits must be 8, not 4"):
        get_attack("quantize", {"algorithm": "llm_int8", "bits": 4})
    with pytest.raises(UnpactError, match="llm_int8 keeps one scale per row: leave group_size"):
        get_attack("quantize", {"algorithm": "llm_int8", "group_size": 32})


def test_quantize_keeps_the_tiny_model_close_at_8_bits_and_rounds_every_layer():
    lm = tiny_model(seed=1)
    ids = torch.tensor([[1, 40, 50, 60, 70]], device=lm.device)
    with torch.no_grad():
        before = lm.model(ids).logits
    n = quantize_weights(lm.model, 8, 32)
    assert n == len(quantizable(lm.model)) == 2 * 7  # q k v o gate up down per layer
    with torch.no_grad():
        after = lm.model(ids).logits
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()


def test_quantize_rounds_gpt2s_conv1d_layers_along_their_input_features():
    """GPT-2's linear layers are `Conv1D` (weight stored as in x out): they were skipped,
    so a 4-bit attack on GPT-2 changed nothing and reported it as a quantized model."""
    from transformers.pytorch_utils import Conv1D

    from unpact.testing import tiny_other

    lm = tiny_other("gpt2")
    convs = {
        n: m.weight.detach().clone() for n, m in lm.model.named_modules() if isinstance(m, Conv1D)
    }
    assert quantize_weights(lm.model, 4, 32) == len(convs) == 2 * 4  # c_attn c_proj c_fc c_proj
    for name, w in convs.items():
        got = lm.model.get_submodule(name).weight
        assert torch.equal(got, round_trip(w.t(), 4, 32).t()), name


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_quantize_rounds_every_expert_of_a_mixture(arch):
    """transformers keeps a mixture's experts as 3-D parameters, which torchao's `quantize_`
    (Linear modules only) never saw: a 4-bit attack on Mixtral rounded the attention alone,
    a fraction of the weights, and reported the model quantized. Each expert's matrix is
    rounded as a linear layer of (out, in), GPT-OSS's stored transposed; the rest stays."""
    from unpact.attacks.quantize import expert_weights
    from unpact.testing import tiny_other

    lm = tiny_other(arch)
    experts = expert_weights(lm.model)
    assert len(experts) == 2 * 2  # gate_up_proj, down_proj per layer
    before = {name: getattr(m, attr).detach().clone() for name, m, attr in experts}
    rounded = {f"{n}.weight" for n, _ in quantizable(lm.model)} | {f"model.{n}" for n in before}
    rest = {n: p.detach().clone() for n, p in lm.model.named_parameters() if n not in rounded}
    assert any(".mlp.gate." in n or ".mlp.router." in n for n in rest)  # the routers
    assert quantize_weights(lm.model, 4, 32) == len(quantizable(lm.model)) + 4 * 3  # 3 experts
    for name, module, attr in experts:
        flipped = getattr(module, "is_transposed", False)
        assert flipped == (arch == "gpt_oss")
        w = before[name].transpose(1, 2) if flipped else before[name]
        want = torch.stack([round_trip(x, 4, 32) for x in w])
        assert torch.equal(getattr(module, attr), want.transpose(1, 2) if flipped else want), name
    for n, p in lm.model.named_parameters():
        if n in rest:  # routers, norms, embeddings, biases, the LM head: as they were
            assert torch.equal(p, rest[n]), n


def test_projecting_out_removes_exactly_the_direction():
    torch.manual_seed(0)
    h, d = torch.randn(5, 7, 16), torch.randn(16)
    out = project_out(h, d)
    u = d / d.norm()
    assert torch.allclose(out @ u, torch.zeros(5, 7), atol=1e-5)
    # what is orthogonal to d is untouched
    basis = torch.linalg.qr(torch.stack([u, *torch.randn(15, 16)]).T)[0][:, 1:]
    assert torch.allclose(out @ basis, h @ basis, atol=1e-5)


def test_ablation_hooks_remove_the_direction_at_the_chosen_layer_and_go_away():
    lm = tiny_model(seed=2)
    seqs = [[1, 40, 50, 60], [1, 70, 80]]
    plain = last_states(lm.model, seqs)
    d = torch.randn(plain.shape[-1])
    with ablated(lm.model, d, at=[1]):  # after layer 0 only
        hooked = last_states(lm.model, seqs)
    u = d / d.norm()
    assert torch.equal(hooked[:, 0], plain[:, 0])  # before: unchanged
    assert torch.allclose(hooked[:, 1], project_out(plain[:, 1], d), atol=1e-5)
    assert torch.allclose(hooked[:, 1] @ u, torch.zeros(2), atol=1e-5)
    assert not torch.allclose(hooked[:, 2], plain[:, 2])  # later layers see the change
    assert torch.equal(last_states(lm.model, seqs), plain)  # hooks removed
    with ablated(lm.model, d):  # everywhere: every residual state is orthogonal to d
        every = last_states(lm.model, seqs)
    assert torch.allclose(every @ u, torch.zeros(2, every.shape[1]), atol=1e-4)


def test_last_states_are_padding_free_and_the_lens_at_the_last_layer_is_the_model():
    lm = tiny_model(seed=3)
    seqs = [[1, 40, 50, 60, 61], [1, 70]]
    states = last_states(lm.model, seqs, batch=2)
    alone = torch.cat([last_states(lm.model, [s]) for s in seqs])
    assert torch.allclose(states, alone, atol=1e-5)
    assert states.shape[1] == residual_size(lm.model) == 3
    with torch.no_grad():
        logits = lm.model(torch.tensor([seqs[0]], device=lm.device)).logits[0, -1].cpu()
    lens = lens_logits(lm.model, states[0, -1]).cpu()
    assert torch.allclose(lens, logits, atol=1e-4)
    rank, prob = token_ranks(lens, int(logits.argmax()))
    assert int(rank) == 0 and float(prob) == pytest.approx(
        float(logits.softmax(-1).max()), rel=1e-4
    )
    second = int(logits.topk(2).indices[1])
    assert int(token_ranks(lens, second)[0]) == 1


@pytest.mark.parametrize("arch", ["llama", "mamba", "recurrent_gemma", "openai_gpt"])
def test_continuation_states_share_the_prompt_and_equal_the_full_pass(arch):
    """Mamba's layers (and RecurrentGemma's recurrent blocks) keep a recurrent state with no
    keys to repeat per continuation (the probe stopped the audit on "'LinearAttentionLayer'
    object has no attribute 'batch_repeat_interleave'"): it runs the concatenations, the
    same states. GPT-1 caches nothing, and its layers return a list, not a tuple (read
    as the hidden states: a TypeError)."""
    from unpact.testing import tiny_other

    lm = tiny_model(seed=3) if arch == "llama" else tiny_other(arch)
    prompt, conts = [1, 40, 50, 60], [[70, 71, 72], [80], [90, 91]]
    shared = continuation_states(lm.model, prompt, conts)
    full = last_states(lm.model, [prompt + c for c in conts])
    layers = lm.model.config.num_hidden_layers
    assert shared.shape == full.shape == (3, layers + 1, 64)
    assert torch.allclose(shared, full, atol=1e-4)


def test_mean_difference_is_the_unit_difference_of_means():
    a, b = torch.tensor([[2.0, 0.0], [4.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(mean_difference(a, b), torch.tensor([1.0, 0.0]))


def test_the_probe_beats_chance_on_a_separable_case_and_not_on_noise():
    rng = np.random.default_rng(0)

    # options of 3; the right one has feature 0 shifted up; the rest is noise
    def make(n):
        x = rng.normal(size=(3 * n, 8))
        y = np.zeros(3 * n, dtype=int)
        right = rng.integers(0, 3, size=n)
        for i, r in enumerate(right):
            x[3 * i + r, 0] += 4.0
            y[3 * i + r] = 1
        return x, y, [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(n)], right.tolist()

    x, y, _, _ = make(40)
    tx, _, groups, right = make(30)
    verdicts, _ = probe_accuracy(x, y, tx, groups, right)
    assert np.mean(verdicts) > 0.9
    noise = rng.normal(size=tx.shape)
    verdicts, _ = probe_accuracy(x, y, noise, groups, right)
    assert np.mean(verdicts) < 0.6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    for seed in (0, 1):
        lm = tiny_model(seed=seed)
        save_model(lm.model, lm.tokenizer, root / f"m{seed}")
    return root


def _items(split, n, offset=0):
    words = ["Paris", "river", "glass", "seven", "Mira", "fox"]
    return [
        QAItem(
            f"{split}-{k}",
            f"What is the capital of France? number {k + offset}",
            words[k % 6],
            split,
            perturbed_answers=(words[(k + 1) % 6], words[(k + 2) % 6]),
        )
        for k in range(n)
    ]


def _ctx(saved, name, items, **extra):
    from unpact.models import load_model

    lm = load_model(str(saved / "m1"))
    return AttackContext(
        model=lambda: lm,
        spec=str(saved / "m1"),
        items=items,
        keys={},
        retain=_items("retain", 6, 10),
        judge=JudgeSettings(max_new_tokens=3),
        label="m1",
        original_spec=str(saved / "m0"),
        general=_items("general", 4, 20),
        **extra,
    )


def test_the_attacks_keys_hold_what_they_train_on_and_the_original_by_content(saved):
    """The probe's key left out the retain items it trains on, relearning and
    ablate_direction held their ids alone (an answer edited under its id read the old
    rows), and ablate_direction held the original's folder, not its content (a checkpoint
    retrained in place read the old direction)."""
    import dataclasses

    items = _items("forget", 2)
    retain = _items("retain", 6, 10)
    edited = [dataclasses.replace(retain[0], answer="Quintrell"), *retain[1:]]
    for name in ("probe", "relearn", "ablate_direction"):
        attack = get_attack(name)
        one = attack.key_parts(_ctx(saved, name, items, original_key="a"))
        ctx = dataclasses.replace(_ctx(saved, name, items, original_key="a"), retain=edited)
        assert attack.key_parts(ctx) != one, name
    ablate = get_attack("ablate_direction")
    keys = [ablate.key_parts(_ctx(saved, "a", items, original_key=k)) for k in ("a", "b")]
    assert keys[0] != keys[1]


@pytest.mark.parametrize(
    "name", ["quantize", "relearn_unrelated", "ablate_direction", "logit_lens", "probe"]
)
def test_each_attack_runs_on_the_tiny_model_with_a_row_per_item(saved, name):
    items = _items("forget", 4)
    attack = get_attack(name, {"steps": 2, "items": 2} if name == "relearn_unrelated" else {})
    rows = attack.run(_ctx(saved, name, items))
    assert [r["id"] for r in rows] == [i.id for i in items]
    assert all(isinstance(r["recovered"], bool) and "outputs" in r for r in rows)
    if name in ("logit_lens", "probe"):
        width = len(rows[0]["layers"])
        assert width == 2 and all(r["layer"] == rows[0]["layer"] for r in rows)
        best = rows[0]["layer"]
        assert all(r["recovered"] == r["layers"][best] for r in rows)
        assert best == 0  # the last layer (index 1) is the model's own answer, left out


def test_ablating_a_direction_of_zero_recovers_nothing_and_says_so(saved, caplog):
    """States at the ablated point equal to the original's (unlearning that changed later
    layers only; here the original itself) leave nothing to remove: the attack recovers
    nothing, with a note, where it ended the run after every other stage ("the direction
    to ablate is zero"). The original given as its own reference is refused before a run
    (tests/process/test_weight_attacks_run.py)."""
    import logging

    items = _items("forget", 2)
    ctx = _ctx(saved, "ablate_direction", items)
    ctx.original_spec = ctx.spec
    with caplog.at_level(logging.WARNING, logger="unpact"):
        rows = get_attack("ablate_direction").run(ctx)
    assert "ablate_direction on m1: its residual states at point 1" in caplog.text
    # the model's own answers, unablated
    plain = answer_items(ctx.model(), items, ctx.judge)
    assert [r["outputs"] for r in rows] == [[o] for o, _ in plain]


def test_quantize_baseline_judges_every_split(saved):
    ctx = _ctx(saved, "quantize", [])
    rows = get_attack("quantize", {"bits": 8, "group_size": 32}).baseline(
        ctx, {"forget": _items("forget", 2), "retain": _items("retain", 3)}
    )
    assert [r["split"] for r in rows] == ["forget"] * 2 + ["retain"] * 3


def test_a_recovered_answer_is_explained_against_the_original_focus(saved):
    from unpact.attacks.weights import explain
    from unpact.attribution import attribute_many
    from unpact.models import load_model

    items = _items("forget", 2)
    lm = load_model(str(saved / "m1"))
    settings = {"unit": "token", "baseline": "delete", "alpha": 0.5, "beta": 0.5, "max_work": None}
    original = attribute_many(
        lm,
        [i.question for i in items],
        [i.answer for i in items],
        unit="token",
        baseline="delete",
        alpha=0.5,
        beta=0.5,
    )
    ctx = _ctx(saved, "quantize", items, attribution=settings)
    ctx.original = {i.id: {"attribution": a.to_dict()} for i, a in zip(items, original)}
    rows = [{"id": i.id, "recovered": n == 0} for n, i in enumerate(items)]
    explain(lm, ctx, rows)  # the same model: the focus is the original's exactly
    assert rows[0]["keytoken_similarity"] == 1.0 and rows[0]["key_tokens"]
    assert "keytoken_similarity" not in rows[1]  # not recovered: not attributed


def test_hqq_scales_keep_the_grid_and_err_no_more_than_round_to_nearest():
    torch.manual_seed(7)
    m = _Two(8, 64)
    w = m.lin.weight.detach().clone()
    quantize_weights(m, 4, 16, algorithm="hqq")
    q = m.lin.weight.detach()
    assert all(len(torch.unique(g)) <= 16 for g in q.reshape(-1, 16))
    rtn = round_trip(w, 4, 16, symmetric=True)  # HQQ's scale-only variant is symmetric
    assert ((q - w) ** 2).mean() <= ((rtn - w) ** 2).mean() * 1.0001
    assert not torch.equal(q, rtn)  # the scales were optimised, not the min/max ones


def _lens_rows(saved, opts):
    """The tiny model, the question's prompt, each option's tokens after it, and the logit
    lens's rows for one item per option (each the right one in turn)."""
    from unpact.models import load_model

    lm = load_model(str(saved / "m1"))
    question = "What is the capital of France?"
    prompt = lm.encode_prompt(question)
    items = [QAItem(f"forget-{n}", question, o, "forget", choices=opts) for n, o in enumerate(opts)]
    rows = get_attack("logit_lens", {"last_layer": True}).run(_ctx(saved, "x", items))
    return lm, prompt, [lm.encode_answer(o, prompt) for o in opts], rows


def _lens_at(lm, seq):
    """The lens's logits after each layer at the last token of `seq`."""
    return lens_logits(lm.model, last_states(lm.model, [seq])[0, 1:])


def test_the_lens_reads_an_option_that_ends_where_another_goes_on_at_its_end(saved):
    """ "Paris" against "Paris river": they share every token of the shorter, so "Paris" was
    never right at any layer (and "Paris river" neither). Now read where "Paris" ends: its
    end-of-answer token against the other's next one, after the shared token."""
    from unpact.attacks.weights import answer_end

    lm, prompt, (paris, river, glass), rows = _lens_rows(saved, ("Paris", "Paris river", "glass"))
    assert river[: len(paris)] == paris and answer_end(lm) == [lm.tokenizer.eos_token_id]
    first, after = (_lens_at(lm, s) for s in ([*prompt.input_ids], [*prompt.input_ids, *paris]))
    end, layers = answer_end(lm)[0], range(len(first))
    p, g, r = paris[0], glass[0], river[len(paris)]
    assert rows[0]["layers"] == [
        bool(first[k, p] > first[k, g]) and bool(after[k, end] > after[k, r]) for k in layers
    ]
    assert rows[1]["layers"] == [
        bool(first[k, p] > first[k, g]) and bool(after[k, r] > after[k, end]) for k in layers
    ]
    assert rows[2]["layers"] == [bool(first[k, g] > first[k, p]) for k in layers]
    assert all(sum(row["layers"][k] for row in rows) == 1 for k in layers)  # one pick each


def test_the_lens_reads_options_that_all_open_alike_where_they_part(saved):
    """Options that all open with the same token (a shared first word; the lone space a
    template ending `Answer: ` leaves before digits) were never right: every option had
    the right one's first token. They are read after it, by the token where they part."""
    from unpact.attacks.weights import _decisions

    three = [[5, 6, 7], [5, 6, 8], [5, 9]]
    assert _decisions(three, 2) == ([([5], 9, [6])], True)
    # the right option shares its token with another: read on where those two part
    assert _decisions(three, 0) == ([([5], 6, [9]), ([5, 6], 7, [8])], True)
    assert _decisions([[5], [5, 6]], 0) == ([([], 5, [])], False)  # "5" ends, "5 6" goes on
    assert _decisions([[5, 6], [5, 6]], 1) == ([([5], 6, [])], False)  # the same option twice
    # the tiny tokenizer: A + Ġ, Ġb, Ġm
    lm, prompt, conts, rows = _lens_rows(saved, ("A lamp", "A bell", "A mill"))
    assert len({c[0] for c in conts}) == 1 and len({c[1] for c in conts}) == 3
    logits = _lens_at(lm, [*prompt.input_ids, conts[0][0]])
    for n, row in enumerate(rows):
        right, others = conts[n][1], [c[1] for m, c in enumerate(conts) if m != n]
        want = [all(logits[k, right] > logits[k, t] for t in others) for k in range(len(logits))]
        assert row["layers"] == want
    assert sum(any(r["layers"]) for r in rows) >= 1  # some option is the lens's pick


def test_the_lens_reads_on_where_options_sharing_the_right_token_part(saved):
    """Options sharing the right option's first token were never right (5% of the built-in
    wmdp items, more on real WMDP, where options open alike): read on after that token,
    where they part, the right option must win at both readings."""
    lm, prompt, conts, rows = _lens_rows(saved, ("Paris lamp", "Paris bell", "glass"))
    # the tiny tokenizer: "Paris", "Ġ", then "l..." against "b...": they part at the third
    assert conts[0][:2] == conts[1][:2] and conts[0][2] != conts[1][2]
    assert conts[0][0] != conts[2][0]
    first, second = (
        _lens_at(lm, s) for s in ([*prompt.input_ids], [*prompt.input_ids, *conts[0][:2]])
    )
    layers = range(len(first))
    for n in (0, 1):  # the lens at both readings, by hand
        mine, theirs = conts[n][2], conts[1 - n][2]
        want = [
            bool(first[k, conts[n][0]] > first[k, conts[2][0]])
            and bool(second[k, mine] > second[k, theirs])
            for k in layers
        ]
        assert rows[n]["layers"] == want
    assert rows[2]["layers"] == [
        bool(first[k, conts[2][0]] > first[k, conts[0][0]]) for k in layers
    ]
    # the pick is one option at every layer: exactly one of the three is right there
    assert all(sum(r["layers"][k] for r in rows) == 1 for k in layers)


@pytest.mark.parametrize(
    "arch",
    [
        *("gpt2", "opt", "opt_proj", "gpt_neox", "qwen2", "gemma", "phi"),
        *("mistral", "gemma2", "bloom", "gemma3_vl", "mixtral", "gpt_oss"),
    ],
)
def test_the_residual_stream_is_read_and_ablated_in_other_architectures(arch):
    """Once Llama-style only (`embed_tokens`, `layers`, `norm`): GPT-2, OPT and GPT-NeoX were
    refused, and Gemma's index 0 missed its embedding scaling. Index 0 is what the first
    layer receives (transformers' hidden_states[0]), l + 1 what layer l gives, and the lens
    at the last layer is the model's own output."""
    from unpact.testing import tiny_other

    lm = tiny_other(arch)
    seqs = [[1, 40, 50, 60, 61], [1, 70, 71]]
    states = last_states(lm.model, seqs, batch=2)
    assert states.shape[1] == residual_size(lm.model) == 3
    with torch.no_grad():
        out = lm.model(torch.tensor([seqs[0]], device=lm.device), output_hidden_states=True)
    for k in (0, 1):  # transformers' last hidden state has the final norm applied
        want = out.hidden_states[k][0, -1].float().cpu()  # last_states gives CPU tensors
        assert torch.allclose(states[0, k], want, atol=1e-4), k
    lens = lens_logits(lm.model, states[0, -1]).cpu()
    assert torch.allclose(lens, out.logits[0, -1].cpu(), atol=1e-3)
    d = torch.randn(states.shape[-1])
    with ablated(lm.model, d):
        every = last_states(lm.model, seqs)
    assert torch.allclose(every @ (d / d.norm()), torch.zeros(2, 3), atol=1e-4)
    shared = continuation_states(lm.model, seqs[0][:3], [seqs[0][3:], [80]])
    assert torch.allclose(shared[0], states[0], atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_rmu_trains_the_mlps_and_reads_the_layer_of_other_architectures(arch):
    """RMU once stopped on `body.layers` (GPT-2, OPT) and trained nothing where the MLPs are
    named otherwise (`h.i.mlp`, OPT's fc1/fc2)."""
    from unpact.testing import tiny_other
    from unpact.unlearn.methods import RMU, Batch, layer_activations

    lm = tiny_other(arch)
    rmu = RMU(RMU.Settings(layer=1))
    names = [n for n, _ in lm.model.named_parameters() if rmu.trainable(n)]
    assert names and all(".0." in n or ".1." in n for n in names), names
    assert not any("attn" in n or "attention" in n for n in names), names
    batch = Batch(("a",), ((1, 40, 50),), ((60, 2),), ((1, 5),))
    (acts,) = layer_activations(lm.model, batch, 0)
    with torch.no_grad():
        out = lm.model(
            torch.tensor([[1, 40, 50, 60, 2]], device=lm.device), output_hidden_states=True
        )
    assert torch.allclose(acts.cpu(), out.hidden_states[1][0, 1:5].cpu(), atol=1e-5)


def test_relearning_gives_the_callers_torch_stream_back(saved):
    """The relearned copy's training seeds torch; the caller's stream is given back."""
    ctx = _ctx(saved, "relearn_unrelated", _items("forget", 2))
    attack = get_attack("relearn_unrelated", {"steps": 2, "items": 2})
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    attack.run(ctx)
    assert torch.equal(torch.rand(4), expected)


def test_the_lens_reads_an_open_answer_past_the_lone_space_it_opens_with(saved, tmp_path):
    """DeepSeek's `Assistant:` then an answer whose first word leaves the space a token of
    its own (`Ġ`, then `Wh` on the tiny tokenizer; a year on tokenizers that split digits):
    every answer opens with that space, so reading it told nothing of what a model knows
    (any model writes it first, the never-taught one too). The lens reads after it, at the
    answer's first word."""
    import shutil

    from tests.unit.test_models import GAP_TEMPLATE
    from unpact.models import load_model
    from unpact.types import pair_ids

    shutil.copytree(saved / "m1", tmp_path / "gap")
    lm = load_model(str(saved / "m1"))
    lm.tokenizer.chat_template = GAP_TEMPLATE
    lm.tokenizer.save_pretrained(tmp_path / "gap")
    lm = load_model(str(tmp_path / "gap"))
    question, answer = "What is the capital of France?", "Who wrote it"
    prompt, ids = pair_ids(lm, question, answer)
    assert lm.token_texts(ids[:1]) == ["Ġ"] and ids[1:] == lm.encode_answer(answer)
    ctx = _ctx(saved, "x", [QAItem("forget-0", question, answer, "forget")])
    ctx.model, ctx.spec = (lambda: lm), str(tmp_path / "gap")
    (row,) = get_attack("logit_lens", {"last_layer": True}).run(ctx)
    rank, _ = token_ranks(_lens_at(lm, [*prompt, ids[0]]), ids[1])
    assert row["ranks"] == [int(r) for r in rank]


def test_a_layer_output_is_read_from_a_tuple_a_list_or_alone_and_streams_are_refused():
    """GPT-1's layers return a list (indexed with a tuple: a TypeError), Gemma 3n's carry
    parallel AltUp streams (batch indexed past its end: an IndexError, inside RMU)."""
    from unpact.scoring import layer_output, with_layer_output

    h, extra = torch.ones(2, 3, 4), torch.zeros(1)
    for output in (h, (h, extra), [h, extra]):
        assert layer_output(output) is h
    assert isinstance(with_layer_output([h, extra], 2 * h), list)
    new = with_layer_output((h, extra), 2 * h)
    assert isinstance(new, tuple) and torch.equal(new[0], 2 * h) and new[1] is extra
    with pytest.raises(UnpactError, match=r"shape \(2, 2, 3, 4\).*parallel streams"):
        layer_output(torch.ones(2, 2, 3, 4))


@pytest.mark.parametrize("name", ["relearn", "relearn_unrelated"])
def test_relearning_with_lora_changes_each_linear_weight_by_a_low_rank_update(saved, name):
    """`lora:` trains adapters of rank r on the model in the run's dtype and merges them:
    each adapted linear weight moves by an update of rank at most r, nothing else moves,
    and the judged model is an ordinary one (no peft layers). Unset, it stays out of the
    attack's cache key, so rows cached before the setting existed stay valid."""
    from unpact.attacks.relearn import finetune
    from unpact.models import load_model
    from unpact.unlearn.config import LoraSettings

    ctx = _ctx(saved, name, _items("forget", 3))
    before = {n: p.detach().clone() for n, p in load_model(ctx.spec).model.named_parameters()}
    lora = LoraSettings(r=2, alpha=4, target_modules=["q_proj", "down_proj"])
    lm = finetune(ctx, _items("retain", 3), 3, 1e-2, 2, 0, lora)
    after = {n: p.detach().cpu() for n, p in lm.model.named_parameters()}
    assert set(after) == set(before)  # merged: the plain model's parameters, no adapters
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all(n.endswith(("q_proj.weight", "down_proj.weight")) for n in moved)
    for n in moved:
        rank = torch.linalg.matrix_rank((after[n] - before[n]).double(), rtol=1e-6)
        assert 1 <= rank <= 2, (n, rank)
    attack = get_attack(name, {"steps": 2, "items": 2})
    assert "lora" not in attack.settings_key()
    with_lora = get_attack(name, {"steps": 2, "items": 2, "lora": {"r": 2}})
    assert with_lora.settings_key()["lora"]["r"] == 2
    rows = with_lora.run(ctx)
    assert rows and all(isinstance(r["recovered"], bool) for r in rows)
    # a bfloat16 run: the model loaded in bfloat16, float32 adapters merged into it
    half = _ctx(saved, name, _items("forget", 3), dtype="bfloat16")
    lm16 = finetune(half, _items("retain", 3), 3, 1e-2, 2, 0, lora)
    assert {p.dtype for p in lm16.model.parameters()} == {torch.bfloat16}
    assert any(
        not torch.equal(p.cpu(), before[n].to(torch.bfloat16))
        for n, p in lm16.model.named_parameters()
    )


@pytest.mark.parametrize("layers", [2, 3])
def test_ablating_against_an_original_of_another_shape_is_one_message(saved, tmp_path, layers):
    """An unlearned model that is no fine-tune of the original (another width or depth, the
    same tokenizer) met a traceback from the subtraction of their mean states ("The size of
    tensor a (32) must match the size of tensor b (64)"), or, deeper, a direction taken at
    another layer of each."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from unpact.models import load_model

    lm = load_model(str(saved / "m0"))
    config = LlamaConfig(**{**lm.model.config.to_dict(), "num_hidden_layers": layers})
    if layers == 2:  # another width
        config.hidden_size, config.intermediate_size = 32, 64
    save_model(LlamaForCausalLM(config), lm.tokenizer, tmp_path / "other")
    ctx = dataclasses.replace(
        _ctx(saved, "ablate_direction", _items("forget", 2)), original_spec=str(tmp_path / "other")
    )
    with pytest.raises(UnpactError, match=r"residual stream \(2 layers of 64 features\) is not"):
        get_attack("ablate_direction").run(ctx)
