"""Plugins: Python files or modules that add attacks, metrics and unlearning methods.

A plugin registers things the way the package itself does: subclassing
`unpact.attacks.Attack` or `unpact.unlearn.Method` (each registers under its `name`), or
decorating a function with `unpact.metrics.metric`. A run config's `plugins:` list (paths
relative to the config file, or importable module names) and `unpact run --plugin FILE` are
imported before the rest of the config is validated, so what they define is usable by name
in that config. A file in a package's folder (an `__init__.py` beside it) is imported as
a module of that package, so its relative imports (`from . import util`) work, and a
package's folder as the package; a module name is looked for in the config file's folder
and the working directory too, where the `unpact` command does not look (and refused where
it is there but the name imports another module: the file's path loads it). An error inside
a plugin is one `UnpactError` naming its file and line: while it is imported here, and
while it runs (`plugin_failure`, which the CLI applies to whatever a run raises).

Stages are cached by the names and settings of what they run and, for a plugin's attack or
method, by the source of the file that defines its class and of the plugin's own modules that
file imports (`code_key`): editing them re-runs what they computed. A module imported by a
name computed at run time (`importlib.import_module(name)`) is not seen: after changing
one, change the plugin's file too, or clear the cache (`$UNPACT_CACHE/stages`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from unpact.errors import UnpactError, check_callable, check_not_builtin

_LOADED: dict[str, ModuleType] = {}
_SOURCES: dict[str, str] = {}  # resolved file or package folder -> the plugin as given
_PLUGGED: set[str] = set()  # the modules loaded as plugins so far (their names)
_RAN: dict[Path, bytes] = {}  # a plugin file on its own -> the source its module ran
_NAMED = [0]  # how many attacks and methods have registered, built-in or a plugin's
_DEFINING: set[str] = set()  # the modules that define them


def check_name(registry: dict[str, Any], cls: type, what: str) -> None:
    """A class registering under a name unpact's own code already uses is refused (a
    plugin's attack named `probab`, or `class MyNPO(NPO)` inheriting the name `npo`): it
    would replace the built-in for every run in the process, silently."""
    name = getattr(cls, "name", "")
    check_not_builtin(what, name, registry.get(name), cls, 'name = "..."')
    _NAMED[0] += 1
    _DEFINING.add(cls.__module__)


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
    """One plugin: a Python file, or an importable module name. A plugin that runs now and
    registers nothing is said in a warning: its class has no `name` (or its metric no
    `@metric`), or it is not the file meant, and the run would otherwise fail later on an
    "unknown attack" (or never use it)."""
    before, imported, loaded = _registered(), set(sys.modules), len(_LOADED)
    module = _load_plugin(entry, base)
    ran = len(_LOADED) > loaded or module.__name__ not in imported
    # a module imported before (`--plugin json`, the standard library's) registered nothing
    # either, unless what it defines was registered then (a user's `import myplugin` first)
    before_now = not ran and (module.__name__ in _PLUGGED or _defines_any(module.__name__))
    if not before_now and _registered() == before:
        logging.getLogger("unpact").warning(
            f"plugin {entry} registered no attack, method or metric: a subclass of "
            "unpact.attacks.Attack or unpact.unlearn.Method registers itself by its `name`, "
            "a metric by @unpact.metrics.metric (docs/architecture.md)"
        )
    _PLUGGED.add(module.__name__)
    return module


def _defines_any(module: str) -> bool:
    """Whether an attack, method or metric registered so far is defined in `module` or in
    a module of its package."""
    from unpact.metrics import METRICS

    found = _DEFINING | {m.fn.__module__ for m in METRICS.values()}
    return any(f == module or f.startswith(module + ".") for f in found)


def _registered() -> int:
    """How many attacks, methods and metrics have registered (built-in and plugins')."""
    from unpact.metrics import METRICS

    return _NAMED[0] + len(METRICS)


def _load_plugin(entry: str, base: Path | None) -> ModuleType:
    if not entry.strip():
        raise UnpactError("plugin: empty; give a .py file or an importable module's name")
    if not is_path(entry):
        with _no_bytecode():
            return _load_module(entry, base)
    path = Path(entry).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_dir() and _package(path):  # a package's folder
        path = path / "__init__.py"
    elif path.is_dir():
        raise UnpactError(
            f"plugin {entry}: a folder without __init__.py; give a .py file, a package's "
            "folder or an importable module's name"
        )
    if not path.is_file():
        raise UnpactError(f"plugin {entry}: no such file ({path})")
    try:
        source = path.read_bytes()
    except OSError as e:
        raise UnpactError(f"plugin {path}: cannot be read ({e.strerror})") from None
    resolved = path.resolve()
    key = f"{resolved}:{hashlib.sha256(source).hexdigest()[:16]}"
    if key in _LOADED:
        return _LOADED[key]
    packaged = _in_package(resolved)
    with _no_bytecode():
        if packaged is not None:  # `from . import util` works as in its package
            module = _load_packaged(str(path), resolved, *packaged)
        else:
            name = "unpact_plugin_" + hashlib.sha256(key.encode()).hexdigest()[:12]
            module = _load_file(path, name, source)
    _LOADED[key] = module
    return module


@contextmanager
def _no_bytecode() -> Iterator[None]:
    """No `__pycache__` written for what a plugin load imports. Python trusts a cached
    .pyc while its source keeps the size and the whole second of the modification time it
    was compiled from: a plugin rewritten within that second to the same size (a sweep
    that writes one setting per run) ran the previous code under the new code's key."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def _load_module(entry: str, base: Path | None) -> ModuleType:
    """A plugin given as a module name: importable as it is, or a package or module in the
    config file's folder or the working directory (which the `unpact` command, unlike
    `python -m`, does not put on the path)."""
    top = entry.split(".")[0]
    folders = dict.fromkeys([base or Path.cwd(), Path.cwd()])
    here = [f for f in folders if (f / top).is_dir() or (f / f"{top}.py").is_file()]
    try:
        try:
            module = importlib.import_module(entry)
        except ModuleNotFoundError as e:
            if e.name != top or not here:
                raise
            with _beside(here[0].resolve()):
                module = importlib.import_module(entry)
        else:
            _check_not_shadowed(entry, sys.modules[top], here)
    except ModuleNotFoundError as e:
        if e.name and entry.startswith(e.name):
            raise UnpactError(
                f"plugin {entry!r}: no such module, and not a .py file (give a path)"
            ) from None
        raise _plugin_error(entry, e) from None
    except Exception as e:
        raise _plugin_error(entry, e) from None
    if getattr(module, "__file__", None):  # a package: every file under its folder
        file = Path(str(module.__file__))
        _SOURCES[str(file.parent if file.name == "__init__.py" else file)] = entry
    return module


def _check_not_shadowed(entry: str, imported: ModuleType, here: list[Path]) -> None:
    """A module name that is also a file or package in the config's folder or the working
    directory, while the name imports another module (`--plugin code` beside a `code.py`:
    the standard library's `code`, which registers nothing, so the user's attack was then
    "unknown"), is refused, naming both: the file's path loads it."""
    found = getattr(imported, "__file__", None)
    if not here or found is None:
        return
    top = entry.split(".")[0]
    mine = [here[0] / f"{top}.py"] if (here[0] / f"{top}.py").is_file() else []
    mine += [here[0] / top] if _package(here[0] / top) else []
    loaded = Path(found).resolve()
    if not mine or any(loaded.is_relative_to(m.resolve()) for m in mine):
        return  # a folder of that name but no package; or the module is the one here
    local = mine[0]
    raise UnpactError(
        f"plugin {entry!r}: the name imports {found}, not the {local.name} here ({local}); "
        f"give its path (--plugin ./{local.name}{'' if local.is_file() else '/'}) or rename it"
    )


