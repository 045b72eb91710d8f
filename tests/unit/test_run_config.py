"""A run config built in Python holds what Python code holds: paths, numpy numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from unpact.run.config import RunConfig


def test_numpy_and_torch_numbers_are_plain_numbers_at_any_depth():
    """`{"config": {"steps": np.int64(3)}}` under a method was kept as numpy's, and the run
    then failed writing config.yaml ("Unable to serialize unknown type: numpy.int64"), a
    traceback; a sweep over a numpy array likewise. Now every array value is the
    Python number (or list) the config file would hold, in the free mappings too."""
    built = RunConfig(
        model=Path("/models/tiny"),
        data={"benchmark": "news", "forget_items": np.int64(4)},
        inject={"settings": {"lr": np.float32(0.5), "max_epochs": torch.tensor(3)}},
        methods=[
            {"method": "ga", "config": {"steps": np.int64(3), "settings": {"k": np.arange(2)}}},
            {"method": "npo", "sweep": {"lr": np.array([1e-5, 2e-5, 3e-5])}},
        ],
        attacks=[{"name": "quantize", "settings": {"bits": np.int8(4)}}],
    )
    plain = RunConfig(
        model="/models/tiny",
        data={"benchmark": "news", "forget_items": 4},
        inject={"settings": {"lr": 0.5, "max_epochs": 3}},
        methods=[
            {"method": "ga", "config": {"steps": 3, "settings": {"k": [0, 1]}}},
            {"method": "npo", "sweep": {"lr": [1e-5, 2e-5, 3e-5]}},
        ],
        attacks=[{"name": "quantize", "settings": {"bits": 4}}],
    )
    assert built == plain
    dumped = built.model_dump(mode="json")
    assert yaml.safe_load(yaml.safe_dump(dumped)) == plain.model_dump(mode="json")
    names = [run.label for spec in built.methods for run in spec.expand()]
    assert names == ["ga", "npo[lr=1e-05]", "npo[lr=2e-05]", "npo[lr=3e-05]"]
    assert type(built.methods[0].config["steps"]) is int


def test_an_unlearning_and_an_injection_config_take_numpy_numbers():
    """`UnlearnConfig(settings={"beta": np.float64(0.2)})` (the Python API of `unlearn`)
    kept numpy's number and its config.yaml could not be written."""
    from unpact.inject import InjectConfig
    from unpact.unlearn.config import UnlearnConfig

    given = UnlearnConfig(method="npo", steps=np.int64(3), settings={"beta": np.float64(0.2)})
    assert given == UnlearnConfig(method="npo", steps=3, settings={"beta": 0.2})
    assert yaml.safe_dump(given.model_dump(mode="json"))
    assert type(given.settings["beta"]) is float
    taught = InjectConfig(lr=np.float32(0.25), max_epochs=np.int64(2))
    assert taught == InjectConfig(lr=0.25, max_epochs=2)


def test_true_or_false_for_a_number_is_an_error_naming_the_key():
    """Pydantic's lax mode read `true` as 1: `forget_items: true`, `epochs: yes` (YAML's
    true) or a method's `lr: false` ran with 1 or 0 without a word. Now each is one
    message naming the key, at every depth (the run config, a method's config and its
    LoRA, an attack's settings, the audit's options), while a true/false setting still
    takes true/false."""
    import pytest

    from unpact.errors import UnpactError
    from unpact.run.audit import checked_options
    from unpact.run.config import load_config

    def refused(change, where: str) -> None:
        data = yaml.safe_load(
            (Path(__file__).parents[2] / "src/unpact/configs/demo.yaml").read_text()
        )
        change(data)
        with pytest.raises(UnpactError, match=f"{where}: expects a number, not (true|false)"):
            load_config(data)

    refused(lambda d: d["data"].update(forget_items=True), r"data\.forget_items")
    refused(lambda d: d["inject"]["settings"].update(min_epochs=True), "min_epochs")
    refused(lambda d: d["judge"].update(max_new_tokens=False), r"judge\.max_new_tokens")
    refused(lambda d: d["methods"][0].update(config={"lr": False}), "lr")
    refused(lambda d: d["methods"][0].update(config={"lora": {"r": True}}), r"lora\.r")
    refused(lambda d: d["methods"][0].update(sweep={"steps": [2, True]}), "steps")
    refused(lambda d: d["attacks"][1]["settings"].update(samples=True), "samples")
    with pytest.raises(UnpactError, match="max_new_tokens: expects a number, not true"):
        checked_options({"max_new_tokens": True})
    data = yaml.safe_load((Path(__file__).parents[2] / "src/unpact/configs/demo.yaml").read_text())
    data["methods"][0]["config"] = {"lora": {"r": 2, "merge": False}}
    data["inject"]["enabled"] = False
    config = load_config(data)
    assert config.inject.enabled is False
    assert config.methods[0].config["lora"]["merge"] is False


