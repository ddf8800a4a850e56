"""Shared fixtures: a tiny but real copy of the project where `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from digit.params import Yaml12Loader

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# No dvc command, `dvc init` included, may try to reach the network.
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Stage commands call `python`: make it this interpreter.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

TINY = {
    "data": {"train_size": 200, "val_size": 50, "shard_size": 64},
    "encoder": {"batch_size": 32},
    "codebook": {"k": 32, "niter": 10, "max_points": 4000},
    "tokenize": {"batch_size": 40, "row_group_size": 64},
}
# The rest of the DAG at toy size: a few optimizer steps, 20 samples, ~90 Inception forwards.
TINY_DAG = {
    "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32, "batch_size": 16, "max_steps": 10, "warmup_steps": 2,
            "eval_every": 5, "checkpoint_every": 5},
    "sample": {"num_per_class": 2, "batch_size": 10},
    "probe": {"batch_size": 64, "steps": 10},
    "decoder": {"width": 32, "n_attn": 1, "n_head": 2, "batch_size": 16, "max_steps": 10, "warmup_steps": 2,
                "adv_start": 5, "eval_every": 5, "checkpoint_every": 5, "eval_images": 20},
    "decode": {"batch_size": 8, "grid_columns": 2},
    "evaluate": {"reference_size": 30, "floor_pool": 20, "batch_size": 10, "kid_subsets": 10},
    "stability": {"num_images": 10, "batch_size": 10, "k_sweep": [8, 16]},
    "stage2": {"n_layer": 1, "n_head": 2, "n_embd": 32, "batch_size": 16, "max_steps": 6, "warmup_steps": 2,
               "eval_every": 3, "checkpoint_every": 3, "eval_images": 20},
    "vqgan": {"width": 8, "dim": 16, "k": 16, "batch_size": 16, "max_steps": 10, "warmup_steps": 2, "adv_start": 5,
              "eval_every": 5, "checkpoint_every": 5, "eval_images": 20, "restart_every": 5},
}


def sh(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None,
       timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command, capture output; on failure show it in the assertion. A hang fails after `timeout` s."""
    proc = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def expect_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A stage refused its input: exit status 2, one message with every fragment, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def update_params(path: Path, changes: dict) -> None:
    params = yaml.load(path.read_text(), Loader=Yaml12Loader)
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, changes: dict | None = None) -> Path:
    """Copy the pipeline (code + dvc.yaml + params) into `dest` as a fresh git+dvc repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("stages", "digit"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    update_params(dest / "params.yaml", {**TINY, **(changes or {})} if changes is None else _merge(TINY, changes))
    sh("git init -q && git config user.email t@t && git config user.name t", dest)
    sh([sys.executable, "-m", "dvc", "init", "-q"], dest)
    sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    sh("git add -A && git commit -qm 'tiny project'", dest)  # DVCLive needs a commit to log into
    return dest


def _merge(base: dict, changes: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


def dvc(args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # PYTHONPATH makes the stages import the project copy's `digit`.
    return sh(f"{sys.executable} -m dvc {args}", cwd, check=check, env={"PYTHONPATH": str(cwd)})


needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed (make dataset)")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A tiny project after `dvc repro tokenize` (200 train / 50 val images, K=32)."""
    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist not installed (make dataset)")
    repo = make_project(tmp_path_factory.mktemp("tiny") / "repo")
    proc = dvc("repro tokenize", repo)
    repo.joinpath("repro.log").write_text(proc.stdout + proc.stderr)
    return repo


@pytest.fixture(scope="session")
def full_repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny project after `dvc repro` of the whole DAG (TINY + TINY_DAG): both GPTs (train/sample/probe
    @digit and @vq), the decoder, the VQGAN, stage 2 (@ar), every renderer decoded and scored, stability and
    evaluate; a few minutes on 2 CPU cores."""
    repo = tmp_path_factory.mktemp("full") / "repo"
    sh(f"cp -a {tiny_repo} {repo}", repo.parent)
    update_params(repo / "params.yaml", TINY_DAG)
    proc = dvc("repro", repo)
    (repo / "repro-full.log").write_text(proc.stdout + proc.stderr)
    return repo
