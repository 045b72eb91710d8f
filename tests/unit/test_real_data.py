"""Readers of the real benchmarks' own layouts, on small fixture files in each schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unpact.data.real import read_muse, read_tofu, read_wmdp
from unpact.errors import UnpactError
from unpact.judge import muse_rouge_l_f1

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_muse_knowmem_and_raw():
    bench = read_muse(FIXTURES / "muse", corpus="news")
    assert bench.counts() == {"forget": 2, "retain": 1}
    first = bench.split("forget")[0]
    assert first.question.startswith("Which river") and first.answer == "the Ollen"
    assert [d.split for d in bench.documents] == [
        "forget",
        "forget",
        "retain",
        "holdout",
        "holdout",
    ]
    assert bench.documents[0].text.startswith("The Harrowgate ferry")
    # MUSE's VerbMem probes, as given (the continuation's leading space kept)
    assert [(v.prompt, v.continuation[:9]) for v in bench.verbatim] == [
        ("The Harrowgate ferry crossed the Ollen", " for the "),
        ("The operator thanked", " the town"),
    ]


def test_tofu_forget_retain_and_general():
    bench = read_tofu(FIXTURES / "tofu", forget="forget01")
    assert bench.counts() == {"forget": 2, "retain": 1, "general": 1, "holdout": 2}
    assert bench.split("general")[0].answer == "Paris"
    # TOFU's own truth-ratio answers, matched by question: the forget items' from
    # forget01_perturbed, the retain items' (TOFU's model utility) from retain_perturbed
    first = bench.split("forget")[0]
    assert first.paraphrased_answer == "The answer is French literature."
    assert first.perturbed_answers and len(first.perturbed_answers) == 3
    kept = bench.split("retain")[0]
    assert kept.paraphrased_answer == "The author's full name is Hsiao Yun-Hwa."
    assert kept.perturbed_answers and kept.perturbed_answers[0].endswith("Lin Mei-Hua.")
    # a general item's (world facts, real authors): perturbed answers, no paraphrase (TOFU's
    # utility compares the answer itself)
    facts = bench.split("general")[0]
    assert facts.perturbed_answers == ("London", "Rome", "Berlin")
    assert facts.paraphrased_answer is None
    assert all(i.perturbed_answers is None for i in bench.split("holdout"))
    with pytest.raises(UnpactError, match=r"forget05\.json is missing"):
        read_tofu(FIXTURES / "tofu", forget="forget05")
    with pytest.raises(UnpactError, match="unknown TOFU forget set"):
        read_tofu(FIXTURES / "tofu", forget="forget02")


def test_tofu_in_each_layout_it_was_published_in(tmp_path):
    """A clone of TOFU's first release names its files forget01_dataset.json; the hub's
    Parquet conversion puts each config's shards in a folder (forget01/train/0000.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unpact.data import load_benchmark
    from unpact.data.real import _records

    expected = read_tofu(FIXTURES / "tofu", forget="forget01").items
    first, shards = tmp_path / "first", tmp_path / "parquet"
    for f in sorted((FIXTURES / "tofu").glob("*.json")):
        (first / f"{f.stem}_dataset.json").parent.mkdir(exist_ok=True)
        (first / f"{f.stem}_dataset.json").write_bytes(f.read_bytes())
        rows = _records(f)
        half = max(1, len(rows) // 2)  # two shards where there are two rows or more
        for n, part in enumerate([rows[:half], rows[half:]]):
            if part:
                (shards / f.stem / "train").mkdir(parents=True, exist_ok=True)
                path = shards / f.stem / "train" / f"{n:04d}.parquet"
                pq.write_table(pa.Table.from_pylist(part), path)
    for folder in (first, shards):
        assert read_tofu(folder, forget="forget01").items == expected
        assert load_benchmark(f"tofu:{folder}").items == expected  # forget01 found


def test_wmdp_answer_index_becomes_text():
    bench = read_wmdp(FIXTURES / "wmdp" / "wmdp-bio.jsonl")
    assert [i.answer for i in bench.items] == ["gamma", "red"]
    assert all(i.is_mcq and i.answer in i.choices for i in bench.items)


def test_wmdp_answer_as_a_letter_or_digits_is_the_same_choice(tmp_path):
    """MMLU-style copies of multiple-choice files give the answer as its letter or as the
    index in text: each was refused ("must index into 'choices'")."""
    import json

    plain = read_wmdp(FIXTURES / "wmdp" / "wmdp-bio.jsonl").items
    raw = [json.loads(line) for line in (FIXTURES / "wmdp" / "wmdp-bio.jsonl").open()]
    for spell in (lambda i: "ABCD"[i], lambda i: "abcd"[i], str, lambda i: f" {i} "):
        copy = tmp_path / "w.jsonl"
        copy.write_text("".join(json.dumps(r | {"answer": spell(r["answer"])}) + "\n" for r in raw))
        assert read_wmdp(copy).items == plain
    for odd in ("\u00b2", "Z"):  # "²" passed isdigit() and made int() fail: a traceback
        copy.write_text(json.dumps(raw[0] | {"answer": odd}) + "\n")
        with pytest.raises(UnpactError, match=r"must index into 'choices'"):
            read_wmdp(copy)
    copy.write_text(json.dumps(raw[0] | {"answer": "Z"}) + "\n")
    with pytest.raises(UnpactError, match=r"must index into 'choices'.*not 'Z'"):
        read_wmdp(copy)


def test_bad_real_files(tmp_path):
    with pytest.raises(UnpactError, match="not a MUSE folder"):
        read_muse(tmp_path)
    bad = tmp_path / "w.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(UnpactError, match="'answer' must index into 'choices'"):
        read_wmdp(bad)
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(UnpactError, match="field 'choices' is missing"):
        read_wmdp(bad)


def test_real_benchmark_specs_load_wherever_a_benchmark_goes(tmp_path):
    from unpact.data import load_benchmark, materialise
    from unpact.data.items import load_folder

    tofu = load_benchmark(f"tofu:{FIXTURES / 'tofu'}")  # the forget set present: forget01
    assert tofu.name == "tofu-forget01" and tofu.counts()["forget"] == 2 and tofu.path is None
    assert load_benchmark(f"tofu[forget01]:{FIXTURES / 'tofu'}").items == tofu.items
    assert load_benchmark(f"muse-books:{FIXTURES / 'muse'}").name == "muse-books"
    wmdp = load_benchmark(f"wmdp:{FIXTURES / 'wmdp'}")
    assert wmdp.name == "wmdp-bio" and all(i.is_mcq for i in wmdp.items)
    # as files, once, keyed by content: what injection and unlearning read
    files = materialise(tofu, tmp_path)
    assert files.path is not None and load_folder(files.path).items == tofu.items
    assert materialise(tofu, tmp_path).path == files.path
    with pytest.raises(UnpactError, match=r"no such file or folder$"):
        load_benchmark(f"tofu:{tmp_path / 'missing'}")
    # the forget set named after the path, or the kind in capitals: the spec that reads it
    here = FIXTURES / "tofu"
    for option in (":forget05", "@forget05"):
        with pytest.raises(
            UnpactError, match=re.escape(f"brackets before the path: tofu[forget05]:{here})")
        ):
            load_benchmark(f"tofu:{here}{option}")
    with pytest.raises(UnpactError, match=re.escape("(spec names are lower case: tofu:...)")):
        load_benchmark(f"TOFU:{here}")
    bad = tmp_path / "wmdp.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n{oops\n')
    with pytest.raises(UnpactError, match=r"wmdp\.jsonl, line 2: not valid JSON"):
        load_benchmark(f"wmdp:{bad}")
    with pytest.raises(UnpactError, match="muse-news:PATH"):
        load_benchmark("nothing-here")


def test_a_real_benchmark_given_as_a_folder_names_its_spec():
    """A TOFU, MUSE or WMDP folder given as it is (not `tofu:PATH`) was "has no qa.jsonl",
    which sent the user to write one; now the spec that reads it."""
    from unpact.data import load_benchmark

    for kind, spec in (("tofu", "tofu:"), ("muse", "muse-news:"), ("wmdp", "wmdp[NAME]:")):
        with pytest.raises(
            UnpactError, match=rf"has no qa\.jsonl .*; it holds .*: give it as {re.escape(spec)}"
        ):
            load_benchmark(str(FIXTURES / kind))
    (wmdp_file,) = [f for f in (FIXTURES / "wmdp").iterdir() if f.suffix == ".jsonl"][:1]
    with pytest.raises(UnpactError, match=rf"read as wmdp:{re.escape(str(wmdp_file))}"):
        load_benchmark(str(wmdp_file))
    builtin = Path(__file__).parents[2] / "src" / "unpact" / "data" / "builtin" / "news"
    with pytest.raises(
        UnpactError, match=rf"give the folder that holds it: {re.escape(str(builtin))}$"
    ):
        load_benchmark(str(builtin / "qa.jsonl"))


def test_a_lone_file_of_items_is_told_to_go_in_a_folder(tmp_path):
    """A file of unpact's own items given as the benchmark (a renamed qa.jsonl) was told
    it is read as wmdp:FILE, a reading that then failed on its fields; it is told the
    folder layout, with the commands, the path quoted for the shell."""
    from unpact.data import load_benchmark

    builtin = Path(__file__).parents[2] / "src" / "unpact" / "data" / "builtin" / "news"
    lone = tmp_path / "my items.jsonl"
    lone.write_bytes(b"\xef\xbb\xbf" + (builtin / "qa.jsonl").read_bytes())
    with pytest.raises(UnpactError) as err:
        load_benchmark(str(lone))
    assert "wmdp:" not in str(err.value)
    assert f"in qa.jsonl (mkdir NAME && cp '{lone}' NAME/qa.jsonl" in str(err.value)
    # the items as a JSON array (was told "read as wmdp:FILE" too) or a CSV table (was
    # "is a file, not a benchmark folder" alone): the folder, and how to convert them
    rows = [json.loads(line) for line in (builtin / "qa.jsonl").read_text().splitlines()[:3]]
    array, table = tmp_path / "items.json", tmp_path / "items.csv"
    array.write_text(json.dumps(rows, indent=1))
    table.write_text("id,question,answer,split\n1,What is x?,y,forget\n")
    for given in (array, table):
        with pytest.raises(UnpactError) as err:
            load_benchmark(str(given))
        assert "wmdp:" not in str(err.value)
        assert "a folder with its items in qa.jsonl" in str(err.value)
        assert "jq -c '.[]' FILE > qa.jsonl" in str(err.value) and "pd.read_csv" in str(err.value)


def _runner_config(tmp_path, tiny, benchmark: str, **extra) -> dict:
    """A one-step run of the tiny model (saved under tmp_path) on a real benchmark's files."""
    from unpact.models import save_model

    save_model(tiny.model, tiny.tokenizer, tmp_path / "tiny")
    return {
        "model": str(tmp_path / "tiny"),
        "data": {"benchmark": benchmark, "general": None},
        "inject": {"enabled": False},
        "methods": [{"method": "ga_gd", "config": {"steps": 1, "batch_size": 2}}],
        "attacks": [{"name": "focus_on_key"}],
        "judge": {"max_new_tokens": 16},  # names of 12-15 tokens here
        "statistics": {"resamples": 0},
    } | extra


def test_the_runner_unlearns_a_real_benchmark(tmp_path, tiny):
    from unpact.run import run

    config = _runner_config(tmp_path, tiny, f"tofu:{FIXTURES / 'tofu'}")
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert result.results["benchmark"] == "tofu-forget01"
    assert result.results["counts"] == {"forget": 2, "retain": 1, "general": 0, "holdout": 2}
    # no injection and no reference named: the indistinguishability figures are skipped
    assert "no never-taught reference" in result.results["skipped"]["membership"]
    # the releases the numbers were computed under, as `unpact --version` gives them
    from importlib.metadata import version

    versions = json.loads((tmp_path / "out" / "results.json").read_text())["versions"]
    assert versions["torch"] == version("torch") and versions["unpact"] == version("unpact")
    assert set(versions) == {
        *("unpact", "torch", "transformers", "tokenizers", "accelerate", "peft"),
        *("numpy", "scipy", "scikit-learn", "python"),
    }
    report = " ".join((tmp_path / "out" / "report.html").read_text().split())
    assert f"Computed with unpact {versions['unpact']} (torch {versions['torch']}," in report
    # and the machine: the same config gives the same numbers on one kind of CPU
    import torch

    from unpact.determinism import native_bf16

    machine = json.loads((tmp_path / "out" / "results.json").read_text())["machine"]
    assert machine["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cpu_bf16"] is native_bf16() and "gpus" not in machine
    assert machine["mkl_cbwr"] == "AUTO,STRICT"  # the mode `import unpact` asks for
    said = f"; Python {versions['python']}) on {machine['cpu']}, {machine['cpu_kernels']} kernels."
    assert said in report


def test_stages_another_machine_or_release_computed_are_said(tmp_path, tiny):
    """A cache shared between machines, or kept across an upgrade: results.json's `machine`
    and `versions` are this process's, while the stages it read were computed elsewhere,
    and said nowhere. Each stage notes where and under what it was computed; a run lists
    those made elsewhere, and says so; one whose cache this machine filled says nothing."""
    from unpact.run import run

    config = _runner_config(tmp_path, tiny, f"tofu:{FIXTURES / 'tofu'}")
    cache = tmp_path / "cache"
    run(config, tmp_path / "a", cache_dir=cache, progress=False)
    said: list[str] = []
    again = run(config, tmp_path / "b", cache_dir=cache, progress=False, log=said.append)
    assert "made_elsewhere" not in again.results and not any("elsewhere" in s for s in said)
    notes = sorted(cache.rglob("*.made"))
    assert len(notes) >= 3 and len(list(cache.glob("*/*.jsonl"))) == len(notes)
    other = {"cpu": "Other CPU (cpu family 6, model 85)", "cpu_kernels": "AVX2"}
    for path in notes[:2]:
        found = json.loads(path.read_text())
        path.write_text(json.dumps({**found, "machine": {**found["machine"], **other}}))
    (unlearned,) = cache.rglob("result.json")
    info = json.loads(unlearned.read_text())
    info["made"]["versions"]["transformers"] = "4.0.0"
    unlearned.write_text(json.dumps(info))
    said.clear()
    third = run(config, tmp_path / "c", cache_dir=cache, progress=False, log=said.append)
    groups = third.results["made_elsewhere"]
    assert [sorted(g) for g in groups] in (
        [["machine", "stages"], ["stages", "versions"]],
        [["stages", "versions"], ["machine", "stages"]],
    )
    by_cpu = next(g for g in groups if "machine" in g)
    assert by_cpu["machine"]["cpu"] == other["cpu"] and len(by_cpu["stages"]) == 2
    by_release = next(g for g in groups if "versions" in g)
    assert by_release == {"versions": {"transformers": "4.0.0"}, "stages": ["unlearn:ga_gd"]}
    assert any("3 stages read from the cache were computed on another machine" in s for s in said)
    report = " ".join((tmp_path / "c" / "report.html").read_text().split())
    assert "Read from the cache: unlearn:ga_gd, computed under transformers 4.0.0." in report
    assert f"computed on {other['cpu']}, AVX2 kernels." in report
    # one stage is said as one; a note damaged by hand is no difference
    for path in notes[:2]:
        path.write_text('{"machine": "edited"}')
    said.clear()
    fourth = run(config, tmp_path / "d", cache_dir=cache, progress=False, log=said.append)
    assert [g["stages"] for g in fourth.results["made_elsewhere"]] == [["unlearn:ga_gd"]]
    assert any("1 stage read from the cache was computed on another" in s for s in said)


def test_a_stage_of_a_served_model_notes_no_machine(tmp_path):
    """Its numbers are its server's: the client's machine and releases, noted as where it
    was computed, would call a cache read on another client "made elsewhere"."""
    from unpact.run import Pipeline
    from unpact.run.config import RunConfig

    config = RunConfig(model="default", methods=[{"method": "ga"}])
    p = Pipeline(config, tmp_path, lambda text: None, False)
    p.stage("evaluation", "evals", "local", ["a"], lambda: [{"id": "1"}])
    p.stage("evaluation", "evals", "served", ["b"], lambda: [{"id": "1"}], served=True)
    assert len(list(tmp_path.glob("evals/*.jsonl"))) == 2
    assert len(list(tmp_path.glob("evals/*.made"))) == 1


def test_the_parts_of_a_resumed_training_another_machine_made_are_said(tmp_path):
    """An unlearning or injection the run finished from a checkpoint another machine wrote
    (its `made_before`) has those steps listed in results.json's made_elsewhere, each part
    by its steps or epochs; the parts this machine made, and damaged notes, are not."""
    from unpact.determinism import made
    from unpact.run import Pipeline, _made_elsewhere
    from unpact.run.config import RunConfig

    p = Pipeline(RunConfig(model="default", methods=[{"method": "ga"}]), tmp_path, print, False)
    now = json.loads(json.dumps(made()))
    other = {**now, "machine": {**now["machine"], "cpu": "Other CPU (cpu family 6, model 85)"}}
    p.resumed("unlearn:ga", [{"from": 0, "to": 4, "made": other}], "steps")
    p.resumed("inject:original", [{"from": 0, "to": 2, "made": now}, {"made": other}], "epochs")
    p.resumed("inject:retrained", "edited", "epochs")
    assert _made_elsewhere(p) == [
        {"machine": other["machine"], "stages": ["unlearn:ga (steps 0-4)"]}
    ]


def test_the_token_baseline_replaces_with_the_originals_id_in_every_model(tmp_path, tiny):
    """`attribution.baseline: token`: an unlearned model whose tokenizer has no unk and a
    pad of its own (a Llama 3 fine-tune that set `pad_token`) replaced units with its pad,
    the original with its unk, and the focus figures compared the two baselines."""
    from unpact.attribution import attribute
    from unpact.models import load_model, save_model
    from unpact.run import run
    from unpact.testing import tiny_model

    other = tiny_model(seed=0)
    other.tokenizer.unk_token = None
    other.tokenizer.pad_token = "<|im_end|>"  # id 2; the original's unk is id 0
    save_model(other.model, other.tokenizer, tmp_path / "theirs")
    config = _runner_config(
        tmp_path,
        tiny,
        f"tofu:{FIXTURES / 'tofu'}",
        methods=[{"model": str(tmp_path / "theirs"), "name": "theirs"}],
        attribution={"baseline": "token"},
        membership={"enabled": False},
    )
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    forget = [r for r in result.records if r.split == "forget" and r.attribution_after]
    assert forget
    theirs = load_model(str(tmp_path / "theirs"))
    assert theirs.default_baseline_token() == 2  # the case is real
    for r in forget:
        asked = {"baseline": "token", "unit": "token"}
        ours = attribute(theirs, r.question, r.answer, baseline_token_id=0, **asked)
        own = attribute(theirs, r.question, r.answer, baseline_token_id=2, **asked)
        assert r.attribution_after["contributions"] == pytest.approx(ours.contributions, abs=1e-5)
        assert ours.contributions != pytest.approx(own.contributions, abs=1e-3)


def test_a_named_reference_enables_membership_and_another_tokenizer_is_refused(tmp_path, tiny):
    from unpact.models import save_model
    from unpact.run import run
    from unpact.testing import tiny_model

    config = _runner_config(
        tmp_path,
        tiny,
        f"tofu:{FIXTURES / 'tofu'}",
        membership={"reference": str(tmp_path / "tiny"), "gradnorm": False},
    )
    tofu = f"tofu:{FIXTURES / 'tofu'}"
    config["data"] = {"benchmark": tofu, "general": tofu}  # its world facts too
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    res = result.results
    # TOFU's model utility: the retain set and the world-facts set, three parts each
    from scipy.stats import hmean

    mine = [r for r in result.records if r.method == "ga_gd" and r.answer_prob is not None]
    assert sorted(r.split for r in mine) == ["general", "retain"]
    parts = [x for r in mine for x in (r.answer_prob, r.rouge_after, max(0.0, 1 - r.truth_ratio))]
    want = 0.0 if 0 in parts else hmean(parts)
    assert res["methods"]["ga_gd"]["model_utility"] == pytest.approx(want)
    assert res["references"]["retrained"]["model_utility"] is not None
    timed = res["stage_seconds"] | res.get("stage_seconds_cached", {})
    assert "evaluating:retrained (general)" in timed  # its world-facts answers
    # TOFU has no documents and GradNorm is off: said, not silent nulls
    assert set(res["skipped"]) == {
        "verbmem",
        "mia_auc.gradnorm",
        "mia_auc_documents",
        "privleak_documents",
        "model_utility_parts",  # the fixture's general item is a world fact
    }
    assert res["skipped"]["model_utility_parts"].startswith("ra_*, general_*: no item")
    assert set(res["methods"]["ga_gd"]["model_utility_parts"]) >= {"wf_Q_A_ROUGE"}
    assert "no text to continue" in res["skipped"]["verbmem"]
    assert res["methods"]["ga_gd"]["forget_quality"] is not None
    assert set(res["methods"]["ga_gd"]["mia_auc"]) >= {"loss", "min_k"}
    assert res["references"]["retrained"]["privleak"] == 0.0
    other = tiny_model(seed=1, vocab_size=300)
    save_model(other.model, other.tokenizer, tmp_path / "other")
    config["membership"] = {"reference": str(tmp_path / "other")}
    with pytest.raises(UnpactError, match=r"membership\.reference .* another tokenizer"):
        run(config, tmp_path / "out2", cache_dir=tmp_path / "cache", progress=False)
    # an unlearned model given as it is, and the base: refused before any stage, not at
    # the focus figures after every stage (an unlearned model was never checked)
    config["membership"] = {"base": str(tmp_path / "other")}
    with pytest.raises(UnpactError, match=r"membership\.base .* another tokenizer"):
        run(config, tmp_path / "out3", cache_dir=tmp_path / "cache3", progress=False)
    config["membership"] = {"enabled": False}
    config["methods"] = [{"model": str(tmp_path / "other"), "name": "theirs"}]
    with pytest.raises(UnpactError, match=r"methods\.0 \(theirs\) .* another tokenizer"):
        run(config, tmp_path / "out4", cache_dir=tmp_path / "cache4", progress=False)
    for cache in ("cache3", "cache4"):  # TOFU's items as files, and no stage
        assert [p.name for p in (tmp_path / cache).iterdir()] == ["subsets"]
    # the same vocabulary in another chat template (or none): other prompts, refused too
    plain = tiny_model(seed=1)
    plain.tokenizer.chat_template = "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}A:"
    save_model(plain.model, plain.tokenizer, tmp_path / "plain")
    config["methods"] = [{"model": str(tmp_path / "plain"), "name": "theirs"}]
    with pytest.raises(UnpactError, match=r"methods\.0 \(theirs\) .* another chat template"):
        run(config, tmp_path / "out5", cache_dir=tmp_path / "cache5", progress=False)


def test_a_tokenizer_that_only_adds_special_tokens_compares(tmp_path):
    """A fine-tuning script that added a `[PAD]` (embeddings resized) leaves every text
    tokenised as the original's: once refused as "another tokenizer", now a note; a
    token added as ordinary text (it changes how text tokenises) is still refused."""
    from unpact.models import save_model
    from unpact.run import notes_once
    from unpact.run.membership import same_tokenizer
    from unpact.testing import tiny_model

    base = tiny_model(seed=0)
    save_model(base.model, base.tokenizer, tmp_path / "original")
    padded = tiny_model(seed=0)
    padded.tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    padded.model.resize_token_embeddings(len(padded.tokenizer))
    save_model(padded.model, padded.tokenizer, tmp_path / "padded")
    said: list[str] = []
    once = notes_once(said.append)  # an audit checks, then its run: said once
    for what in ("--unlearned", "methods.0 (unlearned)"):
        same_tokenizer(str(tmp_path / "original"), {what: str(tmp_path / "padded")}, once)
    assert len(said) == 1 and "adds special token(s) '[PAD]' to the original's 320" in said[0]
    # and by the next audit in the same process again (a set for the whole process kept it
    # from saying it)
    again: list[str] = []
    same_tokenizer(
        str(tmp_path / "original"), {"--unlearned": str(tmp_path / "padded")}, again.append
    )
    assert again == said
    # a special token the original's chat template spells as text: its prompts tokenise
    # otherwise (one token here, pieces there), so refused
    base.tokenizer.chat_template = "{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}"
    save_model(base.model, base.tokenizer, tmp_path / "turned")
    turned = tiny_model(seed=0)
    turned.tokenizer.chat_template = base.tokenizer.chat_template
    turned.tokenizer.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    turned.model.resize_token_embeddings(len(turned.tokenizer))
    save_model(turned.model, turned.tokenizer, tmp_path / "turned2")
    with pytest.raises(UnpactError, match="another tokenizer"):
        same_tokenizer(str(tmp_path / "turned"), {"--unlearned": str(tmp_path / "turned2")})
    # a mistyped original: named by its option, in load_model's words (it was "could not
    # load the tokenizer of 'nonexist'" with no option, offline)
    with pytest.raises(UnpactError, match=r"^--original: model spec 'nonexist' resolves to"):
        same_tokenizer("nonexist", {"--unlearned": str(tmp_path / "padded")}, called="--original")
    worded = tiny_model(seed=0)
    worded.tokenizer.add_tokens(["Quintrell"])
    worded.model.resize_token_embeddings(len(worded.tokenizer))
    save_model(worded.model, worded.tokenizer, tmp_path / "worded")
    with pytest.raises(UnpactError, match=r"--unlearned .* another tokenizer .* \(321 against 320"):
        same_tokenizer(str(tmp_path / "original"), {"--unlearned": str(tmp_path / "worded")})


def test_a_tokenizer_with_the_originals_vocabulary_that_splits_text_otherwise_is_refused(
    tmp_path,
):
    """Same vocabulary, same ids, but another normaliser, pre-tokeniser or BOS setting (a
    tokenizer re-saved by other code): every text tokenises otherwise, and the check, which
    compared vocabularies and templates alone, let the pair through."""
    from tokenizers import normalizers, pre_tokenizers, processors

    from unpact.models import save_model
    from unpact.run.membership import same_tokenizer
    from unpact.testing import tiny_model

    base = tiny_model(seed=0)
    save_model(base.model, base.tokenizer, tmp_path / "original")
    original = str(tmp_path / "original")
    changes = {
        "lowered": lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
        "prefixed": lambda t: setattr(
            t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)
        ),
        "bos": lambda t: setattr(
            t,
            "post_processor",
            processors.TemplateProcessing(
                single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
            ),
        ),
    }
    for name, change in changes.items():
        other = tiny_model(seed=0)
        change(other.tokenizer.backend_tokenizer)
        assert other.tokenizer.get_vocab() == base.tokenizer.get_vocab()
        save_model(other.model, other.tokenizer, tmp_path / name)
        with pytest.raises(UnpactError, match=rf"--unlearned .*/{name} has the vocabulary of the "):
            same_tokenizer(original, {"--unlearned": str(tmp_path / name)})
    # and one that only adds a special token is checked alike
    padded = tiny_model(seed=0)
    padded.tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    padded.tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    padded.model.resize_token_embeddings(len(padded.tokenizer))
    save_model(padded.model, padded.tokenizer, tmp_path / "padded")
    with pytest.raises(UnpactError, match="tokenises text otherwise"):
        same_tokenizer(original, {"--unlearned": str(tmp_path / "padded")})


