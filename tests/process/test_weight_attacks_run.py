"""The attacks on weights and hidden states in a run (issue 22), on the tiny model: each is
a stage with per-item rows, its control on the never-taught reference, its baseline on the
original model, its recovery and control rates as registered metrics, all cached."""

from __future__ import annotations

import json
import re

import pytest

from tests.process.test_membership_run import write_bench
from unpact.errors import UnpactError
from unpact.files import json_lines
from unpact.models import save_model
from unpact.run import load_config, run

ATTACKS = [
    {"name": "focus_on_key"},
    {"name": "quantize", "label": "quantize_8bit", "settings": {"bits": 8, "group_size": 32}},
    {"name": "quantize", "settings": {"bits": 4, "group_size": 32}},
    {"name": "ablate_direction"},
    {"name": "logit_lens"},
    {"name": "probe"},
    {"name": "relearn_unrelated", "settings": {"data": "retain", "items": 2, "steps": 2}},
]
COLUMNS = [a.get("label") or a["name"] for a in ATTACKS]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("weights_run")
    save_model(tiny.model, tiny.tokenizer, root / "tiny")
    write_bench(root / "bench")
    config = {
        "model": str(root / "tiny"),
        "data": {"benchmark": str(root / "bench"), "general": None},
        "inject": {
            "settings": {
                "batch_size": 4,  # the recipe this test was sized with (4 facts a step)
                "max_epochs": 4,
                "min_epochs": 4,
                "general": None,
                "rehearsal_per_step": 2,
                "lr": 5e-3,
            }
        },
        # a strong GA run: the tiny model forgets, so there are items to attack
        "methods": [{"method": "ga", "config": {"lr": 1e-2, "steps": 6, "batch_size": 2}}],
        "attacks": ATTACKS,
        "judge": {"max_new_tokens": 8},  # "Quintrell" is 6 tokens here
        "statistics": {"resamples": 20},
        "membership": {"gradnorm": False, "verbmem_prefix": 4, "verbmem_new_tokens": 4},
    }
    result = run(config, root / "out", cache_dir=root / "cache", progress=False)
    return root, config, result


def test_every_attack_its_control_and_baseline_are_stages(done):
    _, _, result = done
    res = result.results
    assert res["attacks"] == COLUMNS
    m = res["methods"]["ga"]
    assert m["forgotten"] > 0, "the test needs forgotten items"
    assert set(m["recovery"]) == {*COLUMNS, "any"}
    controlled = [c for c in COLUMNS if c != "focus_on_key"]
    for c in controlled:
        assert m["recovery_control"][c] is not None, c
        assert f"control:retrained with {c}" in " ".join(result.computed)
    assert m["recovery_control"]["focus_on_key"] is None  # a prompt attack: no control
    assert set(res["attack_baselines"]) == {"quantize_8bit", "quantize", "relearn_unrelated"}
    assert set(res["attack_baselines"]["quantize"]) == {"forget", "retain"}
    assert "recovery.quantize" in m["ci"] and "recovery_control.quantize" in m["ci"]


def test_rates_recompute_from_items_jsonl(done):
    root, _, result = done
    rows = [json.loads(x) for _, x in json_lines((root / "out" / "items.jsonl").read_text())]
    forgotten = [r for r in rows if r["split"] == "forget" and r["correct_before"]]
    forgotten = [r for r in forgotten if not r["correct_after"]]
    m = result.results["methods"]["ga"]
    for c in ("quantize", "ablate_direction", "logit_lens"):
        hits = [r["recovered"][c] for r in forgotten]
        assert m["recovery"][c] == pytest.approx(sum(hits) / len(hits))
        ctrl = [r["recovered_control"][c] for r in forgotten]
        assert m["recovery_control"][c] == pytest.approx(sum(ctrl) / len(ctrl))
    lens = forgotten[0]["attacks"]["logit_lens"]
    assert len(lens["layers"]) == 2 and len(lens["ranks"]) == 2 and lens["layer"] == 0
    for r in forgotten:  # a recovered answer is explained: its focus against the original's
        if r["recovered"]["quantize"]:
            assert r["attacks"]["quantize"]["keytoken_similarity"] is not None
            assert (
                r["recovered_focus"]["quantize"] == r["attacks"]["quantize"]["keytoken_similarity"]
            )


def test_one_attacks_settings_rerun_only_that_attack(done, tmp_path):
    root, config, _ = done
    again = run(config, tmp_path / "same", cache_dir=root / "cache", progress=False)
    assert again.computed == []
    changed = [dict(a) for a in ATTACKS]
    changed[2] = {"name": "quantize", "settings": {"bits": 3, "group_size": 32}}
    cfg = {**config, "attacks": changed}
    result = run(cfg, tmp_path / "changed", cache_dir=root / "cache", progress=False)
    assert sorted(c.split(":")[0] for c in result.computed) == [
        "attack baseline",
        "attacking",
        "control",
    ]
    assert all(c.endswith("with quantize") or "with quantize (" in c for c in result.computed)


def test_an_item_edited_under_its_id_reruns_the_attacks_that_read_it(done, tmp_path):
    """The attack stages were keyed by the attacked items' ids (and the probe not by the
    retain items it trains on at all): wrong answers edited under the same ids, which
    the logit lens and the probe read as the options, gave the verdicts cached for the
    old ones. The edit leaves the taught and unlearned models as they were (their keys
    leave the truth-ratio answers out)."""
    import dataclasses

    from unpact.data import load_benchmark
    from unpact.data.items import write_folder

    root, config, _ = done
    edited = []
    for i in load_benchmark(str(root / "bench")).items:
        if i.id in ("forget-0", "retain-4"):
            i = dataclasses.replace(i, perturbed_answers=("It is Zorblax.", "It is glass."))
        edited.append(i)
    write_folder(tmp_path / "bench", edited)
    cfg = {**config, "data": {"benchmark": str(tmp_path / "bench"), "general": None}}
    result = run(cfg, tmp_path / "out", cache_dir=root / "cache", progress=False)
    computed = " ".join(result.computed)
    assert "unlearn" not in computed and "inject" not in computed
    for attack in ("logit_lens", "probe"):
        assert f"attacking:ga with {attack}" in computed, attack
        assert f"control:retrained with {attack}" in computed, attack


