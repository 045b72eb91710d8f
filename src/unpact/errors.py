"""The one exception type for user mistakes.

Anything a user can cause (a bad model spec, an empty answer, a prompt too long for the
model) raises `UnpactError` with a message that names the item and says what to do. The
CLI turns it into one line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class UnpactError(ValueError):
    """A problem with the user's input or environment, explained in its message."""


class NotForThisModel(UnpactError):
    """A step the model's architecture cannot have (a hidden-state attack on Gemma 3n,
    whose layers carry parallel streams): a run leaves that step out and says why in
    results.json's `skipped`, where a step called alone stops with the message."""


@contextmanager
def items_named(name: Callable[[int], str], kind: str = "item") -> Iterator[None]:
    """An error about "item N" raised in the block (N: the place, from 0, in the list the
    called function was given) said of the caller's own list: `name(N)` is what replaces
    "item N" ("item 7" of the whole where the call had a subset, "item forget-3 (forget)"
    of a benchmark; "" drops it). Every function that hands a list of its own making to
    another names the items so, or the user reads the place in a list they never saw.
    `kind`: the word for what the list holds ("document N")."""
    try:
        yield
    except UnpactError as exc:
        found = re.match(rf"{kind} (\d+): ", str(exc))
        if found is None:
            raise
        try:
            label = name(int(found[1]))
        except IndexError:
            raise exc from None
        rest = str(exc)[found.end() :]
        raise _again(exc, f"{label}: {rest}" if label else rest) from None


@contextmanager
def said_of(label: str) -> Iterator[None]:
    """An error raised in the block about one item's text ("the prompt '...' holds token
    id ...") said of that item: `label`, "item forget-3 (forget)" or "item 3", in front."""
    try:
        yield
    except UnpactError as exc:
        raise _again(exc, f"{label}: {exc}") from None


def _again(exc: UnpactError, said: str) -> UnpactError:
    """`exc` of its kind (a step the model cannot have stays one) saying `said`."""
    try:
        return type(exc)(said)
    except TypeError:
        return UnpactError(said)


def check_not_builtin(what: str, name: str, held: Any, mine: Any, how: str) -> None:
    """Code outside unpact (a plugin) registering `mine` under a `name` that unpact's own
    `held` has is refused: it would replace the built-in for every run in the process,
    silently. `how`: how to give it another name."""
    if (
        held is not None
        and held is not mine
        and held.__module__.startswith("unpact.")
        and not mine.__module__.startswith("unpact.")
    ):
        title = f" {held.__name__}" if isinstance(held, type) else ""
        raise UnpactError(
            f"{what} name {name!r} is unpact's built-in{title}: give {mine.__name__} a name "
            f"of its own ({how})"
        )


