"""The paper's rates as functions of per-item records, on hand-made records."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.metrics import (
    ItemRecord,
    accuracy,
    bootstrap_ci,
    collapse_rate,
    control_rate,
    destructive_rate,
    focus_shift,
    forgotten_count,
    holm,
    knowmem,
    mcnemar_exact,
    recovery_rate,
    tofu_rouge,
    union_recovery_rate,
)


def _records() -> list[ItemRecord]:
    return [
        # forget: 4 correct before; 3 forgotten, 1 kept; 1 never known
        ItemRecord(
            "f1", "forget", True, False, {"focus_on_key": True, "probab": False}, 0.1, 0.0, 0.2
        ),
        ItemRecord(
            "f2", "forget", True, False, {"focus_on_key": True, "probab": True}, 2.0, 0.5, 0.4
        ),
        ItemRecord(
            "f3", "forget", True, False, {"focus_on_key": False, "probab": False}, 0.3, 1.0, 0.9
        ),
        ItemRecord("f4", "forget", True, True, {}, 3.0, 1.0, 1.0),
        ItemRecord("f5", "forget", False, False, {"focus_on_key": True}, 0.0, 0.0, 0.0),
        # retain: 3 correct before, 1 lost; general: 2 correct before, none lost
        ItemRecord("r1", "retain", True, True),
        ItemRecord("r2", "retain", True, False),
        ItemRecord("r3", "retain", True, True),
        ItemRecord("r4", "retain", False, True),
        ItemRecord("g1", "general", True, True),
        ItemRecord("g2", "general", True, True),
    ]


def test_rates_on_hand_made_records():
    recs = _records()
    assert accuracy(recs, "forget", "before") == pytest.approx(4 / 5)
    assert accuracy(recs, "forget", "after") == pytest.approx(1 / 5)
    assert forgotten_count(recs) == 3
    # f5 was never known: its "recovery" does not count
    assert recovery_rate(recs, "focus_on_key") == pytest.approx(2 / 3)
    assert recovery_rate(recs, "probab") == pytest.approx(1 / 3)
    assert math.isnan(recovery_rate(recs, "paraphrase"))  # never run on these: undefined
    assert union_recovery_rate(recs, ["focus_on_key", "probab"]) == pytest.approx(2 / 3)
    assert union_recovery_rate(recs, ["probab"]) == recovery_rate(recs, "probab")
    assert destructive_rate(recs, "retain") == pytest.approx(1 / 3)  # r4 was wrong before
    assert destructive_rate(recs, "general") == 0.0
    assert collapse_rate(recs, threshold=0.5) == pytest.approx(3 / 5)  # f1, f3, f5
    # "below" the threshold (SPEC 5): a sensitivity equal to it is not collapsed
    at = [ItemRecord("f", "forget", True, False, {}, 0.5, 1.0, 1.0)]
    assert collapse_rate(at, threshold=0.5) == 0.0
    assert focus_shift(recs, "forgotten") == pytest.approx(0.5)
    assert focus_shift(recs, "kept") == pytest.approx(1.0)
    assert focus_shift(recs, "forgotten", "contribution_similarity") == pytest.approx(0.5)


def test_an_attack_run_on_some_forgotten_items_is_rated_on_those():
    """Relearning trains on some forgotten items: they are outside its denominator."""
    recs = [
        ItemRecord("a", "forget", True, False, {"probab": True}),  # trained on by relearn
        ItemRecord("b", "forget", True, False, {"probab": False, "relearn": True}),
        ItemRecord("c", "forget", True, False, {"probab": True, "relearn": False}),
        ItemRecord("d", "forget", True, False, {"probab": False, "relearn": False}),
    ]
    assert recovery_rate(recs, "relearn") == pytest.approx(1 / 3)
    assert recovery_rate(recs, "probab") == pytest.approx(2 / 4)
    assert union_recovery_rate(recs, ["probab", "relearn"]) == pytest.approx(3 / 4)
    test = mcnemar_exact(recs, "relearn", "probab")  # on b, c, d only
    assert (test.only_a, test.only_b) == (1, 1)


def test_empty_groups_give_nan_not_zero():
    recs = [ItemRecord("f", "forget", True, True)]
    assert math.isnan(recovery_rate(recs, "probab"))
    assert math.isnan(destructive_rate(recs, "retain"))
    assert math.isnan(focus_shift(recs, "forgotten"))
    with pytest.raises(ValueError):
        focus_shift(recs, "lost")


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=30))
def test_forgotten_plus_kept_plus_unknown_is_every_forget_item(flags):
    recs = [ItemRecord(str(i), "forget", b, a, {"x": x}) for i, (b, a, x) in enumerate(flags)]
    known = sum(b for b, _, _ in flags)
    assert forgotten_count(recs) + sum(r.kept for r in recs) == known
    rate = recovery_rate(recs, "x")
    if forgotten_count(recs):
        assert 0.0 <= rate <= 1.0
        assert rate * forgotten_count(recs) == pytest.approx(
            sum(x for b, a, x in flags if b and not a)
        )
    before, after = accuracy(recs, "forget", "before"), accuracy(recs, "forget", "after")
    # what was lost, as a share of all items, is at least the accuracy drop
    assert forgotten_count(recs) / len(recs) >= before - after - 1e-12


# ---------------------------------------------------------------------- statistics


def _attack_pairs(pairs: list[tuple[bool, bool]]) -> list[ItemRecord]:
    """Forgotten items recovered (or not) by an attack and by PROBAB."""
    return [
        ItemRecord(str(i), "forget", True, False, {"focus_on_key": a, "probab": b})
        for i, (a, b) in enumerate(pairs)
    ]


def test_knowmem_averages_the_open_items_of_its_split():
    """KnowMem (MUSE) per split and moment is the mean of the records' own scores; a
    multiple-choice item (no score: its answer is an option picked) is left out, and a
    split without open items is NaN, not 0."""
    from unpact.metrics import METRICS, MetricContext

    records = [
        ItemRecord("f1", "forget", True, False, knowmem_before=1.0, knowmem_after=0.0),
        ItemRecord("f2", "forget", True, True, knowmem_before=0.5, knowmem_after=0.25),
        ItemRecord("f3", "forget", True, False),  # multiple choice
        ItemRecord("r1", "retain", True, True, knowmem_before=0.8, knowmem_after=0.6),
        ItemRecord("g1", "general", True, True, knowmem_before=0.0, knowmem_after=0.0),
    ]
    assert knowmem(records, "forget", "before") == 0.75
    assert knowmem(records, "forget", "after") == 0.125
    assert knowmem(records, "retain", "after") == pytest.approx(0.6)
    assert math.isnan(knowmem(records[2:3], "forget", "after"))
    ctx = MetricContext()
    assert METRICS["knowmem_forget_after"].fn(records, ctx) == 0.125
    assert METRICS["knowmem_retain_before"].fn(records, ctx) == pytest.approx(0.8)
    assert METRICS["knowmem_forget_after"].higher_is_better is False
    assert METRICS["knowmem_retain_after"].higher_is_better is True
    # TOFU's ROUGE the same way, from its own fields
    records[0].rouge_after, records[1].rouge_after, records[3].rouge_after = 0.5, 0.0, 1.0
    assert tofu_rouge(records, "forget", "after") == 0.25
    assert METRICS["rouge_retain_after"].fn(records, ctx) == 1.0
    assert math.isnan(METRICS["rouge_forget_before"].fn(records, ctx))


def test_mcnemar_exact_on_hand_values():
    one_vs_nine = _attack_pairs([(True, False)] + [(False, True)] * 9 + [(True, True)] * 4)
    test = mcnemar_exact(one_vs_nine, "focus_on_key")
    assert (test.only_a, test.only_b) == (1, 9)
    assert test.p_value == pytest.approx(2 * (1 + 10) / 2**10)  # 0.0215
    assert mcnemar_exact(_attack_pairs([(False, True)] * 5), "focus_on_key").p_value == 2 / 32
    assert (
        mcnemar_exact(_attack_pairs([(True, False), (False, True)] * 3), "focus_on_key").p_value
        == 1.0
    )
    assert mcnemar_exact(_attack_pairs([(True, True)]), "focus_on_key").p_value == 1.0


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40))
def test_mcnemar_equals_enumerating_every_outcome(pairs):
    test = mcnemar_exact(_attack_pairs(pairs), "focus_on_key")
    n = test.only_a + test.only_b
    # the slow, obvious two-sided p: outcomes at least as far from n/2 as the one seen
    far = abs(test.only_a - n / 2)
    slow = sum(math.comb(n, k) for k in range(n + 1) if abs(k - n / 2) >= far - 1e-9) / 2**n
    assert test.p_value == pytest.approx(min(1.0, slow))


def test_holm_on_hand_values():
    # sorted 0.01, 0.02, 0.04, 0.3 of four: 4 x 0.01, 3 x 0.02, max(0.06, 2 x 0.04), 1 x 0.3
    got = holm([0.04, 0.01, 0.3, 0.02])
    assert got == pytest.approx([0.08, 0.04, 0.3, 0.06])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped
    assert holm([0.03]) == [0.03]  # one test: nothing to correct
    assert holm([]) == []


@given(st.lists(st.floats(0, 1), max_size=8), st.floats(0.001, 0.2))
def test_holm_rejects_as_the_step_down_procedure(ps, alpha):
    """Adjusted p below alpha exactly where Holm's procedure rejects: going up the sorted
    p-values, reject while the i-th (from 0) of k is at most alpha / (k - i), stop at the
    first that is not."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    rejected = set()
    for rank, i in enumerate(order):
        if ps[i] * (len(ps) - rank) >= alpha:
            break
        rejected.add(i)
    got = holm(ps)
    assert {i for i, q in enumerate(got) if q < alpha} == rejected
    assert all(q >= p for q, p in zip(got, ps, strict=True))


