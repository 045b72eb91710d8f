"""Progress bars: drawn on a terminal, and nothing (not a blank line per bar) in a log."""

from __future__ import annotations

from unpact.progress import progress_bar


def _run_bar() -> None:
    with progress_bar("Judging", 3) as advance:
        advance(3)


def test_a_bar_is_drawn_on_a_terminal(monkeypatch, capfd) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich (14 and later) treats stderr as a terminal
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich 13 (the lowest unpact takes) likewise
    _run_bar()
    assert "Judging" in capfd.readouterr().err


def test_a_log_file_gets_no_blank_line_per_bar(monkeypatch, capfd) -> None:
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    _run_bar()
    assert capfd.readouterr().err == ""


def test_a_disabled_bar_draws_nothing(monkeypatch, capfd) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    with progress_bar("Judging", 3, enabled=False) as advance:
        advance(3)
    assert capfd.readouterr().err == ""


def test_a_label_is_drawn_as_text_not_markup(monkeypatch, capfd) -> None:
    """A label holds a path, an item id or a caller's text: "Hashing the weights of
    runs/[b]/m" lost its "[b]" as a style tag, and one with "[/]" would have failed as the
    bar was drawn."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    with progress_bar("weights of runs/[b]/m [/]", 3) as advance:
        advance(3)
    assert "weights of runs/[b]/m [/]" in capfd.readouterr().err