def check_callable(fn: Callable[..., Any], wanted: Sequence[str], label: str) -> None:
    """A user's function (a plugin's metric, an attack's `prompts`) can be called with the
    positional arguments unpact passes, named `wanted`; else one message when it is
    defined, not a TypeError from unpact's own code when it is first called."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to read
        return
    try:
        signature.bind(*wanted)
    except TypeError:
        raise UnpactError(
            f"{label}{signature} cannot be called as unpact calls it: ({', '.join(wanted)})"
        ) from None


_DISK_FULL = ("No space left on device", "Disk quota exceeded")
# torch.save's zip writer names no cause when a write fails: "[enforce fail at
# inline_container.cc:...] . unexpected pos ..." (or "... failed writing file ..."), raised
# from "basic_ios::clear: iostream error"
_TORCH_WRITE = ("PytorchStreamWriter failed writing", "iostream error")
_ELSEWHERE = (
    "free some space, or write elsewhere (--out for the outputs, the UNPACT_CACHE variable "
    "for the cache of models and stages)"
)


def disk_full(exc: BaseException) -> UnpactError | None:
    """The message for `exc` if it (or an error it was raised from) is a full disk, else None.

    Writers report a full disk in different shapes: `OSError` with errno ENOSPC or EDQUOT
    from Python's own file calls, safetensors' `SafetensorError` and torch's `RuntimeError`
    with the operating system's words in their text. A full disk is the environment, not a
    bug in unpact: the user frees space or writes elsewhere, so the CLI says that, not a
    traceback.
    """
    for current in _chain(exc):
        hit = isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT)
        where = getattr(current, "filename", None)
        place = f" while writing {where}" if where else ""
        if hit or any(words in str(current) for words in _DISK_FULL):
            return UnpactError(f"the disk is full{place}: {_ELSEWHERE}")
        too_large = isinstance(current, OSError) and current.errno == errno.EFBIG
        if too_large or "File too large" in str(current):  # safetensors says it in words
            return UnpactError(f"a file grew past {_file_size_limit() or 'its limit'}{place}")
        if isinstance(current, RuntimeError) and any(w in str(current) for w in _TORCH_WRITE):
            limit = _file_size_limit()
            cause = f"{limit}, or a full disk" if limit else "the disk being full"
            return UnpactError(
                f"torch could not write a file ({str(current).strip()[:80]}), most often "
                f"because of {cause}: {_ELSEWHERE}"
            )
    return None


def _file_size_limit() -> str:
    """This process's file size limit where one is set (`ulimit -f`, a scheduler's), said;
    else nothing. Past it a write fails (EFBIG; torch's writer says only "iostream error")."""
    limit = _limit("RLIMIT_FSIZE")
    return (
        f"this process's file size limit of {limit / 2**20:.1f} MiB (ulimit -f; raise it)"
        if limit
        else ""
    )


def _limit(name: str) -> int | None:
    """This process's resource limit `name` (resource.RLIMIT_*) where one is set."""
    try:
        import resource

        limit, _ = resource.getrlimit(getattr(resource, name))
    except (ImportError, AttributeError, OSError, ValueError):  # pragma: no cover - not Linux
        return None
    return None if limit == resource.RLIM_INFINITY or limit <= 0 else limit


def not_permitted(exc: BaseException) -> UnpactError | None:
    """The message for `exc` if it (or an error it was raised from) is the system refusing
    a file (permission denied, a read-only file system; a name longer than the file system
    takes, a loop of symbolic links), else None: like a full disk, the environment, said in
    one line with the path rather than as a traceback."""
    paths = "(--out for the outputs, the UNPACT_CACHE variable for the cache of models and stages)"
    allowed = f"give paths you may read and write {paths}"
    refused = {
        **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS), allowed),
        errno.ENAMETOOLONG: f"give a shorter path {paths}",
        errno.ELOOP: f"give a path without a loop of symbolic links {paths}",
    }
    for current in _chain(exc):
        if isinstance(current, OSError) and current.errno in refused:
            name = str(current.filename or "")
            where = f": {name if len(name) <= 120 else name[:117] + '...'}" if name else ""
            why = (current.strerror or "not permitted").lower()
            return UnpactError(f"{why}{where}; {refused[current.errno]}")
    return None


# How torch says it ran out: a device's allocator (CUDA's raises torch.OutOfMemoryError;
# Apple's MPS backend a RuntimeError), or the CPU's (a RuntimeError from c10).
_DEVICE_NO_MEMORY = ("CUDA out of memory", "MPS backend out of memory")
_CPU_NO_MEMORY = "DefaultCPUAllocator: can't allocate memory"
# the system refusing memory in other words: ENOMEM's (safetensors' "unable to mmap N bytes
# from file <...>: Cannot allocate memory (12)" under a process memory limit)
_SYSTEM_NO_MEMORY = "Cannot allocate memory"