def test_bootstrap_interval_covers_a_known_rate_with_the_expected_width():
    # 200 retain items, 60 lost: destructive rate 0.3, binomial s.e. sqrt(.3 * .7 / 200)
    recs = [ItemRecord(str(i), "retain", True, i >= 60) for i in range(200)]
    lo, hi = bootstrap_ci(recs, lambda r: destructive_rate(r, "retain"), resamples=2000)
    assert lo < 0.3 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 200), rel=0.15)
    again = bootstrap_ci(recs, lambda r: destructive_rate(r, "retain"), resamples=2000)
    assert again == (lo, hi)  # seeded


def test_bootstrap_keeps_split_sizes_and_handles_undefined_rates():
    recs = _records()
    sizes = []

    def count(sample):
        sizes.append(sum(r.split == "forget" for r in sample))
        return 0.5

    assert bootstrap_ci(recs, count, resamples=20) == (0.5, 0.5)
    assert set(sizes) == {5}
    nothing = [ItemRecord("f", "forget", True, True)]
    lo, hi = bootstrap_ci(nothing, lambda r: recovery_rate(r, "probab"), resamples=10)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("n", [1, 3, 30, 200])
def test_a_rate_of_none_or_all_gets_the_exact_interval_of_its_count(n):
    """Every resample of 0 of n items recovered is 0: the percentile bootstrap read
    [0%, 0%] whatever n. Clopper-Pearson at 0 of n is [0, 1 - (alpha/2)^(1/n)], at n of n
    [(alpha/2)^(1/n), 1] (hand-computed: the binomial tail of the bound equals alpha/2)."""
    from unpact.run import StatisticsSettings, method_metrics

    tail = (1 - 0.95) / 2
    none = [ItemRecord(str(i), "forget", True, False, {"probab": False}) for i in range(n)]
    every = [ItemRecord(str(i), "forget", True, False, {"probab": True}) for i in range(n)]
    stat = lambda r: recovery_rate(r, "probab")  # noqa: E731
    assert bootstrap_ci(none, stat, resamples=50) == pytest.approx((0.0, 1 - tail ** (1 / n)))
    assert bootstrap_ci(every, stat, resamples=50) == pytest.approx((tail ** (1 / n), 1.0))
    # as results.json gives it, at the run's level (99%: wider)
    out = method_metrics(none, ["probab"], 0.1, StatisticsSettings(resamples=20, level=0.99))
    assert out["ci"]["recovery.probab"] == pytest.approx([0.0, 1 - 0.005 ** (1 / n)])
    # a mean that is the same on every resample is not a count: its interval stays a point
    same = [ItemRecord(str(i), "forget", True, True, {}, 1.0, 1.0, 1.0) for i in range(n)]
    assert bootstrap_ci(same, lambda r: focus_shift(r, "kept"), resamples=20) == (1.0, 1.0)