@pytest.mark.parametrize(
    "attack",
    [
        {"name": "relearn_unrelated", "settings": {"data": "retain", "items": 2, "steps": 1}},
        {"name": "relearn", "settings": {"data": "retain", "items": 2, "steps": 1}},
        {"name": "ablate_direction", "settings": {"prompts": "retain"}},
    ],
)
def test_an_attack_reading_retain_items_is_refused_up_front_without_them(done, tmp_path, attack):
    """On a benchmark without retain items, these stopped the run after every unlearning
    ("relearning needs at least one item to train on"), ablate_direction with a traceback
    from torch.cat; refused now before anything is taught."""
    from unpact.data import load_benchmark
    from unpact.data.items import write_folder

    root, config, _ = done
    items = [i for i in load_benchmark(str(root / "bench")).items if i.split != "retain"]
    write_folder(tmp_path / "bench", items)
    cfg = {**config, "data": {"benchmark": str(tmp_path / "bench"), "general": None}}
    cfg["attacks"] = [attack]
    with pytest.raises(UnpactError, match=r"attacks\.0: \w+ reads retain items, and benchmark"):
        run(cfg, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.jsonl"))


def test_ablating_against_a_model_of_another_shape_is_refused_before_the_run(done, tmp_path):
    """An unlearned model given as it is, or a reference, of another width than the
    original (the same tokenizer: no fine-tune of it) ended ablate_direction in a traceback
    when the attack's turn came, after every evaluation; it is said before anything runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unpact.testing import tiny_model

    root, config, _ = done
    tiny = tiny_model()
    wide = LlamaConfig(**{**tiny.model.config.to_dict(), "hidden_size": 32})
    wide.intermediate_size, wide.head_dim = 64, 8
    save_model(LlamaForCausalLM(wide), tiny.tokenizer, tmp_path / "other")
    base = {**config, "inject": {"enabled": False}, "attacks": [{"name": "ablate_direction"}]}
    runs = {
        "methods.0 (other)": base
        | {"methods": [{"model": str(tmp_path / "other"), "name": "other"}]},
        "membership.reference": base
        | {
            "methods": [{"model": str(root / "tiny"), "name": "same"}],
            "membership": {**config["membership"], "reference": str(tmp_path / "other")},
        },
    }
    for n, (what, cfg) in enumerate(runs.items()):
        said = rf"attacks\.0 \(ablate_direction\): {re.escape(what)} .*\(2 layers of 32 features\) is not the original's \(2 layers of 64"
        with pytest.raises(UnpactError, match=said):
            run(cfg, tmp_path / f"out{n}", cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").rglob("*.jsonl"))


def test_the_original_given_as_its_own_reference_is_said_and_its_controls_run(done, tmp_path):
    """`--reference` naming the original (or a copy of its weights): every control ran on
    the original, and ablate_direction's ended the run after every other stage with "the
    direction to ablate is zero: the two models' activations agree". It is said before
    the run, and the run completes."""
    import shutil

    root, config, _ = done
    shutil.copytree(root / "tiny", tmp_path / "copy")
    for n, reference in enumerate((root / "tiny", tmp_path / "copy")):
        cfg = {
            **config,
            "inject": {"enabled": False},
            "methods": [{"model": str(root / "tiny"), "name": "same"}],
            "attacks": [{"name": "ablate_direction"}],
            "membership": {**config["membership"], "reference": str(reference)},
        }
        said: list[str] = []
        run(
            cfg, tmp_path / f"out{n}", cache_dir=tmp_path / "cache", progress=False, log=said.append
        )
        assert any(re.search(r"membership\.reference .* is the original model", s) for s in said)


def test_bad_attack_lists_are_one_message():
    base = {"methods": [{"method": "ga"}]}
    with pytest.raises(UnpactError, match="listed twice; give each a label"):
        load_config(base | {"attacks": [{"name": "quantize"}, {"name": "quantize"}]})
    with pytest.raises(UnpactError, match=r"attacks\.0\.settings.*bits"):
        load_config(base | {"attacks": [{"name": "quantize", "settings": {"bits": 1}}]})
    with pytest.raises(UnpactError, match="'any' names the union"):
        load_config(base | {"attacks": [{"name": "quantize", "label": "any"}]})


def test_layer_curves_are_the_per_layer_share_of_forgotten_items(done):
    root, _, result = done
    rows = [json.loads(x) for _, x in json_lines((root / "out" / "items.jsonl").read_text())]
    forgotten = [r for r in rows if r["split"] == "forget" and r["correct_before"]]
    forgotten = [r for r in forgotten if not r["correct_after"]]
    curves = result.results["methods"]["ga"]["layer_curves"]
    assert set(curves) == {"logit_lens", "probe"}
    for attack, curve in curves.items():
        layers = [r["attacks"][attack]["layers"] for r in forgotten]
        assert curve == [sum(col) / len(layers) for col in zip(*layers)]
    page = (root / "out" / "report.html").read_text()
    assert 'id="layers-ga-logit_lens"' in page and 'id="verdicts"' in page
