"""DVC lineage: each stage depends on the code its command runs, and dvc.lock records what dvc.yaml and the tree hold.

The code a stage runs is derived from the source, never from a hand-kept list: the command
`python -m vae_mlops <stage>` runs `__main__.py`, `cli.py`'s `main`, `build_parser` and `_cmd_<stage>`;
from the names those functions use, every module they import is followed, transitively, through every
`import` in each module (module level or inside a function: both run; `if TYPE_CHECKING:` blocks do not).
The names cli.py imports only for other commands are not followed: they cannot change this stage's outputs.
A package's `__init__.py` counts when the package itself is imported (`from vae_mlops.likelihoods import X`),
not when a submodule is (`from vae_mlops.stages.train import X` runs stages/train.py for this stage's work).
A package that imports its own modules at run time (`likelihoods`) is a folder dep; a module file that code
reads beside itself (`Path(__file__).with_name("served_model.py")`) is a dep too.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.support.project import ROOT
from vae_mlops import plugins

PKG_DIR = ROOT / "src" / "vae_mlops"
STAGES = ("download", "train", "evaluate", "register")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_file(name: str) -> Path | None:
    """The file of project module `name` (dotted, under vae_mlops), or None if it is not one."""
    parts = name.split(".")
    if parts[0] != "vae_mlops":
        return None
    base = PKG_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts if path.name == "__init__.py" else parts[:-1]).removesuffix(".__init__")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: anywhere but inside `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _bindings(node: ast.Import | ast.ImportFrom, path: Path) -> dict[str, str]:
    """Local name -> the project module it brings in, for one import statement."""
    out: dict[str, str] = {}
    if isinstance(node, ast.Import):
        for alias in node.names:
            if module_file(alias.name):
                out[alias.asname or alias.name.split(".")[0]] = alias.name
        return out
    base = node.module or ""
    if node.level:
        pkg = _package_of(path).split(".")
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join([*pkg, base] if base else pkg)
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        target = sub if module_file(sub) else base
        if module_file(target):
            out[alias.asname or alias.name] = target
    return out


def imports_of(path: Path) -> set[str]:
    """The project modules that `path` imports anywhere."""
    tree = ast.parse(path.read_text(), str(path))
    mods: set[str] = set()
    for node in _import_nodes(tree):
        mods.update(_bindings(node, path).values())
    return mods


def closure(modules: set[str]) -> set[Path]:
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imports_of(module_file(name)))
    return {module_file(m) for m in seen}


def _names_used(fn: ast.FunctionDef) -> set[tuple[str, ...]]:
    """`(x, y)` for every `x.y` in `fn`, `(x,)` for every other use of a name `x`."""
    used: set[tuple[str, ...]] = set()
    heads: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            used.add((node.value.id, node.attr))
            heads.add(id(node.value))
    used.update((n.id,) for n in ast.walk(fn) if isinstance(n, ast.Name) and id(n) not in heads)
    return used


def cli_entry_modules(stage: str) -> set[str]:
    """The project modules `python -m vae_mlops <stage>` reaches from cli.py."""
    cli = PKG_DIR / "cli.py"
    tree = ast.parse(cli.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    table: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            table.update(_bindings(node, cli))
    assert f"_cmd_{stage}" in functions, f"cli.py has no _cmd_{stage}: update this test's entry rule"
    todo, done, modules = [f"_cmd_{stage}", "main", "build_parser"], set(), set()
    while todo:
        name = todo.pop()
        if name in done or name not in functions:
            continue
        done.add(name)
        for used in _names_used(functions[name]):
            head = used[0]
            if head in functions:
                todo.append(head)
            elif head in table:
                sub = f"{table[head]}.{used[1]}" if len(used) == 2 else None
                modules.add(sub if sub and module_file(sub) else table[head])
        modules.update(_local_imports(functions[name], cli))
    return modules


def _local_imports(fn: ast.FunctionDef, path: Path) -> set[str]:
    return {m for node in _import_nodes(fn) for m in _bindings(node, path).values()}


def _sibling_files_read(module: Path) -> set[str]:
    """Source files a module reads as data beside itself (`Path(__file__).with_name("served_model.py")`)."""
    return {m for m in re.findall(r"with_name\(\s*[\"']([\w.-]+\.py)[\"']\s*\)", module.read_text())
            if (module.parent / m).is_file()}  # fmt: skip


# What imports a package's own modules at run time: the shared plugin loader, or the stdlib calls it makes
DISCOVERY_CALLS = {plugins.discover.__name__, "iter_modules", "import_module"}


def _discovers_modules(init: Path) -> bool:
    """A package that imports its own modules at run time (a registry such as `likelihoods`)."""
    if init.name != "__init__.py":
        return False
    calls = [n.func for n in ast.walk(ast.parse(init.read_text())) if isinstance(n, ast.Call)]
    return any(getattr(f, "attr", getattr(f, "id", None)) in DISCOVERY_CALLS for f in calls)


def stage_code(stage: str) -> set[str]:
    """The code deps dvc.yaml must list for `stage`: files, and whole folders for self-discovering packages.

    A package that loads every module in its folder depends on the folder: a new module is then a change too.
    """
    files = closure(cli_entry_modules(stage)) | {PKG_DIR / "cli.py", PKG_DIR / "__main__.py"}
    files |= {f.with_name(name) for f in set(files) for name in _sibling_files_read(f)}
    folders = {f.parent for f in files if _discovers_modules(f)}
    for folder in folders:
        files |= closure({".".join(("vae_mlops", *folder.relative_to(PKG_DIR).parts, p.stem)) for p in folder.glob("*.py")
                          if p.name != "__init__.py"})  # fmt: skip
    return {_rel(f) for f in files if f.parent not in folders} | {_rel(d) for d in folders}


def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.startswith("src/")}


# ---------------------------------------------------------------- the derivation itself


def test_the_derivation_follows_imports_inside_functions_and_skips_type_checking():
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vae_mlops.train import EpochStats\n"
        "def f():\n    from vae_mlops import pyfunc\n    from .params import Params\n"
    )
    probe = PKG_DIR / "_probe.py"  # a module of the package, parsed from `source`, never written
    found = {m for node in _import_nodes(ast.parse(source)) for m in _bindings(node, probe).values()}
    assert found == {"vae_mlops.pyfunc", "vae_mlops.params"}


def test_train_runs_the_modules_it_reaches_through_helpers():
    """Modules train, evaluate and register run through helpers (not named in cli.py) are found by the derivation."""
    assert {f"src/vae_mlops/{m}.py" for m in ("checkpoint", "data", "images", "distributed", "params")} <= stage_code(
        "train"
    )
    assert {"src/vae_mlops/model.py", "src/vae_mlops/checkpoint.py"} <= stage_code("evaluate")
    assert {"src/vae_mlops/tracking/registry_client.py", "src/vae_mlops/metrics.py"} <= stage_code("register")


def test_the_packages_that_load_plugins_are_folder_deps():
    """Every package that calls the plugin loader is found, so a new module in it is a change to the stages using it."""
    found = {f.parent.name for f in PKG_DIR.rglob("__init__.py") if _discovers_modules(f)}
    assert found == {"archs", "likelihoods", "priors"}
    assert {"src/vae_mlops/likelihoods", "src/vae_mlops/archs", "src/vae_mlops/priors"} <= stage_code("train")


def test_no_plugin_is_a_dep_of_download():
    """Validating params names the plugins from their files: a new likelihood does not rerun the download."""
    plugin_deps = sorted(d for d in stage_code("download") if d.split("/")[2] in {"archs", "likelihoods", "priors"})
    assert not plugin_deps, f"the download stage runs {plugin_deps}: params.py must list plugin names, not import them"


# ---------------------------------------------------------------- dvc.yaml against the code


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_exactly_the_code_its_command_runs(stage):
    declared, derived = code_deps(dvc_yaml()[stage]), stage_code(stage)
    missing, extra = sorted(derived - declared), sorted(declared - derived)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: add to deps {missing}, remove from deps {extra} "
        "(derived from the imports of `python -m vae_mlops {stage}`)"
    )


def test_every_stage_runs_the_package_cli():
    assert set(dvc_yaml()) == set(STAGES)


# ---------------------------------------------------------------- dvc.lock against dvc.yaml and the tree
#
# Code changes until the end of a working session: the lock is regenerated last (`dvc repro`, or
# `dvc commit` of unchanged outputs), so this is the test that turns red while code is edited.


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _render(text: str, params: dict) -> str:
    """dvc.yaml's `${a.b}` interpolation, from params.yaml."""
    return re.sub(r"\$\{\s*([\w.-]+)\s*\}", lambda m: str(_lookup(params, m.group(1))), text)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dvcignored(root: Path) -> list[str]:
    """`.dvcignore`'s patterns (names and globs; a trailing `/` names a folder)."""
    path = root / ".dvcignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _dir_md5(folder: Path, root: Path) -> str:
    """The `md5: <hex>.dir` DVC records for a folder dep: the md5 of its sorted file list, as JSON.

    Each entry is {"md5": md5 of the file's bytes, "relpath": its path in the folder}, sorted by relpath and
    dumped with sorted keys (DVC's `Tree.as_bytes`); files `.dvcignore` names are not in it.
    """
    ignored = _dvcignored(root)

    def skip(rel: Path) -> bool:
        return any(fnmatch.fnmatch(part, pat.rstrip("/")) for pat in ignored for part in rel.parts)

    entries = [
        {"md5": _md5(f), "relpath": f.relative_to(folder).as_posix()}
        for f in folder.rglob("*")
        if f.is_file() and not skip(f.relative_to(folder))
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()
    return hashlib.md5(listing).hexdigest() + ".dir"


def lock_problems(root: Path) -> list[str]:
    """Where `root`'s dvc.lock disagrees with its dvc.yaml (stages, cmd, deps, params keys), params.yaml
    (params values) and the tree (md5 of each code dep, file or folder)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    yaml_stages = yaml.safe_load(_render((root / "dvc.yaml").read_text(), params))["stages"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    problems: list[str] = []
    if set(lock) != set(yaml_stages):
        problems.append(f"stages: dvc.lock has {sorted(lock)}, dvc.yaml {sorted(yaml_stages)}")
    for name in sorted(set(lock) & set(yaml_stages)):
        want, got = yaml_stages[name], lock[name]
        if got["cmd"] != want["cmd"]:
            problems.append(f"{name}: cmd {got['cmd']!r} != {want['cmd']!r}")
        deps = {d["path"]: d for d in got.get("deps", [])}
        if set(deps) != set(want.get("deps", [])):
            problems.append(f"{name}: deps {sorted(deps)} != dvc.yaml {sorted(want.get('deps', []))}")
        for path, dep in deps.items():
            if path.startswith("src/") and (root / path).is_file() and dep.get("md5") != _md5(root / path):
                problems.append(f"{name}: {path} changed since dvc.lock recorded it")
            if path.startswith("src/") and (root / path).is_dir() and dep.get("md5") != _dir_md5(root / path, root):
                problems.append(f"{name}: {path}/ changed since dvc.lock recorded it")
        locked = got.get("params", {}).get("params.yaml", {})
        if set(locked) != set(want.get("params", [])):
            problems.append(f"{name}: params {sorted(locked)} != dvc.yaml {sorted(want.get('params', []))}")
        for key, value in locked.items():
            if key in want.get("params", []) and value != _lookup(params, key):
                problems.append(f"{name}: params.yaml {key} is {_lookup(params, key)!r}, dvc.lock has {value!r}")
    return problems


def test_dvc_lock_agrees_with_dvc_yaml_and_the_tree():
    """REGENERATE dvc.lock (`dvc repro`) after the last code or params change; this test says what is stale."""
    problems = lock_problems(ROOT)
    assert not problems, "dvc.lock is stale; run `dvc repro` and commit it:\n" + "\n".join(problems)


@pytest.mark.slow
def test_the_lock_check_agrees_with_dvc_status_in_a_fresh_project(tiny_mirror, tmp_path):
    """The check above, on a lock DVC just wrote: silent where `dvc status` is, and naming what DVC names."""
    from tests.support.e2e import copy_project, dvc, tool_env

    repo = copy_project(tmp_path / "repo", store=False)  # the first stage creates mlflow.db
    dvc("repro", "download", cwd=repo, env=tool_env(VAE_DATA_MIRROR=str(tiny_mirror)))
    assert [p for p in lock_problems(repo) if not p.startswith("stages:")] == []
    assert dvc("status", "download", "--json", cwd=repo).stdout.strip() == "{}"
    edited = repo / "src" / "vae_mlops" / "datasets.py"
    edited.write_text(edited.read_text() + "\n# an edit\n")
    assert "download: src/vae_mlops/datasets.py changed since dvc.lock recorded it" in lock_problems(repo)
    assert "src/vae_mlops/datasets.py" in dvc("status", "download", cwd=repo).stdout  # DVC reruns it too


def test_a_folder_dep_is_hashed_as_dvc_hashes_it_and_an_edit_in_it_is_named(tmp_path):
    """`lock_problems` checks folder deps too (a likelihood edited in `likelihoods/` makes the lock stale)."""
    from tests.support.e2e import dvc

    pkg = tmp_path / "src" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0compiled")  # .dvcignore'd, as in the project
    (tmp_path / ".dvcignore").write_text((ROOT / ".dvcignore").read_text())
    dvc("init", "--no-scm", cwd=tmp_path)
    dvc("add", "src/pkg", cwd=tmp_path)
    dvc_md5 = yaml.safe_load((tmp_path / "src" / "pkg.dvc").read_text())["outs"][0]["md5"]
    assert _dir_md5(pkg, tmp_path) == dvc_md5

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "true", "deps": ["src/pkg"]}}}))
    lock = {"cmd": "true", "deps": [{"path": "src/pkg", "hash": "md5", "md5": dvc_md5}]}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"s": lock}}))
    assert lock_problems(tmp_path) == []
    (pkg / "sub" / "b.py").write_text("B = 3\n")
    assert lock_problems(tmp_path) == ["s: src/pkg/ changed since dvc.lock recorded it"]