def test_a_rate_keeps_its_count_through_a_copy_and_a_pickle():
    """A rate is a `Share`: float's own pickling gave its value alone to `Share(hits, of)`."""
    import copy
    import pickle

    rate = recovery_rate(_records(), "focus_on_key")
    for again in (pickle.loads(pickle.dumps(rate)), copy.deepcopy(rate)):
        assert again == pytest.approx(2 / 3) and (again.hits, again.of) == (2, 3)


def test_a_rate_between_none_and_all_keeps_its_bootstrap_interval():
    recs = [ItemRecord(str(i), "retain", True, i >= 1) for i in range(30)]  # 1 of 30 lost
    lo, hi = bootstrap_ci(recs, lambda r: destructive_rate(r, "retain"), resamples=2000)
    plain = bootstrap_ci(recs, lambda r: float(destructive_rate(r, "retain")), resamples=2000)
    assert (lo, hi) == plain and lo == 0.0 < hi


@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(0, 5))
def test_bootstrap_bounds_are_ordered_rates(flags, seed):
    recs = [ItemRecord(str(i), "general", True, f) for i, f in enumerate(flags)]
    lo, hi = bootstrap_ci(recs, lambda r: destructive_rate(r, "general"), resamples=50, seed=seed)
    assert 0.0 <= lo <= hi <= 1.0


