"""Accuracy of a model before and after unlearning on a benchmark's splits (SPEC section 4)."""

from __future__ import annotations

import json
from pathlib import Path

from unpact.data.sources import general_items, load_benchmark
from unpact.judge import JudgeSettings, answer_items
from unpact.models import load_model

MAX_NEW_TOKENS = 32


def split_accuracy(
    model: str, benchmark: str | Path, general: str | None = "general", device: str = "cpu"
) -> dict[str, float]:
    """Share of forget, retain (and general) items the judge accepts for `model`."""
    lm = load_model(model, device=device)
    bench = load_benchmark(benchmark)
    splits = {s: bench.split(s) for s in ("forget", "retain")}
    if general:
        splits["general"] = general_items(general)
    acc = {}
    for name, items in splits.items():
        if items:
            judge = JudgeSettings(max_new_tokens=MAX_NEW_TOKENS)
            # fixed length, no setting to name
            ok = [v for _, v in answer_items(lm, items, judge, f"Judging {name}", "")]
            acc[name] = sum(ok) / len(ok)
    return acc


def check_evaluable(model: str, benchmark: str | Path) -> None:
    """Refuse, before the unlearning, a benchmark whose answers the evaluation's judge can
    never read in `MAX_NEW_TOKENS` (sentence answers such as TOFU's): it reported 0% before
    and after."""
    from unpact.judge import check_answer_room
    from unpact.models import token_counter
    from unpact.types import is_remote_spec

    if is_remote_spec(model):
        return
    bench = load_benchmark(benchmark)
    check_answer_room(
        bench.split("forget") + bench.split("retain"),
        MAX_NEW_TOKENS,
        token_counter(model),
        "the evaluation's answer length",
        advice="leave the evaluation out (--no-eval) and judge the model with `unpact run`, "
        "whose judge.max_new_tokens and judge.kind (rouge) are settings",
    )


def accuracy_before_after(
    before: str, after: str, benchmark: str | Path, path: Path | None = None, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Per split, {"before": ..., "after": ...} (each model judged on `device`); written to
    `path` as JSON if given."""
    a = split_accuracy(before, benchmark, device=device)
    b = split_accuracy(after, benchmark, device=device)
    table = {s: {"before": a[s], "after": b[s]} for s in a}
    if path is not None:
        path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return table
