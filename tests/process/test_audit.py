"""`unpact audit` on a model pair the user already has (issue 22), in a real subprocess:
tiny models saved as folders, a benchmark folder with holdout items; the verdicts printed
and in results.json, the controls on the reference, user mistakes as exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.process.test_membership_run import HELD, QUESTIONS, WORDS, _item
from unpact.data.items import write_folder
from unpact.errors import UnpactError
from unpact.models import save_model
from unpact.run.audit import audit, audit_config, verdicts
from unpact.testing import tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from unpact.data.items import QAItem
    from unpact.judge import choose_options

    root = tmp_path_factory.mktemp("audit")
    lm = tiny_model(seed=0)
    save_model(lm.model, lm.tokenizer, root / "original")
    # multiple choice, the right option being the original's pick: it "knows" every fact
    options = [tuple((WORDS * 2)[n : n + 3]) for n in range(8)]
    from unpact.models import load_model

    picks = choose_options(load_model(str(root / "original")), QUESTIONS[:8], options)
    unlearned = tiny_model(seed=0)
    with torch.no_grad():  # "unlearned": the original with its MLPs scaled down
        for layer in unlearned.model.model.layers:
            layer.mlp.down_proj.weight.mul_(-1.0)
    save_model(unlearned.model, unlearned.tokenizer, root / "unlearned")
    ref = tiny_model(seed=5)
    save_model(ref.model, ref.tokenizer, root / "reference")
    items = []
    for n, (q, k) in enumerate(zip(QUESTIONS[:8], picks)):
        split = "forget" if n < 4 else "retain"
        wrong = tuple(o for o in options[n] if o != options[n][k])
        items.append(
            QAItem(
                f"{split}-{n}", q, options[n][k], split, choices=options[n], perturbed_answers=wrong
            )
        )
    for n, (q, w) in enumerate(zip(QUESTIONS[8:], HELD)):
        items.append(_item(n, q, w, "holdout", [x for x in HELD if x != w][:3]))
    write_folder(root / "bench", items)
    return root


def _audit(*args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "UNPACT_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "unpact", "audit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_audit_prints_a_verdict_per_test_and_writes_the_run(pair, tmp_path):
    out = tmp_path / "audit"
    res = _audit(
        *("--original", str(pair / "original"), "--unlearned", str(pair / "unlearned")),
        *("--reference", str(pair / "reference"), "--benchmark", str(pair / "bench")),
        *("--out", str(out), "--general", "none", "--device", "cpu"),
        *("--attacks", "focus_on_key,quantize,logit_lens,ablate_direction"),
        cache=tmp_path / "cache",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["attacks"] == ["focus_on_key", "quantize", "ablate_direction", "logit_lens"]
    tests = [v["test"] for v in results["verdicts"]["unlearned"]]
    assert tests[0] == "forgotten"
    assert "unpact audit" in res.stdout and "forgotten" in res.stdout
    assert (out / "items.jsonl").is_file() and (out / "report.html").is_file()
    m = results["methods"]["unlearned"]
    assert m["forget_acc_before"] == 1.0 and m["forgotten"] > 0
    assert tests[1:5] == results["attacks"] and "indistinguishable" in tests
    assert m["recovery_control"]["quantize"] is not None  # the reference was attacked
    assert m["privleak"] is not None
    assert "Traceback" not in res.stderr
    # each forget item says whether the reference answers it (the forgotten line reads it)
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    forget = [r for r in rows if r["split"] == "forget"]
    assert forget and all(isinstance(r["correct_reference"], bool) for r in forget)
    assert all(r["correct_reference"] is None for r in rows if r["split"] != "forget")
    # --general none: no general items, and no line saying they were evaluated
    assert "evaluating: original (retain)" in res.stdout + res.stderr
    assert "(general)" not in res.stdout + res.stderr
    # what the preset left out, said in the audit's own terms (no config key)
    assert "--preset gpu computes it" in results["skipped"]["mia_auc.gradnorm"]
    assert "membership.gradnorm" not in res.stdout
    # the report says so too (it showed only the controls', PrivLeak's and membership's)
    report = (out / "report.html").read_text()
    assert "<code>mia_auc.gradnorm</code>: " in report and "--preset gpu computes it" in report
    assert "; 1 unlearning method;" in report  # "1 unlearning methods" before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--preset", "tiny"), "--preset: 'tiny' is not one of laptop, gpu"),
        (("--attacks", "nope"), "--attacks: unknown attack 'nope'"),
        (("--attacks", ","), "--attacks: give at least one attack name"),
        (("--judge", "vibes"), "--judge: 'vibes' is not one of contains, rouge"),
        (("--max-new-tokens", "0"), "--max-new-tokens: 0 is not a positive number"),
        (("--dtype", "float8"), "--dtype: 'float8' is not one of float32, bfloat16, float16"),
        (("--chat-template", "missing.jinja"), "--chat-template: cannot read missing.jinja"),
        (
            ("--chat-template", "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}"),
            "--chat-template: chat template (given as text):",
        ),
        (
            ("--chat-template", "{{ messages[0]['content'] }}{{ messages[0]['content'] }}"),
            "verbatim exactly once",
        ),
        # an empty value: `--base ""` was dropped unsaid, the others read the current folder
        (("--base", ""), "--base: empty; give a value or leave the option out"),
        (("--reference", " "), "--reference: empty"),
        (("--general", ""), "--general: empty"),
        (("--plugin", ""), "plugin: empty; give a .py file or an importable module's name"),
    ],
    ids=[
        *("preset", "attack", "empty", "judge", "tokens", "dtype", "template", "jinja", "twice"),
        *("no-base", "no-reference", "no-general", "no-plugin"),
    ],
)
def test_audit_mistakes_exit_2(pair, tmp_path, args, message):
    res = _audit(
        *("--original", str(pair / "original"), "--unlearned", str(pair / "unlearned")),
        *("--benchmark", str(pair / "bench"), "--out", str(tmp_path / "a"), *args),
        cache=tmp_path / "cache",
    )
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


NOISE_PLUGIN = """
from contextlib import contextmanager

import torch
from pydantic import BaseModel

from unpact.attacks.weights import WeightAttack
from unpact.metrics import metric
from unpact.models import load_model


class Noise(WeightAttack):
    name = "noise"

    class Settings(BaseModel):
        scale: float = 1e-3

    @contextmanager
    def attacked(self, ctx):
        lm = load_model(ctx.spec, device=ctx.device or "cpu")
        g = torch.Generator().manual_seed(ctx.generator().randrange(2**31))
        with torch.no_grad():
            for p in lm.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * self.settings.scale)
        yield lm