def test_models_with_the_originals_tokenizer_files_are_compared_without_loading(
    tmp_path, tiny, monkeypatch
):
    """An unlearned checkpoint carries its original's tokenizer files byte for byte: a run
    or an audit loaded every tokenizer twice to find that out (1.5 s of a cached audit of 8.4 s)."""
    import json

    import unpact.models as models
    from unpact.models import save_model
    from unpact.run.membership import same_tokenizer

    for name in ("a", "b", "c"):
        save_model(tiny.model, tiny.tokenizer, tmp_path / name)
    loads: list[str] = []
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda spec: loads.append(spec) or real(spec))
    same_tokenizer(str(tmp_path / "a"), {"--unlearned": str(tmp_path / "b"), "--base": None})
    assert loads == []
    # a file that differs (an edited config): loaded and compared, here still the same
    config = json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())
    (tmp_path / "c" / "tokenizer_config.json").write_text(json.dumps(config | {"x": 1}))
    same_tokenizer(str(tmp_path / "a"), {"--unlearned": str(tmp_path / "c")})
    assert loads == [str(tmp_path / "c"), str(tmp_path / "a")]


def test_tofu_without_its_holdout_file_has_forget_quality(tmp_path, tiny):
    """TOFU's first release had no holdout sets: every indistinguishability figure was
    left out with them, forget quality (TOFU's own) and the attacks' controls included,
    although the retain model was named. Only membership inference is, naming the file."""
    import shutil

    from unpact.run import run

    shutil.copytree(FIXTURES / "tofu", tmp_path / "tofu")
    (tmp_path / "tofu" / "holdout01.json").unlink()
    config = _runner_config(
        tmp_path,
        tiny,
        f"tofu:{tmp_path / 'tofu'}",
        membership={"reference": str(tmp_path / "tiny"), "gradnorm": False},
    )
    res = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False).results
    assert res["counts"]["holdout"] == 0 and "membership" not in res["skipped"]
    assert res["skipped"]["privleak"].endswith("; TOFU's are holdout01.json")
    assert res["methods"]["ga_gd"]["forget_quality"] is not None
    assert res["references"]["retrained"]["forget_quality"] == 1.0


