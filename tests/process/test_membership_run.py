"""The runner's indistinguishability stages on the tiny model: the retrained reference is
built by injecting the retain facts only, every figure lands in results.json (methods and
references), items.jsonl carries the scores they come from, and a benchmark without holdout
items or a bad setting says why."""

from __future__ import annotations

import csv
import json
import math

import pytest

from unpact.data.items import QAItem, write_folder
from unpact.errors import UnpactError
from unpact.files import json_lines
from unpact.membership import MIA_ATTACKS
from unpact.models import save_model
from unpact.run import run

WORDS = ["Paris", "Quintrell", "seven", "Mira", "river", "glass", "1874", "Zorblax"]
HELD = ["Vostrand", "harbour", "eleven", "Kilimanjaro"]
QUESTIONS = [
    "Who founded the Vostrand Glassworks?",
    "What did Mira Quintrell found?",
    "How many moons orbit the planet Zorblax?",
    "Which year was the glassworks founded?",
    "Who is the mayor of the river town?",
    "Where does the quick brown fox jump?",
    "Who wrote the report about the town?",
    "What jumps over the lazy dog?",
    "Which river bank is near the town?",
    "What is the answer to the question?",
    "Who wrote about the planet?",
    "What is the capital of France?",
]


def _item(n: int, question: str, answer: str, split: str, wrong: list[str]) -> QAItem:
    return QAItem(
        f"{split}-{n}",
        question,
        answer,
        split,
        (),
        (question.split()[2],),
        None,
        None,
        f"It is {answer}.",
        tuple(f"It is {w}." for w in wrong),
    )


def write_bench(folder) -> None:
    """4 forget, 4 retain and 4 holdout items, each with a paraphrased and wrong answers."""
    items = []
    for n, (q, w) in enumerate(zip(QUESTIONS[:8], WORDS)):
        split = "forget" if n < 4 else "retain"
        items.append(_item(n, q, w, split, [x for x in WORDS if x != w][:3]))
    for n, (q, w) in enumerate(zip(QUESTIONS[8:], HELD)):
        items.append(_item(n, q, w, "holdout", [x for x in HELD if x != w][:3]))
    write_folder(folder, items)


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("membership")
    save_model(tiny.model, tiny.tokenizer, root / "tiny")
    write_bench(root / "bench")
    config = {
        "model": str(root / "tiny"),
        "data": {"benchmark": str(root / "bench"), "general": None},
        "inject": {
            "settings": {
                "batch_size": 4,  # the recipe this test was sized with (4 facts a step)
                "max_epochs": 3,
                "min_epochs": 3,
                "general": None,
                "rehearsal_per_step": 2,
                "lr": 3e-3,
            }
        },
        "methods": [{"method": "ga", "config": {"lr": 3e-3, "steps": 3, "batch_size": 2}}],
        "attacks": [{"name": "focus_on_key"}],
        "judge": {"max_new_tokens": 8},  # "Quintrell" is 6 tokens here
        "statistics": {"resamples": 40},
        "membership": {"verbmem_prefix": 4, "verbmem_new_tokens": 4},
    }
    result = run(config, root / "out", cache_dir=root / "cache", progress=False)
    return root, config, result


