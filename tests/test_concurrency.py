"""Concurrent experiments: `dvc exp run --queue` x2 with `dvc queue start -j 2` == the same runs one by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import dvc, needs_fmnist, sh

pytestmark = [needs_fmnist]

SEEDS = (1, 2)  # two workers, two experiments: they run at the same time
# decode.seed moves the stage-2 renderer's draws: each experiment re-runs the three decodes (two come out
# byte-identical), one Inception score and evaluate, and writes new outputs into the shared cache.
KEY = "decode.seed"


def experiment_metrics(repo) -> dict[str, dict]:
    rows = json.loads(dvc("exp show --json", repo).stdout)
    out = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = rev["data"]["metrics"]["reports/metrics.json"]["data"]
    return out


@pytest.mark.slow
def test_two_queue_workers_give_the_same_metrics_as_sequential_runs(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    sh("git add -A && git commit -qm base", repo)
    for seed in SEEDS:  # one after another, in the workspace
        dvc(f"exp run -n seq{seed} -S {KEY}={seed}", repo)
    sh("git checkout -- params.yaml dvc.lock && git clean -fdq reports", repo)

    # The same two, queued, run at the same time.
    for seed in SEEDS:
        dvc(f"exp run --queue -n par{seed} -S {KEY}={seed}", repo)
    dvc("queue start -j 2", repo)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc("queue status", repo).stdout
        if "Queued" not in status and "Running" not in status and status.count("Success") + status.count(
                "Failed") >= len(SEEDS):
            break
        time.sleep(2)
    assert status.count("Success") == len(SEEDS), status + "".join(
        dvc(f"queue logs par{s}", repo, check=False).stdout[-3000:] for s in SEEDS)

    metrics = experiment_metrics(repo)
    for seed in SEEDS:
        assert metrics[f"par{seed}"] == metrics[f"seq{seed}"], seed  # every key: both GPTs, every renderer
    # The seeds really differ: the stage-2 renderer drew other images.
    assert metrics["par1"]["render"]["stage2_ar"]["fid"] != metrics["par2"]["render"]["stage2_ar"]["fid"]


def test_weights_caches_take_concurrent_writers(tmp_path):
    """Two processes convert the offline encoder and Inception weights into one empty cache at once."""
    code = ("from digit.weights import offline_weights_path, package_weights_path; "
            "print(package_weights_path(), offline_weights_path())")
    env = {**os.environ, "DIGIT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]  # the same published paths
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and not [n for n in names if n.startswith(".")], names  # no temporary leftovers