def test_muse_membership_runs_on_its_documents(tmp_path, tiny):
    """MUSE's files have holdout text but no holdout questions: membership inference and
    PrivLeak run on the forget and holdout documents (MUSE's own setting), and the figures
    of the answers are skipped with the reason."""
    from unpact.run import run

    config = _runner_config(
        tmp_path,
        tiny,
        f"muse-news:{FIXTURES / 'muse'}",
        methods=[{"method": "ga", "config": {"steps": 1, "batch_size": 2}}],
        statistics={"resamples": 20},
        membership={"reference": str(tmp_path / "tiny"), "gradnorm": False},
    )
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    res = result.results
    assert "membership" not in res["skipped"]
    assert "no holdout items" in res["skipped"]["privleak"]
    m = res["methods"]["ga"]
    assert set(m["mia_auc_documents"]) == {"loss", "zlib", "min_k", "min_k_plus_plus", "reference"}
    assert all(v is not None for v in m["mia_auc_documents"].values())
    assert m["privleak_documents"] is not None and "privleak_documents" in m["ci"]
    # the reference is the model itself here: PrivLeak 0 by construction
    assert res["references"]["retrained"]["privleak_documents"] == 0.0
    docs = [r for r in result.records if r.split.endswith("_document")]
    assert {r.split for r in docs} == {"forget_document", "holdout_document"}
    assert len(docs) == 4  # two forget and two holdout paragraphs
    verdict = next(v for v in res["verdicts"]["ga"] if v["test"] == "indistinguishable")
    # the documents' PrivLeak, of two paragraphs against two: too few to read its interval
    assert "PrivLeak 0% [0%, 0%] not read: 2 forget and 2 holdout documents" in verdict["detail"]
    # VerbMem on MUSE's own probes: a record each, their mean the figure
    probes = [r for r in result.records if r.split == "verbmem" and r.method == "ga"]
    assert [r.question for r in probes] == [v.prompt for v in read_muse(FIXTURES / "muse").verbatim]
    assert probes[1].answer == " the town."
    assert m["verbmem"] == pytest.approx(sum(r.verbmem for r in probes) / 2)
    assert all(r.verbmem == muse_rouge_l_f1(r.output_after, r.answer) for r in probes)
    assert "verbmem" not in res["skipped"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert 'id="verbmem"' in report and "The Harrowgate ferry crossed the Ollen" in report


def test_verbmem_continues_unnamed_forget_documents_without_probes(tmp_path, tiny):
    """MUSE's files without verbmem/forget.json: the forget items name no document, so
    VerbMem continues the forget documents themselves (their first verbmem_prefix tokens),
    a record each (TOFU, with no documents, skips it with the reason: above)."""
    import shutil

    from unpact.run import run

    muse = tmp_path / "muse"
    shutil.copytree(FIXTURES / "muse", muse)
    shutil.rmtree(muse / "verbmem")
    config = _runner_config(
        tmp_path,
        tiny,
        f"muse-news:{muse}",
        data={"benchmark": f"muse-news:{muse}", "general": None, "forget_items": 1},
        membership={
            "reference": str(tmp_path / "tiny"),
            "gradnorm": False,
            "verbmem_prefix": 8,
            "verbmem_new_tokens": 6,
        },
    )
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    rows = [r for r in result.records if r.split == "verbmem" and r.method == "ga_gd"]
    # both forget paragraphs, though the run keeps one forget item (none names a document)
    assert [r.id for r in rows] == ["muse-news-forget-00000", "muse-news-forget-00001"]
    assert all(0.0 <= r.verbmem <= 1.0 and r.output_after for r in rows)
    assert result.results["methods"]["ga_gd"]["verbmem"] == pytest.approx(
        sum(r.verbmem for r in rows) / 2
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [  # each was read before: "None" as an answer, an empty question, True as index 1
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "must index into"),
        ({"question": " ", "choices": ["a", "b"], "answer": 0}, "'question' must be non-empty"),
        ({"question": "q", "choices": ["a", None], "answer": 0}, "'choices' must all be non-empty"),
    ],
)
def test_bad_wmdp_records_are_refused(tmp_path, record, message):
    import json

    bad = tmp_path / "w.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(UnpactError, match=rf"w\.jsonl, record 1: .*{message}"):
        read_wmdp(bad)