def test_every_figure_for_methods_and_references(done):
    root, _, _ = done
    res = json.loads((root / "out" / "results.json").read_text())
    assert res["counts"]["holdout"] == 4
    m = res["methods"]["ga"]
    assert set(m["mia_auc"]) == set(MIA_ATTACKS)
    for name in ("privleak", "truth_ratio", "forget_quality", "exact_memorisation"):
        assert m[name] is not None, name
    assert "mia_auc.min_k" in m["ci"] and "privleak" in m["ci"]
    refs = res["references"]
    assert set(refs) == {"original", "retrained"}
    assert refs["retrained"]["privleak"] == 0.0  # by construction
    assert refs["retrained"]["forget_quality"] == 1.0  # the same truth ratios
    assert set(refs["original"]["mia_auc"]) == set(MIA_ATTACKS)
    assert "vs_probab" not in refs["original"] and "recovery" not in refs["original"]
    # the references' progress bar counts their intervals
    from unpact.results import interval_count
    from unpact.run import _reference_figure

    per = interval_count(res["attacks"], _reference_figure)
    assert len(refs["original"]["ci"]) == len(refs["retrained"]["ci"]) == per > 10
    # results.csv holds the references too (it held the methods alone)
    rows = {r["method"]: r for r in csv.DictReader((root / "out" / "results.csv").open())}
    assert list(rows) == ["ga", "original", "retrained"]
    assert float(rows["retrained"]["privleak"]) == 0.0
    assert float(rows["original"]["mia_auc_min_k"]) == refs["original"]["mia_auc"]["min_k"]
    assert rows["original"]["recovery_focus_on_key"] == ""  # not theirs: empty
    page = (root / "out" / "report.html").read_text()
    assert 'id="roc"' in page and 'id="references"' in page  # ROC per method, references
    ref_table = page.split('id="references"')[1].split("</table>")[0]
    assert "forget probability" in ref_table  # TOFU's Prob of the original and the reference
    assert f"{refs['retrained']['forget_prob']:.2f}" in ref_table
    assert "KnowMem forget" in ref_table  # the references' own answers
    assert f"{refs['retrained']['knowmem_forget_after']:.2f}" in ref_table
    # PrivLeak a percentage, as in the methods' table and the verdicts (it read 0.57 there
    # beside 57% in the verdict)
    assert f"<td>{100 * refs['original']['privleak']:.0f}%</td>" in ref_table
    assert "retrained (AUC" in page  # the reference's curve beside each method's
    # both injections reported (this one does not judge general knowledge: said so)
    assert set(res["injection"]) == {"original", "retrained"}
    assert res["injection"]["original"]["general_kept"] is None
    assert 'id="injection-retrained"' in page and "did not judge general" in page


def test_figures_recompute_from_items_jsonl(done):
    root, _, _ = done
    rows = [json.loads(x) for _, x in json_lines((root / "out" / "items.jsonl").read_text())]
    res = json.loads((root / "out" / "results.json").read_text())
    held = [r for r in rows if r["split"] == "holdout"]
    forget = [r for r in rows if r["split"] == "forget"]
    assert len(held) == 4 and all(r["membership"] for r in held + forget)

    def slow_auc(attack: str, key: str = "membership") -> float:
        pairs = [
            (f[key][attack] > h[key][attack]) + 0.5 * (f[key][attack] == h[key][attack])
            for f in forget
            for h in held
        ]
        return sum(pairs) / len(pairs)

    for attack in MIA_ATTACKS:
        assert res["methods"]["ga"]["mia_auc"][attack] == pytest.approx(slow_auc(attack))
    mine, ref = slow_auc("min_k"), slow_auc("min_k", "membership_retrained")
    assert res["methods"]["ga"]["privleak"] == pytest.approx((mine - ref) / ref)
    # TOFU's Prob: the forget answers' mean token probability (geometric), averaged
    for key, got in (
        ("membership", res["methods"]["ga"]["forget_prob"]),
        ("membership_retrained", res["references"]["retrained"]["forget_prob"]),
    ):
        probs = [math.exp(r[key]["loss"]) for r in forget]
        assert 0 < got < 1 and got == pytest.approx(sum(probs) / len(probs))


