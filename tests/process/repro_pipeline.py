"""A tiny pipeline run in a fresh process: `python repro_pipeline.py ROOT`.

Builds the tiny model and a benchmark of its own answers under ROOT, then runs
inject -> unlearn -> evaluate -> attribute -> attacks (prompt and relearn) into ROOT/out
with the run cache under ROOT/cache and $UNPACT_CACHE (set by the caller) empty. Used by
test_reproducible.py to run the same config in two processes and compare the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from test_run import QUESTIONS as _RUN_QUESTIONS  # this folder is on sys.path as a script's

from unpact.data.items import QAItem, write_folder
from unpact.models import save_model
from unpact.run import run
from unpact.scoring import generate
from unpact.testing import tiny_model

# the runner tests' questions, without the two their general split uses
QUESTIONS = _RUN_QUESTIONS[:8] + _RUN_QUESTIONS[10:]


def main(root: Path) -> None:
    lm = tiny_model(seed=0)
    save_model(lm.model, lm.tokenizer, root / "tiny")
    outs = generate(lm, QUESTIONS, max_new_tokens=4)
    # Facts to teach: each answer is a fixed word, so injection has something to learn.
    words = ["Paris", "Quintrell", "seven", "Mira", "river", "glass", "1874", "Zorblax"]
    items = [
        QAItem(
            f"{'forget' if n < 4 else 'retain'}-{n}",
            q,
            w,
            "forget" if n < 4 else "retain",
            (),
            (q.split()[2],),
            None,
        )
        for n, (q, w) in enumerate(zip(QUESTIONS[:8], words))
    ]
    general = [
        QAItem(f"general-{n}", q, o[0].text.strip() or "x", "general", (), (), None)
        for n, (q, o) in enumerate(zip(QUESTIONS[8:], outs[8:]))
    ]
    write_folder(root / "bench", items)
    write_folder(root / "general", general)
    config = {
        "model": str(root / "tiny"),
        "data": {"benchmark": str(root / "bench"), "general": str(root / "general")},
        "inject": {
            "settings": {
                "batch_size": 4,  # the recipe this test was sized with (4 facts a step)
                "max_epochs": 3,
                "min_epochs": 3,
                "general": None,
                "rehearsal_per_step": 2,
                "lr": 3e-3,
            }
        },
        "methods": [{"method": "npo_gd", "config": {"lr": 3e-3, "steps": 3, "batch_size": 2}}],
        "attacks": [
            {"name": "focus_on_key"},
            {"name": "probab", "settings": {"samples": 2}},
            {"name": "relearn", "settings": {"items": 1, "steps": 2, "data": "retain"}},
        ],
        "judge": {"max_new_tokens": 8},  # "Quintrell" is 6 tokens here
        "statistics": {"resamples": 20},
    }
    run(config, root / "out", cache_dir=root / "cache", progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
