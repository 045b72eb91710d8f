"""Indistinguishability (SPEC 9): each definition on small hand-computed cases, the batched
statistics against a slow one-text-at-a-time computation, and the metrics from records."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.errors import UnpactError
from unpact.membership import (
    MIA_ATTACKS,
    TextStats,
    auc,
    exact_memorisation,
    extraction_strength,
    forget_quality,
    mia_scores,
    min_k,
    privleak,
    smallest_auc_pvalue,
    truth_ratio,
)
from unpact.membership_scores import document_stats, gradient_norms, token_stats
from unpact.metrics import METRICS, ItemRecord, MetricContext
from unpact.run.config import MembershipSettings
from unpact.run.membership import fluency, repetition, undefined_privleak


def stats(logprobs, argmax=None, mu=None, sigma=None, text="abc"):
    n = len(logprobs)
    return TextStats(
        list(logprobs),
        list(argmax or [False] * n),
        list(mu or [0.0] * n),
        list(sigma or [1.0] * n),
        len(zlib.compress(text.encode())),
    )


def test_min_k_is_the_mean_of_the_lowest_share():
    assert min_k([-1, -5, -2, -3, -4], 0.4) == (-5 + -4) / 2
    assert min_k([-1, -2], 0.1) == -2  # at least one token
    # int(7 * 0.4) = 2 lowest, rounded down as open-unlearning's `max(1, int(len(lp) * k))`
    assert min_k([-7, -1, -6, -2, -5, -3, -4], 0.4) == (-7 + -6) / 2


def test_attack_scores_by_hand():
    s = stats([-1.0, -3.0, -2.0, -6.0], mu=[-1, -1, -1, -1], sigma=[1, 2, 1, 5], text="hello")
    scores = mia_scores(s, reference_nll=4.0, gradnorm=2.5, k=0.5)
    assert scores["loss"] == -3.0
    assert scores["zlib"] == -3.0 / len(zlib.compress(b"hello"))
    assert scores["min_k"] == (-6 + -3) / 2
    # standardised: 0, -1, -1, -1 -> the two lowest -1, -1
    assert scores["min_k_plus_plus"] == -1.0
    assert scores["reference"] == 4.0 - 3.0
    assert scores["gradnorm"] == -2.5


def test_auc_privleak_and_forget_quality_by_hand():
    # pairs (member > non-member): 3>1, 3>2.5, 2>1, 2<2.5 -> 3 of 4
    assert auc([3, 2], [1, 2.5]) == 0.75
    assert auc([1, 1], [1, 1]) == 0.5
    assert math.isnan(auc([], [1.0]))
    assert privleak(0.9, 0.5) == pytest.approx(0.8)
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.1, 0.5) == pytest.approx(-0.8)  # over-unlearning
    # KS: identical samples p = 1; fully separated 3 against 3, exact p = 2 / C(6, 3)
    assert forget_quality([1, 2, 3], [1, 2, 3]) == 1.0
    assert forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


@pytest.mark.parametrize(("n1", "n2"), [(1, 1), (2, 2), (3, 3), (3, 4), (4, 4), (1, 39), (2, 20)])
def test_the_smallest_auc_p_value_is_scipy_s_exact_test_on_a_perfect_separation(n1, n2):
    """2 / C(n1 + n2, n1): what no AUC of so few texts can go below (the audit reads no
    PrivLeak interval of texts too few for it to reach alpha)."""
    from scipy.stats import mannwhitneyu

    apart = mannwhitneyu(range(n2, n2 + n1), range(n2), method="exact").pvalue
    assert smallest_auc_pvalue(n1, n2) == pytest.approx(apart, rel=1e-12)
    assert smallest_auc_pvalue(n1, n2) == smallest_auc_pvalue(n2, n1)
    assert math.isnan(smallest_auc_pvalue(0, 5))


def test_privleak_undefined_by_a_zero_reference_auc_is_said():
    # every holdout text more familiar to the reference than every forget text: AUC 0
    zero = auc([1.0, 2.0], [3.0, 4.0])
    assert zero == 0 and math.isnan(privleak(0.7, zero))
    reasons = undefined_privleak(
        {"mia_auc": {"min_k": zero, "loss": 0.5}, "mia_auc_documents": {"min_k": 0.4}}, "min_k"
    )
    assert set(reasons) == {"privleak"} and "min_k AUC is 0" in reasons["privleak"]
    assert undefined_privleak({"mia_auc": {"min_k": zero}}, "loss") == {}
    assert set(undefined_privleak({"mia_auc_documents": {"loss": 0.0}}, "loss")) == {
        "privleak_documents"
    }


def test_documents_distributions_are_held_one_text_at_a_time(tiny):
    """Min-K%++ reads each position's whole next-token distribution. A batch's were held
    at once, with their log-softmax: 3.2 GB for 16 documents of 512 tokens over the
    default model's vocabulary, 8.4 GB over Llama 3's, and a laptop's audit was killed by
    the system without a word. The LM head now runs on one text's positions at a time,
    from the batch's hidden states."""
    texts = ["the ferry crossed the river on a quiet day", "Mira Quintrell founded it", "a b"]
    rows: list[int] = []
    head = tiny.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        stats = document_stats(tiny, texts, batch_size=16)
    finally:
        handle.remove()
    scored = [len(s.logprobs) for s in stats]
    assert rows == scored  # one head pass per text, of its own positions
    alone = [document_stats(tiny, [t])[0] for t in texts]
    for a, b in zip(stats, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.sigma == pytest.approx(b.sigma, abs=1e-4)


def test_truth_ratio_by_hand():
    para = [math.log(0.5), math.log(0.5)]  # normalised probability 0.5
    pert = [[math.log(0.25)], [math.log(0.1), math.log(0.1)]]  # 0.25 and 0.1
    assert truth_ratio(para, pert) == pytest.approx(((0.25 + 0.1) / 2) / 0.5)


def test_truth_ratio_and_the_share_of_the_true_answer_where_probabilities_underflow():
    """A model driven far from its answers (gradient ascent's logits grow without bound)
    gives mean token log-probs below -745, whose exponentials are 0 in a float: the plain
    ratio failed with "float division by zero". Taken in logs, it is exp of the difference;
    past the largest float, that float. Above the floor, the plain division as before."""
    import sys

    from unpact.membership import first_share

    assert truth_ratio([-800.0], [[-790.0], [-790.0]]) == pytest.approx(math.exp(10))
    assert truth_ratio([-800.0, -800.0], [[-795.0], [-2000.0]]) == pytest.approx(math.exp(5) / 2)
    assert truth_ratio([-800.0], [[-1.0]]) == sys.float_info.max
    assert truth_ratio([-1.0], [[-800.0]]) == 0.0
    para, pert = [-0.3, -1.2], [[-2.0], [-0.7, -0.1]]  # bit for bit the plain formula
    plain = (math.exp(-2.0) + math.exp(-0.4)) / 2 / math.exp(-0.75)
    assert truth_ratio(para, pert) == plain
    assert first_share([-1.0, -2.0]) == math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0))
    assert first_share([-900.0, -901.0, -1e4]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert first_share([-2000.0, -900.0]) == 0.0


_LOGPROBS = st.lists(st.floats(-1e6, 0.0), min_size=1, max_size=4)


@given(para=_LOGPROBS, perts=st.lists(_LOGPROBS, min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_truth_ratio_is_a_number_for_any_log_probs(para, perts):
    """Any token log-probs, however low, give a finite ratio >= 0, equal to exp of the log
    ratio (computed in logs as the check) wherever that is a float, and a share in [0, 1]."""
    import sys

    from unpact.membership import first_share

    ratio = truth_ratio(para, perts)
    assert math.isfinite(ratio) and ratio >= 0
    means = [sum(p) / len(p) for p in perts]
    top = max(means)
    log_ratio = top + math.log(sum(math.exp(m - top) for m in means) / len(means))
    log_ratio -= sum(para) / len(para)
    if -700 < log_ratio < 700:
        assert ratio == pytest.approx(math.exp(log_ratio), rel=1e-9)
    elif log_ratio >= 710:
        assert ratio == sys.float_info.max
    share = first_share([sum(para) / len(para), *means])
    assert 0.0 <= share <= 1.0


def test_a_model_with_blown_up_logits_gets_truth_ratios_and_utility(tiny):
    """End to end: the tiny model with its LM head scaled by 1e4 (mean token log-probs in
    the thousands below 0) is scored, and its forget truth ratios and general items'
    normalised Prob are numbers, where the figures failed on a division by zero."""
    import copy

    from unpact.data.items import QAItem
    from unpact.run.membership import score_model, utility_rows

    lm = copy.deepcopy(tiny)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(1e4)

    def item(n, split):
        return QAItem(f"{split}-{n}", "Who is Bob?", "a man", split, (), (), None, None,
                      "a person", ("a dog", "a cat"))  # fmt: skip

    rows = score_model(lm, [item(0, "forget")], gradnorm=False)
    answers = rows[0]["truth_answers"]
    assert min(sum(a) / len(a) for a in answers) < -745  # each exp underflows, or some
    ratio = truth_ratio(answers[0], answers[1:])
    assert math.isfinite(ratio) and ratio >= 0
    (general,) = utility_rows(lm, [item(1, "general")])
    assert 0 <= general["prob"] <= 1 and math.isfinite(general["truth_ratio"])


def test_exact_memorisation_and_extraction_strength_by_hand():
    s = stats([-1] * 4, argmax=[False, True, False, True])
    assert exact_memorisation(s) == 0.5
    # every answer token counts, the first (predicted from the question alone) included
    assert exact_memorisation(stats([-1] * 4, argmax=[True, False, False, False])) == 0.25
    assert extraction_strength(s) == 1 - 3 / 4  # only the last token follows its prefix
    assert extraction_strength(stats([-1] * 4, argmax=[True] * 4)) == 1.0
    assert extraction_strength(stats([-1] * 2, argmax=[True, False])) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-50, 0), min_size=1, max_size=12),
    st.lists(st.floats(-50, 0), min_size=1, max_size=12),
)
def test_auc_equals_the_pairwise_count_and_scikit_learn(members, others):
    from sklearn.metrics import roc_auc_score

    pairs = [(m > o) + 0.5 * (m == o) for m in members for o in others]
    assert auc(members, others) == pytest.approx(sum(pairs) / len(pairs))
    if others and members:
        labels = [1] * len(members) + [0] * len(others)
        if len(set(labels)) == 2:
            expected = roc_auc_score(labels, members + others)
            assert auc(members, others) == pytest.approx(expected)


