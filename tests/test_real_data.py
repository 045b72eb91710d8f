"""Readers of the real benchmarks' own layouts, on small fixture files in each schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from unpact.data.real import read_muse, read_tofu, read_wmdp
from unpact.errors import UnpactError

FIXTURES = Path(__file__).parent / "fixtures"


def test_muse_knowmem_and_raw():
    bench = read_muse(FIXTURES / "muse", corpus="news")
    assert bench.counts() == {"forget": 2, "retain": 1}
    first = bench.split("forget")[0]
    assert first.question.startswith("Which river") and first.answer == "the Ollen"
    assert [d.split for d in bench.documents] == ["forget", "forget", "retain"]
    assert bench.documents[0].text.startswith("The Harrowgate ferry")


def test_tofu_forget_retain_and_general():
    bench = read_tofu(FIXTURES / "tofu", forget="forget01")
    assert bench.counts() == {"forget": 2, "retain": 1, "general": 1}
    assert bench.split("general")[0].answer == "Paris"
    with pytest.raises(UnpactError, match=r"forget05\.json is missing"):
        read_tofu(FIXTURES / "tofu", forget="forget05")
    with pytest.raises(UnpactError, match="unknown TOFU forget set"):
        read_tofu(FIXTURES / "tofu", forget="forget02")


def test_wmdp_answer_index_becomes_text():
    bench = read_wmdp(FIXTURES / "wmdp" / "wmdp-bio.jsonl")
    assert [i.answer for i in bench.items] == ["gamma", "red"]
    assert all(i.is_mcq and i.answer in i.choices for i in bench.items)


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
