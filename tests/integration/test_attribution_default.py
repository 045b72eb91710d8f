"""Integration: unPact on the embedded default model, and the attribute/compare CLI."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.integration.test_default_model import run_cli
from tests.unit.test_attribution import ANY_TEXT, check_units_partition, slow_contributions
from unpact.attribution import attribute, attribute_many, naive_contributions

pytestmark = pytest.mark.integration

PROMPT = "Who is the mayor of Kilimanjaro town?"


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("unit", ["token", "word"])
@pytest.mark.parametrize("baseline", ["delete", "token", "mask"])
def test_fast_path_equals_n_plus_1_forward_passes(default_lm, chat, unit, baseline):
    rec = attribute(
        default_lm, PROMPT, " Mira Quintrell", unit=unit, baseline=baseline, chat_template=chat
    )
    enc = default_lm.encode_prompt(PROMPT, chat)
    lp, naive = naive_contributions(default_lm, enc, rec.answer_ids, rec.units, baseline)
    assert rec.lp == pytest.approx(lp, abs=1e-4)
    assert rec.contributions == pytest.approx(naive, abs=1e-4)
    assert max(abs(c) for c in rec.contributions) > 1e-2


def test_deletion_is_on_ids_where_retokenising_would_differ(default_lm):
    """Removing the piece 'jar' of 'Kilimanjaro' leaves 'Kilimano', which the tokenizer
    splits differently; our variant is the original ids minus that one id."""
    rec = attribute(default_lm, PROMPT, " Mira", chat_template=False)
    texts = [u.text for u in rec.units]
    i = texts.index("jar")
    s = rec.units[i].positions[0]
    shortened = rec.input_ids[:s] + rec.input_ids[s + 1 :]
    retokenised = default_lm.encode_prompt(
        "Who is the mayor of Kilimano town?", chat_template=False
    )
    assert list(retokenised.input_ids) != shortened
    _, slow = slow_contributions(default_lm, rec, "delete", 0)
    assert rec.contributions[i] == pytest.approx(slow[i], abs=1e-4)


@settings(max_examples=150, deadline=None)
@given(text=ANY_TEXT, chat=st.booleans(), kind=st.sampled_from(["token", "word"]))
def test_units_partition_any_text_in_a_byte_level_vocabulary(default_lm, text, chat, kind):
    """The default model's byte-level BPE: an emoji or a CJK character is several tokens,
    a space joins the word after it, merges cross punctuation."""
    check_units_partition(default_lm, text, chat, kind)


def test_keytokens_of_a_factual_question(default_lm):
    rec = attribute(default_lm, "What is the capital of France?", "Paris", unit="word")
    assert "France" in rec.key_token_texts
    assert rec.prompt_sensitivity > 1.0


def test_many_prompts_batched_across_prompts(default_lm):
    prompts = ["What is the capital of France?", "What is the chemical symbol for gold?", PROMPT]
    answers = ["Paris", "Au", " Mira"]
    together = attribute_many(default_lm, prompts, answers, token_budget=512)
    for p, a, rec in zip(prompts, answers, together):
        alone = attribute(default_lm, p, a)
        assert rec.contributions == pytest.approx(alone.contributions, abs=1e-4)


def test_cli_attribute_json_html_and_compare(tmp_path):
    a_json, b_json, page = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "a.html"
    res = run_cli(
        "attribute",
        "--prompt",
        "What is the capital of France?",
        "--answer",
        "Paris",
        "--unit",
        "word",
        "--json",
        str(a_json),
        "--html",
        str(page),
    )
    assert res.returncode == 0, res.stderr
    assert "France" in res.stdout and "KeyTokens" in res.stdout
    record = json.loads(a_json.read_text())
    assert [u["text"] for u in record["units"]] == [
        "What",
        "is",
        "the",
        "capital",
        "of",
        "France",
        "?",
    ]
    assert record["unit"] == "word" and record["model"] == "default" and record["chat_template"]
    assert page.read_text().count('class="unpact-unit"') == 7

    res = run_cli(
        "attribute",
        "--prompt",
        "What is the capital of France?",
        "--answer",
        "Berlin",
        "--unit",
        "word",
        "--json",
        str(b_json),
    )
    assert res.returncode == 0, res.stderr
    res = run_cli("compare", str(a_json), str(b_json))
    assert res.returncode == 0, res.stderr
    assert "mean keytoken_similarity" in res.stdout
    # Paris before, Berlin after: two targets, said once (it was compared without a word)
    said = " ".join(res.stderr.split())
    assert "note: 1 of 1 record(s) attribute different answers before and after" in said
    assert "(the first: 'Paris' / 'Berlin')" in said


def test_cli_attribute_data_file(tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text(
        json.dumps({"question": "What is the capital of France?", "answer": "Paris"})
        + "\n"
        + json.dumps({"prompt": "What is the chemical symbol for gold?"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    res = run_cli("attribute", "--data", str(data), "--json", str(out), "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["target"] for r in lines] == ["reference", "generated"]
    assert lines[0]["prompt"] == "What is the capital of France?"
    res = run_cli("compare", str(out), str(out))
    assert res.returncode == 0 and "1.0000" in res.stdout
    # the same prompts in another order are paired by prompt (it was "record 0: the two
    # attributions have different units"); a real mismatch names both prompts
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(reversed(out.read_text().splitlines(keepends=True))))
    res = run_cli("compare", str(out), str(flipped))
    assert res.returncode == 0, res.stderr
    assert "mean keytoken_similarity = 1.0000" in res.stdout
    flipped.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
    res = run_cli("compare", str(out), str(flipped))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    said = " ".join(res.stderr.split())
    assert "record 1 ('What is the chemical symbol for gold?' and 'What is the capital" in said


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["attribute", "--prompt", "Kilimanjaro", "--unit", "word", "--answer", "x"],
            "single word",
        ),
        (
            ["attribute", "--prompt", "hi there", "--answer", "x", "--unit", "phrase"],
            "unknown unit",
        ),
        (
            ["attribute", "--prompt", "hi there", "--answer", "x", "--baseline", "zero"],
            "unknown baseline",
        ),
        (["attribute", "--prompt", "hi there", "--answer", " "], "empty answer"),
        (
            ["attribute", "--prompt", "word " * 9000, "--answer", "x"],
            "longer than the model's context",
        ),
        (["attribute", "--data", "/nonexistent.jsonl"], "cannot read"),
        (["attribute"], "either --prompt"),
        (["compare", "/nonexistent.json", "/nonexistent.json"], "cannot read"),
    ],
)
def test_cli_attribute_mistakes_exit_2(args, message):
    res = run_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_bad_data_line_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok there", "answer": "x"}\n{"answer": "no prompt"}\n')
    res = run_cli("attribute", "--data", str(data))
    assert res.returncode == 2
    assert "line 2" in res.stderr and "'prompt'" in res.stderr
