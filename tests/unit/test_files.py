"""Atomic writes and a full disk: nothing half-written, one message instead of a traceback."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from unpact import cli
from unpact.errors import UnpactError, disk_full, not_permitted
from unpact.files import (
    as_path,
    atomic_text,
    check_folder_path,
    make_folder,
    write_atomically,
    write_folder_atomically,
)


def test_atomic_text_writes_utf8_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "results.json"
    atomic_text(path, "first")
    atomic_text(path, "Zürich ✓")
    assert path.read_bytes() == "Zürich ✓".encode()
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_text("old")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        write_atomically(path, half_then_full)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _fill(text: str):
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(text)

    return write


def test_a_folder_is_written_then_replaced_whole(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "m"
    write_folder_atomically(folder, _fill("one"))
    (folder / "stale.bin").write_text("from the first build")
    write_folder_atomically(folder, _fill("two"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == "two"
    assert [p.name for p in folder.parent.iterdir()] == ["m"]  # no temporary, no trash


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "m"
    write_folder_atomically(folder, _fill("old"))

    def half_then_full(tmp: Path) -> None:
        (tmp / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomically(folder, half_then_full)
    assert (folder / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_another_process_build_is_kept_only_when_complete(tmp_path: Path) -> None:
    """replace=False: a folder that appeared meanwhile (another process's build of the same
    content) is kept when `complete` accepts it; an incomplete one is an error, not kept."""
    folder = tmp_path / "m"
    write_folder_atomically(folder, _fill("theirs"))
    done = lambda f: (f / "config.json").is_file()  # noqa: E731
    write_folder_atomically(folder, _fill("ours"), replace=False, complete=done)
    assert (folder / "config.json").read_text() == "theirs"
    (folder / "config.json").unlink()
    (folder / "other").write_text("x")
    with pytest.raises(OSError):
        write_folder_atomically(folder, _fill("ours"), replace=False, complete=done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        # safetensors' SafetensorError and torch.save say it in their text only
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_disk_full_is_recognised(exc: BaseException) -> None:
    found = disk_full(exc)
    assert found is not None and "disk is full" in str(found)


def test_a_failed_torch_save_is_said_to_be_a_write_failure() -> None:
    """torch.save onto a full device raised (seen once, writing to /dev/full) a RuntimeError
    naming no cause, from an iostream error: recognised by that shape."""
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            ) from None
    except RuntimeError as failed:
        assert failed.__context__ is not None  # `from None` keeps the context, as torch's
        found = disk_full(failed)
    assert found is not None and "torch could not write a file" in str(found)
    assert disk_full(RuntimeError("unexpected pos 704 vs 598")) is None


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EFBIG, "File too large", "/x/model.safetensors"),
        RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
    ],
)
def test_a_file_past_the_file_size_limit_is_said_with_the_limit(exc, monkeypatch) -> None:
    """Under `ulimit -f` (a scheduler's file size limit) safetensors' "File too large (os
    error 27)" was a traceback, torch's bare "iostream error" a full disk; the limit is said."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (2**20, resource.RLIM_INFINITY))
    said = str(disk_full(exc))
    assert said.startswith("a file grew past this process's file size limit of 1.0 MiB (ulim")
    torch_said = str(disk_full(RuntimeError("basic_ios::clear: iostream error")))
    assert "most often because of this process's file size limit of 1.0 MiB" in torch_said


@pytest.mark.parametrize(
    ("found", "cause"),
    [
        (disk_full, OSError(errno.ENOSPC, "No space left on device")),
        (not_permitted, PermissionError(errno.EACCES, "Permission denied", "/x")),
    ],
)
def test_the_environments_refusals_are_found_through_a_chain_and_not_elsewhere(
    found, cause
) -> None:
    try:
        try:
            raise cause
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert found(outer) is not None
    assert found(OSError(errno.ENOENT, "No such file")) is None
    assert found(ValueError("bad value")) is None