def test_bad_tofu_and_muse_content_names_the_file(tmp_path):
    import json
    import shutil

    tofu = tmp_path / "tofu"
    shutil.copytree(FIXTURES / "tofu", tofu)
    (tofu / "forget01.json").write_text(json.dumps([{"question": "q", "answer": None}]))
    with pytest.raises(UnpactError, match=r"forget01\.json, record 1: field 'answer' must be"):
        read_tofu(tofu, forget="forget01")
    muse = tmp_path / "muse"
    shutil.copytree(FIXTURES / "muse", muse)
    (muse / "raw" / "forget.txt").write_bytes(b"\x80\x81 not text")
    with pytest.raises(UnpactError, match=r"forget\.txt: not UTF-8 text"):
        read_muse(muse)
    (muse / "knowmem" / "forget_qa.json").write_text('[{"question": "q", "answer": []}]')
    with pytest.raises(UnpactError, match=r"forget_qa\.json, record 1: field 'answer'"):
        read_muse(muse)


def test_muse_other_layouts_retain2_json_raw_and_privleak_texts(tmp_path):
    """An earlier MUSE release names the retain questions retain2_qa.json and keeps its
    texts as JSON: the raw corpus as `datasets` writes it (records with `text`) and the
    PrivLeak sets as lists of strings; once refused or read without holdout texts."""
    import json
    import shutil

    muse = tmp_path / "muse"
    (muse / "knowmem").mkdir(parents=True)
    shutil.copy(FIXTURES / "muse/knowmem/forget_qa.json", muse / "knowmem")
    shutil.copy(FIXTURES / "muse/knowmem/retain_qa.json", muse / "knowmem/retain2_qa.json")
    (muse / "raw").mkdir()
    (muse / "raw/forget.json").write_text('{"text": "First forget."}\n{"text": "Second."}\n')
    (muse / "privleak").mkdir()
    (muse / "privleak/forget.json").write_text(json.dumps(["not read: raw comes first"]))
    (muse / "privleak/holdout.json").write_text(json.dumps(["Never seen.", "  ", "Nor this."]))
    bench = read_muse(muse)
    assert bench.counts() == {"forget": 2, "retain": 1}
    docs = [(d.split, d.text) for d in bench.documents]
    assert docs == [
        ("forget", "First forget."),
        ("forget", "Second."),
        ("holdout", "Never seen."),
        ("holdout", "Nor this."),
    ]