@metric("forget_items", title="forget items", fmt="count", interval=False)
def forget_items(records, ctx):
    return sum(r.split == "forget" for r in records)
"""


def test_a_plugin_attack_and_metric_run_in_an_audit(pair, tmp_path):
    """`--plugin` as `unpact run` takes it: its attack is chosen by name with --attacks,
    judged beside its control on the reference, and its metric is in results.json."""
    plugin = tmp_path / "noise.py"
    plugin.write_text(NOISE_PLUGIN)
    out = tmp_path / "audit"
    args = (
        *("--original", str(pair / "original"), "--unlearned", str(pair / "unlearned")),
        *("--reference", str(pair / "reference"), "--benchmark", str(pair / "bench")),
        *("--general", "none", "--device", "cpu", "--attacks", "noise,logit_lens"),
    )
    res = _audit(*args, "--out", str(out), "--plugin", str(plugin), cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["attacks"] == ["logit_lens", "noise"]  # the preset's order, then others
    m = results["methods"]["unlearned"]
    assert m["recovery"]["noise"] is not None and m["recovery_control"]["noise"] is not None
    assert m["forget_items"] == 4
    assert "noise" in [v["test"] for v in results["verdicts"]["unlearned"]]
    # without the plugin the name is unknown: one message, exit 2
    res = _audit(*args, "--out", str(tmp_path / "b"), cache=tmp_path / "cache")
    assert res.returncode == 2 and "--attacks: unknown attack 'noise'" in res.stderr


def test_a_chat_template_replaces_every_model_s_own(pair, tmp_path):
    """A checkpoint fine-tuned in another prompt format than its tokenizer's template (or
    saved without one, as open-unlearning's TOFU models): --chat-template gives every model
    of the audit that one template, in copies; the user's folders stay as they were."""
    from unpact.models import load_model

    lm = load_model(str(pair / "unlearned"))
    lm.tokenizer.chat_template = None
    save_model(lm.model, lm.tokenizer, tmp_path / "plain")
    template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    (tmp_path / "qa.jinja").write_text(template)
    before = (pair / "original" / "chat_template.jinja").read_text()
    args = (
        *("--original", str(pair / "original"), "--unlearned", str(tmp_path / "plain")),
        *("--benchmark", str(pair / "bench"), "--out", str(tmp_path / "a")),
        *("--general", "none", "--device", "cpu", "--attacks", "focus_on_key"),
    )
    res = _audit(*args, cache=tmp_path / "cache")  # two templates: refused
    assert res.returncode == 2 and "--unlearned" in res.stderr, res.stderr[-2000:]
    res = _audit(*args, "--chat-template", str(tmp_path / "qa.jinja"), cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["chat_template"] == str(tmp_path / "qa.jinja")
    assert "asked in the chat template" in res.stdout and "qa.jinja" in res.stdout
    assert results["model"] == str(pair / "original")
    used = results["original_model"]  # the copy that ran, in the cache
    assert used.startswith(str(tmp_path / "cache" / "models" / "templated-"))
    assert Path(used, "chat_template.jinja").read_text() == template
    assert (pair / "original" / "chat_template.jinja").read_text() == before
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()


def test_a_pair_with_two_tokenizers_is_named_by_its_option_before_any_stage(pair, tmp_path):
    """A mismatched pair ran every stage, then failed at the focus figures ('the two
    attributions have different units')."""
    other = tiny_model(seed=1, vocab_size=300)
    save_model(other.model, other.tokenizer, tmp_path / "other")
    res = _audit(
        *("--original", str(pair / "original"), "--unlearned", str(tmp_path / "other")),
        *("--benchmark", str(pair / "bench"), "--out", str(tmp_path / "a")),
        cache=tmp_path / "cache",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--unlearned" in res.stderr and "another tokenizer" in res.stderr
    assert not (tmp_path / "cache" / "stages").exists()


def test_an_unknown_benchmark_is_named_by_its_option(pair, tmp_path):
    res = _audit(
        *("--original", str(pair / "original"), "--unlearned", str(pair / "unlearned")),
        *("--benchmark", "nope", "--out", str(tmp_path / "a")),
        cache=tmp_path / "cache",
    )
    assert res.returncode == 2 and "--benchmark: no benchmark 'nope'" in " ".join(
        res.stderr.split()
    )


def test_a_mistyped_model_is_named_by_its_option_before_any_model_loads(tmp_path, monkeypatch):
    """A wrong --unlearned or --reference stops the audit at once, naming the option, not
    after the original model has loaded (minutes for a large one)."""
    import unpact.models
    from unpact.run.audit import audit

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the specs were checked")

    monkeypatch.setattr(unpact.models, "load_model", no_load)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnpactError, match=r"--unlearned: .*without config\.json"):
        audit("default", str(tmp_path / "empty"), "news", tmp_path / "out")
    with pytest.raises(UnpactError, match=r"--reference: .*no such file or directory"):
        audit("default", "default", "news", tmp_path / "out", reference=str(tmp_path / "nope"))
    assert not (tmp_path / "out").exists()


def test_sentence_answers_can_be_judged_by_rouge():
    """TOFU's answers are sentences, which a contains judge of 32 tokens never finds (the
    run refuses them): the audit takes the judge and its answer length."""
    config, _ = audit_config("default", "default", "news", judge="rouge", max_new_tokens=64)
    assert config["judge"] == {"kind": "rouge", "max_new_tokens": 64}
    assert audit_config("default", "default", "news")[0]["judge"] == {"kind": "contains"}


def test_dtype_of_a_served_pair_is_refused(tmp_path):
    served = "openai:m@http://127.0.0.1:1/v1"
    res = _audit(
        *("--original", served, "--unlearned", served, "--benchmark", "news"),
        *("--out", str(tmp_path / "a"), "--dtype", "bfloat16"),
        cache=tmp_path / "cache",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--dtype: bfloat16 applies to local models" in res.stderr


def test_a_served_model_skips_the_attacks_that_need_weights_and_says_why():
    config, skipped = audit_config(
        "openai:m@http://127.0.0.1:9/v1", "openai:u@http://127.0.0.1:9/v1", "news"
    )
    names = [a["name"] for a in config["attacks"]]
    assert names == ["focus_on_key", "probab"]
    assert set(skipped) == {
        f"attack.{a}"
        for a in ("quantize", "relearn_unrelated", "ablate_direction", "logit_lens", "probe")
    }
    assert all("served: no weights" in why for why in skipped.values())


def test_no_general_items_skips_relearning_on_them_and_a_run_config_is_refused_up_front():
    """`--general none` once failed mid-audit, after the prompt attacks had run."""
    from unpact.run import load_config

    config, skipped = audit_config("default", "default", "news", general=None)
    assert "relearn_unrelated" not in [a["name"] for a in config["attacks"]]
    assert skipped == {
        "attack.relearn_unrelated": "--general none: no general-knowledge items to use"
    }
    config, skipped = audit_config("default", "default", "news", general=None, attacks=["quantize"])
    assert not skipped
    run_config = {"methods": [{"method": "ga"}], "data": {"general": None}}
    with pytest.raises(UnpactError, match=r"attacks\.0: relearn_unrelated reads general"):
        load_config(run_config | {"attacks": [{"name": "relearn_unrelated"}]})
    retain = {"name": "relearn_unrelated", "settings": {"data": "retain"}}
    assert load_config(run_config | {"attacks": [retain]}).attacks[0].name == "relearn_unrelated"


def test_verdicts_read_the_figures_and_the_paired_items():
    from unpact.metrics import ItemRecord

    def rec(n, mine, control):
        return ItemRecord(
            f"f{n}",
            "forget",
            True,
            False,
            {"quantize": mine},
            recovered_control={"quantize": control},
        )

    # 8 recovered here and not on the reference, 0 the other way: p = 2/2^8 < 0.05
    records = [rec(n, True, False) for n in range(8)] + [rec(8 + n, False, False) for n in range(4)]
    m = {
        "forgotten": 12,
        "recovery": {"quantize": 8 / 12},
        "recovery_control": {"quantize": 0.0},
        "privleak": 0.02,
        "forget_quality": 0.5,
        "ci": {"privleak": [-0.1, 0.12], "recovery.quantize": [0.4, 0.9]},
    }
    got = {v["test"]: v for v in verdicts(m, records, ["quantize"])}
    assert got["quantize"]["verdict"] == "recoverable beyond the control"
    assert "p = 0.0078" in got["quantize"]["detail"]
    # the counts beside the share, which alone hid how few items it rests on
    assert got["quantize"]["detail"].startswith(
        "recovers 8 of the 12 forgotten items attacked (67% [35%, 90%], exact binomial interval); "
    )
    assert got["indistinguishable"]["verdict"] == "indistinguishable from the reference"
    # the evidence gives TOFU's forget probability beside the reference's, when both are known
    assert "probability" not in got["indistinguishable"]["detail"]

    # without a control a recovery is said as such, not as "recoverable": on items with
    # options, a guess or one of PROBAB's samples answers many a never-known fact
    alone = m | {"recovery_control": {"quantize": None}}
    got = {v["test"]: v for v in verdicts(alone, records, ["quantize"])}
    assert got["quantize"]["verdict"] == "recovered, no control"
    assert "--reference" in got["quantize"]["detail"]
    none = alone | {"recovery": {"quantize": 0.0}}
    got = {v["test"]: v for v in verdicts(none, records, ["quantize"])}
    assert got["quantize"]["verdict"] == "not recovered"

    def detail(test, figures, reference=None):
        got = verdicts(figures, records, ["quantize"], reference=reference)
        return next(v["detail"] for v in got if v["test"] == test)

    with_p = m | {"forget_prob": 0.296}
    assert detail("indistinguishable", with_p, {"forget_prob": 0.0031}).endswith(
        "; the true forget answers' probability 0.30, the reference's 3.1e-03"
    )
    # the forgotten count gives the never-taught reference's accuracies beside the method's
    accs = m | {"forget_acc_before": 1.0, "forget_acc_after": 0.0}
    accs |= {"retain_acc_before": 0.9, "retain_acc_after": 0.8}
    ref = {"forget_acc_after": 0.25, "retain_acc_after": 0.875}
    assert detail("forgotten", accs, ref).endswith(
        "(forget accuracy 100% → 0%, the reference's 25%; retain 90% → 80%, the reference's 88%)"
    )
    assert detail("forgotten", accs).endswith("(forget accuracy 100% → 0%; retain 90% → 80%)")
    # and TOFU's model utility beside the reference's, where known
    useful = accs | {"model_utility": 0.706}
    assert detail("forgotten", useful, {"model_utility": 0.8253}).endswith(
        "retain 90% → 80%; TOFU's model utility 0.71, the reference's 0.83)"
    )
    m["ci"]["privleak"] = [-0.6, -0.3]
    m["privleak"] = -0.45
    got = {v["test"]: v for v in verdicts(m, records, ["quantize"])}
    assert got["indistinguishable"]["verdict"].startswith("distinguishable: over-unlearned")
    # PrivLeak undefined (the reference's AUC 0): forget quality alone decides, the reason
    # said; it read "distinguishable" from the missing interval
    zero = "the retrained reference's min_k AUC is 0 (...) and PrivLeak divides by it"
    undefined = m | {"privleak": None, "ci": {"recovery.quantize": [0.4, 0.9]}}
    got = {
        v["test"]: v for v in verdicts(undefined, records, ["quantize"], 0.05, {"privleak": zero})
    }
    assert got["indistinguishable"]["verdict"] == "indistinguishable from the reference"
    assert got["indistinguishable"]["detail"].endswith(f"PrivLeak not measured: {zero}")
    low = undefined | {"forget_quality": 0.01}
    got = {v["test"]: v for v in verdicts(low, records, ["quantize"], 0.05, {"privleak": zero})}
    assert got["indistinguishable"]["verdict"] == "distinguishable from the reference"
    # a PrivLeak without an interval (statistics.resamples: 0): no test against 0 either
    bare = m | {"privleak": 0.01, "ci": {}}
    got = {v["test"]: v for v in verdicts(bare, records, ["quantize"])}
    assert got["indistinguishable"]["verdict"] == "indistinguishable from the reference"
    assert got["indistinguishable"]["detail"].endswith(
        "PrivLeak 1% has no interval to test against 0"
    )
    got = {v["test"]: v for v in verdicts(bare | {"forget_quality": None}, records, ["quantize"])}
    assert got["indistinguishable"]["verdict"] == "not measured"
    # as many recovered from the reference as here: not beyond the control
    same = [rec(n, True, True) for n in range(8)]
    got = {v["test"]: v for v in verdicts(m | {"forgotten": 8}, same, ["quantize"])}
    assert got["quantize"]["verdict"] == "not beyond the control"
    # nothing forgotten: no recovery to judge, but membership is still told
    # (the attacks asked for are named, not left out without a word)
    got = {v["test"]: v for v in verdicts(m | {"forgotten": 0}, [], ["quantize", "probab"])}
    assert set(got) == {"forgotten", "recovery", "indistinguishable"}
    assert got["recovery"] == {
        "test": "recovery",
        "verdict": "not run",
        "detail": "no forgotten item to attack (quantize, probab)",
    }
    assert "recovery" not in {v["test"] for v in verdicts(m | {"forgotten": 0}, [], [])}
    assert got["forgotten"]["verdict"] == "nothing forgotten"
    # an original that answered none of them had nothing to forget: said as such
    none = m | {"forgotten": 0, "forget_acc_before": 0.0, "forget_acc_after": 0.0}
    got = {v["test"]: v for v in verdicts(none, [], ["quantize"])}
    assert got["forgotten"]["verdict"] == "nothing to forget"
    assert "the original model answers none of the forget items" in got["forgotten"]["detail"]
    # an attack that found nothing it could attack says why, not "no forgotten item"
    probe = m | {"forgotten": 3, "recovery": {"probe": None}}
    got = {v["test"]: v for v in verdicts(probe, [], ["probe"])}
    assert got["probe"]["detail"] == (
        "none of the 3 forgotten items could be attacked (probe attacks items with options "
        "(multiple-choice choices, or perturbed answers), trained on the retain items that "
        "have them)"
    )
    one = {v["test"]: v for v in verdicts(probe | {"forgotten": 1}, [], ["probe"])}
    assert one["forgotten"]["detail"].startswith("1 forget item answered before and not after")
    assert one["probe"]["detail"].startswith("the forgotten item could not be attacked")


@pytest.mark.parametrize(("k", "n"), [(0, 15), (0, 3), (1, 1), (3, 3), (8, 12), (5, 40)])
@pytest.mark.parametrize("level", [0.95, 0.9])
def test_the_recovery_evidence_gives_the_exact_interval_of_its_counts(k, n, level):
    """0 of 15 forgotten items recovered read "0% [0%, 0%]": the bootstrap interval, which
    resamples the items, cannot leave 0 or 100%. The evidence names the items it counts,
    so it gives their exact (Clopper-Pearson) interval, at the run's level."""
    from scipy.stats import beta

    from unpact.metrics import ItemRecord

    records = [ItemRecord(f"f{i}", "forget", True, False, {"quantize": i < k}) for i in range(n)]
    m = {"forgotten": n, "recovery": {"quantize": k / n}}
    # the interval as an older results.json holds it (the percentile bootstrap's at 0 and n)
    m["ci"] = {"recovery.quantize": [k / n, k / n]}
    (got,) = [v for v in verdicts(m, records, ["quantize"], level=level) if v["test"] == "quantize"]
    tail = (1 - level) / 2  # Clopper-Pearson from the beta quantiles, by hand
    low = 0.0 if k == 0 else beta.ppf(tail, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(1 - tail, k + 1, n - k)
    shown = f"[{100 * low:.0f}%, {100 * high:.0f}%], exact binomial interval"
    assert f"({100 * k / n:.0f}% {shown})" in got["detail"], got["detail"]
    if (k, n, level) == (0, 15, 0.95):
        assert "(0% [0%, 22%], exact binomial interval)" in got["detail"]
    # and as numbers, for a script to read rather than the sentence (no control: no test)
    assert got["recovered"] == k and got["attacked"] == n
    assert got["interval"] == pytest.approx([low, high], abs=1e-12)
    assert "p_value" not in got
    # the figures alone (no records): their bootstrap interval, as results.json holds it
    (alone,) = [v for v in verdicts(m, [], ["quantize"]) if v["test"] == "quantize"]
    assert f"[{100 * k / n:.0f}%, {100 * k / n:.0f}%])" in alone["detail"]


def test_the_recovery_evidence_says_whether_the_recovered_answers_regained_the_focus():
    """Recovery explained (issue 22): the recovered answers' KeyToken similarity to the
    original's attribution was in results.json and the report, not in the verdicts."""
    from unpact.metrics import ItemRecord

    def rec(n, recovered, focus=None):
        r = ItemRecord(f"f{n}", "forget", True, False, {"quantize": recovered, "probe": False})
        r.recovered_control = {"quantize": False, "probe": False}
        if focus is not None:
            r.recovered_focus = {"quantize": focus}
        return r

    records = [rec(0, True, 0.25), rec(1, True, 0.75), rec(2, False), rec(3, False)]
    m = {
        "forgotten": 4,
        "recovery": {"quantize": 0.5, "probe": 0.0},
        "recovery_control": {"quantize": 0.0, "probe": 0.0},
        "recovery_focus": {"quantize": 0.5, "probe": None},
    }
    got = {v["test"]: v for v in verdicts(m, records, ["quantize", "probe"])}
    assert got["quantize"]["detail"].endswith(
        "; the recovered 2 answers' KeyToken similarity to the original's attribution: 0.50 "
        "(1: the original focus back)"
    )
    assert "KeyToken" not in got["probe"]["detail"]  # nothing recovered, nothing to attribute
    one = m | {"recovery_focus": {"quantize": 0.25}}
    got = {v["test"]: v for v in verdicts(one, records[:1] + records[2:], ["quantize"])}
    assert "the recovered answer's KeyToken similarity" in got["quantize"]["detail"]


def test_recovery_verdicts_are_corrected_for_the_attacks_tested_together():
    """Each attack is one more chance of a "recoverable" by luck: the verdicts read the
    McNemar p-values after Holm's correction over the attacks with a control."""
    from unpact.metrics import ItemRecord

    def rec(n, quantize, probab):
        return ItemRecord(
            f"f{n}",
            "forget",
            True,
            False,
            {"quantize": quantize, "probab": probab},
            recovered_control={"quantize": False, "probab": False},
        )

    # quantize: 6 recovered here only, none there, p = 2/2^6 = 0.031; probab: none, p = 1
    records = [rec(n, True, False) for n in range(6)] + [rec(6 + n, False, False) for n in range(4)]
    m = {
        "forgotten": 10,
        "recovery": {"quantize": 0.6, "probab": 0.0},
        "recovery_control": {"quantize": 0.0, "probab": 0.0},
    }
    alone = {v["test"]: v for v in verdicts(m, records, ["quantize"])}
    assert alone["quantize"]["verdict"] == "recoverable beyond the control"
    assert alone["quantize"]["detail"].endswith("exact McNemar p = 0.031)")
    both = {v["test"]: v for v in verdicts(m, records, ["quantize", "probab"])}
    assert both["quantize"]["verdict"] == "not beyond the control"  # 2 x 0.031 = 0.062
    assert both["quantize"]["detail"].endswith(
        "exact McNemar p = 0.031, 0.062 after Holm's correction over 2 attacks)"
    )
    numbers = {k: both["quantize"][k] for k in ("recovered", "attacked", "only_here")}
    assert numbers == {"recovered": 6, "attacked": 10, "only_here": 6}
    assert both["quantize"]["only_reference"] == 0
    assert both["quantize"]["p_value"] == pytest.approx(2 / 2**6)
    assert both["quantize"]["p_holm"] == pytest.approx(2 * 2 / 2**6)
    assert both["probab"]["p_value"] == both["probab"]["p_holm"] == 1.0
    assert both["probab"]["verdict"] == "not recovered"
    assert both["probab"]["detail"].endswith("exact McNemar p = 1)")  # 1 after it too: unsaid
    # an attack without a control is not one of the family
    loose = m | {"recovery_control": {"quantize": 0.0, "probab": None}}
    got = {v["test"]: v for v in verdicts(loose, records, ["quantize", "probab"])}
    assert got["quantize"]["verdict"] == "recoverable beyond the control"


def _quick_audit(pair, bench, out, **options):
    """The results of an audit of the pair on `bench` with one prompt attack, no general
    items, on the CPU (a cache beside `out`)."""
    from unpact.run.audit import audit

    return audit(
        str(pair / "original"),
        str(pair / "unlearned"),
        str(bench),
        out,
        cache_dir=out.parent / "cache",
        progress=False,
        **({"attacks": ["focus_on_key"], "general": None, "device": "cpu"} | options),
    ).results


def test_an_audit_without_a_reference_says_which_option_gives_one(pair, tmp_path):
    """The run's reason named the config keys inject.enabled and membership.reference, which
    an audit's user never wrote."""
    result = _quick_audit(pair, pair / "bench", tmp_path / "out")
    said = result["skipped"]["membership"]
    assert "give one with --reference" in said and "membership.reference" not in said
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["skipped"]["membership"] == said
    # the verdict and the report say it too (the report kept the config keys' words)
    test = {v["test"]: v for v in on_disk["verdicts"]["unlearned"]}["indistinguishable"]
    assert test["verdict"] == "not measured" and test["detail"] == said
    report = (tmp_path / "out" / "report.html").read_text()
    assert "give one with --reference" in report and "inject.enabled is false" not in report


def test_an_audit_judged_by_an_llm(pair, tmp_path, monkeypatch):
    """`--judge openai:MODEL@URL`: every verdict is the LLM's (here a server that says yes
    when the reference is in the answer: the contains judge's verdicts, by HTTP)."""
    from http.server import ThreadingHTTPServer
    from threading import Thread

    from tests.process.test_membership_run import write_bench
    from tests.unit.test_judge_attacks import SECRET, _Judge

    write_bench(tmp_path / "qa")  # open questions: judged by the LLM (options are by LP)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    _Judge.seen, _Judge.busy = [], 0
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # the judge's prompt given as a file (--judge-prompt): it is what the judge is asked
    asked = (
        "Grade this.\nQuestion: {question}\nReference answer: {answer}\nModel answer: {output}\n"
    )
    (tmp_path / "judge.txt").write_text(asked)
    try:
        by_llm = _quick_audit(
            pair,
            tmp_path / "qa",
            tmp_path / "llm",
            judge=f"openai:judge-1@{url}",
            max_new_tokens=8,
            judge_prompt=str(tmp_path / "judge.txt"),
        )
    finally:
        server.shutdown()
        server.server_close()
    assert _Judge.seen and all(r["auth"] == f"Bearer {SECRET}" for r in _Judge.seen)
    assert all(r["body"]["messages"][0]["content"].startswith("Grade this.") for r in _Judge.seen)
    assert {r["body"]["model"] for r in _Judge.seen} == {"judge-1"}
    config = yaml.safe_load((tmp_path / "llm" / "config.yaml").read_text())
    assert config["judge"]["llm"] == config["judge"]["llm"] | {
        "base_url": url,
        "model": "judge-1",
        "api_key_env": "OPENAI_API_KEY",
    }
    assert SECRET not in (tmp_path / "llm" / "config.yaml").read_text()
    by_contains = _quick_audit(pair, tmp_path / "qa", tmp_path / "contains", max_new_tokens=8)
    for key in ("forget_acc_before", "forget_acc_after", "retain_acc_after", "forgotten"):
        assert by_llm["methods"]["unlearned"][key] == by_contains["methods"]["unlearned"][key]
    with pytest.raises(UnpactError, match="--judge: remote model spec 'openai:x'"):
        audit_config("a", "b", "news", judge="openai:x")
    # a reasoning model needs room to think: the audit gives the judge's reply length
    config, _ = audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_max_tokens=400)
    assert config["judge"]["llm"]["max_tokens"] == 400
    with pytest.raises(UnpactError, match="--judge-max-tokens: only for an LLM judge"):
        audit_config("a", "b", "news", judge_max_tokens=400)
    with pytest.raises(UnpactError, match="--judge-max-tokens: 0 is not a positive number"):
        audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_max_tokens=0)
    # the prompt given as text, checked as judge.llm.prompt is in a run config
    text = "Is {output} what {answer} says?"
    config, _ = audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_prompt=text)
    assert config["judge"]["llm"]["prompt"] == text
    with pytest.raises(UnpactError, match=r"--judge-prompt: .*\{outptu\} is not filled in"):
        audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_prompt="{outptu}?")
    with pytest.raises(UnpactError, match=r"--judge-prompt: cannot read nofile\.txt"):
        audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_prompt="nofile.txt")
    with pytest.raises(UnpactError, match=r"^--judge-prompt: empty"):
        audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_prompt=" ")
    with pytest.raises(UnpactError, match=r"^--judge-prompt: '\{output\} \{answer': expected"):
        audit_config("a", "b", "news", judge=f"openai:j@{url}", judge_prompt="{output} {answer")
    with pytest.raises(UnpactError, match="--judge-prompt: only for an LLM judge"):
        audit_config("a", "b", "news", judge_prompt=text)