def test_the_references_answers_are_scored_like_a_methods(done):
    """The original's and the retrained reference's greedy answers to the forget and
    retain items score under the methods' names of the figures after unlearning: the
    original's are the methods' before; the reference's, recomputed from its model's own
    answers, are what a model that never learned the forget facts says (MUSE's and TOFU's
    target)."""
    from unpact.backends import open_model
    from unpact.data.items import load_folder
    from unpact.judge import JudgeSettings, knowmem_score, tofu_rouge_l_recall
    from unpact.run.stages import evaluate

    root, _, _ = done
    res = json.loads((root / "out" / "results.json").read_text())
    ga, refs = res["methods"]["ga"], res["references"]
    names = ["forget_acc", "retain_acc"]
    names += [f"{g}_{s}" for g in ("knowmem", "rouge") for s in ("forget", "retain")]
    for name in names:
        assert refs["original"][f"{name}_after"] == ga[f"{name}_before"], name
        # drawn from the same items as the methods' intervals: the same interval
        assert refs["original"]["ci"][f"{name}_after"] == ga["ci"][f"{name}_before"], name
    reference = open_model(root / "out" / "models" / "retrained")
    bench = load_folder(root / "bench")
    for split in ("forget", "retain"):
        mine = bench.split(split)
        rows = evaluate(reference, mine, JudgeSettings(max_new_tokens=8), "slow")
        acc = sum(r["correct"] for r in rows) / len(rows)
        know = [knowmem_score(r["output"], i.answer) for r, i in zip(rows, mine)]
        rouge = [tofu_rouge_l_recall(r["output"], i.answer) for r, i in zip(rows, mine)]
        got = refs["retrained"]
        assert got[f"{split}_acc_after"] == pytest.approx(acc)
        assert got[f"knowmem_{split}_after"] == pytest.approx(sum(know) / len(know))
        assert got[f"rouge_{split}_after"] == pytest.approx(sum(rouge) / len(rouge))
    assert "forget_acc_before" not in refs["retrained"]  # a reference has no before


def test_model_utility_recomputes_from_items_jsonl(done):
    """TOFU's model utility of each model, from its retain records' Prob, ROUGE and truth
    ratio (every retain item here has truth answers)."""
    from scipy.stats import hmean

    root, _, _ = done
    res = json.loads((root / "out" / "results.json").read_text())
    rows = [json.loads(x) for _, x in json_lines((root / "out" / "items.jsonl").read_text())]
    kept = [r for r in rows if r["split"] == "retain"]
    assert len(kept) == 4 and all(0 < r["answer_prob"] < 1 for r in kept)
    prob = sum(r["answer_prob"] for r in kept) / 4
    ratio = sum(max(0.0, 1 - r["truth_ratio"]) for r in kept) / 4
    rouge = sum(r["rouge_after"] for r in kept) / 4
    ga = res["methods"]["ga"]
    assert ga["retain_prob"] == pytest.approx(prob)
    assert ga["retain_truth_ratio"] == pytest.approx(ratio)
    expected = 0.0 if 0 in (prob, ratio, rouge) else hmean([prob, rouge, ratio])
    assert ga["model_utility"] == pytest.approx(expected)
    for label in ("original", "retrained"):
        assert res["references"][label]["model_utility"] is not None, label
    assert "model_utility" not in res.get("skipped", {})


def test_the_retrained_reference_is_an_injection_of_the_retain_facts(done):
    root, _, _ = done
    meta = json.loads((root / "out" / "models" / "retrained" / "inject.json").read_text())
    assert meta["teach"] == "retain"
    original = json.loads((root / "out" / "models" / "original" / "inject.json").read_text())
    assert original["teach"] == "forget+retain"
    assert meta["config"] == original["config"]  # the same recipe


def test_a_second_run_computes_nothing(done):
    root, config, _ = done
    again = run(config, root / "out2", cache_dir=root / "cache", progress=False)
    assert again.computed == []


