"""The Python API's `audit(...)` checks its options as the CLI parses them: a typo or a
value of the wrong type was a TypeError from inside unpact (`max_new_tokens="x"`: "'<' not
supported"), or silently another thing (`attacks="quantize"` was read letter by letter:
"unknown attack 'q'"; `plugins="mine.py"` as the module 'm')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unpact.errors import UnpactError
from unpact.run.audit import audit, audit_config, checked_options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"presets": "gpu"}, r"^audit: presets: unknown option \(options: reference, base, "),
        ({"max_new_tokens": "x"}, r"^audit: max_new_tokens: Input should be a valid integer"),
        ({"max_new_tokens": 2.5}, r"^audit: max_new_tokens: .*fractional part"),
        ({"device": 3}, r"^audit: device: Input should be a valid string"),
        ({"attacks": 5}, r"^audit: attacks: Input should be a valid list"),
    ],
)
def test_a_wrong_option_is_one_message_naming_it(options, message, tmp_path):
    with pytest.raises(UnpactError, match=message):  # before any model is looked at
        audit("no-such-model", "no-such-model", "news", tmp_path / "out", **options)


def test_text_and_paths_are_taken_as_the_cli_takes_them():
    given = {
        "attacks": "quantize, probab",
        "plugins": Path("mine.py"),
        "reference": Path("/models/ref"),
        "max_new_tokens": 5,
    }
    assert checked_options(given) == {
        "attacks": ["quantize", "probab"],
        "plugins": ["mine.py"],
        "reference": "/models/ref",
        "max_new_tokens": 5,
    }
    assert checked_options({"attacks": ("logit_lens",)})["attacks"] == ["logit_lens"]
    numpy_number = checked_options({"max_new_tokens": np.int64(5)})["max_new_tokens"]
    assert type(numpy_number) is int and numpy_number == 5
    # one name given as text is that attack, not its letters
    config, _ = audit_config("a", "b", "news", **checked_options({"attacks": "logit_lens"}))
    assert [a["name"] for a in config["attacks"]] == ["logit_lens"]
    with pytest.raises(UnpactError, match="unknown attack 'nosuch'"):
        audit_config("a", "b", "news", **checked_options({"attacks": "nosuch"}))
    # an attack the gpu preset labels, asked of the laptop one: with the gpu's settings
    asked = checked_options({"attacks": "quantize_fp4,quantize_8bit,probe"})
    config, _ = audit_config("a", "b", "news", **asked)
    assert [(a["name"], a.get("label"), a.get("settings")) for a in config["attacks"]] == [
        ("probe", None, None),
        ("quantize", "quantize_fp4", {"algorithm": "fp4"}),
        ("quantize", "quantize_8bit", {"bits": 8}),
    ]
    for none in ([], "", " , "):  # an audit of no attack ran, said nowhere (the CLI refused it)
        with pytest.raises(UnpactError, match=r"^--attacks: give at least one attack name$"):
            audit_config("a", "b", "news", **checked_options({"attacks": none}))


def test_options_come_back_as_validated_and_general_none_as_the_cli_says_it():
    """pydantic accepted max_new_tokens="8" (lax mode) but the text itself went on, and
    failed inside ("'<' not supported between instances of 'str' and 'int'"); and
    `general="none"`, as `--general none` says it, was looked for as a benchmark."""
    assert checked_options({"max_new_tokens": "8"}) == {"max_new_tokens": 8}
    assert checked_options({"trust_remote_code": "true"}) == {"trust_remote_code": True}
    config, _ = audit_config("a", "b", "news", **checked_options({"max_new_tokens": "8"}))
    assert config["judge"]["max_new_tokens"] == 8
    config, skipped = audit_config("a", "b", "news", general="none")
    assert config["data"]["general"] is None
    assert "--general none" in skipped["attack.relearn_unrelated"]


def test_audit_config_takes_paths_where_it_takes_text(tmp_path):
    """`audit_config(Path(...), ...)` was an AttributeError ('PosixPath' object has no
    attribute 'startswith'), where `audit` and the run config took paths: the same config
    as the same paths given as text."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "mine.py").write_text("")
    paths = {"reference": tmp_path / "ref", "base": tmp_path / "base", "general": None}
    paths |= {"chat_template": template, "plugins": [tmp_path / "mine.py"]}
    texts = {k: v if v is None else [str(p) for p in v] if isinstance(v, list) else str(v)
             for k, v in paths.items()}  # fmt: skip
    given = audit_config(tmp_path / "a", tmp_path / "b", tmp_path / "bench", **paths)
    assert given == audit_config(str(tmp_path / "a"), str(tmp_path / "b"),
                                 str(tmp_path / "bench"), **texts)  # fmt: skip
    assert given[0]["model"] == str(tmp_path / "a")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((3, "default", "news", "out"), r"^original: a model spec is a string or a path"),
        (("default", None, "news", "out"), r"^unlearned: a model spec .*, not NoneType None"),
        (("default", "default", "news", None), r"^out: give a path"),
    ],
)
def test_an_argument_of_the_wrong_type_names_itself(arguments, message, tmp_path):
    """`audit(3, ...)` was "'int' object has no attribute 'startswith'" from inside, and
    `out=None` was found only after the checks had loaded the models."""
    with pytest.raises(TypeError, match=message):
        audit(*arguments)
    with pytest.raises(TypeError, match=r"^cache_dir: give a path"):
        audit("no-such-model", "no-such-model", "news", tmp_path / "o", cache_dir=3)


