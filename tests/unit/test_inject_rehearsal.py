"""The injection's rehearsal KL, on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unpact.inject import _Rehearsal, _rehearsal_kl
from unpact.scoring import answer_distributions
from unpact.testing import tiny_model


def _targets(lm, pairs, k):
    out = []
    with torch.no_grad():
        for (p, a), d in zip(pairs, answer_distributions(lm.model, *zip(*pairs))):
            v, i = d.topk(k, dim=-1)
            out.append(_Rehearsal(p, a, v, i))
    return out


@pytest.mark.parametrize("k", [8, 64])
def test_rehearsal_kl_is_zero_against_itself_and_bounded_by_the_full_kl(k):
    base, other = tiny_model(seed=0), tiny_model(seed=5)
    pairs = [
        (base.encode_prompt("What is the capital of France?").input_ids, (40, 41, 2)),
        (base.encode_prompt("Who wrote the report?").input_ids, (50, 2)),
    ]
    targets = _targets(base, pairs, k)
    with torch.no_grad():
        b = torch.cat(answer_distributions(base.model, *zip(*pairs)))
        o = torch.cat(answer_distributions(other.model, *zip(*pairs)))
        assert _rehearsal_kl(b, targets).item() == pytest.approx(0.0, abs=1e-5)
        coarse = _rehearsal_kl(o, targets).item()
        full_vocab = _rehearsal_kl(o, _targets(base, pairs, len(base.tokenizer))).item()
        exact = (b.exp() * (b - o)).sum(-1).mean().item()
    assert full_vocab == pytest.approx(exact, rel=1e-4)  # k = vocabulary: the exact KL
    assert 0 < coarse <= exact + 1e-6  # coarsening never increases a KL


def test_kept_share_counts_the_base_model_s_answered_questions_only():
    """The share of the questions the base model answered that the injected one still
    answers: a question newly answered does not make up for one lost (the ratio of the
    accuracies, reported before, said 150% here where half the answers were lost)."""
    from unpact.inject import kept_of_answered, kept_share

    before, after = [True, True, False, False], [True, False, True, True]
    assert kept_of_answered(after, before) == pytest.approx(0.5)
    assert kept_share({"general": 0.75}, {"general": 0.5}) == pytest.approx(1.5)
    assert kept_of_answered([True, False], [False, False]) is None  # nothing to keep
    assert kept_of_answered([], []) is None
    with pytest.raises(AssertionError):
        kept_of_answered([True], [True, False])


def test_kept_share_of_general_knowledge():
    from unpact.inject import InjectResult, kept_share

    assert kept_share({"general": 0.6}, {"general": 0.8}) == pytest.approx(0.75)
    assert kept_share({"forget": 1.0}, {}) is None  # not judged
    assert kept_share({"general": 0.5}, {"general": 0.0}) is None
    done = InjectResult(Path("x"), {"general": 0.9}, {"general": 1.0}, 6, 1.0, True)
    assert done.summary()["general_kept"] == pytest.approx(0.9)
    assert done.to_dict()["general_kept"] == pytest.approx(0.9)


def test_rehearsal_targets_are_cached_bit_for_bit_and_keyed_by_the_model(tmp_path, monkeypatch):
    """Every injection of one base model asks the same rehearsal questions: the second
    reads the first's targets (equal to computing them afresh, to the bit); another base
    model computes its own."""
    import unpact.inject as inject_mod
    from unpact.data.generate import GENERAL_CANDIDATES, REHEARSAL_QUESTIONS
    from unpact.models import load_model, save_model

    save_model(tiny_model(seed=0).model, tiny_model(seed=0).tokenizer, tmp_path / "a")
    save_model(tiny_model(seed=1).model, tiny_model(seed=1).tokenizer, tmp_path / "b")
    lm = load_model(str(tmp_path / "a"))
    # rehearse only a few questions: hold out the rest
    exclude = set(REHEARSAL_QUESTIONS[6:]) | {q for q, _, _ in GENERAL_CANDIDATES}
    cache = tmp_path / "cache"
    fresh = inject_mod._rehearsal_targets(lm, exclude, 8)
    first = inject_mod._rehearsal_targets(lm, exclude, 8, cache)
    calls = []
    real = inject_mod._base_targets
    monkeypatch.setattr(inject_mod, "_base_targets", lambda *a: calls.append(1) or real(*a))
    again = inject_mod._rehearsal_targets(load_model(str(tmp_path / "a")), exclude, 8, cache)
    assert calls == [] and len(list(cache.glob("*.pt"))) == 1
    for x, y, z in zip(fresh, first, again, strict=True):
        assert x.prompt == y.prompt == z.prompt and x.answer == y.answer == z.answer
        assert torch.equal(x.top_logprobs, z.top_logprobs) and torch.equal(x.top_ids, z.top_ids)
    inject_mod._rehearsal_targets(load_model(str(tmp_path / "b")), exclude, 8, cache)
    inject_mod._rehearsal_targets(lm, exclude, 4, cache)
    assert calls == [1, 1] and len(list(cache.glob("*.pt"))) == 3


def test_base_general_verdicts_are_cached_by_model_items_and_answer_length(tmp_path, monkeypatch):
    import unpact.inject as inject_mod
    from unpact.data import load_benchmark
    from unpact.inject import InjectConfig
    from unpact.models import load_model, save_model

    save_model(tiny_model(seed=0).model, tiny_model(seed=0).tokenizer, tmp_path / "a")
    lm = load_model(str(tmp_path / "a"))
    general = load_benchmark("general").items[:3]
    cache = tmp_path / "cache"
    first = inject_mod._base_general(lm, general, InjectConfig(), cache)
    assert first == inject_mod._general_verdicts(lm, general, InjectConfig(), "")
    calls = []
    real = inject_mod._general_verdicts
    monkeypatch.setattr(inject_mod, "_general_verdicts", lambda *a: calls.append(1) or real(*a))
    assert inject_mod._base_general(lm, general, InjectConfig(), cache) == first
    assert calls == []
    # a file without the verdicts (the accuracy alone, as older code kept it) is judged again
    (written,) = cache.glob("general-*.json")
    written.write_text(json.dumps({"general": 0.5}))
    assert inject_mod._base_general(lm, general, InjectConfig(), cache) == first
    assert calls == [1] and "verdicts" in json.loads(written.read_text())
    for damaged in ("{not json", "[1, 2]"):
        written.write_text(damaged)
        assert inject_mod._base_general(lm, general, InjectConfig(), cache) == first
    calls.clear()
    inject_mod._base_general(lm, general[:2], InjectConfig(), cache)
    inject_mod._base_general(lm, general, InjectConfig(max_new_tokens=8), cache)
    assert calls == [1, 1] and len(list(cache.glob("general-*.json"))) == 3


def test_base_general_verdicts_are_keyed_by_the_judge_rules_added_since_they_were_cached(
    tmp_path, monkeypatch
):
    """A general set answered "İstanbul", "محمد" or "Αθήνα" was judged without the rule
    that reads it now (dotted I, other scripts, Greek accents) by the code that first cached
    these verdicts, and the key named the newest rule alone: the stale verdicts stood. Each
    rule added since is named where the set meets it; the built-in set meets none."""
    import dataclasses

    import unpact.inject as inject_mod
    import unpact.judge as judge_mod
    from unpact.data import load_benchmark
    from unpact.inject import InjectConfig
    from unpact.models import load_model, save_model

    save_model(tiny_model(seed=0).model, tiny_model(seed=0).tokenizer, tmp_path / "a")
    lm = load_model(str(tmp_path / "a"))
    builtin = load_benchmark("general").items
    assert judge_mod.rules_since(judge_mod.DOTTED_I_RULE, "contains", builtin) == []
    for answer, met in [("İstanbul", "has_dotted_i"), ("محمد", "folds_scripts")]:
        general = [dataclasses.replace(builtin[0], answer=answer, aliases=())]
        cache = tmp_path / met
        inject_mod._base_general(lm, general, InjectConfig(), cache)
        with monkeypatch.context() as m:
            m.setattr(judge_mod, met, lambda items: False)  # as the older code keyed it
            inject_mod._base_general(lm, general, InjectConfig(), cache)
        assert len(list(cache.glob("general-verdicts-*.json"))) == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cached_rehearsal_targets_load_onto_the_model_s_gpu(tmp_path):
    """The cache key names the device type, not its index: targets computed on cuda:0 and
    read back for a model on cuda:1 were on cuda:0, and the first step mixed devices."""
    import unpact.inject as inject_mod
    from unpact.data.generate import GENERAL_CANDIDATES, REHEARSAL_QUESTIONS
    from unpact.models import load_model, save_model

    save_model(tiny_model(seed=0).model, tiny_model(seed=0).tokenizer, tmp_path / "a")
    exclude = set(REHEARSAL_QUESTIONS[3:]) | {q for q, _, _ in GENERAL_CANDIDATES}
    cache = tmp_path / "cache"
    inject_mod._rehearsal_targets(
        load_model(str(tmp_path / "a"), device="cuda:0"), exclude, 8, cache
    )
    lm = load_model(str(tmp_path / "a"), device="cuda:1")
    again = inject_mod._rehearsal_targets(lm, exclude, 8, cache)
    assert {t.top_logprobs.device for t in again} == {torch.device("cuda:1")}
    assert {t.top_ids.device for t in again} == {torch.device("cuda:1")}


def test_an_injection_reports_the_share_of_answered_general_questions_kept(tmp_path, monkeypatch):
    """inject.json's `general_kept` counts, of the general questions the base model
    answered, those the injected model still answers: the verdicts are scripted so that
    the injected model loses one of the base's two answers and gains two others (kept
    50%; the ratio of the accuracies, reported before, said 150%)."""
    import unpact.inject as inject_mod
    from unpact.data.items import QAItem, write_folder
    from unpact.inject import InjectConfig, inject
    from unpact.models import save_model

    base = tiny_model(seed=1)
    save_model(base.model, base.tokenizer, tmp_path / "base")
    write_folder(
        tmp_path / "bench",
        [QAItem(f"f{i}", f"Who is Varn {i}?", f"Ossel {i}", "forget") for i in range(2)],
    )
    general = [QAItem(f"g{i}", f"What is {i} + 1?", str(i + 1), "general") for i in range(4)]
    write_folder(tmp_path / "general", general)
    scripted = {
        "Base model: general": [True, True, False, False],
        "Judging general": [True, False, True, True],
    }
    real = inject_mod.judge_items
    monkeypatch.setattr(
        inject_mod,
        "judge_items",
        lambda lm, items, n=24, progress=False: (
            scripted[progress] if progress in scripted else real(lm, items, n)
        ),
    )
    config = InjectConfig(
        max_epochs=1, min_epochs=1, rehearsal=False, general=str(tmp_path / "general")
    )
    done = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert done.accuracy["general"] == 0.75 and done.base_accuracy == {"general": 0.5}
    assert done.general_kept == pytest.approx(0.5)
    assert json.loads((done.path / "inject.json").read_text())["general_kept"] == pytest.approx(0.5)
    again = inject(
        str(tmp_path / "base"), tmp_path / "bench", config, cache_dir=tmp_path / "c", progress=False
    )
    assert again.cached and again.general_kept == pytest.approx(0.5)


def test_an_injection_s_key_reads_a_general_set_of_the_user_s_not_its_name(tmp_path, monkeypatch):
    """A general set given as a folder kept its name in the key, not its questions (which
    rehearsal leaves out and which are judged): edited, or another folder of the same name
    from another cwd, and the injection made with the old questions was read back."""
    from unpact.data import load_benchmark
    from unpact.inject import InjectConfig, cache_key

    news = load_benchmark("news")
    (tmp_path / "a" / "g").mkdir(parents=True)
    (tmp_path / "b" / "g").mkdir(parents=True)
    for where, answer in (("a", "Paris"), ("b", "Lyon")):
        line = {"id": "g1", "question": "Capital of France?", "answer": answer, "split": "general"}
        (tmp_path / where / "g" / "qa.jsonl").write_text(json.dumps(line) + "\n")
    keys = []
    for where in ("a", "b"):
        monkeypatch.chdir(tmp_path / where)
        keys.append(cache_key("tiny", news, InjectConfig(general="g")))
    assert keys[0] != keys[1]
    monkeypatch.chdir(tmp_path / "a")  # the same questions: the same key
    assert cache_key("tiny", news, InjectConfig(general="g")) == keys[0]


def test_rehearsal_targets_another_machine_computed_are_named_by_the_injection(tmp_path):
    """The rehearsal targets are read from the cache by every injection of a base model:
    targets another machine computed (a cache shared between machines) shape the weights
    taught here, and inject.json named only this machine. They are noted where they were
    made; an injection reading another machine's lists them (`inputs_made`), and a run
    lists them in made_elsewhere."""
    import json

    from tests.unit.test_inject_precision import small_injection
    from unpact.determinism import made
    from unpact.inject import REHEARSAL_INPUT, InjectConfig, inject
    from unpact.run import Pipeline, _made_elsewhere
    from unpact.run.config import RunConfig

    model, bench, cache = small_injection(tmp_path, 2)
    common = dict(lr=1e-3, batch_size=2, min_epochs=1, max_epochs=1, check_every=1,
                  target_accuracy=1.1, general=None, rehearsal_per_step=2)  # fmt: skip
    first = inject(model, bench, InjectConfig(**common), cache_dir=cache, progress=False)
    (note,) = (cache / ".base").glob("rehearsal-*.made")
    now = json.loads(json.dumps(made()))
    assert json.loads(note.read_text()) == now and first.inputs_made == {}
    again = inject(model, bench, InjectConfig(**common, seed=1), cache_dir=cache, progress=False)
    assert again.inputs_made == {}  # read back, made here
    other = {**now, "machine": {**now["machine"], "cpu": "Other CPU (cpu family 6, model 85)"}}
    note.write_text(json.dumps(other))
    third = inject(model, bench, InjectConfig(**common, seed=2), cache_dir=cache, progress=False)
    assert third.inputs_made == {REHEARSAL_INPUT: other}
    written = json.loads((third.path / "inject.json").read_text())
    assert written["inputs_made"] == {REHEARSAL_INPUT: other}
    cached = inject(model, bench, InjectConfig(**common, seed=2), cache_dir=cache, progress=False)
    assert cached.cached and cached.inputs_made == third.inputs_made
    edited = {**written, "inputs_made": "edited by hand"}  # no traceback: nothing known
    (third.path / "inject.json").write_text(json.dumps(edited))
    assert inject(model, bench, InjectConfig(**common, seed=2), cache_dir=cache,
                  progress=False).inputs_made == {}  # fmt: skip
    (third.path / "inject.json").write_text(json.dumps(written))
    p = Pipeline(RunConfig(model="default", methods=[{"method": "ga"}]), tmp_path, print, False)
    p.read_inputs("inject:original", cached.inputs_made)
    expected = [{"machine": other["machine"], "stages": ["inject:original (rehearsal targets)"]}]
    assert _made_elsewhere(p) == expected
    # a damaged note (or none, from older code): nothing known
    note.write_text("[" * 100_000)
    fourth = inject(model, bench, InjectConfig(**common, seed=3), cache_dir=cache, progress=False)
    assert fourth.inputs_made == {}


def test_base_general_verdicts_another_machine_judged_are_named_by_the_injection(tmp_path):
    """The base model's general verdicts are read from `.base` by every injection of it,
    and give its general_kept: those another machine judged were noted nowhere. They are
    kept with where they were made, and an injection reading another machine's lists them
    in inject.json's `inputs_made` (older files, without the note: nothing known)."""
    from tests.unit.test_inject_precision import small_injection
    from unpact.data.items import QAItem, write_folder
    from unpact.determinism import made
    from unpact.inject import BASE_GENERAL_INPUT, InjectConfig, inject

    model, bench, cache = small_injection(tmp_path, 2)
    general = [QAItem(f"g{i}", f"What is {i} + 1?", str(i + 1), "general") for i in range(3)]
    write_folder(tmp_path / "general", general)
    common = dict(lr=1e-3, batch_size=2, min_epochs=1, max_epochs=1, check_every=1,
                  target_accuracy=1.1, rehearsal=False, general=str(tmp_path / "general"))  # fmt: skip
    first = inject(model, bench, InjectConfig(**common), cache_dir=cache, progress=False)
    (kept,) = (cache / ".base").glob("general-verdicts-*.json")
    now = json.loads(json.dumps(made()))
    saved = json.loads(kept.read_text())
    assert saved["made"] == now and first.inputs_made == {}
    again = inject(model, bench, InjectConfig(**common, seed=1), cache_dir=cache, progress=False)
    assert again.inputs_made == {}  # read back, made here
    other = {**now, "versions": {**now["versions"], "torch": "2.10.0"}}
    kept.write_text(json.dumps({**saved, "made": other}))
    third = inject(model, bench, InjectConfig(**common, seed=2), cache_dir=cache, progress=False)
    assert third.inputs_made == {BASE_GENERAL_INPUT: other}
    assert json.loads((third.path / "inject.json").read_text())["inputs_made"] == {
        BASE_GENERAL_INPUT: other
    }
    kept.write_text(json.dumps({"verdicts": saved["verdicts"]}))  # older code's file
    fourth = inject(model, bench, InjectConfig(**common, seed=3), cache_dir=cache, progress=False)
    assert fourth.inputs_made == {} and fourth.base_accuracy == first.base_accuracy