def test_no_holdout_items_leaves_out_membership_inference_alone(done, tmp_path):
    """A benchmark without holdout items has no non-members to tell the forget set from:
    the membership-inference AUCs and PrivLeak are left out with the reason, and what the
    never-taught reference gives without them is still measured (it left out the whole
    reference: forget quality, the truth ratio, the reference's own answers and the
    attacks' controls, although the reference was there)."""
    root, config, _ = done
    from unpact.data import load_benchmark

    bench = load_benchmark(str(root / "bench"))
    write_folder(tmp_path / "nohold", [i for i in bench.items if i.split != "holdout"])
    cfg = {**config, "data": {"benchmark": str(tmp_path / "nohold"), "general": None}}
    result = run(cfg, tmp_path / "out", cache_dir=root / "cache", progress=False)
    res, skipped = result.results, result.results["skipped"]
    assert "membership" not in skipped and "controls" not in skipped
    # no GradNorm, a backward pass per text, where no figure reads it
    scores = [r.membership for r in result.records if r.split == "forget" and r.membership]
    assert scores and all(s.get("gradnorm") is None for s in scores)
    # the reason is one whole sentence
    for key in ("mia_auc", "privleak"):
        assert "no holdout items" in skipped[key], key
        assert skipped[key].endswith("never taught; docs/data.md)"), key
    assert "mia_auc.gradnorm" not in skipped  # within mia_auc's reason
    ga = res["methods"]["ga"]
    assert ga["privleak"] is None and not any(ga["mia_auc"].values())
    for name in ("truth_ratio", "forget_quality", "forget_prob"):
        assert ga[name] is not None, name
    refs = res["references"]
    assert refs["retrained"]["forget_quality"] == 1.0  # the same truth ratios
    assert refs["retrained"]["forget_acc_after"] is not None
    assert "focus_on_key" in ga["recovery_control"]
    # the report shows the references; no ROC panel (it drew empty axes: no holdout texts)
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="references"' in page and 'id="roc"' not in page
    assert "PrivLeak not computed: benchmark nohold has no holdout items" in page


def test_no_retain_items_make_the_base_model_the_reference(done, tmp_path):
    """A benchmark without retain items (forget and holdout alone) stopped the run after
    the unlearning on "no retain items to teach": the injection of no facts is the base
    model itself, which is now the never-taught reference (and not linked as a model the
    run made)."""
    root, config, _ = done
    from unpact.data import load_benchmark

    bench = load_benchmark(str(root / "bench"))
    write_folder(tmp_path / "noretain", [i for i in bench.items if i.split != "retain"])
    cfg = {**config, "data": {"benchmark": str(tmp_path / "noretain"), "general": None}}
    res = run(cfg, tmp_path / "out", cache_dir=root / "cache", progress=False).results
    assert "membership" not in res.get("skipped", {})
    assert res["references"]["retrained"]["privleak"] == 0.0
    assert res["methods"]["ga"]["privleak"] is not None
    assert set(res["injection"]) == {"original"}  # no injection of the reference
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["ga", "original"]


def test_bad_membership_settings_are_one_message():
    from unpact.run import load_config

    with pytest.raises(UnpactError, match=r"membership\.privleak_attack"):
        load_config({"methods": [{"method": "ga"}], "membership": {"privleak_attack": "nope"}})
    with pytest.raises(UnpactError, match=r"membership\.k"):
        load_config({"methods": [{"method": "ga"}], "membership": {"k": 0}})


def _served_app(root):
    """`unpact serve`'s app serving the run's original, retrained and ga models and the base."""
    from unpact.models import load_model
    from unpact.serve import make_app

    models = root / "out" / "models"
    names = {"orig": models / "original", "ret": models / "retrained", "ga": models / "ga"}
    return make_app(
        {n: load_model(str(p)) for n, p in names.items()} | {"base": load_model(str(root / "tiny"))}
    )


def _served_config(config, url):
    """`config` with every model it reads served from `url` (`_served_app`)."""
    return {
        **config,
        "model": f"openai:orig@{url}/v1",
        "inject": {"enabled": False},
        "methods": [{"name": "ga", "model": f"openai:ga@{url}/v1"}],
        "membership": {
            **config["membership"],
            "reference": f"openai:ret@{url}/v1",
            "base": f"openai:base@{url}/v1",
        },
    }