def _one_by_one_resamples(records, resamples, seed):
    """The bootstrap's draws as they were made before they were shared between figures:
    one `randrange` per record, split after split, the OWN_DRAWS splits each from its own
    generator."""
    import random

    from unpact.metrics import OWN_DRAWS

    rng = random.Random(seed)
    splits = list(dict.fromkeys(r.split for r in records))
    groups = [[r for r in records if r.split == s] for s in splits if s not in OWN_DRAWS]
    own = [
        ([r for r in records if r.split == s], random.Random(f"{seed}-{s}"))
        for s in OWN_DRAWS
        if any(r.split == s for r in records)
    ]
    for _ in range(resamples):
        sample = [g[rng.randrange(len(g))] for g in groups for _ in range(len(g))]
        for held, other in own:
            sample += [held[other.randrange(len(held))] for _ in range(len(held))]
        yield sample


@given(
    st.lists(
        st.sampled_from(["forget", "retain", "general", "holdout", "verbmem"]),
        min_size=1,
        max_size=25,
    ),
    st.integers(0, 3),
)
def test_shared_resamples_are_the_one_by_one_draws(splits, seed):
    """Every figure reuses one set of draws (39 figures drew 78 million numbers one by one
    for 2,000 items): the resamples, and so every interval, are the same records in the
    same order as drawing them one at a time."""
    recs = [ItemRecord(f"{s}{i}", s, True, i % 3 == 0) for i, s in enumerate(splits)]
    seen = []

    def keep(sample):
        seen.append([r.id for r in sample])
        return float(len(seen))

    bootstrap_ci(recs, keep, resamples=7, seed=seed)
    want = [[r.id for r in x] for x in _one_by_one_resamples(recs, 7, seed)]
    # first once on the records themselves (is the figure a count of none or all?)
    assert seen == [[r.id for r in recs], *want]


# --------------------------------------------------------------- KeyTokens vs keywords