def test_the_cli_says_the_disk_is_full_and_exits_2(monkeypatch, capsys) -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/demo/results.json")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "the disk is full while writing /runs/demo/results.json" in err
    assert "Traceback" not in err


def _no_ram() -> None:
    import torch

    # 400 PB, beyond any machine's address space: refused at once also where the kernel
    # grants any allocation (overcommit_memory=1), as 40 TB may be
    torch.empty(10**17)


def _no_gpu_memory() -> None:
    import torch

    try:  # as transformers' forward passes it on: raised inside, re-raised outside
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.15 GiB of which 1.20 GiB is free. Including non-PyTorch memory, ..."
        )
    except RuntimeError as exc:
        raise RuntimeError("forward failed") from exc


@pytest.mark.parametrize(
    ("fail", "said"),
    [
        (_no_ram, "out of memory in RAM (DefaultCPUAllocator: can't allocate memory: you "
         "tried to allocate 400000000000000000 bytes.)"),
        (_no_gpu_memory, "out of memory on the GPU (CUDA out of memory. Tried to allocate "
         "2.00 GiB.)"),
    ],
)  # fmt: skip
def test_the_cli_says_memory_ran_out_and_exits_2(monkeypatch, capsys, fail, said) -> None:
    """A 7B model trained in full on a 24 GB GPU, or a benchmark too large for the RAM: a
    torch traceback (exit 1); now one message with what to change, exit 2."""
    monkeypatch.setattr(cli, "app", fail)
    monkeypatch.setattr("unpact.errors._memory_limit", lambda: "")  # whatever ulimit -v says
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert said in err and "--dtype bfloat16" in err and "lora" in err
    assert "Traceback" not in err


def test_memory_refused_under_a_process_limit_is_said_with_the_limit(monkeypatch, capsys):
    """Under `ulimit -v` (a cluster scheduler's memory limit) safetensors could not map the
    weights, "unable to mmap ... Cannot allocate memory (12)", a traceback; now the
    out-of-memory message, naming the limit, exit 2."""
    import resource

    def mmap_refused() -> None:
        raise RuntimeError(
            "unable to mmap 538090408 bytes from file </c/model.safetensors>: Cannot "
            "allocate memory (12)"
        )

    monkeypatch.setattr(cli, "app", mmap_refused)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (3 * 2**30, resource.RLIM_INFINITY))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "out of memory in RAM, where this process may use at most 3.0 GiB (ulimit -v) "
        "(unable to mmap 538090408 bytes" in err
    ), err


def test_the_cli_keeps_the_traceback_of_a_bug(monkeypatch) -> None:
    def bug() -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(KeyError):
        cli.main()


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/srv/a.json"), "permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), "read-only file system"),
        (PermissionError(errno.EPERM, "Operation not permitted", "/sys/x"), "not permitted"),
        # a name over the file system's 255 bytes, a loop of links: OSError tracebacks too
        (OSError(errno.ENAMETOOLONG, "File name too long", "/r/" + "a" * 90), "file name too long"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "/r/x"), "symbolic links"),
    ],
)
def test_the_cli_says_a_refused_path_and_exits_2(monkeypatch, capsys, exc, said) -> None:
    """An --out or --json the system refuses (a folder of someone else's, a read-only
    mount) was a PermissionError traceback."""

    code, err = _cli_raising(monkeypatch, capsys, exc)
    flat = "".join(err.split())  # rich wraps a long path where it likes
    assert code == 2 and f"{said}:{exc.filename}".replace(" ", "") in flat
    assert "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    """Ctrl-C in `unpact attribute` or `unpact inject` printed a KeyboardInterrupt traceback
    (run and audit already said how to continue)."""
    assert _cli_raising(monkeypatch, capsys, KeyboardInterrupt()) == (130, "interrupted")


def _cli_raising(monkeypatch, capsys, exc: BaseException) -> tuple[object, str]:
    """The CLI's exit code and what it printed (on one line) when a command raises `exc`."""

    def command() -> None:
        raise exc

    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, " ".join(capsys.readouterr().err.split())