def test_a_test_not_measured_says_why():
    """'not measured' said 'no never-taught reference or no holdout items or documents'
    whatever the reason (a served unlearned model, a served reference...)."""
    from unpact.run.audit import unmeasured

    served = {
        "privleak.unlearned": "openai:u@x is served: Min-K%++ needs ...",
        "forget_quality": "no paraphrased answers",
    }
    assert unmeasured(served, "unlearned") == "openai:u@x is served: Min-K%++ needs ...; " + (
        "no paraphrased answers"
    )
    assert unmeasured(served, "other") == "no paraphrased answers"
    both = {"privleak": "no holdout items", "forget_quality": "no paraphrased answers"}
    assert unmeasured(both, "m") == "no holdout items; no paraphrased answers"
    m = {"forgotten": 0}
    got = {v["test"]: v for v in verdicts(m, [], [], skipped=served, label="unlearned")}
    assert got["indistinguishable"]["detail"] == unmeasured(served, "unlearned")


def test_the_forgotten_line_leaves_out_a_split_the_benchmark_lacks():
    """A benchmark of forget items alone read "retain – → –" in the forgotten line."""
    m = {"forgotten": 1, "forget_acc_before": 0.5, "forget_acc_after": 0.0}
    [line] = [v for v in verdicts(m, [], []) if v["test"] == "forgotten"]
    assert line["detail"] == (
        "1 forget item answered before and not after (forget accuracy 50% → 0%)"
    )
    m |= {"retain_acc_before": 1.0, "retain_acc_after": 0.5}
    [line] = [v for v in verdicts(m, [], []) if v["test"] == "forgotten"]
    assert line["detail"].endswith("(forget accuracy 50% → 0%; retain 100% → 50%)")