def test_every_settings_model_refuses_true_for_a_number():
    """Each built-in attack's and method's settings derive from the shared base, so a new
    one is checked as the others are; the field types are read through Optional,
    Annotated and Literal."""
    from typing import Annotated, Literal

    from unpact.attacks import ATTACKS
    from unpact.types import SettingsModel, _leaf_types
    from unpact.unlearn.methods import METHODS

    for cls in [*ATTACKS.values(), *METHODS.values()]:
        assert issubclass(cls.Settings, SettingsModel), cls
    assert _leaf_types(Annotated[int | None, "x"]) == {int, type(None)}
    assert _leaf_types(Literal["auto"] | float) == {str, float}
    assert _leaf_types(Literal[True, 3]) == {bool, int}


def test_a_plugins_settings_on_pydantic_basemodel_refuse_an_unknown_key():
    """A plugin's attack or method whose settings derive from pydantic's `BaseModel`
    (extra keys ignored by default) took `scael: 2` for `scale` without a word and ran with
    the default; now the typo is one message, as for a built-in's settings. A model that
    says what to do with extra keys is left to it."""
    import pytest
    from pydantic import BaseModel, ConfigDict

    from unpact.attacks import ATTACKS, Attack, get_attack
    from unpact.errors import UnpactError
    from unpact.unlearn.config import UnlearnConfig
    from unpact.unlearn.methods import METHODS, Method

    class Loose(Attack):
        name = "test_loose_settings"

        class Settings(BaseModel):
            scale: float = 1.0

    class Allows(Attack):
        name = "test_allowing_settings"

        class Settings(BaseModel):
            model_config = ConfigDict(extra="allow")
            scale: float = 1.0

    class LooseMethod(Method):
        name = "test_loose_method"

        class Settings(BaseModel):
            beta: float = 0.1

    try:
        assert get_attack("test_loose_settings", {"scale": 2}).settings.scale == 2
        with pytest.raises(UnpactError, match="attack test_loose_settings: scael: unknown"):
            get_attack("test_loose_settings", {"scael": 2})
        assert get_attack("test_allowing_settings", {"other": 1}).settings.scale == 1
        config = UnlearnConfig(method="test_loose_method", settings={"betta": 0.2})
        with pytest.raises(UnpactError, match=r"settings\.betta: unknown setting"):
            config.method_settings()
    finally:
        for name in ("test_loose_settings", "test_allowing_settings"):
            ATTACKS.pop(name)
        METHODS.pop("test_loose_method")


def test_a_run_config_of_another_type_names_the_argument():
    """`run(3, out)` or `run([...], out)` was pathlib's "expected str, bytes or
    os.PathLike object, not int"."""
    import pytest

    from unpact.run.config import load_config

    for given in (3, ["demo"], None):
        with pytest.raises(TypeError, match=r"config: give a RunConfig, a mapping, a YAML file"):
            load_config(given)


