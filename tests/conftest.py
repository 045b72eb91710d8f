"""Shared fixtures: the tiny random model (unit tests) and the embedded default model."""

from __future__ import annotations

import os

# offline whatever the machine says: no test reads the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import settings

# A developer's own keys stay out of the suite: with $VLLM_API_KEY set, every `unpact serve`
# a test starts wanted that key from clients that send none; the clients' keys would go to
# the test servers. A test that needs one sets it itself (monkeypatch).
for _key in ("VLLM_API_KEY", "UNPACT_API_KEY", "OPENAI_API_KEY"):
    os.environ.pop(_key, None)

# The suite reads the CLI's output as a pipe gets it, whatever the terminal settings of
# the machine it runs on: $COLUMNS cut its lines elsewhere; $FORCE_COLOR, and typer's forced
# terminal on GitHub Actions ($GITHUB_ACTIONS), put colour codes into the help and messages
# the tests read; $TRANSFORMERS_VERBOSITY=info printed transformers' notes where tests want
# silence. A test that wants one sets it itself (monkeypatch, a subprocess's env).
for _name in (
    "COLUMNS",
    "LINES",
    "TERMINAL_WIDTH",
    "FORCE_COLOR",
    "PY_COLORS",
    "CLICOLOR_FORCE",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "TRANSFORMERS_VERBOSITY",
):
    os.environ.pop(_name, None)
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"

# The test servers are on this machine: a proxy of the environment ($HTTP_PROXY on a
# cluster) is not in the way of the tests' own requests, nor the browser's.
_here = "127.0.0.1,localhost,::1"
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, (os.environ.get(_name), _here)))

# The same examples in every run (drawn from each test's source, no example database): a
# property test fails on every machine or on none. HYPOTHESIS_PROFILE=default explores.
settings.register_profile("unpact", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unpact"))

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


@pytest.fixture
def printed(capfd, monkeypatch):
    """`printed()`: what the code run so far in the test would have printed on a user's
    terminal (stdout and stderr together), and forget it. capfd alone misses two kinds of
    library noise: transformers' log lines (its handler writes to the sys.stderr of when
    transformers was imported, pytest's own capture, which capfd does not read) and Python
    warnings (pytest records them instead of printing them). Both are added here, the
    warnings filtered as a plain Python's defaults do, and transformers' `warning_once`
    forgets what it said before, so that an earlier test's warning does not hide this
    one's."""
    import logging
    import sys
    import warnings

    from transformers.utils import logging as hf_logging

    class Stderr:  # whatever sys.stderr is when written to (capfd swaps it between phases)
        def write(self, text: str) -> int:
            return sys.stderr.write(text)

        def flush(self) -> None:
            sys.stderr.flush()

    hf_logging.get_logger()  # its handler made, if no import did it yet
    if isinstance(hf_logging._default_handler, logging.StreamHandler):
        monkeypatch.setattr(hf_logging._default_handler, "stream", Stderr())
    hf_logging.warning_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")  # each place once, as Python's defaults
        for quiet in (
            DeprecationWarning,
            PendingDeprecationWarning,
            ImportWarning,
            ResourceWarning,
        ):
            warnings.simplefilter("ignore", quiet)

        def read() -> str:
            out, err = capfd.readouterr()
            said = "".join(
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
            )
            caught.clear()
            return out + err + said

        yield read
    hf_logging.warning_once.cache_clear()
