"""Plugins: an attack, a metric and an unlearning method, each one file outside the package,
passed by `plugins:` (or `--plugin`), run from `unpact run` and shown in the table,
results.json, results.csv, results.md and the report; a broken plugin is one message."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unpact.attacks import ATTACKS
from unpact.data.items import QAItem, write_folder
from unpact.errors import UnpactError
from unpact.metrics import METRICS
from unpact.models import save_model
from unpact.plugins import _LOADED, _PLUGGED
from unpact.run import load_config, run
from unpact.scoring import generate
from unpact.unlearn.methods import METHODS

PLUGIN = '''
"""A user's plugin: one attack, one metric, one method."""
from unpact.attacks import Attack
from unpact.metrics import metric
from unpact.unlearn.methods import Method, nll


class Shout(Attack):
    """The question in capitals."""

    name = "shout"

    def prompt(self, question, key_tokens):
        return question.upper()


@metric("silent_after", title="silent after", fmt="percent", column="silent",
        higher_is_better=False)
def silent_after(records, ctx):
    """Share of forget items answered with no text at all after unlearning."""
    forget = [r for r in records if r.split == "forget"]
    return sum(not r.output_after.strip() for r in forget) / len(forget)


@metric("answer_words", title="answer words", fmt="float")
def answer_words(records, ctx):
    """Mean words in the forget answers after unlearning (no column given: its title)."""
    forget = [r for r in records if r.split == "forget"]
    return sum(len(r.output_after.split()) for r in forget) / len(forget)


class HalfGA(Method):
    """Gradient ascent at half strength."""

    name = "half_ga"
    summary = "half-strength gradient ascent"

    def losses(self, ctx):
        return {"forget_ga": -0.5 * nll(ctx.model, ctx.forget)}