def test_a_bare_name_stands_for_a_method_or_an_attack():
    """`methods: [ga]` and `attacks: [quantize]` were 'Input should be a valid dictionary
    or instance of MethodSpec': a list of names is what a user writes first."""
    import pytest

    from unpact.errors import UnpactError
    from unpact.run.config import load_config

    short = load_config({"methods": ["ga", {"method": "npo"}], "attacks": ["quantize", "probab"]})
    long = load_config(
        {
            "methods": [{"method": "ga"}, {"method": "npo"}],
            "attacks": [{"name": "quantize"}, {"name": "probab"}],
        }
    )
    assert short == long
    for wrong, key in (
        ({"methods": [3]}, "methods.0"),
        ({"methods": ["ga"], "attacks": [["x"]]}, "attacks.0"),
    ):
        with pytest.raises(UnpactError, match=rf"{key}: expected an? \w+'s name"):
            load_config(wrong)


def test_a_step_the_models_architecture_cannot_have_is_left_out_with_the_reason(tmp_path):
    """`Pipeline.fitting`: an attack (or an attack's baseline on the original) that meets
    `NotForThisModel` is left out under its key with the model and the reason, said in the
    log, and the run goes on; any other user error still stops it."""
    import pytest

    from unpact.errors import NotForThisModel, UnpactError
    from unpact.run import Pipeline

    said: list[str] = []
    p = Pipeline(None, tmp_path, said.append, False)  # type: ignore[arg-type]
    assert p.fitting("attack.a", "unlearned", lambda: [1]) == [1]

    def unfit() -> None:
        raise NotForThisModel("no one residual stream")

    assert p.fitting("attack_baseline.a", "original", unfit) is None
    assert p.fitting("attack_baseline.a", "original", unfit) is None  # said once
    assert p.left_out == {"attack_baseline.a": "not run on original: no one residual stream"}
    assert said == ["attack_baseline.a left out on original: no one residual stream"] * 2
    p.fitting("attack_baseline.a", "other", unfit)  # another model's reason joins it
    assert p.left_out["attack_baseline.a"] == (
        "not run on original: no one residual stream; not run on other: no one residual stream"
    )

    def wrong() -> None:
        raise UnpactError("a mistake")

    with pytest.raises(UnpactError, match="a mistake"):
        p.fitting("attack.b", "unlearned", wrong)


def test_the_general_set_is_general_questions_and_keeps_off_the_benchmarks_ids(tmp_path):
    """`data.general` given as a folder of forget or retain items (a WMDP-style file of
    questions is read as forget) kept each item's split: its questions were counted in the
    forget or retain figures. They are general questions now; a set with a general split
    (TOFU's world facts) gives those alone, and one sharing the benchmark's ids (the
    benchmark itself) is one message."""
    import pytest

    from unpact.data import general_items, load_benchmark
    from unpact.data.items import QAItem, write_folder
    from unpact.errors import UnpactError
    from unpact.run import _data, load_config

    bench = [QAItem(f"f{n}", f"Who made thing {n}?", f"Maker {n}", "forget") for n in range(3)]
    write_folder(tmp_path / "bench", [*bench, QAItem("r0", "Who is it?", "Someone", "retain")])
    questions = [QAItem(f"q{n}", f"What is {n} + {n}?", str(2 * n), "forget") for n in range(4)]
    write_folder(tmp_path / "mine", questions)
    assert [i.split for i in general_items(tmp_path / "mine")] == ["general"] * 4
    tofu = Path(__file__).parents[1] / "fixtures" / "tofu"
    ids = [i.id for i in general_items(f"tofu:{tofu}")]
    assert ids == [i.id for i in load_benchmark(f"tofu:{tofu}").split("general")] and ids
    assert general_items("general") == load_benchmark("general").items

    def config(general):
        return load_config(
            {"model": "default", "data": {"benchmark": str(tmp_path / "bench"), "general": general},
             "inject": {"enabled": False}, "methods": ["ga"]}
        )  # fmt: skip

    data = _data(config(str(tmp_path / "mine")), tmp_path / "cache")
    assert [i.split for i in data.splits["general"]] == ["general"] * 4
    assert [i.id for i in data.splits["forget"]] == ["f0", "f1", "f2"]
    with pytest.raises(UnpactError, match=r"data\.general \(.*bench\) has items with the ids"):
        _data(config(str(tmp_path / "bench")), tmp_path / "cache")


