"""Integration: knowledge injection teaches fictional facts to the default model."""

from __future__ import annotations

import json

import pytest

from unpact.data import load_benchmark
from unpact.data.items import write_folder
from unpact.inject import InjectConfig, accuracy, inject
from unpact.models import load_model

pytestmark = pytest.mark.integration


def test_short_injection_teaches_a_small_subset(tmp_path):
    news = load_benchmark("news")
    subset = news.split("forget")[:4] + news.split("retain")[:4]
    docs = [d for d in news.documents if d.id in {i.document for i in subset}]
    folder = tmp_path / "mini"
    write_folder(folder, subset, docs)

    base = load_model("default")
    before = accuracy(base, subset)
    assert before <= 0.125  # invented facts: the base model cannot know them

    # 2 steps per epoch: a constant lr (decaying over 8 steps would teach too little)
    config = InjectConfig(
        batch_size=4,
        max_epochs=8,
        min_epochs=4,
        rehearsal=False,
        general=None,
        target_accuracy=1.0,
        lr_decay_to=1.0,
    )
    result = inject("default", folder, config, cache_dir=tmp_path / "cache", progress=False)
    assert not result.cached
    assert result.accuracy["forget"] >= 0.75 and result.accuracy["retain"] >= 0.75
    assert (result.path / "model.safetensors").is_file()
    meta = json.loads((result.path / "inject.json").read_text())
    assert meta["accuracy"] == result.accuracy and meta["benchmark"] == "mini"

    taught = load_model(str(result.path))
    assert accuracy(taught, subset) == pytest.approx(
        (result.accuracy["forget"] + result.accuracy["retain"]) / 2
    )
    again = inject("default", folder, config, cache_dir=tmp_path / "cache", progress=False)
    assert again.cached and again.path == result.path and again.accuracy == result.accuracy
