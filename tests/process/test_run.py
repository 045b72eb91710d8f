"""The experiment runner on the tiny model: stages, caching, resume, results, config errors.

The tiny random model knows nothing, so the test benchmark is made of what it *does* say:
each answer is the model's own greedy answer, which makes every item "known" before
unlearning, and unlearning then changes those answers (forgotten items, attacks, rates).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unpact.data.items import QAItem, write_folder
from unpact.errors import UnpactError
from unpact.files import json_lines
from unpact.judge import knowmem_score, tofu_rouge_l_recall
from unpact.metrics import ItemRecord
from unpact.models import save_model
from unpact.report import dilemma_svg
from unpact.run import load_config, method_metrics, run
from unpact.scoring import generate

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the report about the town?",
    "How many moons orbit the planet Zorblax?",
    "Who founded the Vostrand Glassworks?",
    "Where does the quick brown fox jump?",
    "What did Mira Quintrell found?",
    "Which year was the glassworks founded?",
    "Who is the mayor of Kilimanjaro?",
    "What jumps over the lazy dog?",
    "Which river bank is near the town?",
    "What is the answer to the question?",
    "Who wrote about the planet?",
]
MAX_NEW = 6


def _known_items(lm, questions, split):
    """Items whose answer is the model's own greedy answer (so it is judged correct)."""
    outs = generate(lm, questions, max_new_tokens=MAX_NEW)
    items = []
    for n, (q, o) in enumerate(zip(questions, outs)):
        text = o[0].text.strip()
        if any(ch.isalnum() for ch in text):
            word = next(w for w in q.split() if len(w) > 3)
            items.append(QAItem(f"{split}-{n}", q, text, split, (), (word,), None))
    return items


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("run")
    save_model(tiny.model, tiny.tokenizer, root / "tiny")
    forget = _known_items(tiny, QUESTIONS[:6], "forget")
    retain = _known_items(tiny, QUESTIONS[6:10], "retain")
    general = _known_items(tiny, QUESTIONS[10:], "general")
    assert len(forget) >= 4 and retain and general
    write_folder(root / "bench", forget + retain)
    write_folder(root / "general", general)
    config = {
        "model": str(root / "tiny"),
        "data": {"benchmark": str(root / "bench"), "general": str(root / "general")},
        "inject": {"enabled": False},
        "methods": [
            {"method": "ga", "config": {"lr": 3e-3, "steps": 3, "batch_size": 2}},
            {
                "method": "npo_gd",
                "name": "npo",
                "config": {"lr": 3e-3, "steps": 4, "batch_size": 2, "save_every": 2},
            },
        ],
        "attacks": [
            {"name": "focus_on_key"},
            {"name": "probab", "settings": {"samples": 3}},
            {"name": "focus_on_key_probab", "settings": {"samples": 3}},
            {"name": "paraphrase"},
            {"name": "in_context"},
            {"name": "keyword_only"},
        ],
        "judge": {"max_new_tokens": MAX_NEW},
        "attribution": {"heatmaps": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root, config


@pytest.fixture(scope="module")
def finished(setup):
    root, config = setup
    result = run(config, root / "out", cache_dir=root / "cache", progress=False)
    return root, result


def _numbers(results: dict) -> dict:
    """results.json without what legitimately differs between two runs (time, paths)."""
    methods = {
        name: {k: v for k, v in m.items() if k not in ("model", "unlearn_seconds")}
        for name, m in results["methods"].items()
    }
    return {"methods": methods, "counts": results["counts"], "attacks": results["attacks"]}


def test_run_writes_every_artefact_with_the_documented_schema(finished):
    root, _ = finished
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"ga", "npo"}
    for m in results["methods"].values():
        for key in (
            "forget_acc_before",
            "forget_acc_after",
            "forgotten",
            "recovery",
            "destructive_retain",
            "destructive_general",
            "collapse_rate",
            "keytoken_similarity_forgotten",
            "keytoken_similarity_kept",
            "knowmem_forget_after",
            "knowmem_retain_after",
            "rouge_forget_after",
        ):
            assert key in m
        assert set(m["recovery"]) == {
            "focus_on_key",
            "probab",
            "focus_on_key_probab",
            "paraphrase",
            "in_context",
            "keyword_only",
            "any",
        }
        assert (
            m["recovery"]["any"] >= max(v for v in m["recovery"].values() if v is not None) - 1e-12
        )
        assert m["forget_acc_before"] == 1.0  # the items are what the model says
        assert (Path(m["model"]) / "model.safetensors").is_file()
        assert 0 <= m["keyword_recall_before"] <= 1  # each item's keyword is in its question
        lo, hi = m["ci"]["forget_acc_after"]
        assert lo <= m["forget_acc_after"] <= hi
        assert set(m["vs_probab"]) == set(m["recovery"]) - {"probab", "any"}
        assert 0 <= m["vs_probab"]["focus_on_key"]["p_value"] <= 1
    assert any(m["forgotten"] > 0 for m in results["methods"].values())
    rows = [json.loads(line) for _, line in json_lines((out / "items.jsonl").read_text())]
    n_items = (
        results["counts"]["forget"] + results["counts"]["retain"] + results["counts"]["general"]
    )
    assert len(rows) == 2 * n_items
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,forget_acc_before") and len(csv_lines) == 3
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| method |") and [r.split(" | ")[0] for r in md[2:]] == [
        "| ga",
        "| npo",
    ]
    assert yaml.safe_load((out / "config.yaml").read_text())["methods"][1]["name"] == "npo"
    html = (out / "report.html").read_text()
    assert '<table id="results">' in html and "<svg" in html
    assert "; 2 unlearning methods;" in html
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)  # self-contained
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", html)


def test_every_number_is_a_function_of_the_item_records(finished):
    root, _ = finished
    results = json.loads((root / "out" / "results.json").read_text())
    rows = [json.loads(line) for _, line in json_lines((root / "out" / "items.jsonl").read_text())]
    for name, m in results["methods"].items():
        records = [ItemRecord(**r) for r in rows if r["method"] == name]
        again = method_metrics(records, results["attacks"], 0.1)
        for key, value in again.items():
            if isinstance(value, dict):
                for a, v in value.items():
                    assert (m[key][a] is None and math.isnan(v)) or m[key][a] == pytest.approx(v)
            elif isinstance(value, float) and math.isnan(value):
                assert m[key] is None
            else:
                assert m[key] == pytest.approx(value)
        # forgotten items carry their attacks' prompts and answers; others have none
        for r in records:
            assert r.knowmem_after == knowmem_score(r.output_after, r.answer)  # open items
            assert r.knowmem_before == knowmem_score(r.output_before, r.answer)
            assert r.rouge_after == tofu_rouge_l_recall(r.output_after, r.answer)
            if r.forgotten:
                assert set(r.attacks) == set(results["attacks"])
                assert len(r.attacks["probab"]["outputs"]) == 3
                assert len(r.attacks["paraphrase"]["prompts"]) == 4
                assert len(r.attacks["paraphrase"]["outputs"]) == 4
                assert "\nA:" in r.attacks["in_context"]["prompt"]
                assert r.attacks["focus_on_key"]["prompt"].startswith(r.question)
                assert r.attribution_before and r.attribution_after
            else:
                assert not r.attacks