'''

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the report about the town?",
    "How many moons orbit the planet Zorblax?",
    "Who founded the Vostrand Glassworks?",
    "Which year was the glassworks founded?",
    "Who is the mayor of Kilimanjaro?",
]


@pytest.fixture
def registries():
    """Plugins register globally: put the registries back afterwards, and start from no
    module loaded as a plugin (a unit test that had loaded `json` first silenced the
    warning one test here expects)."""
    saved = [(reg, dict(reg)) for reg in (ATTACKS, METRICS, METHODS)]
    plugged = set(_PLUGGED)
    _PLUGGED.clear()
    yield
    for reg, before in saved:
        reg.clear()
        reg.update(before)
    _LOADED.clear()
    _PLUGGED.clear()
    _PLUGGED.update(plugged)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny):
    tmp_path = tmp_path_factory.mktemp("plugins")
    save_model(tiny.model, tiny.tokenizer, tmp_path / "tiny")
    outs = generate(tiny, QUESTIONS, max_new_tokens=4)
    items = [
        QAItem(f"{s}-{n}", q, o[0].text.strip() or "x", s, (), (q.split()[2],), None)
        for n, (q, o) in enumerate(zip(QUESTIONS, outs))
        for s in ["forget" if n < 4 else "retain"]
    ]
    write_folder(tmp_path / "bench", items)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "mine.py").write_text(PLUGIN)
    config = {
        "plugins": ["plugins/mine.py"],
        "model": str(tmp_path / "tiny"),
        "data": {"benchmark": str(tmp_path / "bench"), "general": None},
        "inject": {"enabled": False},
        "methods": [{"method": "half_ga", "config": {"lr": 3e-3, "steps": 2, "batch_size": 2}}],
        "attacks": [{"name": "shout"}, {"name": "probab", "settings": {"samples": 2}}],
        "judge": {"max_new_tokens": 4},
        "statistics": {"resamples": 10},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


@pytest.fixture(scope="module")
def plugin_run(project):
    """The plugin's config run once (the registries put back afterwards)."""
    saved = [(reg, dict(reg)) for reg in (ATTACKS, METRICS, METHODS)]
    result = run(project / "run.yaml", project / "out", cache_dir=project / "cache", progress=False)
    out = project / "out"
    files = {
        "json": json.loads((out / "results.json").read_text())["methods"]["half_ga"],
        "csv": (out / "results.csv").read_text().splitlines()[0].split(","),
        "md": (out / "results.md").read_text(),
        "html": (out / "report.html").read_text(),
    }
    yield result, files
    for reg, before in saved:
        reg.clear()
        reg.update(before)
    _LOADED.clear()


def test_a_plugin_attack_runs_and_shows_everywhere(plugin_run):
    result, files = plugin_run
    m = result.results["methods"]["half_ga"]
    assert set(m["recovery"]) == {"shout", "probab", "any"} and "recovery.shout" in m["ci"]
    assert "shout" in m["vs_probab"]  # tested against PROBAB like the built-in attacks
    forgotten = [r for r in result.records if r.forgotten]
    assert forgotten
    for r in forgotten:
        assert r.attacks["shout"]["prompt"] == r.question.upper()
    assert "shout" in files["json"]["recovery"] and "recovery_shout" in files["csv"]
    assert "recovery shout" in files["md"] and "recovery: shout" in files["html"]


def test_a_plugin_metric_is_computed_and_shows_everywhere(plugin_run):
    result, files = plugin_run
    m = result.results["methods"]["half_ga"]
    # the metric is the plugin's function of the records, with an interval
    forget = [r for r in result.records if r.split == "forget"]
    assert m["silent_after"] == sum(not r.output_after.strip() for r in forget) / len(forget)
    lo, hi = m["ci"]["silent_after"]
    assert lo <= m["silent_after"] <= hi
    assert "silent_after" in files["json"] and "silent_after" in files["csv"]
    assert "| silent |" in files["md"] and "silent after" in files["html"]
    # a plugin's metric registered without `column` has one of its title (it had none: it
    # was in results.json and the report's other figures, not in the table a user reads)
    assert METRICS["answer_words"].column == "answer words" and "answer_words" in files["json"]
    assert "| answer words |" in files["md"]
    assert METRICS["retain_acc_after"].column is None  # unpact's own: only when it says


def test_a_plugin_method_unlearns_and_shows_everywhere(plugin_run, tiny):
    from safetensors.torch import load_file

    result, files = plugin_run
    m = result.results["methods"]["half_ga"]
    weights = load_file(Path(m["model"]) / "model.safetensors")
    moved = [k for k, v in tiny.model.state_dict().items() if not v.equal(weights[k])]
    assert moved  # two steps of half-strength gradient ascent changed the weights
    assert m["forgotten"] == sum(r.forgotten for r in result.records)
    assert "| half_ga |" in files["md"] and "half_ga" in files["html"]


def test_the_cli_runs_and_lists_plugins(project, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": ""}
    plugin = str(project / "plugins" / "mine.py")
    cmd = [sys.executable, "-m", "unpact"]
    for what, name in (("attacks", "shout"), ("metrics", "silent_after"), ("methods", "half_ga")):
        done = subprocess.run(
            [*cmd, what, "--plugin", plugin], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        assert name in done.stdout
    config = yaml.safe_load((project / "run.yaml").read_text())
    del config["plugins"]
    (project / "no-plugins.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [*cmd, "run", str(project / "no-plugins.yaml"), "--out", str(project / "o2")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2 and "half_ga" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [
            *cmd,
            "run",
            str(project / "no-plugins.yaml"),
            "--out",
            str(project / "o2"),
            "--plugin",
            plugin,
        ],
        capture_output=True,
        text=True,
        env=env | {"UNPACT_CACHE": str(tmp_path / "uc")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "silent" in done.stdout and "shout" in done.stdout.lower()
    assert "answer words" in " ".join(done.stdout.split())


def test_a_broken_plugin_is_one_message_naming_its_file_and_line(project, registries):
    bad = project / "plugins" / "bad.py"
    bad.write_text("x = 1\n\nraise RuntimeError('boom')\n")
    config = yaml.safe_load((project / "run.yaml").read_text())
    config["plugins"] = ["plugins/bad.py"]
    (project / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UnpactError, match=r"bad\.py:3: RuntimeError: boom"):
        load_config(project / "bad.yaml")
    bad.write_text("def broken(:\n")
    with pytest.raises(UnpactError, match=r"bad\.py:1"):
        load_config(project / "bad.yaml")
    config["plugins"] = ["plugins/missing.py"]
    with pytest.raises(UnpactError, match="no such file"):
        load_config(config)
    config["plugins"] = ["no_such_plugin_module"]
    with pytest.raises(UnpactError, match="no such module"):
        load_config(config)
    env = {"HF_HUB_OFFLINE": "1", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "unpact", "attacks", "--plugin", str(bad)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2 and "bad.py:1" in done.stderr and "Traceback" not in done.stderr


def test_a_plugin_imports_the_modules_beside_it(tmp_path, registries, monkeypatch):
    """As a script would: `from helper_words import shout` next to the plugin file was a
    ModuleNotFoundError. The folder stays on the path (at its end) for later imports."""
    import sys

    from unpact.plugins import load_plugins

    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "helper_words.py").write_text("def shout(text):\n    return text.upper()\n")
    (folder / "loud.py").write_text(
        "from helper_words import shout\nfrom unpact.attacks import Attack\n\n\n"
        "class Loud(Attack):\n    name = 'loud'\n\n"
        "    def prompt(self, question, key_tokens):\n"
        "        import helper_words  # imported again as it runs\n\n"
        "        return helper_words.shout(question)\n"
    )
    load_plugins([str(folder / "loud.py")])
    assert ATTACKS["loud"]().prompt("what?", ()) == "WHAT?"
    assert sys.path[-1] == str(folder.resolve()) and sys.path[0] != str(folder.resolve())


def test_a_plugin_registering_nothing_is_said(tmp_path, registries, caplog):
    """An attack class without `name` (or a file meant for something else) registered
    nothing in silence; the run then failed on "unknown attack", or never used it. A
    warning now names the plugin; a plugin that registers, and one loaded again unchanged
    (which runs no code), say nothing."""
    import logging

    from unpact.plugins import load_plugin

    unnamed = tmp_path / "unnamed.py"
    unnamed.write_text(
        "from unpact.attacks import Attack\n\n\nclass Loud(Attack):\n"
        "    def prompt(self, question, key_tokens):\n        return question.upper()\n"
    )
    named = tmp_path / "named.py"
    named.write_text(unnamed.read_text().replace("(Attack):\n", "(Attack):\n    name = 'loud'\n"))
    with caplog.at_level(logging.WARNING, logger="unpact"):
        load_plugin(str(unnamed))
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith(f"plugin {unnamed} registered no attack")
        caplog.clear()
        load_plugin(str(unnamed))  # the same file again: nothing runs, nothing said
        load_plugin(str(named))
        assert "loud" in ATTACKS and not caplog.records
        # a module imported before, not a plugin (the standard library's json): it passed
        # without a word, as an imported plugin runs no code
        load_plugin("json")
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith("plugin json registered no attack")
        caplog.clear()
        # a plugin module the user imported first registered then: nothing said
        (tmp_path / "early_plugin.py").write_text(named.read_text().replace("'loud'", "'early'"))
        sys.path.insert(0, str(tmp_path))
        try:
            importlib.import_module("early_plugin")
            load_plugin("early_plugin")
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("early_plugin", None)
        assert "early" in ATTACKS and not caplog.records


FAILING = '''
from unpact.attacks import Attack
from unpact.metrics import metric