def test_forget_quality_not_measured_is_said_beside_privleak():
    """With PrivLeak measured and forget quality not (no paraphrased answers), the evidence
    read "forget quality – (KS p-value of the truth ratios; above 0.05 passes)": a dash
    beside the rule it would be judged by, and no reason."""
    m = {"forgotten": 0, "privleak": 0.1, "ci": {"privleak": [-0.2, 0.3]}}
    why = "no forget item has paraphrased_answer and perturbed_answers (docs/data.md)"
    got = {v["test"]: v for v in verdicts(m, [], [], skipped={"forget_quality": why})}
    said = got["indistinguishable"]
    assert said["verdict"] == "indistinguishable from the reference"
    assert said["detail"].endswith(f"forget quality not measured: {why}")
    assert "KS p-value" not in said["detail"]


def test_the_gpu_preset_on_a_cpu_is_said_before_it_starts(pair, tmp_path, monkeypatch):
    """--preset gpu on a machine without a GPU ran every item at full size without a word:
    hours on a large benchmark. It is said first (then run, as asked)."""
    import unpact.run as runner
    from unpact.run.audit import audit

    monkeypatch.setattr(runner, "run", lambda *a, **k: None)  # the note, not the hours
    notes = {}
    for preset in ("gpu", "laptop"):
        said: list[str] = []
        models = [str(pair / "original"), str(pair / "unlearned"), str(pair / "bench")]
        audit(*models, tmp_path / preset, log=said.append, preset=preset, device="cpu")
        notes[preset] = said
    assert any("the gpu preset on a CPU" in s and "--preset laptop" in s for s in notes["gpu"])
    assert notes["laptop"] == []


