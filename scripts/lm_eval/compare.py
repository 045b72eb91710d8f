"""lm-evaluation-harness through `unpact serve` against the harness's own transformers model.

    python scripts/lm_eval/compare.py --lm-eval /path/to/venv/bin/lm_eval \\
        --url http://127.0.0.1:8000/v1/completions --name smol --model MODEL_FOLDER

With `unpact serve --model MODEL_FOLDER --name smol --port 8000` running, runs the two
small tasks beside this file (a multiple-choice log-likelihood task and a generate-until
task cut at "\\n" and ".", with the chat template) twice: as `local-completions` against
the server and as `hf` on the same folder, then prints each task's score for both and
the largest difference between their per-choice log-likelihoods, whether their greedy
flags agree, and whether their generations are equal. lm-evaluation-harness is not one of
unpact's dependencies: install it in a virtual environment of its own (`pip install
torch==2.13.0` first, then `pip install 'lm-eval[api]' accelerate transformers`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
TASKS = ("unpact_capitals", "unpact_capitals_gen")


def _tasks(folder: Path) -> None:
    """The task files with the data file's path filled in."""
    for name in ("capitals.yaml", "capitals_gen.yaml"):
        text = (HERE / name).read_text().replace("CAPITALS", str(HERE / "capitals.jsonl"))
        (folder / name).write_text(text)


def _evaluate(lm_eval: str, model: str, args: str, tasks: Path, out: Path) -> None:
    command = [lm_eval, "--model", model, "--model_args", args, "--apply_chat_template"]
    command += ["--include_path", str(tasks), "--tasks", ",".join(TASKS)]
    command += ["--log_samples", "--output_path", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def _samples(out: Path, task: str) -> list[dict]:
    # samples_<task>_<date>.jsonl (not another task's whose name starts with this one)
    (path,) = [p for p in out.glob("*/*.jsonl") if re.fullmatch(rf"samples_{task}_\d.*", p.name)]
    return [json.loads(line) for line in path.read_text().splitlines()]


def _score(out: Path, task: str) -> float:
    (path,) = out.glob("*/results_*.json")
    metrics = json.loads(path.read_text())["results"][task]
    return float(next(v for k, v in metrics.items() if k.endswith(",none") and "stderr" not in k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", required=True, help="the lm_eval command of its venv")
    parser.add_argument("--url", required=True, help="the server's /v1/completions URL")
    parser.add_argument("--name", required=True, help="the name the server serves")
    parser.add_argument("--model", required=True, help="the served model's folder")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _tasks(root)
        served, local = root / "served", root / "hf"
        remote = f"model={a.name},base_url={a.url},tokenizer={a.model},tokenized_requests=True"
        _evaluate(a.lm_eval, "local-completions", remote + ",num_concurrent=1", root, served)
        _evaluate(a.lm_eval, "hf", f"pretrained={a.model},dtype=float32", root, local)
        for task in TASKS:
            print(f"{task}: served {_score(served, task):.4f}, hf {_score(local, task):.4f}")
        pairs = zip(_samples(served, TASKS[0]), _samples(local, TASKS[0]))
        choices = [(x, y) for s, h in pairs for x, y in zip(s["resps"], h["resps"])]
        gap = max(abs(float(x[0][0]) - float(y[0][0])) for x, y in choices)
        same_greedy = all(x[0][1] == y[0][1] for x, y in choices)
        print(f"log-likelihoods: {len(choices)} choices, largest difference {gap:.2e}")
        print(f"greedy flags equal: {same_greedy}")
        gens = zip(_samples(served, TASKS[1]), _samples(local, TASKS[1]))
        equal = [s["filtered_resps"] == h["filtered_resps"] for s, h in gens]
        print(f"generations equal: {sum(equal)} of {len(equal)}")
        if gap > 1e-3 or not same_greedy or not all(equal):
            sys.exit(1)


if __name__ == "__main__":
    main()
