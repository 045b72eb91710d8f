"""The benchmark scripts and helper scripts are not run by the suite (each takes minutes
on the default model), so a rename in the package left one importing a name that no longer
exists (`benchmarks/generation.py` and `scoring._stop_ids`), found only when someone ran
it to check a speed claim. Every `from unpact... import name` they hold must resolve."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_name_a_script_imports_from_unpact_exists(script):
    assert SCRIPTS
    missing = []
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unpact"):
            module = importlib.import_module(node.module or "")
            missing += [
                f"{node.module}.{a.name} (line {node.lineno})"
                for a in node.names
                if not hasattr(module, a.name)
                and importlib.util.find_spec(f"{node.module}.{a.name}") is None
            ]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("unpact"):
                    importlib.import_module(a.name)
    assert not missing, f"{script.name} imports names unpact no longer has: {missing}"


def test_robust_tables_says_when_a_folder_holds_no_run(tmp_path):
    """Given a folder without runs (a typo), it printed the pooled tables empty, as if the
    runs had recovered nothing, and exited 0."""
    import subprocess
    import sys

    script = ROOT / "scripts" / "robust_tables.py"
    res = subprocess.run([sys.executable, script, tmp_path], capture_output=True, text=True)
    assert res.returncode != 0 and "no news/books/wmdp/results.json here" in res.stderr
    assert "pooled McNemar" not in res.stdout


@pytest.mark.parametrize("script", sorted(ROOT.glob("scripts/*.py")), ids=lambda p: p.name)
def test_a_helper_script_says_how_it_is_called(script):
    """`python scripts/stage_times.py --help` read "--help" as its run folder ("--help: no
    results.json here"), quantize_buckets.py loaded it as a model: each now prints its
    usage and what it does, and a call without its arguments is usage error 2."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("usage:"), res.stderr
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    assert doc.split("\n")[0][:40] in res.stdout  # what it does
    res = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert res.returncode == 2 and "required" in res.stderr
