"""Gradient attributions (checks of unPact) on the tiny model, and the agreement statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.attribution import make_units
from unpact.errors import UnpactError
from unpact.gradient import gradient_attributions, spearman, top_k_overlap

PROMPTS = ["Who founded the Vostrand Glassworks?", "What is the capital of France?"]
ANSWERS = [" Mira Quintrell", " Paris"]


def _lp_scaled(lm, prompt, answer, positions, factor):
    """LP with the embeddings at `positions` multiplied by `factor` (a direct forward)."""
    enc = lm.encode_prompt(prompt)
    ans = lm.encode_answer(answer)
    ids = torch.tensor([[*enc.input_ids, *ans]], device=lm.device)
    with torch.no_grad():
        e = lm.model.get_input_embeddings()(ids)
        e[0, list(positions)] *= factor
        logp = lm.model(inputs_embeds=e).logits[0].float().log_softmax(-1)
    n = len(enc.input_ids)
    return float(torch.stack([logp[n - 1 + k, t] for k, t in enumerate(ans)]).mean())


def test_grad_x_input_is_the_derivative_along_each_units_embeddings(tiny):
    """A unit's gradient x input = d/dh LP(embeddings of the unit scaled by 1 + h) at 0."""
    (g,) = gradient_attributions(tiny, PROMPTS[:1], ANSWERS[:1], method="grad_x_input")
    units = make_units(tiny, tiny.encode_prompt(PROMPTS[0]))
    h = 1e-3
    for u, score in zip(units, g.scores):
        up = _lp_scaled(tiny, PROMPTS[0], ANSWERS[0], u.positions, 1 + h)
        down = _lp_scaled(tiny, PROMPTS[0], ANSWERS[0], u.positions, 1 - h)
        assert score == pytest.approx((up - down) / (2 * h), abs=2e-3)
    assert max(abs(s) for s in g.scores) > 1e-2


def test_integrated_gradients_are_complete(tiny):
    """The scores sum to LP(x) - LP(baseline) once the path is finely sampled."""
    coarse = gradient_attributions(tiny, PROMPTS, ANSWERS, steps=8)
    fine = gradient_attributions(tiny, PROMPTS, ANSWERS, steps=512)
    for c, f in zip(coarse, fine):
        gap = f.lp - f.baseline_lp
        assert abs(gap) > 0.1
        assert sum(f.scores) == pytest.approx(gap, abs=2e-3)
        assert abs(sum(c.scores) - gap) > abs(sum(f.scores) - gap)  # refinement converges


def test_a_model_in_bfloat16_gets_the_float32_scores_within_its_rounding():
    """`dtype: bfloat16` with `attribution.gradient: [integrated_gradients]` was "expected
    m1 and m2 to have the same dtype": the float32 content mask made every path point
    float32. The gradients are now summed in float32, whatever the model's dtype."""
    from unpact.testing import tiny_model

    full, half = tiny_model(seed=3), tiny_model(seed=3)
    half.model.to(torch.bfloat16)
    for method in ("grad_x_input", "integrated_gradients"):
        want = gradient_attributions(full, PROMPTS, ANSWERS, method=method, steps=8)
        got = gradient_attributions(half, PROMPTS, ANSWERS, method=method, steps=8)
        for w, g in zip(want, got):  # bfloat16 keeps ~3 digits of a log-prob near -6
            scale = max(abs(x) for x in w.scores)  # IG's gap: 1.5-2% of the largest score
            assert max(abs(a - b) for a, b in zip(w.scores, g.scores)) < 0.03 * scale + 0.01
            assert g.lp == pytest.approx(w.lp, abs=0.05)
            assert all(math.isfinite(x) for x in g.scores) and any(g.scores)


