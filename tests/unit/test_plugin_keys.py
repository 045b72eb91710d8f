"""A plugin's code key covers the plugin's own modules its class's file imports."""

from __future__ import annotations

import hashlib
import importlib
import sys

import pytest

from unpact.errors import UnpactError
from unpact.plugins import _LOADED, code_key, load_plugin


@pytest.fixture
def clean_imports():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]
    _LOADED.clear()
    importlib.invalidate_caches()


def _key_of(path, class_name="Thing"):
    module = load_plugin(str(path))
    return code_key(getattr(module, class_name))


def test_a_plugin_files_helper_module_is_in_its_key(tmp_path, clean_imports):
    """A helper module beside a plugin file was not in the key: its author edited the
    helper, ran again, and read the stages the old helper computed."""
    plugin, helper = tmp_path / "mine.py", tmp_path / "helpers.py"
    helper.write_text("def shout(q):\n    return q.upper()\n")
    (tmp_path / "unused.py").write_text("X = 1\n")
    plugin.write_text(
        "import json\nimport numpy\n\n\nclass Thing:\n"
        "    def prompt(self, q):\n        from helpers import shout\n\n        return shout(q)\n"
    )
    first = _key_of(plugin)
    assert first == _key_of(plugin)  # the same code: the same key
    (tmp_path / "unused.py").write_text("X = 2\n")  # a module it does not import
    assert _key_of(plugin) == first
    helper.write_text("def shout(q):\n    return q.upper() + '!'\n")
    assert _key_of(plugin) != first


def test_a_single_file_plugin_keeps_its_key(tmp_path, clean_imports):
    """A plugin importing none of its own modules (only installed ones: not followed into
    site-packages) is keyed by its file's hash, as before helpers were followed."""
    plugin = tmp_path / "solo.py"
    plugin.write_text("import numpy\nimport torch\nfrom unpact.attacks import Attack\n\n"
                      "class Thing:\n    pass\n")  # fmt: skip
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()[:16]
    assert _key_of(plugin) == [f"code {digest}"]


