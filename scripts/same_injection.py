"""Does a cold injection reproduce a cached one bit for bit?

    python scripts/same_injection.py CONFIG BENCHMARK FOLDER

Teaches BENCHMARK to CONFIG's model with CONFIG's injection settings (a run config: a
built-in name such as `paper`, or a YAML file), in this new process with an empty cache
(a temporary UNPACT_CACHE: the base model's rehearsal targets are computed again too), and
compares the taught weights with those of FOLDER (an injected model folder, e.g. one under
$UNPACT_CACHE/injected/ or a run's models/original) by the sha256 of model.safetensors.
Prints both digests, the accuracies and whether the cache keys agree.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", metavar="CONFIG", help="a run config (built-in or YAML)")
    parser.add_argument("benchmark", metavar="BENCHMARK", help="the benchmark to teach")
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="an injected model")
    args = parser.parse_args()
    config, benchmark, folder = args.config, args.benchmark, args.folder
    if not (folder / "model.safetensors").is_file():
        parser.error(f"{folder}: no model.safetensors here")
    os.environ["UNPACT_CACHE"] = tempfile.mkdtemp(prefix="unpact-same-")
    from unpact.inject import InjectConfig, inject
    from unpact.run import load_config

    cfg = load_config(config)
    settings = InjectConfig(**({"device": cfg.device} | cfg.inject.settings))
    done = inject(cfg.model, benchmark, settings, progress=True)
    mine, theirs = sha256(done.path / "model.safetensors"), sha256(folder / "model.safetensors")
    print(f"cold injection: {done.path} ({done.seconds:.0f} s), accuracy {done.accuracy}")
    print(
        f"sha256: cold {mine}, {folder} {theirs}; same cache key: {done.path.name == folder.name}"
    )
    print("bit-identical" if mine == theirs else "DIFFERENT weights")


if __name__ == "__main__":
    main()