def test_keyword_units_on_fixed_units():
    from unpact.attribution import keyword_units

    prompt = "Who founded Vostrand Glassworks? Vostrand!"
    units = ["Who", " founded", " Vost", "rand", " Glass", "works", "?", " Vost", "rand", "!"]
    assert keyword_units(prompt, units, ["Vostrand"]) == [2, 3, 7, 8]
    assert keyword_units(prompt, units, ["glassworks"]) == [4, 5]  # case does not matter
    assert keyword_units(prompt, units, ["works"]) == [5]
    assert keyword_units(prompt, units, []) == []


def test_keyword_units_are_found_at_the_prompt_s_own_offsets():
    """The keywords were searched in the lower-cased prompt, whose offsets are one later
    after each "İ" (U+0130 lower-cased is two characters): "Turkey" marked the "." after
    it too, and a keyword after a few such letters a unit it does not touch. Found in the
    prompt itself, "İstanbul" is also the keyword "istanbul", as a Turkish reader means."""
    from unpact.attribution import keyword_units

    prompt = "İstanbul is in Turkey."
    units = ["İstanbul", " is", " in", " Turkey", "."]
    assert keyword_units(prompt, units, ["Turkey"]) == [3]
    assert keyword_units(prompt, units, ["istanbul"]) == [0]
    prompt = "İİİİ in Turkey."
    units = ["İİİİ", " in", " Turkey", "."]
    assert keyword_units(prompt, units, ["in"]) == [1]


# letters of several scripts and cases, Arabic and Hebrew marks, tatweel, format characters
_KEY_CHARS = "aAbBİiIıßsS\u0640\u064e\u0651\u05b8\u05bcمحدשלו\u200f\u00ad\u200d "


@settings(max_examples=300, deadline=None)
@given(st.text(_KEY_CHARS, max_size=30), st.text(_KEY_CHARS, min_size=1, max_size=5))
def test_keyword_spans_equal_the_one_pattern_search(text, keyword):
    """keyword_spans searches the text with the optional marks and invisible characters
    taken out (offsets mapped back), where it compiled one pattern per keyword with a
    class of them between its letters: 235 s to read 20,000 items with their own keywords
    (`benchmarks/reading.py`). The spans are those of that pattern, on any mix of
    cases, marks and format characters."""
    from unpact.data.items import keyword_spans
    from unpact.testing import keyword_spans_one_pattern

    assert keyword_spans(text, keyword) == keyword_spans_one_pattern(text, keyword)


def test_a_keyword_is_found_with_or_without_arabic_and_hebrew_vowel_marks(tmp_path):
    """An item whose question writes مُحَمَّد (vowel marks) and whose keyword محمد (none, as
    usually typed) was refused: "'محمد' does not occur in the question". The marks are
    optional on either side, and a keyword's span takes the marks on its letters, so the
    token units holding them are the keyword's too."""
    from unpact.attribution import keyword_units
    from unpact.data.items import keyword_spans

    question = "من أسس مُحَمَّدٌ؟"
    word = (7, 16)  # مُحَمَّدٌ with its marks
    for keyword in ("محمد", "مُحَمَّد", "مُحَمَّدٌ", "مـحـمـد"):
        assert keyword_spans(question, keyword) == [word], keyword
    assert keyword_spans("أسسها محمد", "مُحَمَّد") == [(6, 10)]
    assert keyword_spans(question, "محمود") == [] and keyword_spans(question, "\u064e") == []
    assert keyword_spans("שָׁלוֹם עולם", "שלום") == [(0, 7)]
    # invisible format characters, on either side: a copied answer's right-to-left mark,
    # a soft hyphen in the question
    assert keyword_spans(question, "\u200fمحمد") == [word]
    assert keyword_spans("Who is Vost\u00adrand?", "Vostrand") == [(7, 16)]
    units = ["من", " أسس", " مُ", "حَ", "مَّ", "دٌ", "؟"]
    assert keyword_units(question, units, ["محمد"]) == [2, 3, 4, 5]
    write = tmp_path / "qa.jsonl"
    write.write_text(
        '{"id": "a", "question": "من أسس مُحَمَّدٌ؟", "answer": "x", "split": "forget", '
        '"keywords": ["محمد"]}\n',
        encoding="utf-8",
    )
    from unpact.data import load_benchmark

    assert load_benchmark(str(tmp_path)).items[0].keywords == ("محمد",)


