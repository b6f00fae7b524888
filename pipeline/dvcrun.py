"""DVC as the Prefect tasks use it: one stage at a time, its output streamed into a logger.

Each Prefect task runs `dvc repro --single-item <stage>`, the command `dvc repro`
itself runs per stage, so `dvc.lock` and the DVC cache come out exactly as after
`dvc repro`. Nothing here imports Prefect: the flows pass their run logger in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from pipeline.dvc_internals import declared_stage
from pipeline.procs import stop_process_group, venv_bin
from vae_mlops import atomic
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import load_raw, read_raw
from vae_mlops.paths import Paths

TRAIN = "train"
LOCK_SCHEMA = "2.0"
MAX_HANDOFF_FILE = 256 * 1024  # uncached outputs larger than this stay on the worker
LOCK_ENTRY_KEYS = ("cmd", "deps", "params", "outs", "md5", "frozen", "always_changed", "desc", "meta")
# a lock entry's hash fields, as DVC 3 writes them: a file's md5, or a folder's md5 + ".dir" with its file count
HASH_KEYS = {"path", "hash", "md5", "size", "nfiles"}
FILE_MD5 = re.compile(r"[0-9a-f]{32}")
DIR_MD5 = re.compile(r"[0-9a-f]{32}\.dir")
RUN_ID = re.compile(r"[0-9a-f]{32}")


class CommandFailed(VaeMlopsError):
    """A DVC command exited non-zero or ran past its deadline; the message ends with its last lines."""


# What a fresh checkout of this pipeline needs to run it (tests' projects, `make loop-demo`'s workspace)
PIPELINE_FILES = (
    "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "src", "pipeline",
    "data/incoming/.gitkeep",  # train, evaluate and register depend on data/incoming (the snapshots)
)  # fmt: skip


def copy_pipeline(source: Path, dest: Path) -> None:
    """Copy the pipeline's files from the checkout `source` into the folder `dest` (no caches, no build metadata)."""
    for name in PIPELINE_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This interpreter's bin first on PATH (so dvc.yaml's `python` is this venv's) and no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(extra or {})
    return env


def dvc_bin() -> str:
    return venv_bin("dvc")


