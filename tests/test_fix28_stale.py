"""A compiled module is stale when its sources' content differs from what was built, not when they are only newer.

setup.py records the sha256 of each built module's sources and of the built file in `_compiled_sources.json`
beside it; `compiled.stale` compares them where a source is newer than the built file, and keeps the mtime rule
where there is no record (a build before records). The checks run on a fake layout (a built file, its sources and
a record in a temporary directory) with setup.py's own record writer, and on the real install's records.
"""

import ast
import json
import os
import re
import time

import pytest

from dualpath_jax import compiled

_SETUP_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def _setup_functions() -> dict:
    """setup.py's record writer (`_sha256`, `_module_sources`, `_write_record` and the names they use), without
    running setup.py (that cythonizes and builds)."""
    tree = ast.parse(open(_SETUP_PY).read())
    keep = {"_sha256", "_module_sources", "_write_record", "_SOURCES_RECORD", "_SOURCE_SUFFIXES"}
    body = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in keep)
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") in keep for t in node.targets))
        or (isinstance(node, ast.Import) and all(a.name in ("hashlib", "json", "os") for a in node.names))
    ]
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), _SETUP_PY, "exec"), namespace)
    assert keep <= set(namespace), f"setup.py lacks {sorted(keep - set(namespace))}"
    return namespace


_SETUP = _setup_functions()
_MODULE = "fakepkg.mod"  # (its last name names its files and its entry in the record)


def _layout(tmp_path, monkeypatch, sources=("mod.py", "mod.pxd"), record=True):
    """A built module as setup.py leaves it: `fakepkg/mod.<so>` built after its sources, and (record=True) the
    record of its build written by setup.py's own code, run from the fake project's root as setup.py is.
    Returns the built file's path; `compiled` sees it as the built file of `fakepkg.mod`."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    for name in sources:
        (pkg / name).write_text(f"# the source {name}\nx = 1\n")
    built = pkg / "mod.cpython-311-x86_64-linux-gnu.so"
    built.write_bytes(b"\x7fELF the compiled module")
    past = time.time() - 1000.0
    for p in pkg.iterdir():  # sources first, then the build
        os.utime(p, (past, past + (100.0 if p == built else 0.0)))
    if record:
        monkeypatch.chdir(tmp_path)
        entry = {"built": built.name, "built_sha256": _SETUP["_sha256"](str(built))}
        entry["sources"] = _SETUP["_module_sources"](_MODULE)
        _SETUP["_write_record"](os.path.join("fakepkg", _SETUP["_SOURCES_RECORD"]), {"mod": entry})
    real_built_file = compiled._built_file
    monkeypatch.setattr(compiled, "_built_file", lambda m: str(built) if m == _MODULE else real_built_file(m))
    return built


def _touch(path, ahead_s=500.0):
    """A newer mtime, same bytes (a `cp` back, a checkout of the same content, a save without change)."""
    t = os.path.getmtime(path) + ahead_s
    os.utime(path, (t, t))


def test_setup_and_compiled_agree_on_the_modules_and_the_record():
    """compiled.MODULES are setup.py's extensions; both name the same record file and source suffixes."""
    extensions = re.findall(r'Extension\(\s*"([\w.]+)"', open(_SETUP_PY).read())
    assert sorted(extensions) == sorted(compiled.MODULES)
    assert _SETUP["_SOURCES_RECORD"] == compiled.SOURCES_RECORD
    assert tuple(_SETUP["_SOURCE_SUFFIXES"]) == compiled.SOURCE_SUFFIXES


def test_same_content_with_a_newer_mtime_is_not_stale(tmp_path, monkeypatch):
    built = _layout(tmp_path, monkeypatch)
    for name in ("mod.py", "mod.pxd"):
        _touch(built.parent / name)
    assert os.path.getmtime(built.parent / "mod.py") > os.path.getmtime(built) + 5.0  # the mtime rule: stale
    assert not compiled.stale(_MODULE) and compiled.stale_reason(_MODULE) == ""


def test_one_byte_changed_is_stale_and_named(tmp_path, monkeypatch):
    built = _layout(tmp_path, monkeypatch)
    src = built.parent / "mod.pxd"
    src.write_bytes(src.read_bytes().replace(b"x = 1", b"x = 2"))
    _touch(src, 0.0)  # (written now: newer than the build)
    assert compiled.stale(_MODULE)
    assert compiled.stale_reason(_MODULE) == "edited since the build: mod.pxd"


def test_an_edit_with_an_older_mtime_than_the_build_keeps_the_mtime_rule(tmp_path, monkeypatch):
    """Contents are compared only where a source is newer (hashing costs): an older source is the built one."""
    built = _layout(tmp_path, monkeypatch)
    src = built.parent / "mod.py"
    old = os.path.getmtime(src)
    src.write_text("x = 3\n")
    os.utime(src, (old, old))
    assert not compiled.stale(_MODULE)