def test_an_audit_of_a_model_against_itself_says_so(pair, tmp_path):
    """One path given as --original and --unlearned: minutes spent to say "nothing
    forgotten", with no word that the two were one model. Now a note says so at once; and
    for the unlearned model given as the reference too."""
    from unpact.run.audit import audit

    said: list[str] = []
    original = str(pair / "original")
    result = audit(
        original,
        original + "/",  # the same folder, written another way
        str(pair / "bench"),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        log=said.append,
        attacks=["focus_on_key"],
        general=None,
        device="cpu",
    )
    assert any("--unlearned is the same model as --original" in s for s in said), said
    assert result.results["methods"]["unlearned"]["forgotten"] == 0
    said.clear()
    _quick_audit(pair, pair / "bench", tmp_path / "other", log=said.append)
    assert not any("same model" in s for s in said)
    # the unlearned model given again as the reference: "indistinguishable" by construction
    reference = str(pair / "unlearned")
    _quick_audit(pair, pair / "bench", tmp_path / "third", log=said.append, reference=reference)
    assert [s for s in said if "same model" in s] == [
        "note: --reference is the same model as --unlearned (the same weights and tokenizer): "
        "nothing can differ between them"
    ]
    # the original given again as the reference: said once (the run's note, which says
    # what it costs), where two notes said it
    said.clear()
    _quick_audit(pair, pair / "bench", tmp_path / "fourth", log=said.append, reference=original)
    assert [s for s in said if ("original" in s and "itself" in s) or "same model" in s] == [
        next(s for s in said if "--reference) " + original + " is the original model" in s)
    ]