def _package(folder: Path) -> bool:
    return (folder / "__init__.py").is_file()


def _in_package(path: Path) -> tuple[Path, str] | None:
    """For a file in a package's folder (an `__init__.py` beside it), the folder its top
    package is in and its module name (`mypkg.methods`); else None."""
    parts, folder = [path.stem], path.parent
    while _package(folder) and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    if len(parts) == 1 or not path.stem.isidentifier():
        return None
    if path.name == "__init__.py":
        parts.pop()
    return folder, ".".join(parts)


def _load_packaged(entry: str, path: Path, root: Path, name: str) -> ModuleType:
    """A plugin file of a package, imported as its module `name` with the package's folder
    `root` on the path (its relative imports work); when it changed, its package is
    imported again from the files as they are now."""
    top = name.split(".")[0]
    held = sys.modules.get(top)
    where = Path(getattr(held, "__file__", None) or "")
    if held is not None and not where.resolve().is_relative_to(root / top):
        raise UnpactError(
            f"plugin {entry}: its package {top!r} has the name of a module already imported "
            f"from {where}; rename the plugin's package"
        )
    for loaded in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[loaded]  # changed since imported: the package afresh, not half of it
    try:  # its folder too: `import helpers` beside it works as for a file on its own
        with _beside(path.parent), _beside(root):
            module = importlib.import_module(name)
    except Exception as e:
        raise _plugin_error(entry, e, path) from None
    if Path(str(module.__file__)).resolve() != path:
        raise UnpactError(f"plugin {entry}: importing it as {name} gave {module.__file__}")
    _SOURCES[str(root / top)] = entry
    return module


