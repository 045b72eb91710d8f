"""Shared fixtures: the tiny random model (unit tests) and the embedded default model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# UNPACT_TEST_THREADS lets the suite share the machine with a long run (1 thread).
torch.set_num_threads(int(os.environ.get("UNPACT_TEST_THREADS", 0)) or min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny():
    from unpact.testing import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The first 8 forget and 8 retain items of news, as a benchmark folder."""
    from unpact.data import load_benchmark
    from unpact.data.items import write_folder

    news = load_benchmark("news")
    folder = tmp_path_factory.mktemp("bench") / "mini"
    write_folder(folder, news.split("forget")[:8] + news.split("retain")[:8])
    return folder


@pytest.fixture(scope="session")
def default_lm():
    """The default model, from the user's cache (built on first use)."""
    from unpact.models import load_model

    return load_model("default")
