"""The same config gives the same weights and numbers in any new process (issue 19, step 0).

Two fresh processes, each with empty caches, one with 1 intra-op thread and one with 2,
run the tiny pipeline (injection with the default precision, unlearning, evaluation,
attribution, prompt and relearning attacks); the taught and unlearned weights must be
bit-identical and results.json / items.jsonl equal apart from timings and paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("repro_pipeline.py")


def _run(root: Path, threads: int) -> None:
    env = os.environ | {
        "UNPACT_CACHE": str(root / "user-cache"),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(root)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _without_timings(value):
    if isinstance(value, dict):
        return {
            k: _without_timings(v)
            for k, v in value.items()
            if k
            not in (
                "seconds",
                "stage_seconds",
                "stage_seconds_cached",
                "unlearn_seconds",
                "model",
                "original_model",
            )
        }
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_two_fresh_processes_give_identical_weights_and_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _run(a, threads=1)
    _run(b, threads=2)
    for name in ("original", "npo_gd"):
        wa = load_file(a / "out" / "models" / name / "model.safetensors")
        wb = load_file(b / "out" / "models" / name / "model.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert wa[k].equal(wb[k]), f"{name}: {k} differs"
    ra = json.loads((a / "out" / "results.json").read_text())
    rb = json.loads((b / "out" / "results.json").read_text())
    assert _without_timings(ra) == _without_timings(rb)
    assert (a / "out" / "items.jsonl").read_text() == (b / "out" / "items.jsonl").read_text()
    # the run did something worth comparing
    assert ra["methods"]["npo_gd"]["forget_acc_before"] is not None