@given(
    st.lists(st.sampled_from(["Vost", "rand", " ", "ab", "AB", "a", "?", "Glass"]), max_size=12),
    st.lists(st.text(alphabet="abVostrAB ?", min_size=0, max_size=4), max_size=3),
)
def test_keyword_units_agree_with_a_search_at_every_offset(units, keywords):
    """On text without "İ" the units are those a plain search gives: a keyword at every
    offset where the prompt's slice of its length is it, lower case aside, overlaps kept."""
    from unpact.attribution import keyword_units

    prompt = "".join(units)
    spans = [
        (s, s + len(k))
        for k in keywords
        if k
        for s in range(len(prompt) - len(k) + 1)
        if prompt[s : s + len(k)].lower() == k.lower()
    ]
    starts = [sum(len(u) for u in units[:i]) for i in range(len(units))]
    cores = [  # each unit's text less its spaces, by its offset in the prompt
        (a + len(u) - len(u.lstrip()), a + len(u.rstrip())) for a, u in zip(starts, units)
    ]
    want = [i for i, (a, b) in enumerate(cores) if a < b and any(a < e and s < b for s, e in spans)]
    assert keyword_units(prompt, units, keywords) == want


def test_keyword_units_match_the_tokenizer_offsets(tiny):
    from unpact.attribution import keyword_units, make_units

    prompt = "Who founded the Vostrand Glassworks near the river bank?"
    enc = tiny.encode_prompt(prompt)
    units = make_units(tiny, enc, "token")
    offsets = tiny.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    for keyword in ["Vostrand", "river bank", "Glassworks near"]:
        a = prompt.index(keyword)
        b = a + len(keyword)
        # the slow, obvious way: a token's character span overlaps the keyword's
        slow = [
            i
            for i, (s, e) in enumerate(offsets)
            if prompt[s:e].strip()
            and s + (len(prompt[s:e]) - len(prompt[s:e].lstrip())) < b
            and a < e
        ]
        assert keyword_units(prompt, [u.text for u in units], [keyword]) == slow


def test_keyword_precision_and_recall_on_hand_made_records():
    from unpact.metrics import keyword_precision, keyword_recall

    def rec(keys_before, keys_after, truth):
        return ItemRecord(
            "f",
            "forget",
            True,
            False,
            attribution_before={"key_tokens": keys_before},
            attribution_after={"key_tokens": keys_after},
            keyword_units=truth,
        )

    recs = [rec([1, 2], [0], [2, 3]), rec([4], [], [4]), rec([0], [0], [])]
    # item 3 has no keyword units: it counts for neither
    assert keyword_precision(recs, "before") == pytest.approx((1 / 2 + 1) / 2)
    assert keyword_recall(recs, "before") == pytest.approx((1 / 2 + 1) / 2)
    assert keyword_precision(recs, "after") == pytest.approx(0.0)  # item 2: no KeyTokens
    assert keyword_recall(recs, "after") == pytest.approx(0.0)
    # one KeyToken of three is a keyword, the only one: precision 1/3, recall 1
    lopsided = [rec([1, 2, 5], [], [2])]
    assert keyword_precision(lopsided, "before") == pytest.approx(1 / 3)
    assert keyword_recall(lopsided, "before") == 1.0


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (lambda: __import__("numpy").float32(0.25), 0.25),
        (lambda: __import__("numpy").int64(3), 3),
        (lambda: __import__("torch").tensor(0.5), 0.5),
        (lambda: None, None),
    ],
)
def test_a_plugin_metric_may_return_numpy_torch_or_none(returned, expected):
    """What a metric written with numpy or torch returns is a Python number in results.json
    and its interval; None (undefined) is null with NaN bounds. Each was a traceback: a JSON
    encoder's TypeError, or math.isnan(None) in the bootstrap."""
    import json

    from unpact.metrics import METRICS, metric
    from unpact.run import StatisticsSettings, method_metrics

    @metric("plugin_odd", title="odd", fmt="float")
    def odd(records, ctx):
        """Odd."""
        return returned()

    try:
        out = method_metrics(_records(), ["focus_on_key"], 0.1, StatisticsSettings(resamples=20))
    finally:
        METRICS.pop("plugin_odd")
    assert out["plugin_odd"] == expected and type(out["plugin_odd"]) is type(expected)
    low, high = out["ci"]["plugin_odd"]
    if expected is None:
        assert math.isnan(low) and math.isnan(high)
    else:
        assert low == high == expected
    json.dumps(out["plugin_odd"])