def test_batched_statistics_equal_one_text_at_a_time(tiny):
    questions = ["Who founded the glassworks?", "Where is the town?", "What is it?"]
    answers = ["Mira Quintrell", "by the river bank", "seven"]
    fast = token_stats(tiny, questions, answers, batch_size=2)
    for q, a, got in zip(questions, answers, fast):
        ids = list(tiny.encode_prompt(q).input_ids)
        ans = list(tiny.encode_answer(a))
        with torch.no_grad():
            logits = tiny.model(torch.tensor([ids + ans], device=tiny.device)).logits[0].double()
        logp = logits.log_softmax(-1)[len(ids) - 1 : len(ids) - 1 + len(ans)]
        for t, tok in enumerate(ans):
            row = logp[t]
            mu = float((row.exp() * row).sum())
            var = float((row.exp() * row**2).sum()) - mu**2
            assert got.logprobs[t] == pytest.approx(float(row[tok]), abs=1e-4)
            assert got.mu[t] == pytest.approx(mu, abs=1e-4)
            assert got.sigma[t] == pytest.approx(math.sqrt(max(var, 1e-6)), rel=1e-3)
            assert got.argmax[t] == (int(row.argmax()) == tok)


def test_document_statistics_are_a_plain_pass_over_the_raw_text(tiny):
    """Each document's tokens after the first, given those before it, with no chat template
    and no added special tokens; cut at `max_tokens`; ZLib's length is the text scored."""
    docs = ["Mira Quintrell founded the glassworks by the river.", "The quick brown fox."]
    got = document_stats(tiny, docs, max_tokens=6, batch_size=1)
    for text, stats in zip(docs, got):
        ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"][:6]
        with torch.no_grad():
            logits = tiny.model(torch.tensor([ids], device=tiny.device)).logits[0].double()
        logp = logits.log_softmax(-1)[:-1]
        assert len(stats.logprobs) == len(ids) - 1
        for t, tok in enumerate(ids[1:]):
            assert stats.logprobs[t] == pytest.approx(float(logp[t, tok]), abs=1e-4)
        scored = tiny.tokenizer.decode(ids)
        assert stats.zlib_bytes == len(zlib.compress(scored.encode()))
    with pytest.raises(UnpactError, match="document 0"):
        document_stats(tiny, ["a"], max_tokens=1)