def run_logged(
    cmd: list[str],
    cwd: Path,
    logger: logging.Logger | logging.LoggerAdapter,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run `cmd`, sending each output line to `logger`; kill its process group past `timeout_s`.

    Lines are logged from the calling thread (Prefect's run logger is bound to it), and
    the child is killed on any exit from here, Prefect's own task timeout included.
    """
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=dict(env or tool_env()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise CommandFailed(f"`{' '.join(cmd)}` ran past its timeout of {timeout_s:g} s and was stopped")
                continue
            if line is None:
                break
            out.append(line)
            if line.strip():
                logger.info(line)
        rc = proc.wait()
    finally:
        stop_process_group(proc)
    if rc != 0:
        tail = "\n".join(out[-25:])
        raise CommandFailed(f"`{' '.join(cmd)}` failed with exit code {rc}:\n{tail}")
    return out


def repro(stage: str, root: Path, logger, timeout_s: float, env: Mapping[str, str] | None = None) -> bool:
    """`dvc repro --single-item <stage>`; True if the stage ran, False if DVC found it up to date."""
    out = run_logged([dvc_bin(), "repro", "--single-item", stage], root, logger, timeout_s, env)
    return any(f"Running stage '{stage}'" in line for line in out)


def transfer(action: str, stages: list[str], remote: str, root: Path, logger, timeout_s: float) -> None:
    """`dvc push|pull -r <remote> <stages...>`: move the stages' cached outputs to or from a shared remote."""
    run_logged([dvc_bin(), action, "-r", remote, *stages], root, logger, timeout_s)


def stage_names(root: Path) -> list[str]:
    """The stages of `dvc.yaml`, in the order written there (the DAG's order)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages") or {}
    return list(stages)


def split_at_train(stages: list[str]) -> tuple[list[str], list[str]]:
    """Stages before and after `train`: what training needs, and what must not run if it fails."""
    if TRAIN not in stages:
        raise ValueError(f"dvc.yaml has no '{TRAIN}' stage (stages: {', '.join(stages)})")
    i = stages.index(TRAIN)
    return stages[:i], stages[i + 1 :]


# ---------------------------------------------------------------- params


def flat_raw(params_file: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params.yaml` as written (no type coercion) with overrides applied, as dotted keys."""
    raw = load_raw(params_file, overrides)
    return {f"{s}.{k}": v for s, sec in raw.items() if isinstance(sec, dict) for k, v in sec.items()}


@contextlib.contextmanager
def edit_yaml(path: Path) -> Iterator[Any]:
    """Edit a YAML file in place as DVC does (ruamel's round trip: comments and layout kept), written whole or not at all."""
    rt = YAML(typ="rt")
    rt.default_flow_style = False
    data = rt.load(path.read_text()) or {}
    yield data
    out = io.StringIO()
    rt.dump(data, out)
    atomic.write_text(path, out.getvalue())


def set_params(params_file: Path, values: Mapping[str, Any]) -> list[str]:
    """Write dotted-key values into `params.yaml` the way `dvc exp run -S` does; return the keys changed.

    The round-trip edit keeps comments and layout. A key whose value is already
    equal (same type too) is left alone, so the file only changes when a value does.
    """
    current = flat_raw(params_file)
    changed = [k for k, v in values.items() if k not in current or type(current[k]) is not type(v) or current[k] != v]
    if changed:
        with edit_yaml(params_file) as data:
            for key in changed:
                section, _, name = key.partition(".")
                data[section][name] = values[key]
    return changed


# ---------------------------------------------------------------- dvc.lock handoff


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}


def merge_lock(root: Path, entries: Mapping[str, Any]) -> None:
    """Put stage entries (as another checkout's `dvc.lock` holds them) into this checkout's `dvc.lock`."""

    path = root / "dvc.lock"
    if not path.exists():
        path.write_text(yaml.safe_dump({"schema": LOCK_SCHEMA, "stages": {}}, sort_keys=False))
    with edit_yaml(path) as data:
        data.setdefault("stages", {})
        for name, entry in entries.items():
            data["stages"][name] = entry


def stage_outputs(root: Path, stage: str) -> list[tuple[str, bool]]:
    """(path, cached by DVC) for each output of a stage, with dvc.yaml's interpolation resolved."""
    return [(path, cached) for path, cached in _stage_paths(root, stage)["outs"]]


def _stage_paths(root: Path, stage: str) -> dict[str, Any]:
    """The stage as this checkout's `dvc.yaml` declares it: cmd, deps, outs (path, cached) and params."""
    return declared_stage(root, stage)


def handoff(root: Path, stage: str, extra_files: list[Path] = ()) -> dict[str, Any]:
    """What another checkout needs to adopt a stage run here: its lock entry and its small uncached files.

    Cached outputs travel through the DVC remote (`dvc push`/`dvc pull`); outputs
    DVC does not cache (`cache: false`) and `extra_files` travel here, as text,
    when they are small files.
    """
    files: dict[str, str] = {}
    candidates = [p for p, cached in stage_outputs(root, stage) if not cached]
    candidates += [str(p.relative_to(root)) for p in extra_files]
    for rel in candidates:
        path = root / rel
        if path.is_file() and path.stat().st_size <= MAX_HANDOFF_FILE:
            try:
                files[rel] = path.read_text()
            except UnicodeDecodeError:
                continue
    return {"lock": {stage: read_lock(root).get(stage)}, "files": files}


class HandoffRefused(VaeMlopsError):
    """A worker's hand-off names something other than the stage's own outputs; nothing was written."""


def train_outputs(root: Path) -> dict[str, str]:
    """What the train stage writes, each "file" or "folder" (from `Paths`, the one place for paths)."""
    paths = Paths(root)
    kinds = {paths.model_file: "file", paths.checkpoints_dir: "folder", paths.train_images_dir: "folder",
             paths.train_run_file: "file", paths.history_file: "file"}  # fmt: skip
    return {str(path.relative_to(paths.root)): kind for path, kind in kinds.items()}


def handoff_text_files(root: Path) -> set[str]:
    """The only files a hand-off may carry as text: train's small text outputs, nothing else."""
    paths = Paths(root)
    return {str(p.relative_to(paths.root)) for p in (paths.history_file, paths.train_run_file)}


def check_handoff(root: Path, data: Any, stage: str = TRAIN) -> tuple[dict[str, Any], dict[Path, str]]:
    """The hand-off's lock entry and files (as paths under `root`), or `HandoffRefused` listing every problem.

    Only `stage`'s `dvc.lock` entry is accepted, and only if every field is what
    this checkout's `dvc.yaml` and `params.yaml` say (cmd, deps, params, each out
    with the hash fields of its kind, file or folder). Only train's small text
    outputs are accepted as files, as relative paths inside `root` (no absolute
    path, no `..`, no symlink leading out, not onto a folder), each matching the
    md5 and size its lock entry records; `mlflow_run.json` must be what train
    writes (a run id, its experiment and tracking URI).
    """
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise HandoffRefused(f"the hand-off is a {type(data).__name__}, not a JSON object; nothing was written")
    declared = _stage_paths(root, stage)
    outs = {path for path, _ in declared["outs"]}
    problems += [f"unexpected key {k!r} (only 'lock' and 'files')" for k in data if k not in ("lock", "files")]
    lock = data.get("lock") or {}
    files = data.get("files") or {}
    if not isinstance(lock, Mapping) or not isinstance(files, Mapping):
        raise HandoffRefused("the hand-off's 'lock' and 'files' must be JSON objects; nothing was written")
    problems += [f"lock entry for stage {name!r}: only '{stage}' is adopted from a worker" for name in lock if name != stage]
    entry = lock.get(stage)
    if entry is not None:
        problems += _lock_entry_problems(entry, declared, stage, root)
        if stage == TRAIN:
            problems += _out_kind_problems(entry, train_outputs(root), stage)
    recorded = _recorded_outs(entry)
    text_files = handoff_text_files(root) if stage == TRAIN else outs
    real_root = root.resolve()
    accepted: dict[Path, str] = {}
    for rel, text in files.items():
        where = f"file {rel!r}"
        parts = Path(str(rel)).parts
        if not isinstance(text, str):
            problems.append(f"{where}: its content is not text")
        elif not rel or Path(rel).is_absolute() or rel.startswith("~"):
            problems.append(f"{where}: an absolute path; only paths relative to the checkout are adopted")
        elif ".." in parts or "." in parts or str(Path(*parts)) != rel:
            problems.append(f"{where}: not a plain relative path (`..`, `.` or redundant separators)")
        elif rel not in outs:
            problems.append(f"{where}: not an output of stage '{stage}' ({', '.join(sorted(outs))})")
        elif rel not in text_files:
            problems.append(f"{where}: '{stage}' writes it as a binary file or a folder; only "
                            f"{', '.join(sorted(text_files))} travel as text")  # fmt: skip
        elif not (root / rel).resolve().is_relative_to(real_root):
            problems.append(f"{where}: leads out of {root} through a symlink")
        elif (root / rel).is_dir():
            problems.append(f"{where}: a folder in this checkout; the hand-off would replace it with a file")
        else:
            problems += [f"{where}: {p}" for p in _text_problems(rel, text, recorded.get(rel), root, entry is not None)]
            accepted[root / rel] = text
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise HandoffRefused(
            f"refused the worker's hand-off for stage '{stage}' ({len(problems)} problem(s)); nothing was written:\n"
            f"{lines}\nCheck what runs the '{stage}' deployment on that work pool."
        )
    return ({stage: entry} if entry else {}), accepted


def _lock_entry_problems(entry: Any, declared: Mapping[str, Any], stage: str, root: Path | None = None) -> list[str]:
    """What in a `dvc.lock` entry differs from the stage this checkout declares (every field is checked)."""
    if not isinstance(entry, Mapping):
        return [f"lock entry for '{stage}' is not an object"]
    where = f"lock entry for '{stage}'"
    problems = [f"{where}: unexpected key {k!r}" for k in entry if k not in LOCK_ENTRY_KEYS]
    if entry.get("cmd") != declared["cmd"]:
        problems.append(f"{where}: cmd {entry.get('cmd')!r} is not dvc.yaml's {declared['cmd']!r}")
    for kind, allowed in (("outs", {path for path, _ in declared["outs"]}), ("deps", declared["deps"])):
        items = entry.get(kind)
        if not isinstance(items, list):
            problems.append(f"{where}: {kind} is not a list")
            continue
        seen: list[str] = []
        for item in items:
            path = item.get("path") if isinstance(item, Mapping) else None
            if not isinstance(path, str) or path not in allowed:
                problems.append(f"{where}: {kind[:-1]} {path!r} is not declared in dvc.yaml")
                continue
            seen.append(path)
            problems += [f"{where}: {kind[:-1]} {path!r}: {p}" for p in _hash_problems(item)]
        problems += [f"{where}: {kind[:-1]} {p!r} is listed twice" for p in sorted({p for p in seen if seen.count(p) > 1})]
        if kind == "outs":
            problems += [f"{where}: out {p!r} is missing" for p in sorted(allowed - set(seen))]
    for key in ("frozen", "always_changed"):
        if key in entry and not isinstance(entry[key], bool):
            problems.append(f"{where}: {key} is not true or false")
    if "md5" in entry and not (isinstance(entry["md5"], str) and FILE_MD5.fullmatch(entry["md5"])):
        problems.append(f"{where}: md5 {entry['md5']!r} is not an md5")
    if "desc" in entry and not isinstance(entry["desc"], str):
        problems.append(f"{where}: desc is not text")
    if root is not None:
        problems += _params_problems(entry.get("params"), declared.get("params", {}), where)
    return problems


def _hash_problems(item: Mapping[str, Any]) -> list[str]:
    """A dep or out as DVC 3 writes it: `hash: md5`, an md5 (`.dir` for a folder), a size, a folder's file count."""
    problems = [f"unexpected key {k!r}" for k in item if k not in HASH_KEYS]
    md5, size, nfiles = item.get("md5"), item.get("size"), item.get("nfiles")
    if item.get("hash", "md5") != "md5":
        problems.append(f"hash {item.get('hash')!r} is not md5")
    if not isinstance(md5, str) or not (FILE_MD5.fullmatch(md5) or DIR_MD5.fullmatch(md5)):
        problems.append(f"md5 {md5!r} is not an md5")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        problems.append(f"size {size!r} is not a byte count")
    if nfiles is not None and (not isinstance(nfiles, int) or isinstance(nfiles, bool) or nfiles < 0):
        problems.append(f"nfiles {nfiles!r} is not a file count")
    if isinstance(md5, str) and FILE_MD5.fullmatch(md5) and nfiles is not None:
        problems.append("a file's entry with a file count")
    return problems


def _params_problems(params: Any, declared: Mapping[str, Any], where: str) -> list[str]:
    """The entry's params must be exactly the stage's declared keys, with this checkout's params.yaml values."""
    if not declared:
        return []
    if not isinstance(params, Mapping) or set(params) != set(declared):
        return [f"{where}: params must hold {', '.join(sorted(declared))} only"]
    problems = []
    for file, expected in declared.items():
        got = params[file]
        if not isinstance(got, Mapping):
            problems.append(f"{where}: params of {file} are not an object")
            continue
        problems += [f"{where}: param {k!r} of {file} is not one the stage declares" for k in got if k not in expected]
        problems += [f"{where}: param {k!r} of {file} is missing" for k in expected if k not in got]
        problems += [f"{where}: param {k!r} is {got[k]!r}, but this checkout's {file} has {v!r}"
                     for k, v in expected.items() if k in got and got[k] != v]  # fmt: skip
    return problems


def _out_kind_problems(entry: Any, kinds: Mapping[str, str], stage: str) -> list[str]:
    """Each out of the entry recorded as what the stage writes there: a file's md5, or a folder's `.dir` md5."""
    problems = []
    for path, item in _recorded_outs(entry).items():
        md5 = item.get("md5")
        if path in kinds and isinstance(md5, str):
            folder = md5.endswith(".dir")
            if folder != (kinds[path] == "folder"):
                problems.append(f"lock entry for '{stage}': out {path!r} is recorded as a "
                                f"{'folder' if folder else 'file'}, but '{stage}' writes a {kinds[path]} there")  # fmt: skip
    return problems


def _recorded_outs(entry: Any) -> dict[str, Mapping[str, Any]]:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("outs"), list):
        return {}
    return {o["path"]: o for o in entry["outs"] if isinstance(o, Mapping) and isinstance(o.get("path"), str)}