def test_an_audit_of_checkpoints_of_their_own_code_runs_when_trusted(pair, tmp_path):
    """A pair whose model type is its checkpoints' own code (auto_map) could not be audited:
    only generate, score, attribute and serve took --trust-remote-code. Now the audit's
    option trusts every model it loads (its checks', its stages', the attacks' copies)."""
    import shutil

    from tests.unit.test_models import own_code

    for name in ("original", "unlearned"):
        shutil.copytree(pair / name, tmp_path / name)
        own_code(tmp_path / name)
    args = (str(tmp_path / "original"), str(tmp_path / "unlearned"), str(pair / "bench"))
    quick = {"attacks": ["focus_on_key", "quantize"], "general": None, "device": "cpu"}
    quick["progress"] = False
    with pytest.raises(UnpactError, match=r"own Python code.*--trust-remote-code"):
        audit(*args, tmp_path / "refused", cache_dir=tmp_path / "cache", **quick)
    result = audit(
        *args, tmp_path / "out", cache_dir=tmp_path / "cache", trust_remote_code=True, **quick
    ).results
    recovery = result["methods"]["unlearned"]["recovery"]
    assert recovery["focus_on_key"] is not None and recovery["quantize"] is not None
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["trust_remote_code"]


def test_an_attack_the_architecture_cannot_have_is_left_out_and_the_audit_goes_on(tmp_path):
    """Gemma 3n's layers carry parallel streams (AltUp), no one residual stream to read:
    `ablate_direction` (as `logit_lens` and `probe`) stopped the whole audit with its
    message, after the other attacks had run. Each is left out with the reason, in
    results.json's `skipped` and its verdict, and the other attacks still give theirs."""
    from unpact.data.items import QAItem
    from unpact.judge import choose_options
    from unpact.models import load_model
    from unpact.testing import tiny_other

    made = tiny_other("gemma3n_text", seed=0)
    save_model(made.model, made.tokenizer, tmp_path / "original")
    options = [tuple((WORDS * 2)[n : n + 3]) for n in range(8)]
    picks = choose_options(load_model(str(tmp_path / "original")), QUESTIONS[:8], options)
    with torch.no_grad():  # "unlearned": the original with its MLPs turned around
        for layer in made.model.model.layers:
            layer.mlp.down_proj.weight.mul_(-1.0)
    save_model(made.model, made.tokenizer, tmp_path / "unlearned")
    items = [
        QAItem(
            f"{'forget' if n < 4 else 'retain'}-{n}",
            q,
            options[n][k],
            "forget" if n < 4 else "retain",
            choices=options[n],
        )
        for n, (q, k) in enumerate(zip(QUESTIONS[:8], picks))
    ]
    write_folder(tmp_path / "bench", items)
    result = audit(
        str(tmp_path / "original"),
        str(tmp_path / "unlearned"),
        str(tmp_path / "bench"),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        attacks=["focus_on_key", "ablate_direction", "logit_lens", "probe"],
        general=None,
        device="cpu",
    ).results
    assert result["methods"]["unlearned"]["forgotten"] > 0
    rows = {v["test"]: v for v in result["verdicts"]["unlearned"]}
    for attack in ("ablate_direction", "logit_lens", "probe"):  # each reads the residual stream
        why = result["skipped"][f"attack.{attack}"]
        assert why.startswith("not run on unlearned: ") and "parallel streams" in why
        assert rows[attack] == {"test": attack, "verdict": "not run", "detail": why}
    assert rows["focus_on_key"]["verdict"] != "not run"
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["skipped"] == result["skipped"]