def test_a_second_run_reuses_every_stage(finished, tmp_path, monkeypatch):
    root, first = finished

    def boom(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr("unpact.run.open_model", boom)
    monkeypatch.setattr("unpact.unlearn.loop.unlearn", boom)
    again = run(root / "config.yaml", tmp_path / "out", cache_dir=root / "cache", progress=False)
    assert _numbers(again.results) == _numbers(first.results)


# The killed process: the real CLI, SIGKILLed (no clean-up) by itself right after the second
# unlearning run's first checkpoint is written. Polling for the checkpoint from outside raced
# the run: two tiny steps after it the run finished and removed its checkpoints.
_DIE_AFTER_CHECKPOINT = """
import os, signal, sys
from unpact.unlearn import loop
real = loop._checkpoint
def checkpoint_then_die(accelerator, out, step, parts):
    real(accelerator, out, step, parts)
    if out.name.startswith("npo_gd-"):
        os.kill(os.getpid(), signal.SIGKILL)
loop._checkpoint = checkpoint_then_die
from unpact.cli import main
sys.argv = ["unpact", *sys.argv[1:]]
main()
"""


def test_killed_run_resumes_to_the_same_numbers(finished, tmp_path):
    root, first = finished
    out = tmp_path / "out"
    cache = tmp_path / "home" / "stages"  # the default stage cache under $UNPACT_CACHE
    env = {**os.environ, "UNPACT_CACHE": str(tmp_path / "home")}
    cmd = [sys.executable, "-c", _DIE_AFTER_CHECKPOINT, "run", str(root / "config.yaml")]
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "results.json").exists()
    assert list(cache.glob("unlearned/npo_gd-*/checkpoints/step-2"))  # killed after it
    assert list(cache.glob("unlearned/ga-*/result.json"))  # the first method was finished
    resumed = run(root / "config.yaml", out, cache_dir=cache, progress=False)
    assert _numbers(resumed.results) == _numbers(first.results)


def test_a_prompt_attribution_refuses_stops_the_run_before_any_unlearning(setup, tmp_path):
    """A one-token forget question (unPact needs two units) was refused by the attribution
    stage after every method had been trained: now before the first."""
    _, config = setup
    items = [QAItem("f-1", "Q", "x", "forget"), QAItem("r-1", "What is it?", "y", "retain")]
    write_folder(tmp_path / "bench", items)
    one = {**config, "data": {"benchmark": str(tmp_path / "bench"), "general": None}}
    with pytest.raises(UnpactError, match="is a single token"):
        run(one, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("unlearned/*"))  # nothing was trained


