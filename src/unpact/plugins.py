"""Plugins: Python files or modules that add attacks, metrics and unlearning methods.

A plugin registers things the way the package itself does: subclassing
`unpact.attacks.Attack` or `unpact.unlearn.Method` (each registers under its `name`), or
decorating a function with `unpact.metrics.metric`. A run config's `plugins:` list (paths
relative to the config file, or importable module names) and `unpact run --plugin FILE` are
imported before the rest of the config is validated, so what they define is usable by name
in that config. An error inside a plugin is one `UnpactError` naming its file and line:
while it is imported here, and while it runs (`plugin_failure`, which the CLI applies to
whatever a run raises).

Stages are cached by the names and settings of what they run and, for a plugin's attack or
method, by the source of the file that defines its class (`code_key`): editing that file
re-runs what it computed. A helper module the file imports is not part of the key: after
changing one, change the plugin's file too, or clear the cache (`$UNPACT_CACHE/stages`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from unpact.errors import UnpactError, check_callable, check_not_builtin

_LOADED: dict[str, ModuleType] = {}
_SOURCES: dict[str, str] = {}  # resolved file or package folder -> the plugin as given


def check_name(registry: dict[str, Any], cls: type, what: str) -> None:
    """A class registering under a name unpact's own code already uses is refused (a
    plugin's attack named `probab`, or `class MyNPO(NPO)` inheriting the name `npo`): it
    would replace the built-in for every run in the process, silently."""
    name = getattr(cls, "name", "")
    check_not_builtin(what, name, registry.get(name), cls, 'name = "..."')


def check_overrides(cls: type, base: type, what: str) -> None:
    """A subclass's override of one of `base`'s methods must take what unpact passes it
    (`prompts(self, target)`, `losses(self, ctx)`, ...), and a property stays a property:
    `def prompts(self, question, key_tokens)` was a TypeError from inside unpact's own code
    at the first item, after the models were trained, and `def samples(self)` without
    `@property` a bound method where a number is read."""
    for name, mine in vars(cls).items():
        theirs = inspect.getattr_static(base, name, None)
        if name.startswith("__") or theirs is None:
            continue
        label = f"{what} {getattr(cls, 'name', '') or cls.__name__}"
        if isinstance(theirs, property) and inspect.isfunction(mine):
            raise UnpactError(
                f"{label}: {name} is a property of {base.__name__} (write @property above "
                f"def {name}, or set {name} = value)"
            )
        if inspect.isfunction(theirs) and inspect.isfunction(mine):
            takes = inspect.signature(theirs).parameters.values()
            wanted = [
                p.name for p in takes if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            check_callable(mine, wanted, f"{label}: {name}")


def load_plugins(entries: list[str], base: Path | None = None) -> list[ModuleType]:
    """Import each plugin once (a file again only if it changed); `base` is the folder a
    relative path is read from (the config file's). Returns the modules."""
    return [load_plugin(entry, base) for entry in entries]


def is_path(entry: str) -> bool:
    """Whether a plugin entry names a file (else an importable module)."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def load_plugin(entry: str, base: Path | None = None) -> ModuleType:
    """One plugin: a Python file, or an importable module name."""
    if not entry.strip():
        raise UnpactError("plugin: empty; give a .py file or an importable module's name")
    if not is_path(entry):
        try:
            module = importlib.import_module(entry)
        except ModuleNotFoundError as e:
            if e.name and entry.startswith(e.name):
                raise UnpactError(
                    f"plugin {entry!r}: no such module, and not a .py file (give a path)"
                ) from None
            raise _plugin_error(entry, e) from None
        except Exception as e:
            raise _plugin_error(entry, e) from None
        if getattr(module, "__file__", None):  # a package: every file under its folder
            top = Path(str(module.__file__))
            _SOURCES[str(top.parent if top.name == "__init__.py" else top)] = entry
        return module
    path = Path(entry).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise UnpactError(f"plugin {entry}: no such file ({path})")
    try:
        source = path.read_bytes()
    except OSError as e:
        raise UnpactError(f"plugin {path}: cannot be read ({e.strerror})") from None
    key = f"{path.resolve()}:{hashlib.sha256(source).hexdigest()[:16]}"
    if key in _LOADED:
        return _LOADED[key]
    name = "unpact_plugin_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UnpactError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _beside(path.resolve().parent):
            spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise _plugin_error(str(path), e, path) from None
    _LOADED[key] = module
    _SOURCES[str(path.resolve())] = str(path)
    return module


def code_key(cls: type) -> list[str]:
    """For a class a plugin defines (an attack, an unlearning method), the hash of the
    source file that defines it, as a stage key's part: a plugin author edits the code and
    runs again, and the stages it computed before must not be read for the new code. []
    for unpact's own classes, whose changes are versioned by hand (`revision`), and for a
    class without a source file (defined in a notebook: keyed by name and settings only)."""
    if cls.__module__.split(".")[0] == "unpact":
        return []
    try:
        where = inspect.getsourcefile(cls)
        source = Path(where).read_bytes() if where else None
    except (TypeError, OSError):
        source = None
    return [] if source is None else [f"code {hashlib.sha256(source).hexdigest()[:16]}"]


@contextmanager
def _beside(folder: Path) -> Iterator[None]:
    """A plugin file imports the modules beside it as a script would (its folder first on
    the path while it is imported); the folder then stays at the end of the path, for the
    imports its functions make later, where it shadows nothing installed."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)
        if entry not in sys.path:
            sys.path.append(entry)


def plugin_failure(error: BaseException) -> UnpactError | None:
    """An error raised inside a loaded plugin's code while it ran (a metric, an attack's
    prompt, a method's loss) as one message naming the plugin's file and line; None when
    no frame of its traceback is in a plugin (a fault of unpact's own, left as it is)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        where = str(Path(frame.filename).resolve())
        for source, entry in _SOURCES.items():
            if where == source or where.startswith(source.rstrip("/") + "/"):
                return _failed(entry, f"{frame.filename}:{frame.lineno}", error)
    return None


def _failed(entry: str, where: str, error: BaseException) -> UnpactError:
    message = str(error) if isinstance(error, UnpactError) else f"{type(error).__name__}: {error}"
    return UnpactError(f"plugin {entry} failed at {where}: {message}")


def _plugin_error(entry: str, error: Exception, path: Path | None = None) -> UnpactError:
    """One line: where in the plugin it failed (its last frame there) and what."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        where = f"{error.filename}:{error.lineno}"
    else:
        mine = [
            f for f in frames if path is not None and Path(f.filename).resolve() == path.resolve()
        ]
        chosen = mine or list(frames)
        where = f"{chosen[-1].filename}:{chosen[-1].lineno}" if chosen else entry
    return _failed(entry, where, error)