def test_a_folder_s_files_get_the_mode_of_the_umask_not_the_writer_s(tmp_path: Path) -> None:
    """safetensors writes owner-only files; a model folder is readable as any file the
    user makes (a server running as another user can load it)."""
    import os
    import stat

    def write(tmp: Path) -> None:
        fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "note.txt").write_text("x")

    old = os.umask(0o027)
    try:
        write_folder_atomically(tmp_path / "m", write)
    finally:
        os.umask(old)
    for f in ("model.safetensors", "sub/note.txt"):
        assert stat.S_IMODE((tmp_path / "m" / f).stat().st_mode) == 0o640, f


def test_a_second_writer_of_the_same_artefact_waits_then_finds_it_done(tmp_path, caplog):
    """Two runs side by side sharing a cache both injected (or unlearned) into the same
    folder, one resuming from the other's half-written checkpoints. The second now waits
    (saying so) and then finds the artefact done."""
    import logging
    import threading

    from unpact.files import exclusive

    target = tmp_path / "model"
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with exclusive(target, "first waits"):
            holding.set()
            order.append("first in")
            threading.Event().wait(0.3)  # the second asks meanwhile
            target.mkdir()
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait()
    with caplog.at_level(logging.WARNING, logger="unpact"), exclusive(target, "second waits"):
        order.append("second in")
        assert target.is_dir()
    t.join()
    assert order == ["first in", "first done", "second in"]
    assert "second waits" in caplog.text and "first waits" not in caplog.text
    with exclusive(target, "nobody holds it"):  # free again: no wait, nothing said
        pass
    assert "nobody holds it" not in caplog.text


def test_once_computes_only_what_no_process_has_done(tmp_path):
    """`once`: done already, or done by another process while this one waited for the
    lock, it is not computed again (inject and unlearn both went through this by hand)."""
    import threading

    from unpact.files import exclusive, once

    folder = tmp_path / "model"
    done = folder / "result.json"
    calls: list[str] = []

    def make() -> str:
        calls.append("made")
        folder.mkdir(exist_ok=True)
        done.write_text("{}")
        return "fresh"

    holding, release = threading.Event(), threading.Event()

    def other_process() -> None:
        with exclusive(folder, "other waits"):
            holding.set()
            release.wait()
            make()

    t = threading.Thread(target=other_process)
    t.start()
    holding.wait()
    threading.Timer(0.2, release.set).start()
    assert once(done, folder, "this one waits", make) == (True, None)  # made meanwhile
    t.join()
    assert calls == ["made"]
    done.unlink()
    assert once(done, folder, "free", make) == (False, "fresh")
    assert once(done, folder, "free", make) == (True, None)
    assert calls == ["made", "made"]


# Characters `str.splitlines` splits at that a JSON string may hold raw, as
# `json.dumps(..., ensure_ascii=False)` (every unpact writer, and pandas' `force_ascii=False`)
# writes them: once a random model's answer holding one broke the cached stage it was read
# from (a JSONDecodeError traceback), and a question holding one broke its benchmark's load.
SEPARATORS = "a\u2028b\u2029c\x85d"


def test_json_lines_split_at_line_ends_alone() -> None:
    from unpact.files import json_lines

    text = f'{{"q": "{SEPARATORS}"}}\r\n\n  \n{{"q": 2}}\r{{"q": 3}}\n'
    assert json_lines(text) == [(1, f'{{"q": "{SEPARATORS}"}}'), (4, '{"q": 2}'), (5, '{"q": 3}')]