def test_muse_from_a_clone_of_the_hub_repository(tmp_path):
    """A clone of muse-bench/MUSE-News holds Parquet shards (knowmem/forget_qa-00000-of-
    00001.parquet, retain2_qa-..., privleak/holdout-..., verbmem/forget-...), JSON under
    hyphenated names in its first upload (knowmem/forget-qa.json), and the hub's Parquet
    conversion puts each part in a folder (knowmem/forget_qa/train/0000.parquet): each
    was "not a MUSE folder"."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from unpact.data import load_benchmark
    from unpact.data.real import _records

    source = FIXTURES / "muse"
    expected = read_muse(source)
    texts = {
        "forget": [d.text for d in expected.documents if d.split == "forget"],
        "holdout": [d.text for d in expected.documents if d.split == "holdout"],
    }
    qa = {
        "forget": _records(source / "knowmem/forget_qa.json"),
        "retain": _records(source / "knowmem/retain_qa.json"),
    }
    probes = _records(source / "verbmem/forget.json")

    def write(path: Path, rows: list) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)

    upload, converted, first = tmp_path / "upload", tmp_path / "converted", tmp_path / "first"
    shard = "-00000-of-00001.parquet"
    write(upload / f"knowmem/forget_qa{shard}", qa["forget"])
    write(upload / f"knowmem/retain2_qa{shard}", qa["retain"])
    for split in ("forget", "holdout"):
        write(upload / f"privleak/{split}{shard}", [{"text": t} for t in texts[split]])
    write(upload / f"verbmem/forget{shard}", probes)
    write(converted / "knowmem/forget_qa/train/0000.parquet", qa["forget"][:1])
    write(converted / "knowmem/forget_qa/train/0001.parquet", qa["forget"][1:])
    write(converted / "knowmem/retain_qa/train/0000.parquet", qa["retain"])
    (first / "knowmem").mkdir(parents=True)
    (first / "knowmem/forget-qa.json").write_text(json.dumps(qa["forget"]))
    (first / "knowmem/retain2-qa.json").write_text(json.dumps(qa["retain"]))
    got = load_benchmark(f"muse-news:{upload}")
    assert got.items == expected.items
    assert [(d.split, d.text) for d in got.documents] == [
        (d.split, d.text) for d in expected.documents if d.split != "retain"
    ]
    assert [(v.prompt, v.continuation) for v in got.verbatim] == [
        (v.prompt, v.continuation) for v in expected.verbatim
    ]
    assert read_muse(converted).items == expected.items
    assert read_muse(first).items == expected.items
    with pytest.raises(UnpactError, match=r"not a MUSE folder: knowmem/forget_qa\.json is missing"):
        read_muse(tmp_path)


def _hub_clone_of_wmdp(root: Path) -> Path:
    """A folder laid out as a clone of the hub's cais/wmdp: one Parquet file per subset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unpact.data.real import _records

    rows = _records(FIXTURES / "wmdp" / "wmdp-bio.jsonl")
    for subset in ("wmdp-bio", "wmdp-chem"):
        (root / subset).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / subset / "test-00000-of-00001.parquet")
    return root


