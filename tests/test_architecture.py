"""The import contract: three wings with one-way doors, no circles, no imports hidden in functions.

    core       params, paths, data, datasets, model, likelihoods/, train, step, metrics, images,
               checkpoint, ..., and the fast path behind one door (accel/): no MLflow, no DVC, no Prefect
    MLflow     tracking/store -> tracking/runs -> model format -> registry -> report; imports the core
    runners    cli, stages/, pipeline/, benchmarks/: import the core and the MLflow wing

An arrow may point down or sideways, never up. Only `cli` imports a stage (it dispatches to them);
a stage does not import another stage, and a benchmark imports none. Every import counts, module
level or inside a function (both run); an import inside a function is allowed only where
`FUNCTION_IMPORTS` names it with its reason. The fast path is reached through `vae_mlops.accel`'s face
only, and torch internals (`torch._*`, `torch.ops.*`) appear nowhere else. Each test names every violation
it finds, so a red run says which file to change.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support.project import ROOT

SOURCE_ROOTS = {"vae_mlops": ROOT / "src" / "vae_mlops", "pipeline": ROOT / "pipeline", "benchmarks": ROOT / "benchmarks"}

CORE, MLFLOW, RUNNERS = "core", "MLflow", "runners"
WING_RANK = {CORE: 0, MLFLOW: 1, RUNNERS: 2}

# Module name patterns (regular expressions, matched whole) -> wing and, in the MLflow wing, the rung of its
# ladder: store -> runs -> model format -> registry -> report. The first pattern that matches decides.
WINGS: list[tuple[str, str, int]] = [
    (r"vae_mlops\.(cli|__main__)", RUNNERS, 0),
    (r"vae_mlops\.stages(\..*)?", RUNNERS, 0),
    (r"pipeline(\..*)?", RUNNERS, 0),
    (r"benchmarks(\..*)?", RUNNERS, 0),
    (r"vae_mlops\.tracking\.(store|mlflow_internals)", MLFLOW, 0),
    (r"vae_mlops\.tracking\.(runs|monitor_runs)", MLFLOW, 1),
    (r"vae_mlops\.(model_store|pyfunc|served_model|served_loader|serving|serving_app)", MLFLOW, 2),
    (r"vae_mlops\.tracking(\.registry_client|\.reader)?", MLFLOW, 3),
    (r"vae_mlops\.(registry|promotion)", MLFLOW, 3),
    (r"vae_mlops\.(compare|compare_template)", MLFLOW, 4),
    (
        r"vae_mlops(\.(__init__|params|paths|errors|atomic|ports|cli_args|data|datasets|snapshots|incoming"
        r"|model|likelihoods|archs|priors|accel|train|step|metrics|metric_catalogue|images|checkpoint"
        r"|denormals|distributed|host_memory|precision|drift|provenance|progress|pretrain|scores|inference_log"
        r"|loop_report|html_page|collect|stage_inputs|plugins|locks|binarize|code_partition)(\..*)?)?",
        CORE,
        0,
    ),
]

# Third-party tools a wing must not import: the core knows none of them, the MLflow wing knows only MLflow.
FORBIDDEN_TOOLS = {CORE: ("mlflow", "dvc", "prefect"), MLFLOW: ("dvc", "prefect")}

# (importer, imported module or package) -> why the import waits until a function runs. Only commands that
# must start fast: everything else imports at the top, where a reader (and `dvc.yaml`'s deps) sees it.
FUNCTION_IMPORTS: dict[tuple[str, str], str] = {
    **{
        ("vae_mlops.cli", target): "`python -m vae_mlops <command>` loads only the stack of the command it runs "
        "(`download` and `--help` never pay for MLflow or the training code)"
        for target in (
            "vae_mlops.stages",
            "vae_mlops.train",
            "vae_mlops.tracking",
            "vae_mlops.registry",
            "vae_mlops.compare",
            "vae_mlops.data",
            "vae_mlops.distributed",
            "vae_mlops.served_loader",
            "vae_mlops.model_store",
            "vae_mlops.serving",
            "vae_mlops.snapshots",
            "vae_mlops.collect",
            "rich",
        )
    },
    ("vae_mlops.code_partition", "umap"): "UMAP and numba take 0.75 s to import: only a training that groups its "
    "codes by UMAP pays it, not every `python -m vae_mlops train`",
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a project module, or a third-party top-level package
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{module_path(self.importer)}:{self.line}"


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package, `pipeline/` and `benchmarks/`."""
    found: dict[str, Path] = {}
    for top, folder in SOURCE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = project_modules()


