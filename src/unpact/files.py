"""Writing files so that a reader never sees half of one, and reading a user's text file
with one clear message when it cannot be read.

Every artefact unpact writes (results, records, cached stages, reports, checkpoints' notes,
model folders) goes to a temporary name beside its place and is renamed into place once
complete; a write that fails (a full disk, an interrupt) leaves neither half a file nor the
temporary one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from unpact.errors import UnpactError

T = TypeVar("T")


def as_path(value: Any, what: str) -> Path:
    """A folder or file argument of the Python API as a Path: a string or any path, else a
    TypeError naming the argument (`out=None` was pathlib's "expected str, bytes or
    os.PathLike object, not NoneType"). `~` is the home folder, as in a model spec: kept,
    `out="~/runs/x"` made a folder named `~` in the working directory."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    raise TypeError(f"{what}: give a path (a string or a pathlib.Path), not {type(value).__name__}")


def check_folder_path(path: Path, what: str) -> None:
    """One message, before any work, where `path` cannot become a folder: a file is there,
    or a file stands where one of its parent folders goes (`--out results.json/run`,
    which was `NotADirectoryError` from deep in the run, after the injection's training)."""
    for current in (path, *path.parents):
        if current.is_dir():
            return
        if current.exists() or current.is_symlink():
            if not current.exists():  # a link to a missing target, or links in a loop
                where = f"{current} is a symbolic link that leads nowhere (a missing target, "
                where += "or links in a loop)"
            else:
                where = "a file is there" if current == path else f"{current} is a file"
            raise UnpactError(f"{what} {path}: {where}; give a folder")


def make_folder(path: Path, what: str) -> None:
    """`path` as a folder, made with its parents if needed; one message naming the option
    (`what`) where it cannot be (see `check_folder_path`; a place where the system lets
    no folder be made, such as under /proc)."""
    check_folder_path(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, FileNotFoundError) as e:
        raise UnpactError(
            f"{what} {path}: cannot make this folder ({(e.strerror or str(e)).lower()})"
        ) from None


@contextlib.contextmanager
def exclusive(artefact: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on `.lock-NAME` beside `artefact` for the block, so that two
    processes computing the same artefact into a shared cache (runs launched side by side)
    do not both write into one folder: the second says `waiting` and waits, then finds the
    artefact done. Without `fcntl` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the machines unpact is tested on
        yield
        return
    lock = artefact.with_name(f".lock-{artefact.name}")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("unpact").warning(waiting)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (Lustre or NFS without them): unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


WRITER_LOCK = ".unpact-lock"  # in a run folder: held by the process writing into it


@contextlib.contextmanager
def sole_writer(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder/.unpact-lock` for the block, and refuse (not wait) where another process
    holds it: two runs writing into one folder at once (the same command started twice,
    or with an edited config) left one's config.yaml beside the other's results. The lock
    is the system's, so a process that dies holds it no longer. The file is removed as the
    lock is let go (it stayed in every run's folder); a process that opened it just before
    then holds a lock on a removed file, which is none: it finds the file gone or another
    one in its place, and takes the lock again. Without `fcntl` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the machines unpact is tested on
        yield
        return
    lock = folder / WRITER_LOCK
    while True:
        fh = lock.open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UnpactError(
                f"{what} {folder}: another unpact process is writing there now; wait for it "
                "to end, or give another folder"
            ) from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            fh.close()
            yield
            return
        if _names(lock, fh):
            break
        fh.close()  # the holder before removed it as it let go: the lock of a removed file
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while holding it: whoever opens it next makes anew
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _names(path: Path, fh: Any) -> bool:
    """Whether `path` is still the file `fh` has open (not removed, not made anew)."""
    try:
        return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return False


def once(done: Path, folder: Path, waiting: str, compute: Callable[[], T]) -> tuple[bool, T | None]:
    """`compute()` unless the file `done` exists, under `folder`'s lock (`exclusive`) and
    looked for again once the lock is held (another process may have finished it while
    this one waited). (True, None) when it was done already, else (False, what
    `compute` gave)."""
    if done.is_file():
        return True, None
    with exclusive(folder, waiting):
        if done.is_file():
            return True, None
        return False, compute()


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: Path, text: str) -> None:
    """Write `text` to `path` as UTF-8, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder_atomically(
    folder: Path,
    write: Callable[[Path], Any],
    *,
    replace: bool = True,
    complete: Callable[[Path], bool] | None = None,
) -> None:
    """`write(tmp)` fills a new temporary folder beside `folder`, which is then renamed into
    place. `replace`: a folder already there is removed first (a reader sees the old folder
    or the new one, never half of either); otherwise it is kept. When a folder is there at
    the rename all the same (another process finished the same build in between), it is
    kept if `complete(folder)` accepts it, and this copy is discarded."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        _readable_as_usual(tmp)
        if replace and folder.exists():
            trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # a non-empty folder is there: renaming onto it fails
            if complete is None or not complete(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _readable_as_usual(folder: Path) -> None:
    """Give each file under `folder` at least the permissions the user's umask gives a new
    file (0644 for the usual 022): safetensors (0.8) writes its files owner-only (0600), so
    a model folder could not be read by a server or a colleague running as another user.
    Permissions are only added, and only to the files this write made: a link to a file
    elsewhere (a user's weights, a cache's) is left as it is."""
    mask = os.umask(0o022)
    os.umask(mask)
    for f in folder.rglob("*"):
        if not f.is_file() or f.is_symlink() or (found := f.stat()).st_nlink != 1:
            continue
        mode = stat.S_IMODE(found.st_mode)
        if mode | (0o666 & ~mask) != mode:
            with contextlib.suppress(PermissionError):
                f.chmod(mode | (0o666 & ~mask))


def link_files(src: Path, dst: Path, *, skip: tuple[str, ...] = (), fallback: str = "copy") -> None:
    """Each file of the folder `src` (not `skip`, not one `dst` already holds) into `dst`
    as a hard link (no copy), or where the file system refuses one, as a copy (`fallback`
    "copy": `dst` stands alone) or a link by name ("symlink": no copy of the weights).
    A file of `src` that is a link by name (a hub snapshot's, into `../../blobs/`; a
    weight file linked from another disk) is linked as the file it names: Linux's link()
    links the link itself, whose relative target then named nothing in `dst`."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in skip or (dst / f.name).exists():
            continue
        try:
            os.link(f.resolve(), dst / f.name)
        except OSError:
            if fallback == "symlink":
                (dst / f.name).symlink_to(f.resolve())
            else:
                shutil.copy2(f, dst / f.name)


# what a text nested deeper than the parsers recurse (Python's recursion limit) is said to be
TOO_DEEP = "nested too deeply to read: hundreds of levels inside one another"


def json_value(text: str | bytes, **kwargs: Any) -> Any:
    """`json.loads`, where a text nested too deeply for it (`[[[[...]]]]`, a few thousand
    levels) is a `JSONDecodeError` like any other unreadable JSON: it was a RecursionError,
    whose traceback reached the user of a reader that says what is wrong with a file; so
    is a whole number of more digits than Python converts (`parser_words`), a ValueError."""
    try:
        return json.loads(text, **kwargs)
    except (RecursionError, ValueError) as exc:
        if type(exc) not in (RecursionError, ValueError):  # a JSONDecodeError, a hook's own
            raise
        shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
        why = TOO_DEEP if isinstance(exc, RecursionError) else parser_words(exc)
        raise json.JSONDecodeError(why, shown, 0) from None


def parser_words(exc: ValueError) -> str:
    """What a ValueError of a parser says, its advice to the programmer left out: a number
    over Python's 4300 digits ("Exceeds the limit (4300 digits) for integer string
    conversion: value has 5000 digits; use sys.set_int_max_str_digits() ...")."""
    return str(exc).split(";")[0]


def json_lines(text: str) -> list[tuple[int, str]]:
    r"""(line number, line) for each non-blank line of a JSON-lines text, split at line
    ends (\n, \r\n, \r) alone: `str.splitlines` also splits at U+2028, U+2029 and
    U+0085, which a JSON string may hold raw (`json.dumps(..., ensure_ascii=False)` writes
    them so), cutting a model's answer or a user's question in two. JSON allows no raw
    line end inside a string, so these splits are safe."""
    lines = _LINE_END.split(text)
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


_LINE_END = re.compile(r"\r\n|\r|\n")


def read_text(path: Path) -> str:
    """A user's text file as UTF-8 (a byte-order mark dropped), or one `UnpactError`
    saying why not: missing, a folder, unreadable, UTF-16 or UTF-32 (by its byte-order
    mark, with the command that converts it), holding NUL bytes, or not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        why = "it is a folder" if path.is_dir() else (exc.strerror or str(exc))
        raise UnpactError(f"cannot read {path}: {why}") from None
    wide = next((name for mark, name in _WIDE_MARKS if raw.startswith(mark)), None)
    if wide is not None:  # it read as "not UTF-8 text", which said nothing of the fix
        raise UnpactError(
            f"cannot read {path}: it is {wide} (Windows PowerShell's `>` writes it); save "
            f"it as UTF-8, e.g. iconv -f {wide.split()[0]} -t UTF-8 {path} > NEW_FILE"
        )
    if b"\x00" in raw[:4096]:  # UTF-16 without its mark ("W\x00h\x00o\x00") read as prompts
        raise UnpactError(  # of NUL characters, a line of one refused as "a single token"
            f"cannot read {path}: it holds NUL bytes (UTF-16 or UTF-32 text without a "
            "byte-order mark, or not text at all); save it as UTF-8 text"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UnpactError(f"cannot read {path}: not UTF-8 text") from None


# byte-order marks of the encodings Windows tools write text in besides UTF-8 (UTF-32's
# first: its little-endian mark begins with UTF-16's)
_WIDE_MARKS = (
    (b"\xff\xfe\x00\x00", "UTF-32 text"),
    (b"\x00\x00\xfe\xff", "UTF-32 text"),
    (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"),
)