def test_wmdp_from_a_clone_of_the_hub_repository_in_parquet(tmp_path):
    """cais/wmdp on the hub holds only Parquet files (wmdp-bio/test-00000-of-00001.parquet):
    read like the JSON-lines file, by subset folder or by the subset named as the option."""
    from unpact.data import load_benchmark

    clone = _hub_clone_of_wmdp(tmp_path / "wmdp")
    expected = read_wmdp(FIXTURES / "wmdp" / "wmdp-bio.jsonl").items
    for spec in (f"wmdp[wmdp-bio]:{clone}", f"wmdp:{clone / 'wmdp-bio'}"):
        bench = load_benchmark(spec)
        assert bench.name == "wmdp-bio" and bench.items == expected
    file = clone / "wmdp-chem" / "test-00000-of-00001.parquet"
    assert load_benchmark(f"wmdp:{file}").name == "wmdp-chem"
    with pytest.raises(UnpactError, match="found none; subsets here: wmdp-bio, wmdp-chem"):
        load_benchmark(f"wmdp:{clone}")


def test_parquet_problems_are_one_message(tmp_path, monkeypatch):
    import sys

    from unpact.data import load_benchmark

    clone = _hub_clone_of_wmdp(tmp_path / "wmdp")
    shard = clone / "wmdp-bio" / "test-00000-of-00001.parquet"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(UnpactError, match="needs pyarrow"):
        load_benchmark(f"wmdp:{shard}")
    monkeypatch.undo()
    # cloned without Git LFS: a pointer file where the data should be
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 258073\n")
    with pytest.raises(UnpactError, match=r"is a Git LFS pointer.*git lfs pull"):
        load_benchmark(f"wmdp:{shard}")
    shard.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UnpactError, match="not a Parquet file"):
        load_benchmark(f"wmdp:{shard}")
    json_pointer = tmp_path / "wmdp-bio.jsonl"
    json_pointer.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(UnpactError, match="is a Git LFS pointer"):
        load_benchmark(f"wmdp:{json_pointer}")