def test_every_jsonl_reader_keeps_a_string_with_a_unicode_line_separator(tiny, tmp_path) -> None:
    import json

    from unpact.attribution import attribute, load_records
    from unpact.data import load_benchmark
    from unpact.data.items import QAItem, write_folder
    from unpact.run.store import Stage

    rows = [{"id": "x", "output": f"Par{SEPARATORS}is"}, {"id": "y", "output": "plain"}]
    stage = Stage(tmp_path / "cache", "evals", "k")
    assert stage.write(rows) == rows and stage.read() == rows  # written, then read back

    question = f"Who wrote{SEPARATORS} it?"
    items = [QAItem(id="a", question=question, answer="Ann", split="forget")]
    write_folder(tmp_path / "bench", items)
    assert "\u2028" in (tmp_path / "bench" / "qa.jsonl").read_text(encoding="utf-8")  # raw
    assert load_benchmark(str(tmp_path / "bench")).items[0].question == question

    tofu = tmp_path / "tofu"
    tofu.mkdir()
    for name, q in (("forget01.json", question), ("retain99.json", "Who else?")):
        line = json.dumps({"question": q, "answer": "Ann"}, ensure_ascii=False)
        (tofu / name).write_text(f"{line}\n{line.replace('Ann', 'Bo')}\n", encoding="utf-8")
    assert load_benchmark(f"tofu:{tofu}").split("forget")[0].question == question

    record = attribute(tiny, question, "Ann")
    line = json.dumps(record.to_dict(), ensure_ascii=False)
    (tmp_path / "a.jsonl").write_text(f"{line}\n{line}\n", encoding="utf-8")
    assert [r.prompt for r in load_records(tmp_path / "a.jsonl")] == [question, question]


def test_a_folder_that_cannot_be_made_is_one_message(tmp_path: Path) -> None:
    """`--out results.json/run` (a file where a parent folder goes) was NotADirectoryError
    from deep in a run, after `unpact inject` had trained; a file at the place itself,
    FileExistsError. Both are said before any work, naming the option and the file."""
    (tmp_path / "afile").write_text("mine\n")
    # links that lead nowhere were "a file" too: one to a missing target, two in a loop
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    nowhere = "is a symbolic link that leads nowhere (a missing target, or links in a loop)"
    for path, said in (
        (tmp_path / "afile" / "a" / "b", f"{tmp_path / 'afile'} is a file; give a folder"),
        (tmp_path / "afile", "a file is there; give a folder"),
        (tmp_path / "gone" / "run", f"{tmp_path / 'gone'} {nowhere}; give a folder"),
        (tmp_path / "loop1" / "run", f"{tmp_path / 'loop1'} {nowhere}; give a folder"),
    ):
        message = re.escape(f"--out {path}: {said}")
        with pytest.raises(UnpactError, match=message):
            check_folder_path(path, "--out")
        with pytest.raises(UnpactError, match=message):
            make_folder(path, "--out")
    check_folder_path(tmp_path / "new" / "deeper", "--out")  # nothing made yet
    assert not (tmp_path / "new").exists()
    make_folder(tmp_path / "new" / "deeper", "--out")
    make_folder(tmp_path / "new" / "deeper", "--out")  # already there: as it is
    assert (tmp_path / "new" / "deeper").is_dir()


def test_a_second_writer_of_a_run_folder_is_refused_not_mixed_in(tmp_path):
    """Two `unpact run`s into one --out at once (the command started twice, or again with
    an edited config) each wrote there, leaving one's config.yaml beside the other's
    results. The folder's lock now refuses the second at once, naming the folder; once the
    first ends the folder is free, and a folder holding only the lock is a new one."""
    from unpact.files import sole_writer
    from unpact.run import run

    with sole_writer(tmp_path, "--out"):
        refused = pytest.raises(UnpactError, match=r"another unpact process is writing there")
        with refused, sole_writer(tmp_path, "--out"):
            pass
        with pytest.raises(UnpactError, match=r"--out .*: another unpact process is writing"):
            run({"methods": [{"method": "ga"}]}, tmp_path, progress=False)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written
    with sole_writer(tmp_path, "--out"):
        pass
    from unpact.run import _check_out

    _check_out(tmp_path)  # only the lock is there: accepted as a new folder