def test_a_document_longer_than_the_model_s_context_is_scored_within_it():
    """`document_tokens: 512` on a model of fewer positions: GPT-2's learned positions
    crashed with an IndexError, and a rotary model was scored past its context. The
    document is cut to the positions the model has, and scored as that cut alone is."""
    from unpact.testing import tiny_other

    lm = tiny_other("gpt2")
    text = " ".join(["the river bank"] * 200)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > lm.max_length == 256
    (stats,) = document_stats(lm, [text], max_tokens=512)
    assert len(stats.logprobs) == lm.max_length - 1
    (cut,) = document_stats(lm, [lm.tokenizer.decode(ids[: lm.max_length])], max_tokens=512)
    assert stats.logprobs == pytest.approx(cut.logprobs, abs=1e-5)


def test_a_bos_opening_tokenizer_has_every_document_token_scored_after_its_bos():
    """MUSE encodes each text with the tokenizer's special tokens and scores every token
    after the first: with a Llama-style BOS that is every token of the text, given the BOS."""
    from tokenizers.processors import TemplateProcessing

    from unpact.testing import tiny_model

    lm = tiny_model()
    bos = lm.tokenizer.bos_token_id
    lm.tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert lm.special_prefix() == (bos,)
    text = "Mira Quintrell founded the glassworks."
    (stats,) = document_stats(lm, [text], max_tokens=5)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:5]
    with torch.no_grad():
        logits = lm.model(torch.tensor([[bos, *ids]], device=lm.device)).logits[0].double()
    logp = logits.log_softmax(-1)[:-1]
    assert len(stats.logprobs) == len(ids)
    for t, tok in enumerate(ids):
        assert stats.logprobs[t] == pytest.approx(float(logp[t, tok]), abs=1e-4)
    (one,) = document_stats(lm, ["a"], max_tokens=1)  # one token is scorable after a BOS
    assert len(one.logprobs) == 1


def test_gradnorm_is_the_mean_of_the_weight_tensors_norms():
    from unpact.membership_scores import mean_weight_norm

    # tensors whose gradients have squared norms 9, 16 and 0: (3 + 4 + 0) / 3, not 5
    assert mean_weight_norm([9.0, 16.0, 0.0]) == pytest.approx(7 / 3)
    assert mean_weight_norm([-1e-18, 4.0]) == 1.0  # a rounding-negative square is 0
    assert mean_weight_norm([]) == 0.0


def test_gradient_norm_equals_a_plain_backward_pass(tiny):
    q, a = "Who founded the glassworks?", "Mira Quintrell"
    (fast,) = gradient_norms(tiny, [q], [a])
    ids = list(tiny.encode_prompt(q).input_ids)
    ans = list(tiny.encode_answer(a))
    tiny.model.zero_grad()
    logits = tiny.model(torch.tensor([ids + ans], device=tiny.device)).logits[0]
    logp = logits.log_softmax(-1)[len(ids) - 1 : len(ids) - 1 + len(ans)]
    loss = -logp.gather(-1, torch.tensor(ans, device=tiny.device)[:, None]).mean()
    loss.backward()
    # open-unlearning's GradNormAttack (p = 2): the mean over weight tensors of their
    # gradients' norms, not the norm of the whole gradient
    norms = [p.grad.double().norm() for p in tiny.model.parameters() if p.grad is not None]
    slow = float(torch.stack(norms).mean())
    whole = math.sqrt(sum(float(n) ** 2 for n in norms))
    tiny.model.zero_grad()
    assert fast == pytest.approx(slow, rel=1e-4)
    assert abs(fast - whole) > 0.1 * whole  # the definitions differ here
    assert all(p.grad is None or not p.grad.any() for p in tiny.model.parameters())


