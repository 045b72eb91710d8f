"""`unpact cache`: what each part of the cache takes on disk, and clearing parts of it
without touching what is not unpact's or what a run's folder still holds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from unpact import cache
from unpact.errors import UnpactError

H16, H40 = "9a9f0276db793922", "0004f8ffb9fb231127fa8261a23784b7538725c1"


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _on_disk(*paths: Path) -> int:
    """What `du` counts for these files: their blocks."""
    return sum(p.lstat().st_blocks * 512 for p in paths)


@pytest.fixture
def filled(tmp_path: Path) -> dict[str, object]:
    """A cache as runs leave it, with a user's own file among unpact's entries, and a
    model file hard-linked into a run's folder outside the cache."""
    root = tmp_path / "cache"
    made = {
        "models": [_file(root / "models" / f"adapter-merged-{H16}" / "model.safetensors", 9000)],
        "stages": [
            _file(root / "stages" / "unlearned" / f"ga-{H16}" / "model" / "w.safetensors", 20000),
            _file(root / "stages" / "unlearned" / f"ga-{H16}" / "result.json", 100),
            _file(root / "stages" / "evals" / f"{H16}.jsonl", 3000),  # one entry: the
            _file(root / "stages" / "evals" / f"{H16}.seconds", 5),  # records, their time
            _file(root / "stages" / "evals" / f"{H16}.made", 50),  # and where they were made
        ],
        "injected": [
            _file(root / "injected" / f"news-{H16}abcd" / "model.safetensors", 7000),
            _file(root / "injected" / ".base" / f"rehearsal-{H16}abcd.pt", 2000),
        ],
        "digests": [_file(root / "digests" / H40, 64), _file(root / "digests.json", 300)],
    }
    (root / "stages" / "unlearned" / f".lock-ga-{H16}").touch()
    mine = _file(root / "models" / "my notes.txt", 5000)  # UNPACT_CACHE set to a used folder
    run = tmp_path / "run" / "models" / "ga"
    run.mkdir(parents=True)
    os.link(made["stages"][0], run / "w.safetensors")  # as `files.link_files` leaves it
    return {"root": root, "made": made, "mine": mine, "linked": run / "w.safetensors"}


def test_usage_counts_each_part_s_entries_and_bytes_as_du_would(filled):
    """Entries are artefacts (an evaluation's records, `.seconds` and `.made` are one; locks
    none); bytes are the blocks of the files under them, a file linked from a run's folder
    counted as `shared` (clearing it frees nothing); what unpact did not name is left out."""
    parts = {p.name: p for p in cache.usage(filled["root"])}
    assert list(parts) == list(cache.PARTS)
    made = filled["made"]
    models, stages, digests = parts["models"], parts["stages"], parts["digests"]
    assert (models.entries, stages.entries, digests.entries) == (1, 2, 1)
    assert models.size == _on_disk(*made["models"], made["models"][0].parent)  # no notes
    folders = [p.parent for p in made["stages"][:2]] + [made["stages"][0].parent.parent]
    assert stages.size == _on_disk(*made["stages"], *set(folders))
    assert stages.shared == _on_disk(made["stages"][0])
    assert digests.size == _on_disk(*made["digests"]) and digests.shared == 0
    taught = made["injected"][0].parent
    assert parts["injected"].entries == 2  # a taught model, a base model's rehearsal targets
    assert parts["injected"].size == _on_disk(*made["injected"], taught)
    assert (
        parts["benchmarks"].entries == parts["benchmarks"].size == parts["benchmarks"].newest == 0
    )
    assert stages.newest == max(p.lstat().st_mtime for p in [*made["stages"], *folders])


def test_clear_removes_unpact_s_entries_and_keeps_the_rest(filled):
    root = filled["root"]
    before = {p.name: p for p in cache.usage(root)}
    cleared = cache.clear(["stages", "digests", "stages"], root)
    assert [p.name for p in cleared] == ["stages", "digests"]  # each part once
    assert cleared[0] == before["stages"]  # what it held, as `usage` said
    after = {p.name: p for p in cache.usage(root)}
    assert after["stages"].entries == after["digests"].entries == after["stages"].size == 0
    assert after["models"] == before["models"]
    assert not (root / "digests.json").exists()
    # the run's model stays readable (its other name); the stage kinds' folders stay
    assert filled["linked"].stat().st_size == 20000
    assert sorted(p.name for p in (root / "stages").iterdir()) == ["evals", "unlearned"]
    cache.clear(["all"], root)
    assert filled["mine"].is_file()  # not unpact's: neither counted nor removed
    assert all(p.entries == 0 for p in cache.usage(root))


@pytest.mark.parametrize("parts", [["bogus"], [], ["models", "Stages"]])
def test_clear_refuses_what_is_no_part(parts, tmp_path):
    with pytest.raises(UnpactError, match="choose among models, injected, stages"):
        cache.clear(parts, tmp_path)


def test_clear_says_what_it_may_not_remove(filled, monkeypatch):
    def denied(*_, **__):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", denied)
    with pytest.raises(UnpactError, match=r"cannot remove .*models.* permission denied"):
        cache.clear(["models"], filled["root"])


@pytest.mark.parametrize(
    ("n", "said"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (20480, "20.5 KB"), (5e12, "5.0 TB")],
)
def test_sizes_are_said_in_powers_of_1000(n, said):
    from unpact.cli import _bytes_text

    assert _bytes_text(int(n)) == said


def test_the_cli_shows_and_clears(filled, monkeypatch, capsys):
    """`unpact cache` prints each part; `--clear` what it freed; a wrong part is exit 2."""
    from unpact import cli

    monkeypatch.setenv("UNPACT_CACHE", str(filled["root"]))

    def unpact(*args: str) -> tuple[object, str]:
        monkeypatch.setattr(sys, "argv", ["unpact", *args])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        return exit_.value.code, " ".join(capsys.readouterr().out.split())

    code, shown = unpact("cache")
    assert code == 0 and "│ stages │ 2 │" in shown and str(filled["root"]) in shown, shown
    stages = next(p for p in cache.usage(filled["root"]) if p.name == "stages")
    code, shown = unpact("cache", "--clear", "stages")
    freed, kept = (cli._bytes_text(n) for n in (stages.size - stages.shared, stages.shared))
    assert code == 0, shown
    assert f"cleared stages: 2 entries, {freed} freed ({kept} stays: linked from run" in shown
    monkeypatch.setattr(sys, "argv", ["unpact", "cache", "--clear", "everything"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and "unknown part of the cache 'everything'" in err, err


def test_a_part_moved_to_another_disk_by_a_link_is_counted_and_cleared_there(tmp_path):
    """A user who moved `models/` elsewhere and left a link counts and frees it there;
    an entry that is itself a link is removed as a link, what it points to kept."""
    root, elsewhere = tmp_path / "cache", tmp_path / "big-disk" / "models"
    model = _file(elsewhere / f"adapter-merged-{H16}" / "model.safetensors", 9000)
    root.mkdir()
    (root / "models").symlink_to(elsewhere)
    kept = _file(tmp_path / "mine" / "model.safetensors", 100)
    (root / "injected").mkdir()
    (root / "injected" / f"news-{H16}").symlink_to(kept.parent)
    parts = {p.name: p for p in cache.usage(root)}
    assert parts["models"].entries == 1 and parts["models"].size == _on_disk(model, model.parent)
    assert parts["injected"].entries == 1
    cache.clear(["models", "injected"], root)
    assert list(elsewhere.iterdir()) == [] and (root / "models").is_symlink()
    assert kept.is_file() and not (root / "injected" / f"news-{H16}").exists()