def test_a_run_folder_keeps_no_lock_file_and_a_refused_writer_leaves_the_holders(tmp_path):
    """`.unpact-lock` stayed in every run's folder. It is removed as the lock is let go; a
    writer refused meanwhile must not remove the holder's file (a third would then make a
    new one and write beside the holder)."""
    from unpact.files import WRITER_LOCK, sole_writer

    refused = pytest.raises(UnpactError, match=r"another unpact process is writing there")
    with sole_writer(tmp_path, "--out"):
        for _ in range(2):
            with refused, sole_writer(tmp_path, "--out"):
                pass
        assert (tmp_path / WRITER_LOCK).is_file()
    assert not (tmp_path / WRITER_LOCK).exists()
    with sole_writer(tmp_path, "--out"), refused, sole_writer(tmp_path, "--out"):
        pass  # taken again as before


def test_a_writer_that_opened_the_lock_as_its_holder_let_go_takes_it_again(tmp_path, monkeypatch):
    """The holder removes the lock file as it lets go: a writer that opened the file just
    before, and then got its lock, held the lock of a removed file, and a third writer
    made a new file and wrote beside it. It takes the lock of the file in its place."""
    import fcntl

    from unpact.files import WRITER_LOCK, sole_writer

    holder = sole_writer(tmp_path, "--out")
    holder.__enter__()
    real, raced = fcntl.flock, []

    def racing(fh, op):  # the holder lets go between this writer's open and its flock
        if op & fcntl.LOCK_NB and not raced:
            raced.append(os.fstat(fh.fileno()).st_ino)
            holder.__exit__(None, None, None)
        return real(fh, op)

    monkeypatch.setattr(fcntl, "flock", racing)
    refused = pytest.raises(UnpactError, match=r"another unpact process is writing there")
    with sole_writer(tmp_path, "--out"):
        assert raced and (tmp_path / WRITER_LOCK).is_file()
        with refused, sole_writer(tmp_path, "--out"):  # the third writer
            pass
    assert not (tmp_path / WRITER_LOCK).exists()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EINVAL])
def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, code):
    """On a cluster's shared file system mounted without locks (Lustre's noflock, NFS
    without lockd), flock fails with ENOLCK, ENOSYS or EINVAL: the run folder's lock
    already ran unlocked there, but a cached artefact's (`exclusive`) raised it, a
    traceback from the first stage. Both run the block unlocked."""
    import fcntl

    from unpact.files import exclusive, sole_writer

    def no_locks(fh, op):
        raise OSError(code, "no locks here")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with exclusive(tmp_path / "stage", "waiting"):
        ran.append("artefact")
    with sole_writer(tmp_path, "--out"):
        ran.append("folder")
    assert ran == ["artefact", "folder"]