def test_a_file_under_the_home_folder_is_read_where_a_file_goes(tmp_path, monkeypatch):
    """`--chat-template ~/t.jinja` and `--judge-prompt ~/p.txt` as a config or a quoted
    argument gives them (the shell expands `~` only when unquoted) were 'No such file or
    directory', where a model spec and a benchmark folder take `~`."""
    from unpact.models import read_chat_template
    from unpact.run.audit import _judge_prompt

    monkeypatch.setenv("HOME", str(tmp_path))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert read_chat_template("~/t.jinja") == (template, str(tmp_path / "t.jinja"))
    prompt = "Does {output} give {answer} to {question}? Say yes or no."
    (tmp_path / "p.txt").write_text(prompt)
    assert _judge_prompt("~/p.txt") == prompt


def _config_only(folder: Path, width: int) -> str:
    """A model folder holding only its config.json (what the audit's checks read)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(folder)
    return str(folder)


def test_a_model_of_another_width_leaves_ablate_direction_out_and_says_why(tmp_path):
    """An unlearned model (or a reference) whose residual stream is not the original's
    shape has no direction between them: the run refused the whole audit for it, in its
    config's words ("attacks.3 (ablate_direction): methods.0 (unlearned) ..."). The audit
    leaves the attack out, names the model by its option, and runs the rest."""
    original, narrow = _config_only(tmp_path / "o", 64), _config_only(tmp_path / "n", 32)
    same, wide = _config_only(tmp_path / "s", 64), _config_only(tmp_path / "w", 128)
    config, skipped = audit_config(original, narrow, "news", reference=same)
    assert "ablate_direction" not in [a["name"] for a in config["attacks"]]
    assert "logit_lens" in [a["name"] for a in config["attacks"]]  # its own layers: kept
    assert skipped["attack.ablate_direction"] == (
        f"--unlearned {narrow}'s residual stream (2 layers of 32 features) is not "
        "--original's (2 layers of 64 features): no direction between them (is it a "
        "fine-tune of the original?)"
    )
    config, skipped = audit_config(original, same, "news", reference=wide)
    assert skipped["attack.ablate_direction"].startswith(f"--reference {wide}'s residual stream")
    config, skipped = audit_config(original, same, "news", reference=same)
    assert "ablate_direction" in [a["name"] for a in config["attacks"]] and not skipped


@pytest.fixture
def registry():
    from unpact.attacks import ATTACKS

    before = dict(ATTACKS)
    yield
    ATTACKS.clear()
    ATTACKS.update(before)


def test_an_attack_reading_a_split_the_benchmark_lacks_is_left_out(tmp_path, registry):
    """A plugin's attack that reads the retain items, on a benchmark with none: the run
    refused the audit as "attacks.0: retain_reader reads retain items ... (change its
    settings, or leave it out)", settings an audit cannot change."""
    from unpact.attacks.prompts import KeywordOnly
    from unpact.data.items import QAItem, write_folder

    class RetainReader(KeywordOnly):
        name = "retain_reader"

        @property
        def needs_splits(self) -> frozenset[str]:
            return frozenset({"retain"})

    write_folder(tmp_path / "b", [QAItem("f", "Who?", "Ada", "forget")])
    config, skipped = audit_config("a", "b", str(tmp_path / "b"), attacks=["retain_reader"])
    assert config["attacks"] == []
    why = skipped["attack.retain_reader"]
    assert why == f"benchmark {tmp_path / 'b'} has no retain items, which it reads"
    config, skipped = audit_config("a", "b", "news", attacks=["retain_reader"])
    assert [a["name"] for a in config["attacks"]] == ["retain_reader"] and not skipped