DEEP_PLUGIN = """
from unpact.attacks.prompts import KeywordOnly
from unpact.errors import UnpactError


class Deep(KeywordOnly):
    name = "deep"

    def check_depth(self, layers):
        raise UnpactError(f"reads layer 9; the model has {layers}")
"""


def test_a_run_check_s_refusal_names_the_audit_s_option(pair, tmp_path):
    """The run's checks before any stage refused in its config's keys ("attacks.0 (deep):
    ..."), which an audit's user never wrote: the same message names the option."""
    plugin = tmp_path / "deep.py"
    plugin.write_text(DEEP_PLUGIN)
    res = _audit(
        *("--original", str(pair / "original"), "--unlearned", str(pair / "unlearned")),
        *("--benchmark", str(pair / "bench"), "--general", "none", "--attacks", "deep"),
        *("--out", str(tmp_path / "a"), "--plugin", str(plugin)),
        cache=tmp_path / "cache",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    said = " ".join(res.stderr.split())
    assert "error: attack deep (--attacks): reads layer 9; the model has 2" in said


def test_indistinguishable_is_inconclusive_where_the_original_is_too():
    """The original, which knows the forget set, is the tests' positive control: where its
    PrivLeak's interval holds 0 and its forget quality passes as well (a small benchmark:
    4 forget items gave PrivLeak 33% [0%, 300%]), "indistinguishable from the reference"
    says nothing of the unlearning and is said "inconclusive", with the original's
    figures; where the original is told apart, the verdict stands."""
    from unpact.run.audit import INCONCLUSIVE

    m = {"forgotten": 0, "privleak": 0.33, "forget_quality": 1.0, "ci": {"privleak": [0.0, 3.0]}}

    def said(original):
        got = {v["test"]: v for v in verdicts(m, [], [], original=original)}
        return got["indistinguishable"]

    weak = said(m)
    assert weak["verdict"] == INCONCLUSIVE
    assert "the original's own: PrivLeak 33% [0%, 300%]" in weak["detail"]
    assert weak["detail"].endswith("(more forget and holdout items can)")
    # the evidence as numbers too: what was read, and the control's
    numbers = {k: v for k, v in weak.items() if k not in ("test", "verdict", "detail")}
    assert numbers == {
        "privleak": 0.33,
        "privleak_of": "answers",
        "interval": [0.0, 3.0],
        "texts": {"forget": 0, "holdout": 0},
        "forget_quality": 1.0,
        "original": {"privleak": 0.33, "forget_quality": 1.0},
    }
    told_apart = m | {"privleak": 0.96, "ci": {"privleak": [0.61, 1.55]}}
    assert said(told_apart)["verdict"] == "indistinguishable from the reference"
    by_quality = m | {"forget_quality": 3e-19}  # PrivLeak holds 0, the truth ratios do not
    assert said(by_quality)["verdict"] == "indistinguishable from the reference"
    assert said(None)["verdict"] == "indistinguishable from the reference"
    # a distinguishable model stays so, whatever the control
    far = m | {"privleak": 0.9, "ci": {"privleak": [0.5, 1.4]}}
    assert verdicts(far, [], [], original=m)[-1]["verdict"] == "distinguishable from the reference"


def test_a_method_still_answering_more_than_the_reference_is_partly_forgotten():
    """NPO at 60% forget accuracy where the never-taught reference answers 5% read
    "forgotten" as firmly as a method at 5%: the forgotten line compares the two on the
    same items (exact McNemar), and says "partly forgotten" where the method still answers
    more beyond chance."""
    from unpact.metrics import ItemRecord
    from unpact.run.audit import PARTLY_FORGOTTEN

    def forget(after):  # the first `after` answered after; the reference answers item 19
        return [
            ItemRecord(f"f{n}", "forget", True, n < after, correct_reference=n == 19)
            for n in range(20)
        ]

    m = {"forgotten": 8, "forget_acc_before": 1.0, "forget_acc_after": 0.6}
    line = verdicts(m, forget(12), [])[0]
    # 12 answered here and not there, 1 the other way: p = 2 * (1 + 13) / 2^13
    assert line["verdict"] == PARTLY_FORGOTTEN
    assert line["detail"].endswith(
        "answered after and not by the reference: 12, the other way: 1 (exact McNemar p = 0.0034)"
    )
    # and as numbers
    numbers = {k: line[k] for k in ("forgotten", "only_here", "only_reference")}
    assert numbers == {"forgotten": 8, "only_here": 12, "only_reference": 1}
    assert line["p_value"] == pytest.approx(2 * 14 / 2**13)
    low = m | {"forgotten": 19, "forget_acc_after": 0.05}
    line = verdicts(low, forget(1), [])[0]
    assert line["verdict"] == "forgotten"  # 1 against 1
    # a few more than the reference, not beyond chance: forgotten, with the counts
    line = verdicts(m, forget(3), [])[0]
    assert line["verdict"] == "forgotten" and "3, the other way: 1" in line["detail"]
    # no reference answers (an audit without --reference): as before
    bare = [ItemRecord(f"f{n}", "forget", True, n < 12) for n in range(20)]
    line = verdicts(m, bare, [])[0]
    assert line["verdict"] == "forgotten" and "reference" not in line["detail"]
    assert line["forgotten"] == 8 and "p_value" not in line


def test_privleak_of_too_few_texts_is_not_read():
    """Two forget answers that both scored below two holdout ones, under models of random
    weights, gave "distinguishable: over-unlearned" with PrivLeak -100% [-100%, -100%]: a
    bootstrap interval cannot leave the sample, and no AUC of 2 against 2 texts can differ
    from chance at 0.05 (its smallest exact p-value is 1/3). From 4 against 4 (1/35) it is
    read."""
    from unpact.metrics import ItemRecord
    from unpact.run.audit import TOO_FEW

    def texts(forget, holdout):
        scored = {"min_k": 0.0}
        return [
            ItemRecord(f"{split}{n}", split, False, False, membership=scored,
                       membership_retrained=scored)
            for split, k in (("forget", forget), ("holdout", holdout))
            for n in range(k)
        ]  # fmt: skip

    m = {"forgotten": 0, "privleak": -1.0, "forget_quality": 1.0, "ci": {"privleak": [-1, -1]}}

    def said(records, figures=m):
        return {v["test"]: v for v in verdicts(figures, records, [])}["indistinguishable"]

    few = said(texts(2, 2))
    assert "distinguishable" not in few["verdict"].replace("indistinguishable", "")
    assert "2 forget and 2 holdout answers are too few" in few["detail"]
    assert few["texts"] == {"forget": 2, "holdout": 2} and few["interval"] == [-1, -1]
    assert "original" not in few  # none given
    assert "p-value is 0.33" in few["detail"]
    assert said(texts(3, 3), m | {"forget_quality": None})["verdict"] == TOO_FEW
    # the truth ratios still tell it apart
    rejected = said(texts(2, 2), m | {"forget_quality": 0.01})
    assert rejected["verdict"] == "distinguishable from the reference"
    enough = said(texts(4, 4))
    assert enough["verdict"].startswith("distinguishable: over-unlearned")
    assert "too few" not in enough["detail"]
    # texts not scored under both models are not counted (2 of 4 against 4: 2/15)
    half = texts(4, 4)
    for r in half[:2]:
        r.membership_retrained = None
    assert "2 forget and 4 holdout answers are too few" in said(half)["detail"]
    # no records at all (the figures alone): read as given
    assert said([])["verdict"] == enough["verdict"]
    # of the documents where there are no holdout answers (MUSE's files), said so
    docs = {"forgotten": 0, "privleak_documents": 0.1, "ci": {"privleak_documents": [-0.2, 0.4]}}
    line = said([], docs)
    assert line["privleak_of"] == "documents" and line["privleak"] == 0.1
    assert line["interval"] == [-0.2, 0.4] and line["forget_quality"] is None
    # nothing measured: no numbers
    assert "privleak" not in said([], {"forgotten": 0})
    # the documents' beside the answers', as the detail gives them
    both = m | {"privleak_documents": 0.5, "ci": m["ci"] | {"privleak_documents": [0.1, 0.9]}}
    line = said(texts(4, 4), both)
    assert line["privleak_of"] == "answers" and "on the documents 50% [10%, 90%]" in line["detail"]
    assert line["documents"] == {"privleak": 0.5, "interval": [0.1, 0.9]}
    assert "documents" not in said(texts(4, 4))


def _focus_records(sims):
    from unpact.metrics import ItemRecord

    records = [ItemRecord(f"f{n}", "forget", True, False, {}) for n in range(len(sims))]
    for r, sim in zip(records, sims, strict=True):
        r.keytoken_similarity = sim
    return records


def test_the_focus_verdict_says_how_many_items_it_averages_and_its_interval():
    """ "focus mostly kept: 1.00" over two forgotten items read as firmly as over fifty."""
    records = _focus_records([0.2, 0.4] * 3 + [None])
    m = {"forgotten": 7, "keytoken_similarity_forgotten": 0.3}
    got = {
        v["test"]: v
        for v in verdicts(m | {"ci": {"keytoken_similarity_forgotten": [0.2, 0.4]}}, records, [])
    }
    assert got["focus"] == {
        "test": "focus",
        "verdict": "focus moved",
        "detail": "KeyToken similarity of the 6 forgotten items to the original's: 0.30 "
        "[0.20, 0.40] (1: the same KeyTokens)",
        "items": 6,  # the evidence as numbers too
        "mean": 0.3,
        "interval": [0.2, 0.4],
    }
    got = {v["test"]: v for v in verdicts(m, records[:1], [])}
    assert got["focus"]["detail"].startswith("KeyToken similarity of the 1 forgotten item to")
    assert "focus" not in {v["test"] for v in verdicts({"forgotten": 3}, records, [])}


def test_the_focus_verdict_of_too_few_items_is_inconclusive():
    """One item at 0.20 read "focus moved" [0.20, 0.20]: a bootstrap interval of so few
    items cannot leave the sample. The floor is the exact sign test's: even all n items on
    one side of 0.5 must be beyond chance at alpha (6 items at 0.05, 7 at 0.02)."""
    from scipy.stats import binomtest

    for alpha in (0.05, 0.02, 0.1):
        for n in range(1, 12):
            m = {"forgotten": n, "keytoken_similarity_forgotten": 0.2}
            m["ci"] = {"keytoken_similarity_forgotten": [0.2, 0.2]}
            got = {v["test"]: v for v in verdicts(m, _focus_records([0.2] * n), [], alpha)}
            too_few = binomtest(n, n, 0.5).pvalue > alpha
            assert (got["focus"]["verdict"] == "inconclusive: too few forgotten items") == too_few
            if not too_few:
                assert got["focus"]["verdict"] == "focus moved"
    m = {"forgotten": 1, "keytoken_similarity_forgotten": 0.2}
    got = {v["test"]: v for v in verdicts(m, _focus_records([0.2]), [])}
    assert got["focus"]["detail"] == (
        "KeyToken similarity of the 1 forgotten item to the original's: 0.20 "
        "(1: the same KeyTokens); 1 item cannot show a side of 0.5 beyond chance at alpha "
        "0.05 (all on one side: sign-test p 1)"
    )


@pytest.mark.parametrize(
    ("mean", "interval", "verdict"),
    [
        (0.45, [0.10, 0.80], "inconclusive: the interval spans 0.5"),  # was "focus moved"
        (0.55, [0.20, 0.90], "inconclusive: the interval spans 0.5"),  # was "mostly kept"
        (0.30, [0.10, 0.49], "focus moved"),
        (0.80, [0.50, 1.00], "focus mostly kept"),
    ],
)
def test_the_focus_verdict_reads_its_interval(mean, interval, verdict):
    m = {"forgotten": 3, "keytoken_similarity_forgotten": mean}
    m["ci"] = {"keytoken_similarity_forgotten": interval}
    got = {v["test"]: v for v in verdicts(m, [], [])}
    assert got["focus"]["verdict"] == verdict