def module_path(name: str) -> str:
    return MODULES[name].relative_to(ROOT).as_posix()


def _function_import_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def _resolve(name: str) -> str:
    """The project module `name` lands in (its longest known prefix), or the third-party top-level package."""
    probe = name
    while probe:
        if probe in MODULES:
            return probe
        probe = probe.rpartition(".")[0]
    return name.split(".")[0]


def imports_of(name: str) -> list[Import]:
    """Every import statement of module `name`, wherever it stands (`if TYPE_CHECKING:` blocks too)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside = _function_import_nodes(tree)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if base == "__future__":
                continue
            # `from pkg import sub` imports the module pkg.sub when there is one, else names of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(_resolve(t) for t in targets):
            if target != name:
                found.append(Import(name, target, node.lineno, id(node) in inside))
    return found


ALL_IMPORTS = [imp for name in MODULES for imp in imports_of(name)]
PROJECT_IMPORTS = [imp for imp in ALL_IMPORTS if imp.target in MODULES]


def wing_of(name: str) -> tuple[str, int] | None:
    for pattern, wing, rung in WINGS:
        if re.fullmatch(pattern, name):
            return wing, rung
    return None


def _report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n" + "\n".join(f"  - {p}" for p in sorted(problems))


def test_every_module_belongs_to_a_wing():
    lost = [f"{module_path(m)} ({m})" for m in MODULES if wing_of(m) is None]
    assert not lost, _report("modules in no wing: add each to WINGS in tests/test_architecture.py", lost)


def test_imports_point_down_or_sideways_never_up():
    problems = []
    for imp in PROJECT_IMPORTS:
        src, dst = wing_of(imp.importer), wing_of(imp.target)
        if src is None or dst is None:
            continue  # reported by test_every_module_belongs_to_a_wing
        if WING_RANK[dst[0]] > WING_RANK[src[0]]:
            problems.append(f"{imp.where()}: {imp.importer} ({src[0]}) imports {imp.target} ({dst[0]}), a wing above")
        elif src[0] == dst[0] == MLFLOW and dst[1] > src[1]:
            problems.append(
                f"{imp.where()}: {imp.importer} imports {imp.target}, a rung above it on the MLflow wing's "
                "ladder (store -> runs -> model format -> registry -> report)"
            )
    assert not problems, _report("arrows that point up", problems)


def test_the_core_knows_no_mlflow_dvc_or_prefect_and_the_mlflow_wing_no_dvc_or_prefect():
    problems = []
    for imp in ALL_IMPORTS:
        wing = wing_of(imp.importer)
        if wing and imp.target in FORBIDDEN_TOOLS.get(wing[0], ()):
            problems.append(f"{imp.where()}: {imp.importer} ({wing[0]} wing) imports {imp.target}")
    assert not problems, _report("tools imported behind the wrong door", problems)


def _is_stage(name: str) -> bool:
    return name.startswith("vae_mlops.stages.")


def test_only_the_cli_imports_a_stage_and_benchmarks_import_none():
    problems = []
    for imp in PROJECT_IMPORTS:
        if _is_stage(imp.target) and imp.importer not in ("vae_mlops.cli",):
            problems.append(f"{imp.where()}: {imp.importer} imports the stage {imp.target}")
        if imp.target.startswith("benchmarks") and not imp.importer.startswith("benchmarks"):
            problems.append(f"{imp.where()}: {imp.importer} imports the benchmark {imp.target}")
    assert not problems, _report(
        "stages imported outside the cli (move what they share into the core or the MLflow wing)", problems
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_round_a_circle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lines: dict[tuple[str, str], str] = {}
    for imp in PROJECT_IMPORTS:
        graph[imp.importer].add(imp.target)
        lines.setdefault((imp.importer, imp.target), imp.where())
    problems = [
        ", ".join(group) + " -- " + "; ".join(f"{a} -> {b} ({lines[a, b]})" for a in group for b in sorted(graph[a]) if b in group)
        for group in circles(graph)
    ]
    assert not problems, _report("import circles", problems)


def _allowed(imp: Import) -> bool:
    return any(
        imp.importer == importer and (imp.target == target or imp.target.startswith(target + "."))
        for importer, target in FUNCTION_IMPORTS
    )


def test_imports_inside_functions_are_only_the_allowed_ones():
    problems = [
        f"{imp.where()}: {imp.importer} imports {imp.target} inside a function"
        for imp in ALL_IMPORTS
        if imp.in_function and not _allowed(imp)
    ]
    assert not problems, _report(
        "imports hidden in functions: import each at the top, or, for a command that must start fast, "
        "add it to FUNCTION_IMPORTS with the reason",
        problems,
    )


def test_the_contract_finds_what_it_guards(tmp_path):
    """The checks themselves: a planted circle, an upward arrow and a hidden import are all seen."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert wing_of("vae_mlops.model") == (CORE, 0) and wing_of("pipeline.sweep") == (RUNNERS, 0)
    assert wing_of("vae_mlops.tracking.store") == (MLFLOW, 0) and wing_of("vae_mlops.compare") == (MLFLOW, 4)
    tree = ast.parse("import os\ndef f():\n    import json\n")
    inside = _function_import_nodes(tree)
    assert [id(n) in inside for n in ast.walk(tree) if isinstance(n, ast.Import)] == [False, True]