@pytest.mark.parametrize("what", ["metrics", "attacks", "methods"])
def test_the_listings_print_every_name_whole_at_80_columns(monkeypatch, what):
    """A name is what a config or --attacks is written with: 80 columns (a terminal's
    default, and a pipe's) printed 'recovery_control.<at…' and 'contribution_similarit…'."""
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    from unpact import cli
    from unpact.attacks import ATTACKS
    from unpact.metrics import METRICS
    from unpact.unlearn.methods import METHODS

    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=80))
    assert CliRunner().invoke(cli.app, [what]).exit_code == 0
    printed = buffer.getvalue()
    names = {
        "metrics": [m.name + (".<attack>" if m.per_attack else "") for m in METRICS.values()],
        "attacks": list(ATTACKS),
        "methods": list(METHODS),
    }[what]
    assert max(map(len, printed.splitlines())) <= 80
    cells = {line.split("│")[1].strip() for line in printed.splitlines() if line.count("│") > 2}
    assert set(names) <= cells


def test_the_control_rate_is_over_the_items_the_attack_ran_on():
    """Relearning trains on some forgotten items and has no row for them; a control row
    for such an item (the reference's relearning answered it) is not in the control's
    share, which is over the same items as the recovery rate."""
    records = [
        ItemRecord("f1", "forget", True, False, {"relearn": True}),
        ItemRecord("f2", "forget", True, False, {"relearn": False}),
        ItemRecord("f3", "forget", True, False, {}),  # trained on
        ItemRecord("f4", "forget", True, True, {}),  # kept: not forgotten
    ]
    control = {"f1": False, "f2": True, "f3": True, "f4": True}
    for r in records:
        r.recovered_control["relearn"] = control[r.id]
    assert recovery_rate(records, "relearn") == 0.5
    assert control_rate(records, "relearn") == 0.5  # f1, f2; not 2 of 3 with f3
    assert math.isnan(control_rate(records, "quantize"))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.floats(0, 1),
)
def test_the_interval_s_quantile_is_numpy_s_linear_one(values, q):
    """The bootstrap interval's bounds interpolate between order statistics as numpy's
    default quantile does (a bound read off the nearest lower value passed every test)."""
    import numpy as np

    from unpact.metrics import _quantile

    ordered = sorted(values)
    assert _quantile(ordered, q) == pytest.approx(float(np.quantile(ordered, q)), abs=1e-6)


def test_a_small_negative_figure_keeps_its_sign_and_a_digit():
    """A PrivLeak interval's lower end of -0.24% read "[-0%, 55%]"; -0.0 read "-0%"."""
    from unpact.metrics import display

    assert display("percent", -0.0024) == "-0.2%"
    assert display("percent", -0.0024, precise=True) == "-0.2%"
    assert display("percent", -0.0) == display("percent", 0.0) == "0%"
    assert display("percent", 0.002) == "0%"  # a positive one rounds as ever
    assert display("percent", -0.013) == "-1%" and display("percent", 0.55) == "55%"
    assert display("float", -0.0004) == "-0.0004" and display("float", -0.0) == "0.00"
    assert display("float", -0.37, precise=True) == "-0.370"