@pytest.mark.parametrize(
    ("said", "meant"),
    [
        ("attacks.7 (noise): layer 9 of 2", "attack noise (--attacks): layer 9 of 2"),
        ("attacks.0: noise reads retain items", "--attacks: noise reads retain items"),
        ("methods.0 (unlearned) /m has another tokenizer", "--unlearned /m has another tokenizer"),
        ("membership.reference /r and membership.base /b", "--reference /r and --base /b"),
        ("note: membership.reference (`unpact audit`: --reference) /r", None),
        ("my_attacks.7 (x) and reattacks.3: stay", None),
        ("config: data.general: no benchmark '/x'", "--general: no benchmark '/x'"),
        ("config: data.benchmark: no forget items", "--benchmark: no forget items"),
        ("data.general (g) has items with the ids", "--general (g) has items with the ids"),
        ("note: ... set data.general to the benchmark", None),
        ("config: remote.concurrency: Input should be", "--concurrency: Input should be"),
    ],
)
def test_a_run_s_message_is_said_in_the_audit_s_options(said, meant):
    from unpact.run.audit import in_options

    assert in_options(said) == (said if meant is None else meant)


@pytest.mark.parametrize("named", ["probab", "relearn", "quantize_8bit"])
def test_an_attack_named_twice_runs_once(named):
    # one of the preset's was taken once; another (registered, or the gpu preset's label)
    # was listed twice and refused as "config: attacks.1.label: ... is listed twice"
    config, _ = audit_config("a", "b", "news", attacks=[named, "quantize", named])
    names = [a.get("label") or a["name"] for a in config["attacks"]]
    assert sorted(names) == sorted({named, "quantize"})
    twice, _ = audit_config("a", "b", "news", attacks=[named, "quantize"])
    assert twice == config


@pytest.mark.parametrize("device", ["tpu", "CPU", "cuda:x"])
def test_an_unknown_device_is_said_as_the_option(device, tmp_path):
    # it was "config: device: unknown device ...", to a user who wrote no config, once
    # the models were found (and a model not found was said first)
    with pytest.raises(UnpactError, match=rf"^--device: unknown device '{device}'; use cpu"):
        audit("no-such-model", "no-such-model", "news", tmp_path / "out", device=device)


def test_concurrency_is_the_requests_in_flight_to_a_served_model():
    config, _ = audit_config("a", "b", "news", concurrency=4)
    assert config["remote"] == {"concurrency": 4}
    assert audit_config("a", "b", "news")[0]["remote"] == {"concurrency": 16}


def test_a_served_model_s_queue_is_waited_for():
    """An attempt's wait includes the server's queue: one that answers a request at a time
    (`unpact serve`) served the demo's NPO+KL model at 2.5 s a 32-token answer, so the last
    of the 16 in flight waited 40 s, past the 30 s timeout this was: an audit of a served
    pair gave up (docs/remote.md)."""
    from unpact.judge import LLMJudgeSettings
    from unpact.remote import RemoteSettings

    s = RemoteSettings()
    assert s.timeout > s.concurrency * 2.5 and s.deadline > s.timeout
    judge = LLMJudgeSettings(base_url="http://127.0.0.1:1/v1", model="j")  # the same way
    assert judge.timeout > judge.concurrency * 2.5