def test_a_layer_the_model_lacks_stops_the_run_before_the_injection(setup, tmp_path, monkeypatch):
    """RMU's default layer (7) on a model of two layers was refused when RMU's turn came,
    after the injection and every method listed before it had trained."""
    _, config = setup
    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "uc"))  # where injections go
    both = {
        **config,
        "inject": {"settings": {"max_epochs": 1, "general": None, "rehearsal": False}},
        "methods": [config["methods"][0], {"method": "rmu", "config": {"steps": 1}}],
    }
    with pytest.raises(UnpactError, match=r"methods\.1 \(rmu\): rmu: layer 7 does not exist; "
                       r"the model has 2 layers"):  # fmt: skip
        run(both, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    # an attack's layer too: ablate_direction's was refused only when it attacked
    ablate = {"name": "ablate_direction", "settings": {"layer": 9}}
    deep = {**both, "methods": config["methods"][:1], "attacks": [ablate]}
    with pytest.raises(UnpactError, match=r"attacks\.0 \(ablate_direction\): ablate_direction: "
                       r"layer 9 is not in 0\.\.2"):  # fmt: skip
        run(deep, tmp_path / "out2", cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("unlearned/*"))  # nothing was trained
    assert not list((tmp_path / "uc").glob("**/inject.json"))  # nor taught


def test_an_answer_longer_than_the_judged_answers_stops_the_run_before_the_injection(
    setup, tmp_path, monkeypatch
):
    """A contains judge reading 4 tokens can never find a 12-word answer: such items were
    judged unknown before and after unlearning ('nothing forgotten'), and the injection
    trained to its last epoch for an accuracy it could not reach."""
    _, config = setup
    monkeypatch.setenv("UNPACT_CACHE", str(tmp_path / "uc"))
    long = "the glassworks was founded by the three brothers of the old mill town"
    items = [
        QAItem("f-1", "Who founded the Vostrand Glassworks?", long, "forget"),
        QAItem("f-2", "What is the capital of the blue land?", "Zorb", "forget"),
        QAItem("r-1", "What colour is the sky?", "blue", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    base = {**config, "data": {"benchmark": str(tmp_path / "bench"), "general": None}}
    judged = {**base, "judge": {"max_new_tokens": 4}}
    with pytest.raises(UnpactError, match=r"judge\.max_new_tokens is 4, but 1 answer\(s\) take "
                       r"more tokens .*item f-1 \(forget\).*judge\.kind: rouge"):  # fmt: skip
        run(judged, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    taught = {
        **base,
        "judge": {"max_new_tokens": 64},
        "inject": {"settings": {"max_new_tokens": 4}},
    }
    with pytest.raises(UnpactError, match=r"inject\.settings\.max_new_tokens is 4"):
        run(taught, tmp_path / "out2", cache_dir=tmp_path / "cache", progress=False)
    rouge = {**base, "judge": {"kind": "rouge", "max_new_tokens": 4}, "methods": []}
    with pytest.raises(UnpactError, match="methods"):  # rouge reads part of an answer: passes
        run(rouge, tmp_path / "out3", cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "uc").glob("**/inject.json"))  # nothing was taught
    assert not list((tmp_path / "cache").glob("unlearned/*"))  # nor trained
    # an answer with no word the judge reads ("?", "The") could never be found either
    write_folder(tmp_path / "bench2", [*items[1:], QAItem("f-3", "Which mark?", "?", "forget")])
    wordless = {**base, "data": {"benchmark": str(tmp_path / "bench2"), "general": None}}
    with pytest.raises(UnpactError, match=r"item f-3 \(forget\): its answer '\?' keeps no word"):
        run(wordless, tmp_path / "out4", cache_dir=tmp_path / "cache", progress=False)


def test_an_original_that_knows_none_of_the_forget_items_is_said_at_once(setup, tmp_path):
    """Every figure of forgotten items was an empty dash with no word of why (an injection
    too short for the facts, a judge too strict for the answers)."""
    _, config = setup
    items = [
        QAItem("f-1", "Who founded the Vostrand Glassworks?", "Ilsabet Quorne", "forget"),
        QAItem("r-1", "What colour is the sky?", "Zorbic teal", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    said: list[str] = []
    cfg = {
        **config,
        "data": {"benchmark": str(tmp_path / "bench"), "general": None},
        "methods": config["methods"][:1],
        "attacks": [{"name": "focus_on_key"}],
        "judge": {"max_new_tokens": 12},
    }
    res = run(cfg, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, log=said.append)
    assert any("the original model answers none of the forget items (1)" in s for s in said)
    assert res.results["verdicts"]["ga"][0]["verdict"] == "nothing to forget"


# ------------------------------------------------------------------------- the config


def test_a_config_built_in_python_may_hold_paths(setup):
    """`run({"model": Path(...)}, ...)` said "model: Input should be a valid string"."""
    root, config = setup
    built = {
        **config,
        "model": root / "tiny",
        "data": {**config["data"], "benchmark": root / "bench"},
    }
    loaded = load_config(built)
    assert loaded.model == str(root / "tiny") and loaded.data.benchmark == str(root / "bench")


def test_a_config_files_paths_are_read_beside_it_when_they_name_nothing_here(
    setup, tmp_path, monkeypatch
):
    """A config kept with its data and run from elsewhere: "no benchmark 'bench'"."""
    import shutil

    import yaml

    from unpact.run.config import _paths_beside

    root, config = setup
    kept = tmp_path / "project" / "configs"
    shutil.copytree(root / "bench", kept / "bench")
    shutil.copytree(root / "tiny", tmp_path / "project" / "tiny")
    written = {**config, "model": "../tiny", "data": {**config["data"], "benchmark": "bench"}}
    (kept / "run.yaml").write_text(yaml.safe_dump(written))
    here = tmp_path / "elsewhere"
    (here / "news").mkdir(parents=True)  # a folder named like a built-in: not read for it
    monkeypatch.chdir(here)
    loaded = load_config(str(kept / "run.yaml"))
    assert loaded.model == str(tmp_path / "project" / "tiny")
    assert loaded.data.benchmark == str(kept / "bench")
    # every key that names a model or a benchmark, real-benchmark specs included
    other = {
        "benchmarks": ["news", "bench"],
        "methods": [{"model": "bench", "name": "m"}, {"method": "ga"}],
        "membership": {"reference": "tofu:bench", "k": 0.2},
    }
    moved = _paths_beside(other, kept)
    assert moved["benchmarks"] == ["news", str(kept / "bench")]
    assert moved["methods"] == [{"model": str(kept / "bench"), "name": "m"}, {"method": "ga"}]
    assert moved["membership"] == {"reference": f"tofu:{kept / 'bench'}", "k": 0.2}
    # a path that names something from the working directory is read from there
    (here / "bench").mkdir()
    assert _paths_beside({"data": {"benchmark": "bench"}}, kept)["data"]["benchmark"] == "bench"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methodz": []}, r"methodz: unknown key"),
        ({"methods": [{"method": "nope"}]}, r"methods\.0: unknown method 'nope'"),
        ({"methods": [{"method": "ga", "config": {"lr": -1}}]}, r"methods\.0: .*lr"),
        ({"methods": [{"method": "ga", "config": {"settings": {"beta": 1}}}]}, r"methods\.0"),
        ({"data": {"benchmark": "nowhere"}}, r"data\.benchmark: no benchmark 'nowhere'"),
        ({"data": {"forget_items": 0}}, r"data\.forget_items"),
        ({"attacks": [{"name": "telepathy"}]}, r"attacks\.0\.name: unknown attack"),
        ({"attacks": [{"name": "probab", "settings": {"samples": -2}}]}, r"attacks\.0\.settings"),
        ({"judge": {"kind": "vibes"}}, r"judge\.kind"),
        ({"judge": {"kind": "llm"}}, r"judge\.llm"),
        # the key's variable was read at the first judging, after the injection
        (
            {
                "judge": {
                    "kind": "llm",
                    "llm": {
                        "base_url": "http://x/v1",
                        "model": "j",
                        "api_key_env": "UNPACT_NO_SUCH_KEY",
                    },
                }
            },
            r"judge\.llm\.api_key_env: \$UNPACT_NO_SUCH_KEY, .* is not set",
        ),
        (
            {"attacks": [{"name": "focus_on_key", "settings": {"template": "{question}"}}]},
            r"attacks\.0\.settings: .*\{question\} is not filled in here; use \{prompt\}, \{keys\}",
        ),
        ({"inject": {"settings": {"lrr": 1}}}, r"inject\.settings: .*lrr"),
        ({"chat_template": "no/such.jinja"}, r"chat_template: cannot read no/such\.jinja"),
        (
            {
                "chat_template": "{{ messages[0]['content'] }}",
                "methods": [{"model": "openai:m@http://127.0.0.1:1/v1", "name": "served"}],
            },
            r"chat_template: methods\.0\.model \(openai:m@.*\) is served",
        ),
        (
            {"inject": {"settings": {"precision": "fp16"}}},
            r"inject\.settings: .*unknown precision .fp16.",
        ),
        (
            {"methods": [{"method": "ga"}, {"method": "ga"}]},
            r"methods\.1\.name: 'ga' is used twice",
        ),
        ({"methods": []}, r"methods"),
        # a name is the folder models/<name>: it wrote outside the run directory
        (
            {"methods": [{"method": "ga", "name": "../../elsewhere"}]},
            r"methods\.0\.name: '\.\./\.\./elsewhere' cannot name a folder of the run",
        ),
        # it replaced the original model's folder
        ({"methods": [{"method": "ga", "name": "original"}]}, r"names the run's own original"),
        (
            {"models": [{"name": "..", "model": "default"}]},
            r"models\.0\.name: '\.\.' cannot name a folder",
        ),
        ({"model": "./no/such/model"}, r"model: model spec './no/such/model': no such file"),
        (
            {"methods": [{"model": "./no/such/model", "name": "u"}]},
            r"methods\.0\.model: model spec .*no such file",
        ),
        (
            {"membership": {"reference": "./no/such/model"}},
            r"membership\.reference: model spec .*no such file",
        ),
        ({"membership": {"base": "./no/such/model"}}, r"membership\.base: model spec"),
        # a served model's dtype is its server's: results.json said bfloat16 all the same
        (
            {
                "model": "openai:m@http://127.0.0.1:1/v1",
                "inject": {"enabled": False},
                "methods": [{"model": "openai:u@http://127.0.0.1:1/v1", "name": "u"}],
                "dtype": "bfloat16",
            },
            r"dtype: bfloat16 applies to local models, and every model of this run is served",
        ),
        # once accepted silently: no McNemar test, and a cached run that loads no model
        ({"statistics": {"baseline_attack": "nope"}}, r"statistics\.baseline_attack: 'nope'"),
        ({"device": "tpu"}, r"device: unknown device 'tpu'"),
        ({"inject": {"settings": {"device": "meta"}}}, r"inject\.settings: device: unknown"),
        ({"inject": {"settings": {"target_accuracy": -1}}}, r"target_accuracy"),
        # infinity passed every `gt=0` check and reached the sampler or the optimiser
        (
            {"attacks": [{"name": "probab", "settings": {"temperature": float("inf")}}]},
            r"temperature: Input should be a finite number",
        ),
        ({"methods": [{"method": "ga", "config": {"lr": float("inf")}}]}, r"lr: .*finite"),
        # seeds outside what NumPy and torch take were a traceback when training began
        ({"inject": {"settings": {"seed": 10**23}}}, r"inject\.settings: seed: .*less than"),
        ({"inject": {"settings": {"seed": -1}}}, r"inject\.settings: seed: .*greater than"),
        ({"methods": [{"method": "ga", "config": {"seed": -1}}]}, r"seed: .*greater than"),
        ({"methods": [{"method": "rmu", "config": {"seed": 2**32}}]}, r"seed: .*less than"),
        (
            {"attacks": [{"name": "probab", "settings": {"seed": -5}}]},
            r"attack probab: seed: .*greater than",
        ),
        ({"statistics": {"seed": 2**40}}, r"statistics\.seed: .*less than"),
        # a Python loop that never ended, silently
        ({"statistics": {"resamples": 10**23}}, r"statistics\.resamples: .*less than or equal"),
        # the list replaced the single one, which was silently never run
        (
            {
                "model": "openai:m@http://127.0.0.1:1/v1",
                "models": [{"name": "a", "model": "default"}],
            },
            r"model: 'openai:m@.*' is not run: models replaces it",
        ),
        (
            {"benchmarks": ["news", "books"], "data": {"benchmark": "wmdp"}},
            r"data\.benchmark: 'wmdp' is not run: benchmarks replaces it",
        ),
    ],
)
def test_config_mistakes_name_the_key(change, message):
    config = {"methods": [{"method": "ga"}]} | change
    with pytest.raises(UnpactError, match=message):
        load_config(config)


def test_a_default_kept_beside_the_list_that_replaces_it_is_let_be():
    """`model: default` (as the built-in grids write it) or `data.benchmark: news` kept from
    a config copied as a start, beside a `models:` or `benchmarks:` list without it, is a
    leftover, not a model or benchmark the user asked for: the run goes on."""
    grid = {
        "methods": [{"method": "ga"}],
        "model": "default",
        "models": [{"name": "a", "model": "./no/such/model"}],
        "benchmarks": ["books"],
        "data": {"benchmark": "news"},
    }
    with pytest.raises(UnpactError, match=r"models\.0\.model: model spec './no/such/model'"):
        load_config(grid)  # past both checks, to the models' own
    assert load_config(grid | {"models": [{"name": "a", "model": "default"}]}).benchmarks == [
        "books"
    ]


def test_a_benchmark_without_the_splits_the_methods_need_is_refused_up_front(tmp_path):
    """Once said by the unlearning stage, after the injection had run."""
    for split in ("forget", "retain"):
        folder = tmp_path / f"only_{split}"
        folder.mkdir()
        (folder / "qa.jsonl").write_text(
            json.dumps({"id": "q", "question": "Who is Bob?", "answer": "Bob", "split": split})
        )
    only_forget = {"data": {"benchmark": str(tmp_path / "only_forget"), "general": None}}
    with pytest.raises(UnpactError, match=r"methods\.1: ga_gd needs retain items"):
        load_config(only_forget | {"methods": [{"method": "ga"}, {"method": "ga_gd"}]})
    assert load_config(only_forget | {"methods": [{"method": "ga"}]}).methods[0].method == "ga"
    only_retain = {"data": {"benchmark": str(tmp_path / "only_retain"), "general": None}}
    with pytest.raises(UnpactError, match="has no forget items"):
        load_config(only_retain | {"methods": [{"method": "ga"}]})


def test_builtin_configs_load():
    from unpact import configs

    assert configs.names() == sorted(p.stem for p in configs.FOLDER.glob("*.yaml"))
    assert {"demo", "paper", "beyond"} <= set(configs.names()) and configs.path("nope") is None
    demo = load_config("demo")
    assert [m.method for m in demo.methods] == ["ga_gd", "npo_kl", "rmu"]
    assert demo.data.forget_items and demo.data.forget_items >= 20
    assert demo.judge.max_new_tokens == 24 and demo.inject.settings["min_epochs"] == 6
    assert [a.name for a in demo.attacks] == [
        "focus_on_key",
        "probab",
        "focus_on_key_probab",
        "quantize",
    ]
    robust = load_config("robust")
    assert [a.column for a in robust.attacks if a.controlled()] == [
        "quantize_8bit",
        "quantize",
        "relearn_unrelated",
        "ablate_direction",
        "logit_lens",
        "probe",
    ]
    paper = load_config("paper")
    assert [m.method for m in paper.methods] == ["ga_gd", "ga_kl", "npo_gd", "npo_kl", "tv", "rmu"]
    words = load_config("paper_words")
    assert words.attribution.unit == "word" and words.methods == paper.methods
    beyond = load_config("beyond")
    assert len(beyond.methods) == 17 and beyond.methods[1].config == {"settings": {"gamma": 1}}
    assert {"ga_gd", "npo_gd"} < {m.label for m in beyond.methods}  # the six paper methods
    assert "relearn" in {a.name for a in beyond.attacks} and beyond.attribution.stability


def test_cli_run_with_a_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  - method: ga\n    confg: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "unpact", "run", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "methods.0.confg: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "unpact", "run", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no run config" in missing.stderr


# ----------------------------------------------------------------------- the browser


def _chromium() -> str | None:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("UNPACT_BROWSER_TEST") == "required":
        pytest.fail("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    return found


def _browse(chromium: str, page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            *flags,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_report_opens_in_a_real_browser_without_console_errors(finished, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed")
    root, _ = finished
    page = root / "out" / "report.html"
    artefacts = Path(os.environ.get("UNPACT_ARTIFACTS", Path(__file__).parents[2] / "build"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "report.png"
    shot.unlink(missing_ok=True)
    proc = _browse(
        chromium, page, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1280,2000"
    )
    # Chromium writes every console message (log, warning, error, uncaught exception) to
    # stderr as a ":CONSOLE" line; the report must write none.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert shot.is_file() and shot.stat().st_size > 10_000  # a page, not a blank
    dom = _browse(chromium, page, tmp_path / "p2", "--dump-dom").stdout
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    assert '<table id="results">' in dom and dom.count("<tr>") >= 3
    assert '<figure id="dilemma"><svg' in dom
    assert "unpact-attribution" in dom  # heatmaps
    # At 1,400 px no column head breaks inside a word ("meth od"): a copy of the page with a
    # script that finds every word of every head laid out on more than one line.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _HEAD_PROBE + "</body>"))
    dom = _browse(chromium, probe, tmp_path / "p3", "--window-size=1400,900", "--dump-dom").stdout
    broken = re.search(r'data-broken-heads="([^"]*)"', dom)
    assert broken is not None and broken.group(1) == "", broken
    # nor is a head wider than its column: "FocusOnKey+PROBAB" and "min_k_plus_plus", one
    # word each, ran over the next head
    over = re.search(r'data-overflowing-heads="([^"]*)"', dom)
    assert over is not None and over.group(1) == "", over


_HEAD_PROBE = """<script>
(() => {
  const broken = [];
  for (const th of document.querySelectorAll("table th")) {
    const text = th.firstChild;
    if (!text || text.nodeType !== 3) continue;
    const re = /[^\\s-]+/g;  // a hyphen is a fair place to break
    let m;
    while ((m = re.exec(text.data))) {
      const r = document.createRange();
      r.setStart(text, m.index);
      r.setEnd(text, m.index + m[0].length);
      const tops = new Set([...r.getClientRects()].map((x) => Math.round(x.top)));
      if (tops.size > 1) broken.push(m[0]);
    }
  }
  document.body.dataset.brokenHeads = broken.join(" ");
  const over = [...document.querySelectorAll("table th")].filter(
    (th) => th.scrollWidth > th.clientWidth + 1
  );
  document.body.dataset.overflowingHeads = over.map((th) => th.textContent.trim()).join(" | ");
})();
</script>
"""


def test_a_run_s_chat_template_reaches_every_model_it_names(monkeypatch):
    """`chat_template`: the base model, a given unlearned model, the reference and the
    membership base each become a copy with the template; a method's own model is made
    from the templated base. Without the key the run is as written."""
    from unpact import models
    from unpact.run import _templated
    from unpact.run.config import load_config

    monkeypatch.setattr(models, "with_chat_template", lambda spec, t: f"{spec}+{t}")
    config = {
        "model": "default",
        "methods": [{"method": "ga"}, {"model": "default", "name": "given"}],
        "membership": {"reference": "default", "base": "default"},
    }
    t = "{{ messages[0]['content'] }}"  # a template given as text
    cfg = _templated(load_config({**config, "chat_template": t}))
    assert cfg.model == f"default+{t}" and cfg.chat_template == t
    assert [m.model for m in cfg.methods] == [None, f"default+{t}"]
    assert (cfg.membership.reference, cfg.membership.base) == (f"default+{t}",) * 2
    plain = load_config(config)
    assert _templated(plain) is plain


def test_docs_name_every_config_key():
    from unpact.judge import JudgeSettings, LLMJudgeSettings
    from unpact.remote import RemoteSettings
    from unpact.run import (
        AttributionSettings,
        DataSettings,
        InjectSettings,
        MethodSpec,
        ModelSpec,
        ReportSettings,
        RunConfig,
        StatisticsSettings,
    )

    docs = (Path(__file__).parents[2] / "docs" / "runner.md").read_text()
    for model in (
        RunConfig,
        DataSettings,
        InjectSettings,
        MethodSpec,
        AttributionSettings,
        JudgeSettings,
        LLMJudgeSettings,
        StatisticsSettings,
        ReportSettings,
        ModelSpec,
        RemoteSettings,
    ):
        for name in model.model_fields:
            assert f"{name}:" in docs or f"{name}," in docs, f"{model.__name__}.{name}"


def test_a_grid_runs_each_benchmark_into_its_folder(setup, finished, tmp_path, monkeypatch):
    """Each benchmark into its folder, the tables gathered; a note that holds for every
    run of the grid (a CPU run on a GPU machine) is said once, not once a run. Run into
    the folder of a single run, the grid leaves none of its items or models there; a
    single run into the grid's folder leaves none of the grid's runs."""
    import shutil

    import torch

    root, first = finished
    shutil.copytree(root / "bench", tmp_path / "again")
    _, config = setup
    run(config, tmp_path / "grid", cache_dir=root / "cache", progress=False)
    assert (tmp_path / "grid" / "models").is_dir()
    grid = config | {"benchmarks": [str(root / "bench"), str(tmp_path / "again")]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    said: list[str] = []
    result = run(grid, tmp_path / "grid", cache_dir=root / "cache", progress=False, log=said.append)
    assert len([line for line in said if line.startswith("note: device: cpu")]) == 1
    assert len([line for line in said if line.startswith("run ")]) == 2
    assert set(result.results["benchmarks"]) == {"bench", "again"}
    for name in ("bench", "again"):
        one = json.loads((tmp_path / "grid" / name / "results.json").read_text())
        assert _numbers(one) == _numbers(first.results)  # same items, same stages
    lines = (tmp_path / "grid" / "results.csv").read_text().splitlines()
    assert lines[0].startswith("run,method,") and len(lines) == 1 + 2 * 2
    assert "bench/report.html" in (tmp_path / "grid" / "report.html").read_text()
    assert (tmp_path / "grid" / "results.md").read_text().count("| ga |") == 2
    assert json.loads((tmp_path / "grid" / "results.json").read_text())["benchmarks"]["again"]
    assert not {"items.jsonl", "models"} & {p.name for p in (tmp_path / "grid").iterdir()}
    run(config, tmp_path / "grid", cache_dir=root / "cache", progress=False)
    assert not {"bench", "again"} & {p.name for p in (tmp_path / "grid").iterdir()}


@pytest.mark.parametrize(
    ("sent", "code", "said"),
    [
        (signal.SIGINT, 130, "interrupted"),
        # a scheduler's time limit, `kill`: the process ended in silence
        (signal.SIGTERM, 143, "terminated (SIGTERM)"),
    ],
)
def test_ctrl_c_says_how_to_continue(setup, tmp_path, sent, code, said):
    root, _ = setup
    env = {**os.environ, "UNPACT_CACHE": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "unpact", "run", str(root / "config.yaml"), "--out", str(tmp_path)]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
    # (no KeyboardInterrupt): give the run the terminal's default, as a user at a prompt has.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Interrupt once the run says it is unlearning: seconds of work remain then, so the
    # signal cannot miss the run (polling for a stage's files could, on a busy machine).
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "unlearning: ga" in line:
            proc.send_signal(sent)
            break
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr
    assert f"{said}: run the same command again" in stderr and "Traceback" not in stderr


def test_attribution_checks_run_from_the_config_without_recomputing_attributions(
    setup, finished, tmp_path, tiny
):
    import statistics

    from unpact.data.sources import load_benchmark
    from unpact.gradient import gradient_attributions

    root, first = finished
    _, config = setup
    before = sorted((root / "cache" / "attributions").iterdir())
    checked = config | {
        "attribution": config["attribution"]
        | {"gradient": ["grad_x_input", "integrated_gradients"], "ig_steps": 4, "stability": True}
    }
    result = run(checked, tmp_path / "checked", cache_dir=root / "cache", progress=False)
    assert sorted((root / "cache" / "attributions").iterdir()) == before  # reused
    assert _numbers(result.results) == _numbers(first.results)
    summary = result.results["attribution_checks"]
    assert set(summary) == {"original", "ga", "npo"}
    rows = [json.loads(x) for x in (tmp_path / "checked" / "checks.jsonl").read_text().splitlines()]
    for label, figures in summary.items():
        mine = [r for r in rows if r["model"] == label]
        assert len(mine) == result.results["counts"]["forget"]
        for method in ("grad_x_input", "integrated_gradients"):
            values = [r[method]["spearman"] for r in mine if r[method]["spearman"] is not None]
            assert figures[f"spearman.{method}"] == pytest.approx(statistics.mean(values))
            assert all(len(r[method]["scores"]) > 1 for r in mine)
        if label == "original":  # the tiny model itself: the items' own gradient scores
            items = {i.id: i for i in load_benchmark(str(root / "bench")).items}
            direct = gradient_attributions(
                tiny,
                [items[r["id"]].question for r in mine],
                [items[r["id"]].answer for r in mine],
                method="integrated_gradients",
                steps=4,
            )
            for r, g in zip(mine, direct):
                assert r["integrated_gradients"]["scores"] == pytest.approx(g.scores, abs=1e-5)
        stab = [statistics.mean(v for v in r["stability"] if v is not None) for r in mine]
        assert figures["keytoken_stability"] == pytest.approx(statistics.mean(stab))
        assert 0 <= figures["keytoken_stability"] <= 1
    assert '<table id="checks">' in (tmp_path / "checked" / "report.html").read_text()


def test_a_run_into_another_configs_folder_leaves_none_of_its_files(setup, finished, tmp_path):
    """A config run into the folder of another (its methods and checks since changed) left
    that one's models/npo and checks.jsonl beside results that had neither; a model the new
    config is given from that folder stays."""
    root, _ = finished
    _, config = setup
    out = tmp_path / "out"
    checked = config | {"attribution": config["attribution"] | {"stability": True}}
    run(checked, out, cache_dir=root / "cache", progress=False)
    assert (out / "checks.jsonl").is_file()
    assert sorted(p.name for p in (out / "models").iterdir()) == ["ga", "npo"]
    fewer = config | {
        "methods": [config["methods"][0], {"name": "npo", "model": str(out / "models" / "npo")}]
    }
    again = run(fewer, out, cache_dir=root / "cache", progress=False)
    assert set(again.results["methods"]) == {"ga", "npo"}
    assert not (out / "checks.jsonl").exists()
    assert sorted(p.name for p in (out / "models").iterdir()) == ["ga", "npo"]  # npo: given
    run(config | {"methods": config["methods"][:1]}, out, cache_dir=root / "cache", progress=False)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["ga"]
    assert (root / "cache" / "unlearned").is_dir() and len(
        list((root / "cache" / "unlearned").iterdir())
    ) >= 2


def test_relearning_runs_from_the_config_and_counts_only_held_out_items(setup, finished, tmp_path):
    """Trained-on forgotten items are outside relearning's denominator."""
    root, _ = finished
    _, config = setup
    relearn = {"name": "relearn", "settings": {"items": 2, "steps": 4, "lr": 3e-3}}
    cfg = config | {"attacks": [{"name": "focus_on_key"}, relearn]}
    result = run(cfg, tmp_path / "relearn", cache_dir=root / "cache", progress=False)
    checked = 0
    for name, m in result.results["methods"].items():
        mine = [r for r in result.records if r.method == name and r.forgotten]
        attacked = [r for r in mine if "relearn" in r.recovered]
        assert len(attacked) == max(len(mine) - 2, 0)
        if attacked:
            hits = sum(r.recovered["relearn"] for r in attacked)
            assert m["recovery"]["relearn"] == pytest.approx(hits / len(attacked))
            trained = {t for r in attacked for t in r.attacks["relearn"]["trained_on"]}
            assert len(trained) == 2 and not trained & {r.id for r in attacked}
            checked += 1
        assert all("focus_on_key" in r.recovered for r in mine)
    assert checked


def test_relearning_recovers_a_tiny_injected_fact(tmp_path):
    """Teach the tiny model two facts, each asked two ways; unlearn one phrasing of each
    (gradient ascent) until both are forgotten; relearning on the other phrasings (related
    retain text) brings the forgotten answers back, and the same attack with a vanishing
    learning rate does not."""
    import torch

    from unpact.attacks import AttackContext, get_attack
    from unpact.judge import JudgeSettings, answer_items
    from unpact.testing import tiny_model
    from unpact.unlearn.loop import _batch, encode_items
    from unpact.unlearn.methods import nll

    lm = tiny_model(0)
    a1 = QAItem("a1", "Who founded the glassworks?", "Quintrell", "retain", (), (), None)
    b1 = QAItem("b1", "Which person founded the glassworks?", "Quintrell", "forget", (), (), None)
    a2 = QAItem("a2", "Where does the quick fox jump?", "Kilimanjaro", "retain", (), (), None)
    b2 = QAItem("b2", "The quick fox jumps where?", "Kilimanjaro", "forget", (), (), None)
    judge = JudgeSettings(max_new_tokens=8)

    def train(items, steps, lr, sign):
        enc = encode_items(lm, items)
        opt = torch.optim.AdamW(lm.model.parameters(), lr=lr)
        lm.model.train()
        for _ in range(steps):
            loss = sign * nll(lm.model, _batch(enc, list(range(len(items)))))
            opt.zero_grad()
            loss.backward()
            opt.step()
        lm.model.eval()

    torch.manual_seed(0)
    train([a1, b1, a2, b2], 40, 1e-2, 1)
    assert all(ok for _, ok in answer_items(lm, [a1, b1, a2, b2], judge))  # injected
    for _ in range(20):
        train([b1, b2], 1, 1e-3, -1)
        if not any(ok for _, ok in answer_items(lm, [b1, b2], judge)):
            break
    assert not any(ok for _, ok in answer_items(lm, [b1, b2], judge))  # forgotten
    save_model(lm.model, lm.tokenizer, tmp_path / "unlearned")
    for lr, back in ((1e-2, True), (1e-12, False)):
        attack = get_attack("relearn", {"data": "retain", "items": 2, "steps": 10, "lr": lr})
        spec = str(tmp_path / "unlearned")
        ctx = AttackContext(lambda: lm, spec, [b1, b2], {}, [a1, a2], judge, label="t")
        rows = attack.run(ctx)
        assert [r["id"] for r in rows] == ["b1", "b2"]
        assert all(r["trained_on"] == ["a1", "a2"] for r in rows)
        assert all(r["recovered"] for r in rows) == back
        assert any(r["recovered"] for r in rows) == back


def test_a_sweep_expands_into_one_run_per_value(setup, finished, tmp_path):
    root, _ = finished
    _, config = setup
    swept = config | {
        "methods": [
            {
                "method": "ga",
                "config": {"steps": 2, "batch_size": 2},
                "sweep": {"lr": [1e-3, 3e-3]},
            }
        ],
        "attacks": [{"name": "focus_on_key"}],
    }
    cfg = load_config(swept)
    assert [m.label for m in cfg.methods] == ["ga[lr=0.001]", "ga[lr=0.003]"]
    assert [m.config["lr"] for m in cfg.methods] == [1e-3, 3e-3]
    result = run(swept, tmp_path / "sweep", cache_dir=root / "cache", progress=False)
    methods = result.results["methods"]
    assert [m["sweep"]["value"] for m in methods.values()] == [1e-3, 3e-3]
    # the swept setting reached the unlearning runs: two different models
    a, b = (Path(m["model"]) / "model.safetensors" for m in methods.values())
    assert a.read_bytes() != b.read_bytes()
    # the dilemma plot: one legend entry naming the swept setting, each point its value
    svg = dilemma_svg(result.results, attack="focus_on_key")
    assert ">ga (lr)<" in svg and ">0.001<" in svg and ">0.003<" in svg
    nested = load_config(
        config | {"methods": [{"method": "npo", "sweep": {"settings.beta": [0.1, 1]}}]}
    )
    assert [m.config["settings"]["beta"] for m in nested.methods] == [0.1, 1]
    with pytest.raises(UnpactError, match="one setting"):
        load_config(config | {"methods": [{"method": "ga", "sweep": {"lr": []}}]})


def test_sweep_checks_default_checks_only_the_default_run(setup, tmp_path):
    """`sweep_checks: default` skips the checks on a sweep's other runs; the CLI's log and
    table show a sweep's run by its whole label (rich markup ate "[lr=...]")."""
    _, config = setup
    from unpact.run import _at_default
    from unpact.unlearn.config import resolve_config

    default_lr = resolve_config("ga").lr
    swept = config | {
        "methods": [
            {
                "method": "ga",
                "config": {"steps": 2, "batch_size": 2},
                "sweep": {"lr": [1e-3, default_lr]},
            }
        ],
        "attacks": [{"name": "focus_on_key"}],
        "attribution": {"heatmaps": 0, "gradient": ["grad_x_input"], "sweep_checks": "default"},
    }
    assert [_at_default(m) for m in load_config(swept).methods] == [False, True]
    beta = resolve_config("npo").settings["beta"]
    nested = load_config(
        config | {"methods": [{"method": "npo", "sweep": {"settings.beta": [beta, 2 * beta]}}]}
    )
    assert [_at_default(m) for m in nested.methods] == [True, False]

    (tmp_path / "swept.yaml").write_text(yaml.safe_dump(swept))
    env = {**os.environ, "UNPACT_CACHE": str(tmp_path / "home")}
    cmd = [
        sys.executable,
        "-m",
        "unpact",
        "run",
        str(tmp_path / "swept.yaml"),
        "--out",
        str(tmp_path / "out"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    labels = list(results["methods"])
    assert labels == ["ga[lr=0.001]", f"ga[lr={default_lr}]"]
    assert set(results["attribution_checks"]) == {"original", labels[1]}
    assert f"checking attributions: {labels[1]}" in res.stderr
    assert f"checking attributions: {labels[0]}" not in res.stderr
    assert f"unlearning: {labels[0]}" in res.stderr
    assert all(label in res.stdout for label in labels)


def test_a_run_evaluates_in_the_dtype_it_names(setup, finished, tmp_path, monkeypatch):
    """`dtype: bfloat16` (a large model on a GPU): every model the run evaluates, and every
    copy an attack loads, in bfloat16; each stage of the float32 run computed again, the
    unlearning (float32 training) reused; relearning trains in float32."""
    import torch

    import unpact.attacks.relearn as relearn
    import unpact.backends as backends
    import unpact.models as models

    root, config = setup
    loaded: list[str] = []

    def recording(real):
        def load(spec, *, dtype="float32", **kw):
            loaded.append(dtype)
            return real(spec, dtype=dtype, **kw)

        return load

    monkeypatch.setattr(backends, "load_model", recording(backends.load_model))
    monkeypatch.setattr(models, "load_model", recording(models.load_model))
    monkeypatch.setattr(relearn, "load_model", recording(relearn.load_model))
    relearned = []
    real_finetune = relearn.finetune
    monkeypatch.setattr(
        relearn, "finetune", lambda *a: relearned.append(real_finetune(*a)) or relearned[-1]
    )
    attacks = [{"name": "quantize"}, {"name": "relearn", "settings": {"steps": 1, "items": 1}}]
    cfg = config | {"dtype": "bfloat16", "attacks": config["attacks"][:2] + attacks}
    done = run(cfg, tmp_path / "bf16", cache_dir=root / "cache", progress=False)
    assert done.results["dtype"] == "bfloat16"
    assert "evaluated\nin <b>bfloat16</b>" in (tmp_path / "bf16" / "report.html").read_text()
    assert not [c for c in done.computed if c.startswith("unlearn")]
    assert {"evaluating:original (forget)", "attributing:ga"} <= set(done.computed)
    assert "float32" in loaded and "bfloat16" in loaded  # relearning's copy: float32
    assert all(d == "bfloat16" for d in loaded if d != "float32")
    assert loaded.count("float32") == len(relearned) > 0
    assert all(r.model.dtype == torch.bfloat16 for r in relearned)  # judged in bfloat16
    with pytest.raises(UnpactError, match="dtype"):
        load_config(config | {"dtype": "float8"})


def test_a_run_unlearns_on_the_device_it_names(setup, tmp_path, monkeypatch):
    """`device:` is where a run's local models go, unlearning included: accelerate chose a
    GPU for it whenever there was one (`device: cpu` unlearned on the GPU, cuda:1 on cuda:0)."""
    import unpact.unlearn.loop as loop

    _, config = setup
    asked = []
    real = loop.unlearn

    def recording(*args, device="auto", **kwargs):
        asked.append(device)
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(loop, "unlearn", recording)
    cfg = config | {"device": "cpu", "methods": config["methods"][:1], "attacks": []}
    run(cfg, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert asked == ["cpu"]


def test_a_served_model_beside_a_local_one_is_said_to_keep_its_servers_dtype(setup):
    from unpact.run import _evaluated_as

    _, config = setup
    served = {"model": "openai:u@http://127.0.0.1:1/v1", "name": "u"}
    cfg = load_config(config | {"dtype": "bfloat16", "methods": [served]})
    said = _evaluated_as(cfg, cfg.model)
    assert said["dtype"] == "bfloat16" and "(methods.0.model)" in said["dtype_note"]
    assert "dtype_note" not in _evaluated_as(load_config(config | {"dtype": "bfloat16"}), "")


def test_the_figures_step_is_said_and_counted(setup, finished, tmp_path, monkeypatch):
    """The figures and their bootstrap intervals take minutes on a benchmark of thousands
    of items (`benchmarks/figures.py`), after the last stage's line: the log said nothing
    and no bar moved. Now a line, and a bar that advances per interval (it moved per
    method: one step in 68 s on 4,896 records)."""
    import unpact.run as runner
    from unpact.results import interval_count

    root, config = setup
    advanced: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def bar(label, total, enabled=True):
        yield lambda n: advanced.append((label, n))
        advanced.append((f"{label} of {total}", 0))

    monkeypatch.setattr(runner, "progress_bar", bar)
    lines: list[str] = []
    run(config, tmp_path / "out", cache_dir=root / "cache", progress=False, log=lines.append)
    assert "figures: 2 method(s), 1000 bootstrap resamples" in lines  # the default
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    per = len(results["methods"]["ga"]["ci"])
    assert per == interval_count(results["attacks"]) > 10
    assert advanced[: 2 * per] == [("figures", 1)] * 2 * per
    assert advanced[2 * per] == (f"figures of {2 * per}", 0)
    assert "references" not in results  # nothing more (their bar: test_membership_run.py)
    assert advanced[2 * per + 1 :] == []


def test_a_damaged_cached_stage_is_computed_again(setup, finished, tmp_path, caplog):
    """A cached stage that is not JSON lines (edited by hand, damaged on disk) was a
    JSONDecodeError traceback; now it is said and computed again, to the same numbers."""
    import shutil

    root, config = setup
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache, symlinks=True)
    damaged = sorted((cache / "evals").glob("*.jsonl"))  # other tests' among them
    for path in damaged:
        path.write_text(path.read_text(encoding="utf-8")[:30], encoding="utf-8")
    with caplog.at_level("WARNING", logger="unpact"):
        again = run(config, tmp_path / "out", cache_dir=cache, progress=False)
    assert again.computed and all(c.startswith("evaluating:") for c in again.computed)
    assert caplog.text.count("is unreadable") == len(again.computed)
    assert _numbers(again.results) == _numbers(finished[1].results)


def test_stage_keys_are_exact(setup, finished, tmp_path):
    """A stage's key is what it reads: the same config computes nothing; fewer general
    items re-run only the general evaluation (no unlearning, no attribution); one attack's
    new settings re-run only that attack."""
    root, config = setup
    cache = root / "cache"
    assert run(config, tmp_path / "same", cache_dir=cache, progress=False).computed == []
    fewer = config | {"data": config["data"] | {"general_items": 1}}
    done = run(fewer, tmp_path / "general", cache_dir=cache, progress=False).computed
    assert sorted(done) == [
        "evaluating:ga (general)",
        "evaluating:npo (general)",
        "evaluating:original (general)",
    ]
    attacks = [
        {"name": "probab", "settings": {"samples": 2}} if a["name"] == "probab" else a
        for a in config["attacks"]
    ]
    done = run(config | {"attacks": attacks}, tmp_path / "a", cache_dir=cache, progress=False)
    assert sorted(done.computed) == [
        f"attacking:{m} with probab ({n} items)"
        for m, n in (
            ("ga", done.results["methods"]["ga"]["forgotten"]),
            ("npo", done.results["methods"]["npo"]["forgotten"]),
        )
    ]
    # each computed stage's wall time is in results.json; nothing else is
    assert sorted(done.results["stage_seconds"]) == sorted(done.computed)
    assert all(s >= 0 for s in done.results["stage_seconds"].values())
    # every stage read from the cache keeps the time computing it took when it was made
    cached = done.results["stage_seconds_cached"]
    assert not set(cached) & set(done.computed)
    assert {"unlearn:ga", "unlearn:npo", "attributing:original"} <= set(cached)
    assert all(s >= 0 for s in cached.values())