def _text_problems(rel: str, text: str, recorded: Mapping[str, Any] | None, root: Path, has_entry: bool) -> list[str]:
    """A text file must be the one its lock entry records (md5, size); `mlflow_run.json` must be what train writes."""

    problems = []
    data = text.encode()
    if has_entry:
        if recorded is None:
            problems.append("its lock entry records no such out")
        elif recorded.get("md5") != hashlib.md5(data).hexdigest() or recorded.get("size", len(data)) != len(data):
            problems.append("its content is not the file the lock entry records (md5/size differ)")
    if rel == str(Paths(root).train_run_file.relative_to(Paths(root).root)):
        try:
            run = json.loads(text)
        except ValueError:
            run = None
        if not (isinstance(run, dict) and set(run) == {"run_id", "experiment_id", "tracking_uri", "experiment"}
                and all(isinstance(v, str) for v in run.values()) and RUN_ID.fullmatch(run["run_id"])):  # fmt: skip
            problems.append("not what train writes there (a JSON object: run_id, experiment_id, tracking_uri, experiment)")
        elif run["experiment"] != _experiment(root):
            problems.append(f"names experiment {run['experiment']!r}, not this checkout's {_experiment(root)!r}")
    return problems


def _experiment(root: Path) -> Any:
    raw = read_raw(root / "params.yaml")
    return (raw.get("mlflow") or {}).get("experiment")