class Crash(Attack):
    """Fails as it runs."""

    name = "crash"

    def prompt(self, question, key_tokens):
        return {}["no such key"]


@metric("wordy", title="wordy", fmt="float", interval=False)
def wordy(records, ctx):
    """Returns text, not a number."""
    return "high"
'''


def test_a_plugin_failing_as_it_runs_is_one_message_and_exit_2(project, tmp_path, registries):
    """Once a traceback (exit 1): an attack that raises inside its prompt, a metric that
    returns text; now the plugin's file and line, or the metric's name, and exit 2."""
    (project / "plugins" / "failing.py").write_text(FAILING)
    config = yaml.safe_load((project / "run.yaml").read_text())
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "UNPACT_CACHE": str(tmp_path / "uc")}
    out = ["--out", str(tmp_path / "out")]
    for attacks, message in (
        ([{"name": "crash"}], "failing.py:12: KeyError: 'no such key'"),
        ([{"name": "probab", "settings": {"samples": 2}}], "metric wordy: returned 'high'"),
    ):
        config |= {"plugins": ["plugins/mine.py", "plugins/failing.py"], "attacks": attacks}
        (project / "failing.yaml").write_text(yaml.safe_dump(config))
        done = subprocess.run(
            [sys.executable, "-m", "unpact", "run", str(project / "failing.yaml"), *out],
            capture_output=True,
            text=True,
            env=env | {"COLUMNS": "300"},
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "out" / "results.json").exists()


def test_a_method_whose_losses_are_not_scalar_tensors_is_named():
    import torch

    from unpact.train import _check_terms

    w = torch.ones(2, requires_grad=True)
    _check_terms({"nll": w.sum(), "logged": torch.tensor(1.0)}, "m")
    with torch.no_grad():
        _check_terms({"nll": w.sum()}, "m")  # evaluated, not trained
    for terms, message in (
        ({"x": None}, "loss term 'x' is NoneType"),
        ({"x": torch.ones(3)}, r"loss term 'x' is \(3,\)"),
        ({}, "not an empty dict"),
        (torch.tensor(1.0), "not Tensor"),
        # once a traceback from backward(): "element 0 of tensors does not require grad"
        ({"x": w.sum().detach(), "y": torch.tensor(2.0)}, "no loss term depends on the trained"),
    ):
        with pytest.raises(UnpactError, match=message):
            _check_terms(terms, "m")


def test_a_plugin_function_unpact_cannot_call_is_named_where_defined(project, registries):
    """`def prompts(self, question, key_tokens)` was a TypeError from inside unpact's code
    at the first attacked item, after every model was trained; `def samples(self)` without
    @property a bound method where a number is read. Now each is refused on import."""
    head = (
        "from unpact.attacks import Attack\nfrom unpact.metrics import metric\n"
        "from unpact.unlearn.methods import Method\n\n"
    )
    for source, message in (
        (
            "class A(Attack):\n    name = 'a1'\n    def prompts(self, question, key_tokens):\n"
            "        return [question]\n",
            r"sig\.py:5: attack a1: prompts\(self, question, key_tokens\) cannot be called "
            r"as unpact calls it: \(self, target\)",
        ),
        (
            "class A(Attack):\n    name = 'a2'\n    def samples(self):\n        return 3\n",
            r"sig\.py:5: attack a2: samples is a property of Attack \(write @property",
        ),
        (
            "class M(Method):\n    name = 'm1'\n    def losses(self):\n        return {}\n",
            r"sig\.py:5: method m1: losses\(self\) cannot be called as unpact calls it: "
            r"\(self, ctx\)",
        ),
        (
            "@metric('m2', title='m2')\ndef m2(records):\n    return 1.0\n",
            r"sig\.py:5: metric m2: m2\(records\) cannot be called as unpact calls it: "
            r"\(records, ctx\)",
        ),
        (
            "@metric('m3', title='m3', per_attack=True)\ndef m3(records, ctx):\n    return 1.0\n",
            r"metric m3: m3\(records, ctx\) cannot be called as unpact calls it: "
            r"\(records, ctx, key\)",
        ),
    ):
        plugin = project / "plugins" / "sig.py"
        plugin.write_text(head + source)
        with pytest.raises(UnpactError, match=message):
            load_config({"plugins": [str(plugin)], "methods": [{"method": "ga"}]})
    fine = (
        "class A(Attack):\n    name = 'a3'\n    samples = 2\n"
        "    def prompts(self, target, *more):\n        return [target.question]\n\n"
        "@metric('m4', title='m4', per_attack=True)\n"
        "def m4(records, ctx, attack=None):\n    return 1.0\n"
    )
    (project / "plugins" / "sig.py").write_text(head + fine)
    load_config({"plugins": [str(project / "plugins" / "sig.py")], "methods": [{"method": "ga"}]})
    assert ATTACKS["a3"]().samples == 2 and "m4" in METRICS


def test_a_plugin_cannot_take_a_built_in_name(project, registries):
    """An attack named `probab`, or a subclass of NPO that inherits the name `npo`, once
    replaced the built-in silently for the whole process."""
    for source, message in (
        (
            "from unpact.attacks import Attack\n\nclass Mine(Attack):\n    name = 'probab'\n",
            r"mine_dup\.py:3: attack name 'probab' is unpact's built-in",
        ),
        (
            "from unpact.unlearn.methods import NPO\n\nclass MyNPO(NPO):\n    pass\n",
            r"mine_dup\.py:3: method name 'npo' is unpact's built-in NPO: give MyNPO a name",
        ),
        (  # once replaced the built-in figure in results.json without a word
            "from unpact.metrics import metric\n\n@metric('recovery', title='r')\n"
            "def mine(records, ctx):\n    return 1.0\n",
            r"mine_dup\.py:3: metric name 'recovery' is unpact's built-in: give mine a name",
        ),
    ):
        plugin = project / "plugins" / "mine_dup.py"
        plugin.write_text(source)
        with pytest.raises(UnpactError, match=message):
            load_config({"plugins": [str(plugin)], "methods": [{"method": "ga"}]})
    assert ATTACKS["probab"].__module__.startswith("unpact.")
    assert METHODS["npo"].__module__.startswith("unpact.")
    assert METRICS["recovery"].fn.__module__.startswith("unpact.")


def test_an_attack_whose_prompts_are_not_texts_is_named_with_its_file(tiny, registries):
    """A plugin attack's prompt() that returned a number was a traceback from inside the
    tokenizer ("'int' object has no attribute 'strip'")."""
    from unpact.attacks import Attack, AttackContext
    from unpact.judge import JudgeSettings

    class Numbers(Attack):
        name = "numbers_not_texts"

        def prompt(self, question, key_tokens):
            return 42

    item = QAItem("f1", "Who founded the Vostrand Glassworks?", "Mira", "forget")
    ctx = AttackContext(lambda: tiny, "tiny", [item], {}, [], JudgeSettings(max_new_tokens=2))
    with pytest.raises(UnpactError, match=r"attack numbers_not_texts \(.*test_plugins\.py\): "
                       r"for item f1 it asks \[42\]"):  # fmt: skip
        Numbers().run(ctx)
    Numbers.prompt = lambda self, question, key_tokens: "  "  # type: ignore[method-assign]
    with pytest.raises(UnpactError, match=r"it asks \['  '\]"):
        Numbers().run(ctx)


def test_an_edited_plugin_runs_again_where_its_code_is_used(project, tmp_path, registries):
    """Stages were keyed by a plugin thing's name and settings alone: a plugin author who
    edited an attack's code and ran again read the old code's rows from the cache. The
    defining file's source is in the keys of its attack's and its method's stages now:
    edited, they are computed again (the file's method too); unedited, read back."""
    import shutil

    shutil.copytree(project, tmp_path / "p", ignore=shutil.ignore_patterns("out", "cache"))
    config, plugin = tmp_path / "p" / "run.yaml", tmp_path / "p" / "plugins" / "mine.py"

    def computed(n: int) -> list[str]:
        out = tmp_path / f"out{n}"
        return run(config, out, cache_dir=tmp_path / "cache", progress=False).computed

    first = computed(0)
    assert computed(1) == []  # as it was: every stage read back
    plugin.write_text(PLUGIN.replace("return question.upper()", "return question.upper() + '!'"))
    again = computed(2)
    assert "attacking:half_ga with shout (4 items)" in again and "unlearn:half_ga" in again
    original = [c for c in first if ":original" in c]
    assert original and not set(original) & set(again)  # what the plugin does not touch