def test_an_output_folder_under_the_home_folder_is_there(tmp_path, monkeypatch):
    """`run(config, "~/runs/x")` (or `--out '~/runs/x'`, quoted) made a folder named `~` in
    the working directory, one `rm -rf ~` away from a user's home; a model spec took `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert as_path("~/runs/x", "out") == tmp_path / "runs" / "x"
    assert as_path(Path("~") / "cache", "cache_dir") == tmp_path / "cache"
    assert as_path("runs/x", "out") == Path("runs/x")


def test_text_that_is_no_unicode_is_one_message(tmp_path, monkeypatch, capsys, tiny) -> None:
    """A lone UTF-16 surrogate, from a JSON or YAML escape ("\\ud800", half of an emoji's
    pair) or from command-line bytes that are not UTF-8, was a traceback: the tokenizer's
    "TextEncodeInput must be Union[...]", or "surrogates not allowed" when printed or
    written. Each way in is one message naming where it is; a pair of escapes is one
    character, read as it was."""
    import json

    from unpact.data.items import read_jsonl
    from unpact.errors import check_text
    from unpact.unlearn.config import read_yaml_mapping

    item = {"id": "a", "question": "Who founded \\ud800 it?", "answer": "Mira", "split": "forget"}
    (tmp_path / "qa.jsonl").write_text(json.dumps(item).replace("\\\\", "\\") + "\n")
    with pytest.raises(UnpactError, match=r"qa\.jsonl, line 1: the text, field 'question': "
                       r"'Who founded \\ud800 it\?' holds a lone UTF-16 surrogate"):  # fmt: skip
        read_jsonl(tmp_path / "qa.jsonl")
    emoji = dict(item, question="Who founded \\ud83d\\ude00 it?")
    (tmp_path / "qa.jsonl").write_text(json.dumps(emoji).replace("\\\\", "\\") + "\n")
    assert read_jsonl(tmp_path / "qa.jsonl")[0][1]["question"] == "Who founded \U0001f600 it?"
    (tmp_path / "c.yaml").write_text('model: "a\\udc80"\n')
    with pytest.raises(UnpactError, match=r"c\.yaml, field 'model': 'a\\udc80' holds"):
        read_yaml_mapping(tmp_path / "c.yaml")
    from unpact.run import load_config

    with pytest.raises(UnpactError, match=r"^config, field 'model': 'a\\ud800' holds"):
        load_config({"model": "a\ud800", "methods": [{"method": "ga"}]})
    long = "x" * 100 + "\ud800" + "y" * 100  # the surrogate shown, with its neighbours
    with pytest.raises(UnpactError, match=r"^it: '\.\.\.x{30}\\ud800y{29}' holds"):
        check_text(long, "it")
    with pytest.raises(UnpactError, match="the prompt: 'Who \\\\udced' holds"):
        tiny.encode_prompt("Who \udced")
    with pytest.raises(UnpactError, match="the answer: 'Mira\\\\udced' holds"):
        tiny.encode_answer("Mira\udced")
    # command-line bytes that are not UTF-8 (Python reads them with surrogateescape)
    argv = ["unpact", "score", "-p", b"Who \xff is".decode("utf-8", "surrogateescape")]
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(cli, "app", lambda: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the value of -p: 'Who \\udcff is' holds a lone UTF-16 surrogate" in err


@pytest.mark.parametrize(
    ("encoding", "said"),
    [
        ("utf-16", "it is UTF-16 text (Windows PowerShell's `>` writes it); save it as UTF-8"),
        ("utf-16-be", "it holds NUL bytes (UTF-16 or UTF-32 text without a byte-order mark"),
        ("utf-16-le", "it holds NUL bytes (UTF-16 or UTF-32 text without a byte-order mark"),
        ("utf-32", "it is UTF-32 text"),
    ],
)
def test_a_file_in_another_unicode_encoding_says_which_and_how_to_convert(tmp_path, encoding, said):
    """A prompts file or qa.jsonl written by Windows PowerShell (UTF-16 with its mark) was
    "not UTF-8 text", which named no fix; one without the mark read as text of NUL
    characters, and a line of one was refused as "a single token". UTF-8 with its mark
    (Notepad's) reads as UTF-8."""
    from unpact.files import read_text

    path = tmp_path / "prompts.txt"
    path.write_text("Who founded Rome?\nWhat is two plus two?\n", encoding=encoding)
    with pytest.raises(UnpactError, match=re.escape(f"cannot read {path}: {said}")):
        read_text(path)
    path.write_text("Who founded Rome?\n", encoding="utf-8-sig")
    assert read_text(path) == "Who founded Rome?\n"


def test_a_file_nested_too_deeply_is_one_message(tmp_path, tiny) -> None:
    """JSON or YAML with thousands of brackets inside one another (a fuzzer's file, a
    generator gone wrong) ended every reader in a RecursionError's traceback: items, a
    real benchmark's file, attribution records, a run config, a `--set` value, a model's
    config.json; a number of 5000 digits in a ValueError's. Each is the reader's message
    for unreadable JSON or YAML now."""
    from unpact.attribution import load_records
    from unpact.data import load_benchmark
    from unpact.data.items import read_jsonl
    from unpact.models import load_model, save_model
    from unpact.unlearn.config import parse_override, read_yaml_mapping

    deep = "[" * 5000 + "]" * 5000
    said = "nested too deeply to read"
    (tmp_path / "qa.jsonl").write_text(f'{{"id": "a", "aliases": {deep}}}\n')
    with pytest.raises(UnpactError, match=rf"qa\.jsonl, line 1: not valid JSON \({said}"):
        read_jsonl(tmp_path / "qa.jsonl")
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    for name in ("forget01.json", "retain99.json"):
        (tofu / name).write_text(f'{{"question": "Who?", "answer": {deep}}}\n')
    with pytest.raises(UnpactError, match=said):
        load_benchmark(f"tofu:{tofu}")
    (tmp_path / "a.json").write_text(deep)
    with pytest.raises(UnpactError, match=said):
        load_records(tmp_path / "a.json")
    (tmp_path / "c.yaml").write_text(f"model: {deep}\n")
    with pytest.raises(UnpactError, match=rf"c\.yaml: not valid YAML \({said}"):
        read_yaml_mapping(tmp_path / "c.yaml")
    with pytest.raises(UnpactError, match=said):
        parse_override(f"lr={deep}")
    save_model(tiny.model, tiny.tokenizer, tmp_path / "model")
    config = (tmp_path / "model" / "config.json").read_text().rstrip().removesuffix("}")
    (tmp_path / "model" / "config.json").write_text(f'{config}, "x": {deep}}}')
    with pytest.raises(UnpactError, match=rf"model: config\.json is {said}"):
        load_model(str(tmp_path / "model"))
    (tmp_path / "model" / "config.json").write_text(f"{config}}}")
    tokenizer = (tmp_path / "model" / "tokenizer_config.json").read_text().rstrip()[:-1]
    (tmp_path / "model" / "tokenizer_config.json").write_text(f'{tokenizer}, "x": {deep}}}')
    with pytest.raises(UnpactError, match=rf"model: tokenizer_config\.json is {said}"):
        load_model(str(tmp_path / "model"))
    # a whole number of more digits than Python converts was a ValueError's traceback
    huge = "9" * 5000
    (tmp_path / "qa.jsonl").write_text(f'{{"id": "a", "answer": {huge}}}\n')
    with pytest.raises(UnpactError, match=r"line 1: not valid JSON \(Exceeds the limit \(4300 "):
        read_jsonl(tmp_path / "qa.jsonl")
    (tmp_path / "c.yaml").write_text(f"seed: {huge}\n")
    with pytest.raises(UnpactError, match=r"value has 5000 digits\)$"):
        read_yaml_mapping(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("model: x\nwhen: 2024-13-45\n")  # a date that is none
    with pytest.raises(UnpactError, match=r"c\.yaml: not valid YAML \(month must be in 1\.\.12\)"):
        read_yaml_mapping(tmp_path / "c.yaml")


def test_yaml_aliases_are_read_but_not_without_end(tmp_path) -> None:
    """YAML's aliases repeat a value: a config may share settings so. Nine levels of nine
    (a "billion laughs") held 387 million strings, which the config's checks read for
    more than 100 s without an end, and `&a [*a]` holds itself: each is one message now,
    at once."""
    from unpact.errors import lone_surrogate
    from unpact.unlearn.config import read_yaml_mapping

    shared = "fast: &fast {lr: 0.001, steps: 3}\nmethods: [{method: ga, config: *fast}]\n"
    (tmp_path / "ok.yaml").write_text(shared)
    config = read_yaml_mapping(tmp_path / "ok.yaml")
    assert config["methods"][0]["config"] == {"lr": 0.001, "steps": 3}
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 9)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(UnpactError, match=r"repeat values into more than 1,000,000 of them"):
        read_yaml_mapping(tmp_path / "laughs.yaml")
    (tmp_path / "self.yaml").write_text("methods: &m [{method: ga, x: *m}]\n")
    with pytest.raises(
        UnpactError, match=r"self\.yaml: not valid YAML \(an alias .* holding itself"
    ):
        read_yaml_mapping(tmp_path / "self.yaml")
    # one list held many times is read once for its text
    row = ["x"] * 1000
    assert lone_surrogate([row] * 100_000 + ["\ud800"]) == "\ud800"