def test_a_model_that_changes_its_embeddings_after_the_lookup_is_attributed_as_it_runs(tmp_path):
    """Falcon-H1 multiplies the embeddings it looks up (on the input_ids path alone) and
    its logits: it was refused at load ("its logits are not its LM head applied to its
    last hidden state"), and fed `inputs_embeds` the gradient methods would have skipped
    the multiplier. Loaded, its gradient attributions score the answer as unPact does,
    complete, and GradNorm equals a backward per text."""
    from unpact.attribution import attribute
    from unpact.membership_scores import gradient_norms, gradient_norms_batched
    from unpact.models import load_model, save_model
    from unpact.testing import tiny_other

    made = tiny_other("falcon_h1")
    save_model(made.model, made.tokenizer, tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    plain = {"chat_template": False}
    loo = attribute(lm, "the cat sat on a red mat", " blue", **plain)
    ig = gradient_attributions(
        lm, ["the cat sat on a red mat"], [" blue"], steps=128, ig_baseline="mean", **plain
    )[0]
    assert ig.lp == pytest.approx(loo.lp, abs=1e-5)
    assert sum(ig.scores) == pytest.approx(ig.lp - ig.baseline_lp, abs=2e-3)
    texts = (["Who?", "Where is it?"], ["the town", "by the river"])
    assert gradient_norms_batched(lm, *texts) == pytest.approx(gradient_norms(lm, *texts))


def test_word_units_sum_their_tokens(tiny):
    tok = gradient_attributions(tiny, PROMPTS[:1], ANSWERS[:1], method="grad_x_input")[0]
    word = gradient_attributions(
        tiny, PROMPTS[:1], ANSWERS[:1], method="grad_x_input", unit="word"
    )[0]
    assert len(word.scores) < len(tok.scores)
    assert sum(word.scores) == pytest.approx(sum(tok.scores), abs=1e-5)


def test_bad_settings_are_clear_errors(tiny):
    with pytest.raises(UnpactError, match="unknown gradient method"):
        gradient_attributions(tiny, PROMPTS, ANSWERS, method="saliency")  # type: ignore[arg-type]
    with pytest.raises(UnpactError, match="at least one step"):
        gradient_attributions(tiny, PROMPTS, ANSWERS, steps=0)
    with pytest.raises(UnpactError, match="unknown ig_baseline"):
        gradient_attributions(tiny, PROMPTS, ANSWERS, ig_baseline="one")  # type: ignore[arg-type]


def test_answer_token_ids_give_the_same_scores_as_their_text(tiny):
    ids = [tiny.encode_answer(a) for a in ANSWERS]
    by_text = gradient_attributions(tiny, PROMPTS, ANSWERS, steps=4)
    by_ids = gradient_attributions(tiny, PROMPTS, ids, steps=4)
    for t, i in zip(by_text, by_ids):
        assert i.scores == t.scores and i.lp == t.lp


def test_check_unpact_leaves_an_undefined_agreement_as_none(tiny):
    """Constant contributions have no rank correlation: None (valid JSON), not NaN."""
    import dataclasses

    from unpact.attribution import attribute
    from unpact.gradient import check_unpact

    record = attribute(tiny, PROMPTS[0], ANSWERS[0])
    flat = dataclasses.replace(record, contributions=[0.5] * len(record.units))
    plain, constant = check_unpact(tiny, [record, flat], "grad_x_input")
    assert plain["spearman"] is not None and constant["spearman"] is None
    assert plain["scores"] == constant["scores"]
    json.dumps([plain, constant], allow_nan=False)


def test_spearman_and_top_k_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with a tie: a -> (1, 2.5, 2.5, 4), b -> (1, 2, 3, 4): r = 4.5 / sqrt(4.5 * 5)
    assert spearman([0, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert top_k_overlap([0.9, 0.1, 0.5, 0.3], [0.8, 0.7, 0.0, 0.6], 2) == 0.5
    assert top_k_overlap([1, 2], [2, 1], 5) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12, unique=True))
def test_spearman_invariants(values):
    monotone = [2 * v for v in values]  # strictly increasing, exactly
    assert spearman(values, monotone) == pytest.approx(1.0)
    assert spearman(values, [-v for v in values]) == pytest.approx(-1.0)
    other = list(reversed(values))
    assert -1 - 1e-9 <= spearman(values, other) <= 1 + 1e-9
    assert spearman(values, other) == pytest.approx(spearman(other, values))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-5, 5), st.floats(-100, 100, allow_nan=False)),
        min_size=2,
        max_size=12,
    )
)
def test_spearman_is_scipys(pairs):
    """Our mid-rank Spearman (kept as written: the attribution checks' cached figures were
    computed by it) equals scipy's `spearmanr`, ties included; NaN where scipy's is."""
    from scipy.stats import spearmanr

    a, b = [float(x) for x, _ in pairs], [y for _, y in pairs]
    if len(set(a)) < 2 or len(set(b)) < 2:
        assert math.isnan(spearman(a, b))
    else:
        assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-12)


@pytest.mark.parametrize(
    ("method", "baseline"),  # gradient x input has no baseline
    [("grad_x_input", "mean"), ("integrated_gradients", "mean"), ("integrated_gradients", "zero")],
)
def test_gradient_scores_equal_captum_s_on_the_same_target_and_baseline(tiny, method, baseline):
    """Captum's InputXGradient and IntegratedGradients (its midpoint rule, `riemann_middle`)
    on the input embeddings, with the answer's mean log-prob as the target and the
    template's tokens kept in the baseline, give our per-token scores: the same
    definitions, written independently."""
    from captum.attr import InputXGradient, IntegratedGradients

    ours = gradient_attributions(
        tiny, PROMPTS, ANSWERS, method=method, steps=16, ig_baseline=baseline
    )
    for prompt, answer, mine in zip(PROMPTS, ANSWERS, ours):
        enc = tiny.encode_prompt(prompt)
        ans = tiny.encode_answer(answer)
        ids = torch.tensor([[*enc.input_ids, *ans]])
        n = len(enc.input_ids)
        target = torch.tensor(ans)

        def lp(embeds, n=n, target=target):
            logp = tiny.model(inputs_embeds=embeds).logits.float().log_softmax(-1)
            picked = logp[:, n - 1 : n - 1 + len(target)]
            return picked.gather(-1, target.expand(len(embeds), -1)[..., None])[..., 0].mean(-1)

        with torch.no_grad():
            e = tiny.model.get_input_embeddings()(ids)
        if method == "grad_x_input":
            found = InputXGradient(lp).attribute(e.requires_grad_(True))
        else:
            table = tiny.model.get_input_embeddings().weight
            fill = table.mean(0) if baseline == "mean" else torch.zeros(e.shape[-1])
            base = e.clone()
            base[0, enc.content_start : enc.content_end] = fill
            found = IntegratedGradients(lp).attribute(
                e, baselines=base, n_steps=16, method="riemann_middle"
            )
        per_token = found[0].sum(-1).detach()
        units = make_units(tiny, enc)
        want = [float(per_token[list(u.positions)].sum()) for u in units]
        assert mine.scores == pytest.approx(want, abs=1e-5)