def test_repetition_and_fluency():
    cfg = MembershipSettings()
    assert repetition("Paris") == 0.0
    assert repetition("1,1,1,222222222222222222") > 0.5
    assert repetition("the the the the the the the") > 0.5
    assert repetition("Quyltbright Brewery in Xanaeskmere") < 0.5
    assert repetition("1830s. 1930s. 1930s. 201") > 0.4  # the demo's RMU
    # without spaces between words each character is one: the phrase was one long word
    assert repetition("東京東京東京東京東京東京") > 0.4
    assert repetition("日本の首都は東京です。東京は大きいです。") < 0.2
    assert fluency("1,1,1,222222222222222", -2.0, -3.0, cfg)["degenerate"]
    assert fluency("", None, None, cfg)["degenerate"]
    # an invented name as unlikely as the true invented name is well-formed
    assert not fluency("Vivgrave Brewery", -9.0, -8.5, cfg)["degenerate"]
    assert fluency("qx zzv ptk", -14.0, -8.5, cfg)["degenerate"]
    assert fluency("Some Brewery", -9.0, -8.0, cfg)["relative"] == -1.0


def _records():
    """Two forget and two holdout records with hand-set scores."""

    def rec(i, split, mine, ref, tr=None, tr_ref=None):
        return ItemRecord(
            id=i,
            split=split,
            correct_before=False,
            correct_after=False,
            membership={"min_k": mine, "loss": mine},
            membership_retrained={"min_k": ref, "loss": ref},
            truth_ratio=tr,
            truth_ratio_retrained=tr_ref,
        )

    return [
        rec("f1", "forget", 3.0, 1.0, 0.2, 0.9),
        rec("f2", "forget", 2.0, 2.0, 0.3, 1.1),
        rec("h1", "holdout", 1.0, 1.5),
        rec("h2", "holdout", 2.5, 1.8),
    ]


def test_metrics_from_records_by_hand():
    ctx = MetricContext()
    records = _records()
    assert METRICS["mia_auc"].fn(records, ctx, "min_k") == 0.75
    # retrained: forget 1.0, 2.0 against holdout 1.5, 1.8 -> pairs 1<1.5, 1<1.8, 2>1.5, 2>1.8
    assert METRICS["privleak"].fn(records, ctx) == pytest.approx((0.75 - 0.5) / 0.5)
    assert METRICS["truth_ratio"].fn(records, ctx) == pytest.approx(0.25)
    # TOFU's Prob: exp of minus each forget answer's mean NLL (the LOSS score: 3 and 2 here,
    # beyond a real log-prob's range), averaged over the forget items; holdout not read
    assert METRICS["forget_prob"].fn(records, ctx) == pytest.approx((math.e**3 + math.e**2) / 2)
    assert METRICS["forget_quality"].fn(records, ctx) == pytest.approx(
        forget_quality([0.2, 0.3], [0.9, 1.1])
    )
    assert math.isnan(METRICS["mia_auc"].fn(records, ctx, "gradnorm"))  # not computed
    # documents: their own records; the items' figures do not read them, nor they the items'
    assert math.isnan(METRICS["mia_auc_documents"].fn(records, ctx, "min_k"))
    docs = [
        ItemRecord(
            id=r.id,
            split=f"{r.split}_document",
            correct_before=False,
            correct_after=False,
            membership={"min_k": -r.membership["min_k"]},
            membership_retrained={"min_k": r.membership_retrained["min_k"]},
        )
        for r in records
    ]
    # forget -3, -2 against holdout -1, -2.5 -> pairs <, <, <, > : 1/4; retrained 0.5 as above
    assert METRICS["mia_auc_documents"].fn(records + docs, ctx, "min_k") == 0.25
    assert METRICS["privleak_documents"].fn(records + docs, ctx) == pytest.approx(-0.5)
    assert METRICS["mia_auc"].fn(records + docs, ctx, "min_k") == 0.75
    assert set(METRICS["mia_auc_documents"].keys([])) == set(MIA_ATTACKS) - {"gradnorm"}


def test_memorisation_figures_read_the_forget_items_alone():
    """Exact memorisation and extraction strength are the forget set's (open-unlearning's
    `forget_*`): a retain or holdout item's values, held in its record too, do not count."""
    ctx = MetricContext()

    def rec(i: str, split: str, value: float) -> ItemRecord:
        return ItemRecord(
            i, split, True, False, exact_memorisation=value, extraction_strength=value / 2
        )

    records = [rec("f1", "forget", 1.0), rec("f2", "forget", 0.5), rec("r", "retain", 0.0)]
    records.append(rec("h", "holdout", 0.0))
    assert METRICS["exact_memorisation"].fn(records, ctx) == 0.75
    assert METRICS["extraction_strength"].fn(records, ctx) == 0.375