def test_edited_then_reverted_is_not_stale(tmp_path, monkeypatch):
    built = _layout(tmp_path, monkeypatch)
    src = built.parent / "mod.py"
    text = src.read_text()
    src.write_text(text + "y = 2\n")
    _touch(src, 0.0)
    assert compiled.stale(_MODULE)
    src.write_text(text)  # (a `git stash` of the edit)
    assert not compiled.stale(_MODULE)


def test_a_source_added_or_removed_since_the_build_is_stale(tmp_path, monkeypatch):
    built = _layout(tmp_path, monkeypatch)
    _touch(built.parent / "mod.py")
    (built.parent / "mod.pxd").unlink()
    assert compiled.stale_reason(_MODULE) == "edited since the build: mod.pxd (removed)"
    (built.parent / "mod.pyx").write_text("cdef int x\n")
    assert compiled.stale_reason(_MODULE) == "edited since the build: mod.pyx, mod.pxd (removed)"


def test_no_record_keeps_the_mtime_rule(tmp_path, monkeypatch):
    """A build from before the records (or one whose build of the module failed): newer means edited."""
    built = _layout(tmp_path, monkeypatch, record=False)
    assert not compiled.stale(_MODULE)
    _touch(built.parent / "mod.py")
    assert compiled.stale_reason(_MODULE).startswith("mod.py newer than the build, which has no record")


@pytest.mark.parametrize("damage", ["unreadable", "other module only", "other build"])
def test_a_record_that_does_not_describe_this_build_keeps_the_mtime_rule(tmp_path, monkeypatch, damage):
    built = _layout(tmp_path, monkeypatch)
    path = built.parent / compiled.SOURCES_RECORD
    if damage == "unreadable":
        path.write_text("{not json")
    elif damage == "other module only":
        _SETUP["_write_record"](str(path), {"mod": None, "other": {"built": "x", "sources": {}}})
        assert set(json.loads(path.read_text())) == {"other"}  # (None drops the module's entry)
    else:  # the built file was replaced without a new record (an older setup.py built it)
        built.write_bytes(b"\x7fELF another build")
        os.utime(built, (os.path.getmtime(built) - 1000.0,) * 2)
        os.utime(built.parent / "mod.py", (os.path.getmtime(built) - 100.0,) * 2)
        os.utime(built.parent / "mod.pxd", (os.path.getmtime(built) - 100.0,) * 2)
    assert not compiled.stale(_MODULE)
    _touch(built.parent / "mod.py")
    assert compiled.stale(_MODULE), damage
    if damage == "other build":
        assert "records another build" in compiled.stale_reason(_MODULE)


def test_stale_modules_names_the_stale_ones_with_the_reason(tmp_path, monkeypatch):
    built = _layout(tmp_path, monkeypatch)
    monkeypatch.setattr(compiled, "MODULES", (_MODULE,))
    monkeypatch.setattr(compiled, "PURE_PYTHON", False)
    _touch(built.parent / "mod.py")
    assert compiled.stale_modules() == {}
    (built.parent / "mod.py").write_text("x = 4\n")
    _touch(built.parent / "mod.py", 0.0)
    assert compiled.stale_modules() == {_MODULE: "edited since the build: mod.py"}
    assert not compiled.use(_MODULE)  # (and the warning says why)
    monkeypatch.setattr(compiled, "PURE_PYTHON", True)
    assert compiled.stale_modules() == {}  # the twins run on purpose: not a stale build


def test_the_install_records_the_sources_of_every_compiled_module():
    """After `pip install -e .` (or `python setup.py build_ext --inplace`), each built module has its record."""
    built = {m: compiled._built_file(m) for m in compiled.MODULES}
    if not any(built.values()):
        pytest.skip("no module is compiled in this install (pure Python): nothing records its sources")
    for module, path in built.items():
        if not path:
            continue
        record = compiled._build_record(path, module)
        assert record is not None, (
            f"{module}: no entry in {os.path.join(os.path.dirname(path), compiled.SOURCES_RECORD)}: "
            "built by a setup.py before the records; rebuild with `pip install -e .`"
        )
        assert record["built"] == os.path.basename(path)
        assert record["built_sha256"] == compiled.file_sha256(path), f"{module}: the record is of another build"
        stem = os.path.join(os.path.dirname(path), module.rsplit(".", 1)[-1])
        sources = {os.path.basename(stem + s) for s in compiled.SOURCE_SUFFIXES if os.path.exists(stem + s)}
        assert sources and set(record["sources"]) == sources, (module, sorted(record["sources"]))