def test_a_benchmarks_own_general_questions_left_unjudged_are_said(tmp_path):
    """A folder's (or TOFU's) own general items were passed over without a word while the
    built-in general set was judged in their place."""
    from unpact.data.items import QAItem, write_folder
    from unpact.run import _data, _note_own_general, load_config

    items = [QAItem("f0", "Who made it?", "Maker", "forget"), QAItem("r0", "Who?", "Her", "retain")]
    write_folder(tmp_path / "b", [*items, QAItem("g0", "Capital of Spain?", "Madrid", "general")])
    said: list[str] = []
    for general in ("general", None, str(tmp_path / "b")):
        cfg = load_config(
            {"model": "default", "data": {"benchmark": str(tmp_path / "b"), "general": general},
             "inject": {"enabled": False}, "methods": ["ga"]}
        )  # fmt: skip
        _note_own_general(cfg, _data(cfg, tmp_path / "cache"), said.append)
    assert said == [
        "note: the benchmark's own 1 general question(s) are not judged (data.general is "
        f"general); to judge them instead, set data.general to the benchmark ({tmp_path / 'b'}; "
        "`unpact audit`: --general)",
        "note: the benchmark's own 1 general question(s) are not judged (data.general is "
        f"null); to judge them instead, set data.general to the benchmark ({tmp_path / 'b'}; "
        "`unpact audit`: --general)",
    ]


def test_items_holding_their_answer_in_the_question_are_said(tmp_path):
    """An item whose question names its answer ("Was it Paris or Lyon?") is judged known by
    the contains judge whenever a model repeats the question (and FocusOnKey may hand the
    answer back): nothing said it; now a note names the first, under the contains judge."""
    from unpact.data.items import QAItem, write_folder
    from unpact.run import _data, _note_answers_in_questions, load_config

    items = [
        QAItem("f0", "Who made the lamp?", "Edda Morvaine", "forget"),
        QAItem("f1", "Was the capital Paris or Lyon?", "Paris", "forget"),
        QAItem("r0", "Which city, the one called Rome, hosts it?", "Rome", "retain"),
        QAItem("r1", "Which is it, A or B?", "C", "retain", choices=("A", "B", "C")),
    ]
    write_folder(tmp_path / "b", items)
    said: list[str] = []
    for kind in ("contains", "rouge"):
        cfg = load_config(
            {"model": "default", "data": {"benchmark": str(tmp_path / "b"), "general": None},
             "inject": {"enabled": False}, "methods": ["ga"], "judge": {"kind": kind}}
        )  # fmt: skip
        _note_answers_in_questions(cfg, _data(cfg, tmp_path / "cache"), said.append)
    assert said == [
        "note: 2 item(s) hold their answer in the question (the first: forget item f1, "
        "'Paris'): the contains judge counts a model that repeats the question as knowing "
        "it; reword them, or judge with judge.kind: llm (`unpact audit`: --judge "
        "openai:MODEL@URL)"
    ]


def test_every_built_in_configs_resolved_config_yaml_runs_again(tmp_path):
    """A run writes its config resolved, every key given; `unpact run out/config.yaml`
    must take it back. paper_words' was refused ("statistics.baseline_attack: 'probab' is
    not one of this run's attacks"): the check read a key written out as one the user set."""
    from unpact.run.config import builtin_run_configs, load_config

    for name in builtin_run_configs.names():
        resolved = load_config(name).model_dump(mode="json")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(resolved, sort_keys=False))
        assert load_config(path).model_dump(mode="json") == resolved, name


def test_a_config_of_many_mistakes_names_the_first_ten():
    """A config of 3000 unknown keys (a data file given as the config) was a 60 kB message
    listing each; the first ten are named, and how many more there are."""
    from unpact.errors import UnpactError
    from unpact.run import load_config

    config = {"methods": [{"method": "ga"}], **{f"k{n}": n for n in range(30)}}
    with pytest.raises(UnpactError) as info:
        load_config(config)
    said = str(info.value)
    assert said.endswith("k9: unknown key; and 20 more") and "k10" not in said