def test_document_records_leave_every_other_interval_unchanged():
    """The bootstrap draws the documents from generators of their own, so adding them moves
    no interval of the items' figures (the grid's numbers stay those of RESULTS.md)."""
    from unpact.metrics import bootstrap_ci

    records = _records() + [
        ItemRecord(id=f"r{n}", split="retain", correct_before=True, correct_after=n % 2 == 0)
        for n in range(5)
    ]
    docs = [
        ItemRecord(
            id=f"d{n}",
            split=f"{split}_document",
            correct_before=False,
            correct_after=False,
            membership={"min_k": float(n)},
            membership_retrained={"min_k": 0.0},
        )
        for n, split in enumerate(["forget", "holdout", "forget", "holdout"])
    ]
    ctx = MetricContext()
    for name in ("mia_auc", "privleak"):
        metric = METRICS[name]
        args = ("min_k",) if name == "mia_auc" else ()

        def stat(rs, metric=metric, args=args):
            return metric.fn(rs, ctx, *args)

        assert bootstrap_ci(records, stat, resamples=200) == bootstrap_ci(
            records + docs, stat, resamples=200
        )

    def destroyed(rs):
        retain = [r for r in rs if r.split == "retain"]
        return sum(not r.correct_after for r in retain) / len(retain)

    assert bootstrap_ci(records, destroyed, resamples=200) == bootstrap_ci(
        records + docs, destroyed, resamples=200
    )