# ---------------------------------------------------------------- the fast path's door

ACCEL = "vae_mlops.accel"
INTERNALS_SCANNED = [*SOURCE_ROOTS.values(), ROOT / "tests"]
# (file, torch internal) -> why a test instrument may use it; product code has no such entry
TORCH_INTERNALS_ALLOWED: dict[tuple[str, str], str] = {
    ("tests/test_whole_tensor.py", "torch.utils._python_dispatch.TorchDispatchMode"): "counts host syncs where "
    "they reach the dispatcher; torch has no public mode at that level (TorchFunctionMode sits above it)",
}


def test_the_fast_path_is_core_and_reached_through_its_face_only():
    assert wing_of(ACCEL) == (CORE, 0) and all(wing_of(m) == (CORE, 0) for m in MODULES if m.startswith(ACCEL + "."))
    problems = [
        f"{imp.where()}: {imp.importer} imports {imp.target}: import the name from {ACCEL} (its __init__)"
        for imp in PROJECT_IMPORTS
        if imp.target.startswith(ACCEL + ".") and not (imp.importer == ACCEL or imp.importer.startswith(ACCEL + "."))
    ]
    assert not problems, _report("imports that pass the fast path's door", problems)


def _is_internal(dotted: str) -> bool:
    """`torch.ops.*`, or a private name (`_x`, not `__x__`) anywhere under `torch`."""
    parts = dotted.split(".")
    if parts[0] != "torch":
        return False
    private = any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)
    return parts[1:2] == ["ops"] or private


def torch_internals(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every use of a torch internal: imports, and attribute chains on a name bound to torch.

    A name is followed through its import (`from torch.optim import optimizer as o`; `o._x` is
    `torch.optim.optimizer._x`); attributes of objects made at run time (`opt._hooks`) are not seen.
    """
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> what it is under torch
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "torch"
                    found += [(node.lineno, alias.name)] if _is_internal(alias.name) else []
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                bound[alias.asname or alias.name] = dotted
                found += [(node.lineno, dotted)] if _is_internal(dotted) else []
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in bound:
            dotted = ".".join([bound[base.id], *reversed(chain)])
            found += [(node.lineno, dotted)] if _is_internal(dotted) else []
    return sorted(set(found))


def test_torch_internals_appear_only_behind_the_fast_paths_door():
    accel_dir = MODULES[ACCEL].parent
    problems = []
    for folder in INTERNALS_SCANNED:
        for path in sorted(folder.rglob("*.py")):
            if path.is_relative_to(accel_dir):
                continue
            name = path.relative_to(ROOT).as_posix()
            for line, dotted in torch_internals(path.read_text()):
                if (name, dotted) not in TORCH_INTERNALS_ALLOWED:
                    problems.append(f"{name}:{line}: {dotted}")
    assert not problems, _report(
        f"torch internals outside {accel_dir.relative_to(ROOT).as_posix()}/ (use the public way, or move the "
        "fast path there with a BENCHMARKS.md entry showing it pays)",
        problems,
    )


def test_the_internals_check_sees_what_it_guards():
    planted = (
        "import torch\n"
        "from torch.optim import optimizer as opt_mod\n"
        "from torch import _C\n"
        "torch._foreach_add_(steps, 1)\n"
        "opt_mod._global_optimizer_pre_hooks\n"
        "torch.ops.aten.threshold_backward(g, h, 0)\n"
        "torch.__version__, torch.nn.functional.relu(x), opt_mod.Optimizer\n"
        "import torch._dynamo as dyn\n"
    )
    assert torch_internals(planted) == [
        (3, "torch._C"),
        (4, "torch._foreach_add_"),
        (5, "torch.optim.optimizer._global_optimizer_pre_hooks"),
        (6, "torch.ops.aten.threshold_backward"),
        (8, "torch._dynamo"),
    ]
