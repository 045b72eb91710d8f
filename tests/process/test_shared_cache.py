"""Two processes sharing a cache (runs launched side by side): an injection of the same
model is made once, by one of them, while the other waits and then reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from unpact.data.items import QAItem, write_folder
from unpact.models import save_model

# each process waits until both are ready, so that they ask for the injection together
SCRIPT = """
import json, sys, time
from pathlib import Path
from unpact.inject import InjectConfig, inject

root, me = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{me}").touch()
while len(list(root.glob("ready-*"))) < 2:
    time.sleep(0.01)
config = InjectConfig(
    lr=1e-3, max_epochs=2, min_epochs=2, rehearsal=False, general=None, precision="fp32"
)
done = inject(str(root / "base"), root / "bench", config, cache_dir=root / "c", progress=False)
print(json.dumps({"path": str(done.path), "cached": done.cached, "accuracy": done.accuracy}))
"""


def test_two_processes_inject_the_same_model_once(tiny, tmp_path):
    save_model(tiny.model, tiny.tokenizer, tmp_path / "base")
    items = [
        QAItem("f0", "Who founded the Vostrand Glassworks?", "Mira Quintrell", "forget"),
        QAItem("r0", "What is the capital of France?", "Paris", "retain"),
    ]
    write_folder(tmp_path / "bench", items)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNPACT_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(tmp_path), me],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me in ("a", "b")
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    done = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert done[0]["path"] == done[1]["path"] and done[0]["accuracy"] == done[1]["accuracy"]
    # one taught it, the other waited for it and read it from the cache
    assert sorted(d["cached"] for d in done) == [False, True]
    waited = [err for _, err in outs if "waiting for another process teaching" in err]
    assert len(waited) == 1
    assert not list((tmp_path / "c").glob(".partial-*"))