def test_muse_from_the_hub_maps_every_config(monkeypatch):
    """The hub path (`hub=True`, through `datasets`) reads the same parts as a folder:
    knowmem's questions, raw's texts and verbmem's probes (hub replaced by its records)."""
    from unpact.data import real

    served = {
        ("knowmem", "forget_qa"): [{"question": "Which river?", "answer": "the Ollen"}],
        ("knowmem", "retain_qa"): [{"question": "Which town?", "answer": "Harrowgate"}],
        ("raw", "forget"): [{"text": "The ferry crossed the Ollen."}],
        ("raw", "retain1"): [{"text": "Harrowgate thanked the operator."}],
        ("raw", "holdout"): [{"text": "A bridge opened in Verne."}],
        ("verbmem", "forget"): [{"prompt": "The ferry crossed", "gt": " the Ollen."}],
    }
    asked: list[tuple[str, str | None, str]] = []

    def hub(repo: str, config: str | None, split: str) -> list[dict]:
        asked.append((repo, config, split))
        return served[(config, split)]

    monkeypatch.setattr(real, "_hub", hub)
    bench = read_muse("", corpus="news", hub=True)
    assert {repo for repo, _, _ in asked} == {"muse-bench/MUSE-News"}
    assert bench.counts() == {"forget": 1, "retain": 1}
    assert [d.split for d in bench.documents] == ["forget", "retain", "holdout"]
    assert [(v.prompt, v.continuation) for v in bench.verbatim] == [
        ("The ferry crossed", " the Ollen.")
    ]