def out_of_memory(exc: BaseException) -> UnpactError | None:
    """The message for `exc` if it (or an error it was raised from) is the device or the
    machine running out of memory, else None. Like a full disk, the environment rather
    than a bug: what to do is lighter settings or a larger device, said in one message
    with torch's own first words (how much it tried to allocate)."""
    for current in _chain(exc):
        text = str(current)
        gpu = type(current).__name__ == "OutOfMemoryError" or any(
            w in text for w in _DEVICE_NO_MEMORY
        )
        system = _SYSTEM_NO_MEMORY in text or (
            isinstance(current, OSError) and current.errno == errno.ENOMEM
        )
        if gpu or system or isinstance(current, MemoryError) or _CPU_NO_MEMORY in text:
            said = " ".join(text[max(0, text.find(_CPU_NO_MEMORY)) :].split())  # no c10 prefix
            cut = said.find(". ", 40)  # torch's first sentence or two: how much it asked for
            said = said[: cut + 1] if cut >= 0 else said[:160]
            where = "on the GPU" if gpu else "in RAM" + _memory_limit()
            return UnpactError(
                f"out of memory {where}" + (f" ({said})" if said else "") + ": evaluate in "
                "bfloat16 (--dtype bfloat16; `dtype:` in a run config), train LoRA adapters "
                "rather than every weight (a method's `lora` setting, docs/unlearning.md) with "
                "a smaller batch_size, or use a larger device; stages already cached are kept, "
                "so the same command continues where it stopped"
            )
    return None


def _memory_limit() -> str:
    """The address-space limit of this process where one is set (`ulimit -v`, a cluster
    scheduler's), said: it, not the machine, may be what ran out."""
    limit = _limit("RLIMIT_AS")
    return (
        f", where this process may use at most {limit / 2**30:.1f} GiB (ulimit -v)" if limit else ""
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors it was raised from (`__cause__`, else `__context__`), once each."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_SURROGATE = re.compile("[\ud800-\udfff]")


def unsendable(key: str) -> tuple[int, str] | None:
    """The first character (position, character) of an API key that an HTTP header cannot
    carry (outside printable ASCII: a curly quote, an invisible space pasted with it), or
    None."""
    return next(((n, c) for n, c in enumerate(key) if not " " <= c <= "~"), None)


def lone_surrogate(value: object) -> str | None:
    """The first string in `value` (a string, or the keys and values of dicts and lists
    of them) holding a lone UTF-16 surrogate (U+D800 to U+DFFF), or None. No UTF-8 text
    holds one, but a JSON or YAML escape ("\\ud800", half of an emoji's pair) does, and
    Python reads command-line bytes that are not UTF-8 as such (`surrogateescape`): a
    tokenizer then failed with "TextEncodeInput must be Union[...]", and writing the text
    out with "surrogates not allowed", each a traceback. Each list or mapping is read
    once, however often it occurs: YAML's aliases (`*a`) repeat one object, which nine
    levels of nine made 387 million strings to read, or an infinity (`&a [*a]`)."""
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return v
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            todo += reversed([*v.keys(), *v.values()] if isinstance(v, dict) else v)
    return None


def no_tokens(what: str) -> UnpactError:
    """A text the tokenizer makes no tokens of (a BPE vocabulary without its characters,
    no byte fallback and no unknown token: it drops them): the model would have been
    asked nothing (a reshape error inside the model, or a prompt of its template alone)."""
    return UnpactError(
        f"{what} is no tokens for this model's tokenizer: it drops every character of it "
        "(its vocabulary lacks them); write it in characters the model knows"
    )


def check_text(value: object, what: str) -> None:
    """Refuse `value` (see `lone_surrogate`) with one message naming `what` (and, in a
    JSON object, the field)."""
    found = lone_surrogate(value)
    match = None if found is None else _SURROGATE.search(found)
    if found is None or match is None:
        return
    if isinstance(value, dict):
        key = next((k for k, v in value.items() if lone_surrogate(v) is not None), None)
        what += "" if key is None else f", field {key!r}"
    at = match.start()
    near = ("..." if at > 30 else "") + found[max(at - 30, 0) : at + 30]
    raise UnpactError(
        f"{what}: {near!a} holds a lone UTF-16 surrogate (U+D800 to U+DFFF), "
        "which is not text: an escape such as \\ud800 without its pair in a JSON or YAML "
        "file, or bytes that are not UTF-8 on the command line"
    )