def check_upstream(root: Path, entries: Any, stages: list[str]) -> dict[str, Any]:
    """The orchestrator's `dvc.lock` entries for the stages before train, checked like a hand-off."""
    if not isinstance(entries, Mapping):
        raise HandoffRefused("the upstream lock entries are not a JSON object; nothing was written")
    problems = [f"lock entry for stage {name!r}: only {', '.join(stages)} come from upstream"
                for name in entries if name not in stages]  # fmt: skip
    for name, entry in entries.items():
        if name in stages:
            problems += _lock_entry_problems(entry, _stage_paths(root, name), name, root)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise HandoffRefused(f"refused the upstream lock entries; nothing was written:\n{lines}")
    return dict(entries)


def adopt(root: Path, data: Any, stage: str = TRAIN) -> None:
    """Write a checked hand-off's lock entry and files into this checkout (cached outputs come by `dvc pull`).

    Everything is checked first (`check_handoff`); a refused hand-off writes nothing.
    """
    entries, files = check_handoff(root, data, stage)
    merge_lock(root, entries)
    for path, text in files.items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, text)


def missing_cached_outputs(root: Path, stage: str) -> list[str]:
    return [p for p, cached in stage_outputs(root, stage) if cached and not (root / p).exists()]


def handoff_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True, default=str)