def _load_file(path: Path, name: str, source: bytes) -> ModuleType:
    """A plugin file on its own, imported under `name` with its folder on the path: the
    code run is compiled from `source`, the bytes its code key hashes (never a cached
    .pyc, nor the file read again)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UnpactError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
        with _beside(path.resolve().parent):
            exec(code, module.__dict__)
    except Exception as e:
        del sys.modules[name]
        raise _plugin_error(str(path), e, path) from None
    _SOURCES[str(path.resolve())] = str(path)
    _RAN[path.resolve()] = source
    return module


def code_key(cls: type) -> list[str]:
    """For a class a plugin defines (an attack, an unlearning method), the hash of the
    source that defines it, as a stage key's part: a plugin author edits the code and runs
    again, and the stages it computed before must not be read for the new code. The source
    is the class's file and the plugin's own modules it imports (`_own_sources`): a helper
    module beside a plugin file, or the rest of a plugin package. [] for unpact's own
    classes, whose changes are versioned by hand (`revision`), and for a class without a
    source file (defined in a notebook: keyed by name and settings only)."""
    if cls.__module__.split(".")[0] == "unpact":
        return []
    try:
        where = inspect.getsourcefile(cls)
        sources = _own_sources(Path(where).resolve(), cls.__module__) if where else {}
    except (TypeError, OSError):
        return []
    if len(sources) == 1:  # one file: its hash alone, as before helpers were followed
        return [f"code {hashlib.sha256(*sources.values()).hexdigest()[:16]}"]
    digest = hashlib.sha256()
    top = next(iter(sources)).parent
    for file, source in sorted(sources.items()):
        digest.update(f"{file.relative_to(top) if file.is_relative_to(top) else file}\0".encode())
        digest.update(hashlib.sha256(source).digest())
    return [f"code {digest.hexdigest()[:16]}"]


_MOST_SOURCES = 1000  # a plugin importing more of its own modules than this: the first ones


def _own_sources(file: Path, module: str) -> dict[Path, bytes]:
    """The source of `file` (module `module`) and, followed from its import statements
    (anywhere in it, found without running it), of every module of the plugin's own it
    imports, each read once: for a plugin
    file (`unpact_plugin_...`, or a top-level module outside the installed packages), the
    modules in its folder; for a module of a package, that package's modules (`from .
    import util`, `import pkg.sub`). What is imported by a name computed at run time
    (`importlib.import_module(name)`) is not seen."""
    parts = module.split(".")
    package = file.parent if file.name == "__init__.py" else None
    root = file.parent
    for _ in parts[1:] if package is None else parts:
        root = root.parent
    loose = len(parts) == 1 and package is None and not _installed(root)
    own = None if loose else parts[0]
    found, todo = {file: _RAN.get(file) or file.read_bytes()}, [(file, parts)]
    while todo and len(found) < _MOST_SOURCES:
        current, name = todo.pop()
        for candidate, imported in _imported(found[current], current, name, own, root):
            if candidate not in found and candidate.is_relative_to(root):
                found[candidate] = candidate.read_bytes()
                todo.append((candidate, imported))
    return found


def _installed(folder: Path) -> bool:
    """Whether `folder` is where Python or installed packages live (a module there imports
    other distributions, not modules of its own)."""
    places = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib")}
    places |= {sysconfig.get_paths(vars={"base": sys.base_prefix}).get("stdlib")}
    return any(p and folder == Path(p).resolve() for p in places) or "-packages" in folder.name


def _imported(
    source: bytes, file: Path, module: list[str], own: str | None, root: Path
) -> Iterator[tuple[Path, list[str]]]:
    """The files of the modules the import statements of `file` (`source`) run, with their
    dotted names
    (with `from m import a`, `m.a` too: `a` may be a module), found under `root`; only the
    plugin's own: under its package `own`, or, for a loose file (`own` None), any name."""
    is_package = file.name == "__init__.py"
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # hashed as it is, nothing followed from it
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:  # relative: from the module's package, up level - 1
                anchor = module if is_package else module[:-1]
                if own is None or node.level > len(anchor):
                    continue
                base = anchor[: len(anchor) - node.level + 1] + base
            names = [base] + [[*base, alias.name] for alias in node.names if alias.name != "*"]
        else:
            continue
        for name in names:
            if name and (own is None or name[0] == own):
                yield from _files_of(root, name)


def _files_of(root: Path, name: list[str]) -> Iterator[tuple[Path, list[str]]]:
    """The source files importing `name` runs, under `root`, with their modules' names:
    its packages' `__init__.py` and its own file."""
    for depth in range(1, len(name) + 1):
        folder = root.joinpath(*name[:depth])
        last = depth == len(name)
        candidates = [folder / "__init__.py"] + [folder.with_name(folder.name + ".py")] * last
        for candidate in candidates:
            if candidate.is_file():
                yield candidate.resolve(), name[:depth]


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