@pytest.mark.parametrize("tied", [False, True])
def test_batched_gradient_norms_equal_one_backward_per_text(tied):
    """The ghost-norm identity from one batched backward pass against a plain backward per
    text, untied and with the LM head tied to the embedding (as SmolLM2)."""
    from unpact.membership_scores import gradient_norms_batched
    from unpact.testing import tiny_model

    lm = tiny_model(seed=3)
    if tied:
        lm.model.lm_head.weight = lm.model.model.embed_tokens.weight
    questions = ["Who founded the glassworks?", "Where is it?", "What jumps over the dog?"]
    answers = ["Mira Quintrell of the town", "by the river", "the quick brown fox"]
    slow = gradient_norms(lm, questions, answers)
    fast = gradient_norms_batched(lm, questions, answers, batch_size=2)
    assert fast == pytest.approx(slow, rel=1e-4)
    assert all(p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize(
    ("arch", "batched"),
    [
        *(("qwen3", True), ("cohere", True), ("gpt_neox", True), ("phi", True)),
        *(("bloom", True), ("gemma", False), ("gemma3_vl", False), ("mixtral", False)),
        ("recurrent_gemma", False),  # its embedding scales rows, as Gemma's
    ],
)
def test_batched_gradient_norms_equal_one_backward_per_text_on_other_layers(
    arch, batched, monkeypatch
):
    """Layers the identity once misread or left to the slow loop: Qwen 3's per-head q/k
    RMSNorms (a 4-D input: the batched pass crashed on a shape error), Cohere's LayerNorm
    under an RMSNorm's attribute names (read as an RMSNorm: norms off by 4e-4 relative, in
    silence), the LayerNorms with a bias of GPT-NeoX, Phi and BLOOM (a backward per text
    before), Gemma's RMSNorm scaling by 1 + w and its embedding scaling the rows it looks
    up, a mixture of experts. Each equals a plain backward per text: by the identity where
    `batched` (the per-text loop is then never called), else by falling back to it."""
    from unpact import membership_scores
    from unpact.membership_scores import gradient_norms_batched
    from unpact.testing import tiny_other

    lm = tiny_other(arch, 0)
    questions = ["Who founded the glassworks?", "Where is it?", "What jumps over the dog?"]
    answers = ["Mira Quintrell of the town", "by the river", "the quick brown fox"]
    slow = gradient_norms(lm, questions, answers)
    if batched:

        def refused(*args, **kwargs):
            raise AssertionError("fell back to a backward pass per text")

        monkeypatch.setattr(membership_scores, "gradient_norms", refused)
    fast = gradient_norms_batched(lm, questions, answers, batch_size=3)
    assert fast == pytest.approx(slow, rel=2e-6)
    assert all(p.grad is None for p in lm.model.parameters())


def test_forget_quality_shows_small_p_values():
    from unpact.metrics import METRICS

    fq = METRICS["forget_quality"]
    assert fq.display(0.00027) == "2.7e-04" and fq.display(0.034) == "0.034"
    assert fq.display(None) == "–"


def test_the_documents_scored_are_those_of_the_runs_items():
    """The forget and holdout documents the run's items name (all of a split whose items
    name none), at most `documents` of each, one-word documents left out, and none unless
    both splits have some."""
    from unpact.data.items import Benchmark, Document, QAItem
    from unpact.run import Data
    from unpact.run.membership import scored_documents

    docs = [
        Document("f1", "The ferry crossed the river.", "forget"),
        Document("f2", "Headline", "forget"),
        Document("f3", "The operator thanked the town.", "forget"),
        Document("h1", "A paragraph never trained on.", "holdout"),
        Document("h2", "Another paragraph never seen.", "holdout"),
    ]

    def item(i, split, doc=None):
        return QAItem(i, "Which river?", "the Ollen", split, (), (), doc)

    bench = Benchmark("b", [], docs)
    named = Data(bench, {"forget": [item("a", "forget", "f3")]}, [item("b", "holdout")])
    found = scored_documents(named, MembershipSettings())
    assert [d.id for d in found] == ["f3", "h1", "h2"]  # holdout items name none: all
    every = Data(bench, {"forget": [item("a", "forget")]}, [])
    assert [d.id for d in scored_documents(every, MembershipSettings())] == ["f1", "f3", "h1", "h2"]
    capped = scored_documents(every, MembershipSettings(documents=1))
    assert [d.id for d in capped] == ["f1", "h1"]
    no_holdout = Data(Benchmark("b", [], docs[:3]), {"forget": []}, [])
    assert scored_documents(no_holdout, MembershipSettings()) == []


def test_truth_ratio_answers_are_scored_for_forget_items_only(tiny):
    """Forget quality compares the forget items' truth ratios; the holdout items' were
    scored too (as many answers again) and never read."""
    from unpact.data.items import QAItem
    from unpact.run.membership import score_model
    from unpact.scoring import answer_logprobs

    def item(n, split):
        return QAItem(f"{split}-{n}", "Who is Bob?", "a man", split, (), (), None, None,
                      "a person", ("a dog", "a cat"))  # fmt: skip

    items = [item(0, "forget"), item(1, "holdout"), item(2, "forget")]
    rows = score_model(tiny, items, gradnorm=False)
    assert [len(r.get("truth_answers", [])) for r in rows] == [3, 0, 3]
    alone = answer_logprobs(
        tiny.model, [tiny.encode_prompt("Who is Bob?").input_ids], [tiny.encode_answer("a dog")]
    )[0]
    assert rows[0]["truth_answers"][1] == pytest.approx(alone.tolist(), abs=1e-4)


def test_verbmem_of_a_probe_is_the_greedy_continuation_against_the_cut_truth(tiny):
    """MUSE's protocol on its own probes: the prompt continued as given (raw, greedy, `new`
    tokens), the true continuation cut to its first `new` tokens (their ROUGE-L F1 is
    taken when the run reads the rows: tests/unit/test_real_data.py)."""
    from unpact.data.items import VerbatimPrompt
    from unpact.run.membership import probe_rows
    from unpact.scoring import generate

    probe = VerbatimPrompt("v1", "the ferry crossed", " the river on a quiet day")
    (row,) = probe_rows(tiny, [probe], new=5)
    ids = tiny.tokenizer(probe.continuation, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5 and row["truth"] == tiny.tokenizer.decode(ids[:5])  # no BOS here
    (greedy,) = generate(tiny, [probe.prompt], chat_template=False, max_new_tokens=5)
    assert row["output"] == greedy[0].text
    assert (row["id"], row["prompt"]) == ("v1", "the ferry crossed")


def test_a_probe_truth_is_cut_as_muse_cuts_it_with_the_bos_among_the_tokens():
    """MUSE encodes the true continuation with the tokenizer's special tokens before it
    keeps the first `new`: a tokenizer that opens every text with a BOS (Llama's) leaves
    `new - 1` tokens of text; one without (the tiny one, SmolLM2's) leaves `new`."""
    from tokenizers.processors import TemplateProcessing

    from unpact.run.membership import muse_cut
    from unpact.testing import tiny_tokenizer

    plain = tiny_tokenizer()
    text = " the river on a quiet day near the town"
    ids = plain(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 6
    assert muse_cut(plain, text, 6) == plain.decode(ids[:6])
    with_bos = tiny_tokenizer()
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert with_bos(text)["input_ids"] == [bos, *ids]
    assert muse_cut(with_bos, text, 6) == plain.decode(ids[:5])
    assert muse_cut(with_bos, text, 1) == ""


def test_a_probe_truth_has_transformers_4s_space_clean_up_without_a_warning(printed):
    """MUSE decodes with `clean_up_tokenization_spaces=True`, which transformers 5 skips
    for BPE tokenizers with a warning in the run's output; the clean-up is written out."""
    from unpact.run.membership import clean_up_spaces, muse_cut
    from unpact.testing import tiny_tokenizer

    assert clean_up_spaces("it is n't here , is it ? yes .") == "it isn't here, is it? yes."
    text = "Why is it here , then ?"
    tokenizer = tiny_tokenizer()
    printed()
    assert muse_cut(tokenizer, text, 100) == "Why is it here, then?"
    assert "clean_up_tokenization" not in printed()


def test_model_utility_by_hand():
    """TOFU's model utility: the harmonic mean of the retain items' Prob, ROUGE and truth
    ratio kept (open-unlearning's `true_better`: mean of max(0, 1 - ratio)), read on the
    retain items that have truth answers (those with a Prob) only."""
    from scipy.stats import hmean

    from unpact.indistinguishable import harmonic_mean, truth_ratio_kept

    def rec(n, prob, ratio, rouge, split="retain"):
        r = ItemRecord(f"r{n}", split, True, True, answer_prob=prob, truth_ratio=ratio)
        r.rouge_after = rouge
        return r

    ctx = MetricContext()
    records = [rec(0, 0.5, 0.2, 1.0), rec(1, 0.3, 1.5, 0.5), rec(2, None, None, 0.0)]
    records.append(rec(3, 0.9, 0.1, 1.0, split="forget"))  # not a retain item: not read
    assert METRICS["retain_prob"].fn(records, ctx) == pytest.approx(0.4)
    # ratios 0.2 and 1.5: max(0, 0.8) and max(0, -0.5) -> (0.8 + 0) / 2
    assert METRICS["retain_truth_ratio"].fn(records, ctx) == pytest.approx(0.4)
    # ROUGE of the two items with a Prob: 0.75 (the third, 0.0, has no truth answers)
    expected = 3 / (1 / 0.4 + 1 / 0.75 + 1 / 0.4)
    assert METRICS["model_utility"].fn(records, ctx) == pytest.approx(expected)
    assert expected == pytest.approx(hmean([0.4, 0.75, 0.4]))
    assert truth_ratio_kept([2.0, 3.0]) == 0.0
    # the forget set's, as open-unlearning reports it (closer_to_1_better): min(r, 1/r);
    # retain items not read: forget ratios 0.1 and 4 -> (0.1 + 0.25) / 2
    records.append(rec(4, None, 4.0, None, split="forget"))
    assert METRICS["forget_truth_ratio"].fn(records, ctx) == pytest.approx(0.175)
    assert METRICS["truth_ratio"].fn(records, ctx) == pytest.approx(2.05)  # the plain mean
    assert harmonic_mean([0.5, 0.0]) == 0.0  # as scipy's hmean
    assert math.isnan(harmonic_mean([0.5, math.nan])) and math.isnan(harmonic_mean([]))
    # TOFU's general sets, each its own three parts (told apart by the TOFU reader's ids):
    # real authors Prob 0.6, ROUGE 1, ratios 0.5 -> 0.5; world facts 0.2, 0.5, ratio 0 -> 1;
    # a general item of another benchmark is a set of its own; one without a Prob is not read
    general = [
        rec(0, 0.6, 0.5, 1.0, split="general"),
        rec(1, 0.2, 0.0, 0.5, split="general"),
        rec(2, 0.8, 0.25, 1.0, split="general"),
        rec(3, None, None, 0.0, split="general"),
    ]
    for r, name in zip(general, ["tofu-real_authors-00000", "tofu-world_facts-00000", "g-1"]):
        r.id = name
    parts = [0.4, 0.75, 0.4, 0.6, 1.0, 0.5, 0.2, 0.5, 1.0, 0.8, 1.0, 0.75]
    assert METRICS["model_utility"].fn(records + general, ctx) == pytest.approx(hmean(parts))
    # each part by open-unlearning's name (its TOFU evaluation's keys), in that order
    every = METRICS["model_utility_parts"]
    names = [
        *("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"),
        *("ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"),
        *("wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"),
        *("general_Q_A_Prob_normalised", "general_Q_A_ROUGE", "general_Truth_Ratio"),
    ]
    assert every.variants == tuple(names)
    got = [every.fn(records + general, ctx, name) for name in names]
    assert got == pytest.approx(parts)
    # a set the records lack: its parts undefined, the others as before
    alone = [every.fn(records, ctx, name) for name in names]
    assert alone[:3] == pytest.approx([0.4, 0.75, 0.4]) and all(map(math.isnan, alone[3:]))
    # the retain figures do not read the general items
    assert METRICS["retain_prob"].fn(records + general, ctx) == pytest.approx(0.4)
    # no retain item with truth answers: no figure, not 0
    bare = [rec(0, None, None, 1.0)]
    for name in ("retain_prob", "retain_truth_ratio", "model_utility"):
        assert math.isnan(METRICS[name].fn(bare, ctx)), name


def test_utility_rows_are_teacher_forced_answer_probabilities(tiny):
    """The Prob of a retain item's true answer and its truth ratio, from the answers'
    log-probs one at a time (the slow path) against the batch of them all."""
    from unpact.data.items import QAItem
    from unpact.membership import truth_ratio
    from unpact.run.membership import utility_rows
    from unpact.scoring import answer_logprobs

    items = [
        QAItem("r0", "Who is Bob?", "a man", "retain", (), (), None, None, "a person",
               ("a dog", "a cat")),
        QAItem("r1", "Where is Paris?", "in France", "retain", (), (), None, None,
               "France", ("in Spain",)),
    ]  # fmt: skip
    rows = utility_rows(tiny, items)

    def lp(question, answer):
        ids = [tiny.encode_prompt(question).input_ids]
        return answer_logprobs(tiny.model, ids, [tiny.encode_answer(answer)])[0].tolist()

    general = QAItem("g0", "Where is Rome?", "in Italy", "general", (), (), None, None, None,
                     ("in Spain", "in Peru"))  # fmt: skip
    row = utility_rows(tiny, [*items, general])[-1]
    p = [math.exp(sum(x) / len(x)) for x in (lp(general.question, a) for a in
         ("in Italy", "in Spain", "in Peru"))]  # fmt: skip
    # TOFU's general sets: Prob normalised over the answer and the perturbed ones, the truth
    # ratio against the answer itself (no paraphrase)
    assert row["prob"] == pytest.approx(p[0] / sum(p), rel=1e-4)
    assert row["truth_ratio"] == pytest.approx((p[1] + p[2]) / 2 / p[0], rel=1e-4)
    for row, item in zip(rows, items):
        true = lp(item.question, item.answer)
        assert row["id"] == item.id
        assert row["prob"] == pytest.approx(math.exp(sum(true) / len(true)), rel=1e-4)
        para = lp(item.question, item.paraphrased_answer)
        wrong = [lp(item.question, w) for w in item.perturbed_answers]
        assert row["truth_ratio"] == pytest.approx(truth_ratio(para, wrong), rel=1e-4)


def test_a_missing_model_utility_says_which_set_lacks_what():
    """Each set of TOFU's utility needs its truth answers and an open question ROUGE reads:
    the reason names what is missing, so a missing figure is never a silent null."""
    from unpact.data.items import Benchmark, QAItem
    from unpact.run import Data
    from unpact.run.membership import missing_inputs

    def item(i, split, choices=None, para="It is Paris.", pert=("It is Rome.",)):
        answer = "Paris"
        return QAItem(i, "Which city?", answer, split, (), (), None, choices, para, pert)

    def why(splits):
        data = Data(Benchmark("b", []), {"forget": [], **splits}, [])
        return missing_inputs(data, MembershipSettings())

    # open retain items with truth answers: every utility figure is there
    assert "model_utility" not in why({"retain": [item("r", "retain")], "general": []})
    # none with truth answers anywhere
    bare = why({"retain": [item("r", "retain", para=None, pert=None)], "general": []})
    assert "no retain item has paraphrased_answer" in bare["model_utility"]
    assert "no retain item" in bare["retain_prob"]
    # a multiple-choice retain set beside an open general one: the retain set is named
    mcq = item("r", "retain", choices=("Paris", "Rome"))
    got = why({"retain": [mcq], "general": [item("tofu-world_facts-00000", "general", para=None)]})
    assert got["model_utility"].startswith("no item of its retain set is an open question")
    assert "retain_prob" not in got  # its Prob and truth ratio are still read
    # the parts of the sets a run lacks: named in one line, with the sets it has
    assert got["model_utility_parts"] == (
        "ra_*, general_*: no item of TOFU's real-authors set (real_authors_perturbed) and no "
        "other general item with perturbed_answers; the model utility is over its retain, "
        "tofu-world_facts sets"
    )
    assert "retain_*, ra_*, wf_*, general_*: no retain item" in bare["model_utility_parts"]


def test_answers_longer_than_the_greedy_answers_rouge_reads_are_said():
    """TOFU's answers are sentences: under judge.max_new_tokens (32 by default) a greedy
    answer is cut before the true answer's length, its ROUGE recall and the model utility
    read low (open-unlearning generates up to 200 tokens). The run says how many, the
    longest, and the length that reads them whole; short answers, or ones ROUGE does not
    read, say nothing."""
    from unpact.data.items import Benchmark, QAItem
    from unpact.run import Data, RunConfig, _note_rouge_room

    def item(i, split, answer, para="It is so.", pert=("It is not.",)):
        return QAItem(i, "Which?", answer, split, (), (), None, None, para, pert)

    long = "one two three four five six seven eight nine ten"
    data = Data(
        Benchmark("b", []),
        {
            "forget": [item("f", "forget", long)],  # not read by ROUGE under contains
            "retain": [item("r1", "retain", long), item("r2", "retain", "short one")],
            "general": [item("g", "general", long + " eleven", para=None)],
        },
        [],
    )

    def words(text: str) -> int:  # the test's tokenizer: a token a word
        return len(text.split())

    def cfg(**judge) -> RunConfig:
        return RunConfig.model_validate({"methods": [{"method": "ga"}], "judge": judge})

    said: list[str] = []
    _note_rouge_room(cfg(max_new_tokens=8), data, words, said.append)
    assert len(said) == 1
    assert said[0].startswith("2 true answer(s) that ROUGE reads")
    assert "(the longest: item g, 11)" in said[0] and "judge.max_new_tokens: 11 reads" in said[0]
    said.clear()  # the ROUGE judge reads every open answer
    _note_rouge_room(cfg(max_new_tokens=8, kind="rouge"), data, words, said.append)
    assert said[0].startswith("3 true answer(s)")
    said.clear()
    _note_rouge_room(cfg(max_new_tokens=11), data, words, said.append)
    assert said == []


def test_documents_in_a_script_without_spaces_are_scored():
    """A Chinese or Japanese document is one word by its spaces: each was left out, and
    the run said it had no documents to compare."""
    from unpact.data.items import Benchmark, Document, QAItem
    from unpact.run import Data
    from unpact.run.membership import scored_documents

    docs = [
        Document("f1", "日本の首都は東京です。", "forget"),
        Document("f2", "東", "forget"),  # one character: one word still
        Document("h1", "北京是中国的首都。", "holdout"),
    ]
    item = QAItem("a", "首都は?", "東京", "forget")
    data = Data(Benchmark("b", [], docs), {"forget": [item]}, [])
    assert [d.id for d in scored_documents(data, MembershipSettings())] == ["f1", "h1"]


@pytest.mark.parametrize("gradnorm", [True, False])
def test_what_a_served_models_scores_leave_out_is_named(gradnorm):
    """PrivLeak with GradNorm on a served model is named whether GradNorm is on or not
    (with it off, naming it was a KeyError)."""
    from unpact.run.config import MembershipSettings
    from unpact.run.membership import served_notes

    settings = MembershipSettings(privleak_attack="gradnorm", gradnorm=gradnorm)
    notes = served_notes("openai:m@u", "ga", settings, documents=True)
    assert notes["privleak.ga"] == "openai:m@u is served: GradNorm needs its weights"
    assert ("mia_auc.gradnorm.ga" in notes) is gradnorm
    assert "privleak_documents.ga" not in notes  # documents have no GradNorm at all
    assert "Min-K%++" in notes["mia_auc_documents.min_k_plus_plus.ga"]
    k = served_notes(
        "openai:m@u", "ga", MembershipSettings(privleak_attack="min_k_plus_plus"), True
    )
    assert k["privleak.ga"] == k["privleak_documents.ga"] == k["mia_auc.min_k_plus_plus.ga"]
    plain = served_notes("openai:m@u", "ga", MembershipSettings(), False)
    assert set(plain) == {"mia_auc.min_k_plus_plus.ga", "mia_auc.gradnorm.ga"}
    # without holdout items no item's membership is inferred (skipped.mia_auc says so for
    # every model): nothing of the items' said again per served model
    assert served_notes("openai:m@u", "ga", MembershipSettings(), False, items=False) == {}
    docs = served_notes("openai:m@u", "ga", settings, documents=True, items=False)
    assert set(docs) == {"mia_auc_documents.min_k_plus_plus.ga"}
    k = served_notes(
        "openai:m@u", "ga", MembershipSettings(privleak_attack="min_k_plus_plus"), True, False
    )
    assert set(k) == {"mia_auc_documents.min_k_plus_plus.ga", "privleak_documents.ga"}