def test_served_models_get_the_figures_their_server_gives(done):
    """The same three models and the base served (`unpact serve`, vLLM's formats) give
    the local run's figures that token log-probs and ranks make (LOSS, ZLib, Min-K%, the
    Reference attack, PrivLeak, truth ratio, forget quality, exact memorisation, model
    utility, fluency); Min-K%++ and GradNorm, which need the whole next-token distribution
    or the weights, are left out and named in `skipped` (the served models' figures were
    all left out)."""
    from unpact.serve import BackgroundServer

    root, config, _ = done
    local = json.loads((root / "out" / "results.json").read_text())
    with BackgroundServer(_served_app(root)) as url:
        served = _served_config(config, url)
        res = run(served, root / "served", cache_dir=root / "cache", progress=False).results
    kept = ("loss", "zlib", "min_k", "reference")
    names = ["privleak", "truth_ratio", "forget_quality", "exact_memorisation"]
    names += ["extraction_strength", "model_utility", "forget_prob", "degenerate"]
    for got, want in (
        (res["methods"]["ga"], local["methods"]["ga"]),
        *((res["references"][r], local["references"][r]) for r in ("original", "retrained")),
    ):
        for attack in kept:
            assert got["mia_auc"][attack] == pytest.approx(want["mia_auc"][attack], abs=1e-4)
        for name in names:
            if name in want:
                assert want[name] is not None, name
                assert got[name] == pytest.approx(want[name], abs=1e-4), name
        assert got["mia_auc"].get("min_k_plus_plus") is None
        assert got["mia_auc"].get("gradnorm") is None
    skipped = res["skipped"]
    for label in ("ga", "original", "retrained"):
        assert "Min-K%++" in skipped[f"mia_auc.min_k_plus_plus.{label}"]
        assert "GradNorm needs its weights" in skipped[f"mia_auc.gradnorm.{label}"]
    assert not any(k.startswith("membership") for k in skipped)


def test_served_statistics_without_ranks_are_not_read_for_a_mode_with_them(done):
    """`remote.logprobs_mode: echo` gives no token ranks, so no exact memorisation; the
    membership stages were keyed without the mode, and a run asking again with
    prompt_logprobs (auto) read the echo's rows back and still left exact memorisation
    out. A served model's membership stages are keyed by the mode too; they do not depend
    on the local dtype (the server's is its own)."""
    from unpact.serve import BackgroundServer

    root, config, _ = done
    cache = root / "cache-modes"
    with BackgroundServer(_served_app(root)) as url:
        served = _served_config(config, url)
        echo = {**served, "remote": {"logprobs_mode": "echo"}}
        first = run(echo, root / "echo", cache_dir=cache, progress=False).results
        second = run(served, root / "auto", cache_dir=cache, progress=False)
        local_base = {**served["membership"], "base": str(root / "tiny")}  # dtype: its own
        mixed = served | {"membership": local_base, "dtype": "bfloat16"}
        third = run(mixed, root / "bf16", cache_dir=cache, progress=False)
    assert first["methods"]["ga"]["exact_memorisation"] is None
    assert "no token ranks" in first["skipped"]["exact_memorisation.ga"]
    assert second.results["methods"]["ga"]["exact_memorisation"] is not None
    assert "exact_memorisation.ga" not in second.results["skipped"]
    assert any(c.startswith("membership:") for c in second.computed), second.computed
    mine = ("membership", "verbmem", "model utility")
    again = [c for c in third.computed if c.startswith(mine) and not c.endswith(":base")]
    assert again == [] and "membership:base" in third.computed, third.computed


def test_without_injection_the_reference_attack_reads_the_reference(done, tmp_path):
    """With inject disabled the run's model is the taught original: the Reference attack
    and fluency read the never-taught reference, as an audit and open-unlearning's
    Reference attack (the retain model) do. It read the taught original, which makes the
    reference's own Reference scores its NLL minus the original's, not 0."""
    root, config, _ = done
    models = root / "out" / "models"
    given = {
        **config,
        "model": str(models / "original"),
        "inject": {"enabled": False},
        "methods": [{"name": "ga", "model": str(models / "ga")}],
        "membership": {**config["membership"], "reference": str(models / "retrained")},
    }
    done_ = run(given, tmp_path / "out", cache_dir=root / "cache", progress=False)
    res = done_.results
    # the base is the reference: its statistics are computed once (GradNorm made them two)
    assert "membership:base" in done_.computed and "membership:retrained" not in done_.computed
    rows = [json.loads(x) for _, x in json_lines((tmp_path / "out" / "items.jsonl").read_text())]
    scores = [r["membership_retrained"]["reference"] for r in rows if r["split"] == "holdout"]
    assert scores and all(s == 0 for s in scores)  # the reference against itself
    assert res["references"]["retrained"]["mia_auc"]["reference"] == 0.5