def test_a_plugin_packages_modules_are_in_its_key(tmp_path, clean_imports, monkeypatch):
    """A plugin given as a module of a package: the package's modules its file imports,
    relative or absolute, and the packages' __init__ files they run; not another package's,
    and not its modules it does not import."""
    pkg = tmp_path / "myplug"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .deep import VALUE\n")
    (pkg / "sub" / "deep.py").write_text("VALUE = 1\n")
    (pkg / "util.py").write_text("def f():\n    return 1\n")
    (pkg / "other.py").write_text("Y = 1\n")
    (tmp_path / "elsewhere.py").write_text("Z = 1\n")
    (pkg / "methods.py").write_text(
        "from . import util\nfrom myplug.sub import VALUE\nimport elsewhere\n\n"
        "class Thing:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    key = lambda: code_key(importlib.import_module("myplug.methods").Thing)  # noqa: E731
    first = key()
    for unrelated in (pkg / "other.py", tmp_path / "elsewhere.py"):
        unrelated.write_text("Y = 2\n")
        assert key() == first, unrelated
    for followed in (pkg / "util.py", pkg / "sub" / "deep.py", pkg / "sub" / "__init__.py"):
        followed.write_text(followed.read_text() + "\n# edited\n")
        assert key() != first, followed
        first = key()


def test_unpacts_own_classes_have_no_code_key_and_unparsable_helpers_count(tmp_path, clean_imports):
    from unpact.attacks import ATTACKS

    assert code_key(ATTACKS["probab"]) == []  # versioned by hand (revision)
    plugin, helper = tmp_path / "mine.py", tmp_path / "helpers.py"
    plugin.write_text("class Thing:\n    def run(self):\n        import helpers\n")
    helper.write_text("def broken(:\n")  # not Python (yet): hashed, nothing followed
    first = _key_of(plugin)
    helper.write_text("def broken():\n    pass\n")
    assert first != _key_of(plugin) != []


def test_a_plugin_file_of_a_package_imports_relatively(tmp_path, clean_imports, monkeypatch):
    """`--plugin mypkg/methods.py` whose file says `from . import util` was "ImportError:
    attempted relative import with no known parent package", and `--plugin mypkg.methods`
    "no such module" from the `unpact` command (which does not put the working directory
    on the path): a plugin package could be used only once pip-installed. Now the file is
    imported as mypkg.methods, and the module name is found in the working directory."""
    pkg = tmp_path / "mypkg_rel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "util.py").write_text("def f():\n    return 1\n")
    (pkg / "helpers.py").write_text("G = 2\n")
    (pkg / "methods.py").write_text(
        "from . import util\nimport helpers\n\nclass Thing:\n    value = util.f() + helpers.G\n"
    )
    module = load_plugin(str(pkg / "methods.py"))
    assert module.__name__ == "mypkg_rel.methods" and module.Thing.value == 3
    first = code_key(module.Thing)
    (pkg / "util.py").write_text("def f():\n    return 10\n")  # edited: in its key
    assert code_key(module.Thing) != first
    (pkg / "methods.py").write_text(
        "from . import util\n\nclass Thing:\n    value = util.f() + 1\n"
    )  # the file edited: imported again (the same process, as in a notebook)
    assert load_plugin(str(pkg / "methods.py")).Thing.value == 11
    for name in [n for n in sys.modules if n.startswith("mypkg_rel")]:
        del sys.modules[name]
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert load_plugin("mypkg_rel.methods").Thing.value == 11


def test_a_plugin_package_named_like_an_imported_module_is_refused(tmp_path, clean_imports):
    pkg = tmp_path / "json"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.py").write_text("X = 1\n")
    with pytest.raises(UnpactError, match=r"its package 'json' has the name of a module"):
        load_plugin(str(pkg / "mine.py"))


def test_a_plugin_package_may_be_given_as_its_folder(tmp_path, clean_imports):
    """`--plugin ./mypkg` said "no such file": a package's folder is its __init__.py,
    imported as the package; a folder that is no package is one message saying so."""
    pkg = tmp_path / "mypkg_dir"
    pkg.mkdir()
    (pkg / "util.py").write_text("V = 5\n")
    (pkg / "__init__.py").write_text("from .util import V\n\nclass Thing:\n    value = V\n")
    module = load_plugin(str(pkg) + "/")
    assert module.__name__ == "mypkg_dir" and module.Thing.value == 5
    first = code_key(module.Thing)
    (pkg / "util.py").write_text("V = 6\n")  # the package's module it imports: in its key
    assert code_key(module.Thing) != first
    (tmp_path / "loose").mkdir()
    with pytest.raises(UnpactError, match=r"a folder without __init__.py; give a \.py file"):
        load_plugin(str(tmp_path / "loose"))


def test_a_plugin_rewritten_in_the_same_second_runs_its_new_code(tmp_path, clean_imports):
    """Python trusts a cached .pyc while the source keeps its size and its modification
    time's second: a plugin rewritten within that second to the same size (a sweep writing
    one setting per run) ran the previous code under the new code's key."""
    import os
    import py_compile

    plugin = tmp_path / "sweep.py"
    plugin.write_text("class Thing:\n    value = 0.5\n")
    stamp = (1_700_000_000, 1_700_000_000)
    os.utime(plugin, stamp)
    py_compile.compile(str(plugin), cfile=importlib.util.cache_from_source(str(plugin)))
    plugin.write_text("class Thing:\n    value = 0.7\n")  # same size, same second
    os.utime(plugin, stamp)
    module = load_plugin(str(plugin))
    assert module.Thing.value == 0.7
    assert code_key(module.Thing) == [
        f"code {hashlib.sha256(plugin.read_bytes()).hexdigest()[:16]}"
    ]


def test_a_plugin_load_leaves_no_bytecode_to_go_stale(tmp_path, clean_imports, monkeypatch):
    """Neither the plugin file nor the helper it imports gets a `__pycache__` from
    unpact (which a later rewrite in the same second would meet)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as without PYTHONDONTWRITEBYTECODE
    (tmp_path / "sweep_helper.py").write_text("SCALE = 1\n")
    plugin = tmp_path / "sweeping.py"
    plugin.write_text("from sweep_helper import SCALE\n\nclass Thing:\n    value = SCALE\n")
    assert load_plugin(str(plugin)).Thing.value == 1
    assert not (tmp_path / "__pycache__").exists()
    assert sys.dont_write_bytecode is False  # as it was before the load


def test_a_plugin_module_name_shadowed_by_another_module_is_refused(
    tmp_path, clean_imports, monkeypatch
):
    """`--plugin code` beside a `code.py` of the user's imported the standard library's
    `code` module, which registers nothing: the user's attack was then "unknown" with no
    word of why. A name that is both a file here and another importable module is one
    message naming both; the file's path loads it."""
    (tmp_path / "code.py").write_text("class Thing:\n    value = 4\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnpactError, match=r"plugin 'code': .*code\.py here .* give its path"):
        load_plugin("code")
    assert load_plugin("./code.py").Thing.value == 4
    (tmp_path / "json").mkdir()  # a data folder of that name, no package: json is json's
    assert load_plugin("json").__name__ == "json"
    (tmp_path / "json" / "__init__.py").write_text("")  # a package of the user's: refused
    with pytest.raises(UnpactError, match=r"give its path \(--plugin \./json/\)"):
        load_plugin("json")
    # the same module found both ways (a checkout installed with `pip install -e .`): fine
    (tmp_path / "mine_here.py").write_text("class Thing:\n    value = 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugin("mine_here").Thing.value == 5
