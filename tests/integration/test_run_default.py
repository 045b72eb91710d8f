"""Integration: the runner on the embedded default model, on facts it already knows.

No injection: the forget set is world knowledge the base model answers correctly, pure
gradient ascent takes it away, and the run must show it (forgotten items, attacks run on
them with real prompts, a report)."""

from __future__ import annotations

import json

import pytest

from unpact.data.items import QAItem, write_folder
from unpact.data.sources import load_benchmark
from unpact.run import run

pytestmark = pytest.mark.integration


def test_runner_on_the_default_model(tmp_path):
    general = load_benchmark("general").items
    forget = [
        QAItem(f"f{n}", i.question, i.answer, "forget", i.aliases, i.keywords, None)
        for n, i in enumerate(general[:6])
    ]
    retain = [
        QAItem(f"r{n}", i.question, i.answer, "retain", i.aliases, i.keywords, None)
        for n, i in enumerate(general[6:12])
    ]
    write_folder(tmp_path / "bench", forget + retain)
    config = {
        "data": {"benchmark": str(tmp_path / "bench"), "general_items": 10},
        "inject": {"enabled": False},
        "methods": [{"method": "ga", "config": {"lr": 1e-4, "steps": 4, "batch_size": 2}}],
        "attacks": [
            {"name": "focus_on_key"},
            {"name": "probab", "settings": {"samples": 2}},
        ],
        "judge": {"max_new_tokens": 24},
    }
    result = run(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    m = result.results["methods"]["ga"]
    assert m["forget_acc_before"] == 1.0  # the general set is what the model knows
    assert m["forgotten"] >= 3, m
    forgotten = [r for r in result.records if r.forgotten]
    for r in forgotten:
        keys = [r.attribution_before["units"][k] for k in r.attribution_before["key_tokens"]]
        prompt = r.attacks["focus_on_key"]["prompt"]
        assert prompt.startswith(r.question + "\nFocus on ")
        assert all(f'"{k.strip()}"' in prompt for k in keys if k.strip())
        assert len(r.attacks["probab"]["outputs"]) == 2
    rows = (tmp_path / "out" / "items.jsonl").read_text().splitlines()
    assert len(rows) == 6 + 6 + 10
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["ga"] == m
