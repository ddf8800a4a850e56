"""Shared fixtures: a tiny but real copy of the project where `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from digit.params import Yaml12Loader

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# No dvc command, `dvc init` included, may try to reach the network.
os.environ["DVC_NO_ANALYTICS"] = "1"
# Under pytest-xdist (`make test` runs one worker per core) every worker and every stage it starts gets an
# equal share of the cores: oversubscribed OpenMP threads spin. One value for the whole session also keeps
# the bitwise comparisons between a test's run and the shared `full_repo` exact (thread counts move fp16
# features by an ulp). Set before anything imports torch.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
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
                "disc_start": 3, "adv_start": 5, "eval_every": 5, "checkpoint_every": 5, "eval_images": 20},
    "decode": {"batch_size": 8, "grid_columns": 2, "roundtrip_images": 20},
    "evaluate": {"reference_size": 30, "floor_pool": 20, "batch_size": 10, "kid_subsets": 10},
    "stability": {"num_images": 10, "batch_size": 10, "k_sweep": [8, 16]},
    "stage2": {"n_layer": 1, "n_head": 2, "n_embd": 32, "batch_size": 16, "max_steps": 6, "warmup_steps": 2,
               "eval_every": 3, "checkpoint_every": 3, "eval_images": 20},
    "vqgan": {"width": 8, "dim": 16, "k": 16, "batch_size": 16, "max_steps": 10, "warmup_steps": 2, "disc_start": 3,
              "adv_start": 5, "eval_every": 5, "checkpoint_every": 5, "eval_images": 20, "restart_every": 5},
}


def sh(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None,
       timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command, capture output; on failure show it in the assertion. A hang fails after `timeout` s."""
    proc = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` inside this test process, for a stage that is expected to refuse its input.

    The same code path as the command line (the module runs as `__main__`, through digit.cli.run), without
    the seconds of interpreter start-up and torch import a subprocess pays: what makes the many refusal
    tests cheap. cwd, argv, the environment and torch's thread count are restored afterwards; an exception
    that escapes the stage comes back as exit status 1 with its traceback on stderr, as from a process.
    """
    import contextlib
    import io
    import runpy
    import traceback

    import torch

    out, err = io.StringIO(), io.StringIO()
    saved = os.getcwd(), sys.argv, dict(os.environ), torch.get_num_threads()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [module, *args]
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 (reported like an uncaught exception in a process)
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, out.getvalue(), err.getvalue())


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


@pytest.fixture(scope="session", autouse=True)
def _tempfiles_in_the_session_folder(tmp_path_factory):
    """`tempfile` in the test process writes under pytest's own session folder, which pytest prunes."""
    before, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = before


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(repo)` once per test session, shared by every pytest-xdist worker; returns `repo`.

    The first worker to ask builds under a file lock in the session's shared temporary root; the others
    wait for it and reuse the result (read-only: tests that change a project copy it first). A failed
    build is removed and reported to every worker that asks, without building again.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        repo = tmp_path_factory.mktemp(name) / "repo"
        build(repo)
        return repo
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # one per session, shared by the workers
    repo, done, failed = root / name / "repo", root / name / "done", root / name / "failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"building the shared {name} project failed on another worker:\n{failed.read_text()}")
        if not done.exists():
            repo.parent.mkdir(parents=True, exist_ok=True)
            try:
                build(repo)
            except BaseException as exc:
                shutil.rmtree(repo, ignore_errors=True)
                failed.write_text(f"{type(exc).__name__}: {exc}"[-20000:])
                raise
            done.touch()
    return repo


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A tiny project after `dvc repro tokenize` (200 train / 50 val images, K=32)."""
    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist not installed (make dataset)")

    def build(repo: Path) -> None:
        make_project(repo)
        proc = dvc("repro tokenize", repo)
        repo.joinpath("repro.log").write_text(proc.stdout + proc.stderr)

    return built_once(tmp_path_factory, "tiny", build)


@pytest.fixture(scope="session")
def full_repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny project after `dvc repro` of the whole DAG (TINY + TINY_DAG): both GPTs (train/sample/probe
    @digit and @vq), the decoder, the VQGAN, stage 2 (@ar), every renderer decoded and scored, stability and
    evaluate; a few minutes on 2 CPU cores."""

    def build(repo: Path) -> None:
        sh(f"cp -a {tiny_repo} {repo}", repo.parent)
        update_params(repo / "params.yaml", TINY_DAG)
        proc = dvc("repro", repo)
        (repo / "repro-full.log").write_text(proc.stdout + proc.stderr)

    return built_once(tmp_path_factory, "full", build)


# The longest chain of the suite (tests/test_faults.py's kill campaign, one stage after another) starts first,
# so that under pytest-xdist the other workers fill the cores around it instead of waiting for it at the end.
FIRST = ("test_faults.py::test_sigkill_at_random_points_of_every_stage_then_repro_matches_uninterrupted",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.endswith(FIRST))  # stable: the rest keep their order
