"""Plain helper functions for the tests (no fixtures: those live in conftest.py).

Keep each helper small, documented and free of side effects; import them with
`from helpers import ...` (pytest puts tests/ on sys.path, as for conftest).

- `dvc_stages`: every stage of a DVC project, `foreach`/`matrix` expanded, as DVC itself resolves them.
- `entry_modules`: the project modules a stage command runs (`-m stages.NAME`, `path/to/script.py`).
(Which project files a module imports is digit.code's job, the one import reader: the training loop
fingerprints the same files the deps test checks.)
- `is_inert_init`: whether a package `__init__.py` holds nothing that can change what a stage computes.
- `names_read`, `is_docstring`: small AST pieces.
- `llamagen_checkpoint`: a random checkpoint of LlamaGen's VQ-16 layout, saved as LlamaGen saves it.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

from digit.code import module_file, parse


# ---------------------------------------------------------------- DVC stages

@dataclass(frozen=True)
class StageInfo:
    """One resolved stage: `name` as `dvc repro` takes it from the root (e.g. `train@digit`), its command, its deps.

    `deps` are paths relative to the project root (DVC writes them relative to the stage's wdir), params
    dependencies (params.yaml) excluded.
    """

    name: str
    cmd: str
    deps: tuple[str, ...]


def dvc_stages(root: Path) -> list[StageInfo]:
    """All stages of the DVC project at `root`, in dvc.yaml order, with DVC's own interpolation.

    `${...}` in cmd/deps is resolved against params.yaml and `vars`, and a `foreach`/`matrix` definition
    yields one stage per item (`name@key`), exactly as `dvc repro` would run them. Reads only.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root).resolve()
    stages = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            cmd = stage.cmd if isinstance(stage.cmd, str) else "\n".join(stage.cmd or [])
            wdir = Path(stage.wdir)
            deps = tuple(
                Path(os.path.relpath(wdir / str(dep.def_path), root)).as_posix()
                for dep in stage.deps if not isinstance(dep, ParamsDependency)
            )
            # stage.addressing is relative to the current directory; name it from `root` instead.
            dvcfile = Path(os.path.relpath(stage.dvcfile.path, root)).as_posix()
            name = stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"
            stages.append(StageInfo(name, cmd, deps))
    return stages


# ---------------------------------------------------------------- stage entry points

_ENTRY_MODULE = re.compile(r"(?<!\S)(?:-m\s*|--module[=\s]\s*)([A-Za-z_][\w.]*)")
_ENTRY_SCRIPT = re.compile(r"(?<!\S)([\w./-]+\.py)(?!\S)")


def entry_modules(cmd: str, root: Path) -> list[Path]:
    """The project files a stage command starts, in order: `-m pkg.mod` (`--module pkg.mod`: accelerate,
    torchrun) and `path/script.py` operands.

    The command may be multi-line or start with a launcher (`python`, `accelerate launch ...`,
    `torchrun ...`). `-m pkg` naming a package runs `pkg/__main__.py`. Modules that are not under
    `root` (`-m torch.distributed.run`, ...) are ignored.
    """
    found: list[Path] = []
    for name in _ENTRY_MODULE.findall(cmd):
        path = module_file(name, root)
        if path is not None and path.name == "__init__.py" and (path.parent / "__main__.py").is_file():
            path = path.parent / "__main__.py"
        if path is not None and path not in found:
            found.append(path)
    for script in _ENTRY_SCRIPT.findall(cmd):
        path = Path(root, script)
        if path.is_file() and path not in found:
            found.append(path)
    return found


def is_docstring(stmt: ast.stmt) -> bool:
    """A bare string statement (a module, class or function docstring)."""
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def inert_init_names(path: Path) -> set[str] | None:
    """For a package `__init__.py` holding only a docstring, `from __future__` imports and dunder constants
    (`__version__ = "0.1.0"`), the dunder names it defines; None when it holds anything else (code,
    imports, functions, classes, other names), which makes it a real dependency of every importer.
    """
    names: set[str] = set()
    for stmt in parse(path).body:
        if is_docstring(stmt) or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if all(isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__") for t in targets) \
                    and _is_literal(stmt.value):
                names.update(t.id for t in targets)
                continue
        return None
    return names


def is_inert_init(path: Path) -> bool:
    """A package `__init__.py` that cannot change a stage's outputs on its own (see `inert_init_names`)."""
    return Path(path).name == "__init__.py" and inert_init_names(path) is not None


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def names_read(path: Path) -> set[str]:
    """Every identifier a module reads as a name, an attribute, an imported name or a string (a superset)."""
    found: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            found.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            found.add(node.value)  # getattr(pkg, "__version__")
    return found


# ---------------------------------------------------------------- running stages

def stages_ran(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, from its output ("Running stage 'train@digit':")."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def stage_cmd(name: str, *args: str, launcher: list[str] | None = None) -> list[str]:
    """The command line of `python -m stages.<name> args` (or under `launcher`, e.g. torchrun())."""
    import sys

    return [*(launcher or [sys.executable, "-m"]), f"stages.{name}", *args]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """A CPU torchrun launcher prefix for stage_cmd: `nproc` processes on a free local port, then `-m`."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m"]


def kill_after_checkpoint(cmd: list[str], cwd: Path, checkpoints: Path, step: int, env: dict | None = None,
                          timeout: float = 120) -> None:
    """Start `cmd`, SIGKILL it as soon as checkpoint step `step` exists under `checkpoints`/<run>/, wait.

    Fails the test when the run ends before that checkpoint (the run is too short to be killed)."""
    import signal
    import subprocess
    import time

    import pytest

    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not list(Path(checkpoints).glob(f"*/step_{step:08d}")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(cmd)} finished before checkpoint {step}; make the run longer")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------- checkpoints

def llamagen_checkpoint(path, image_size=32, ch=32, z_channels=32, k=16, dim=4, seed=0, **edits):
    """A random state dict of the layout (small channels: the layout leaves them to the checkpoint), saved as
    LlamaGen saves it; `edits` replace (tensor) or drop (None) keys first."""
    import torch

    from digit.pretrained_vqgan import PretrainedVQConfig, PretrainedVQGAN

    torch.manual_seed(seed)
    model = PretrainedVQGAN(PretrainedVQConfig(image_size=image_size, ch=ch, z_channels=z_channels, k=k, dim=dim))
    state = {**model.state_dict(), "quantize.codebook_used": torch.zeros(65536)}
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    torch.save({"model": state, "optimizer": {}}, path)
    return path
