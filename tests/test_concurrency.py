"""Concurrent experiments: `dvc exp run --queue` x3 with `dvc queue start -j 2` == the same runs one by one."""

from __future__ import annotations

import json
import time

import pytest

from conftest import dvc, needs_fmnist, sh

pytestmark = [needs_fmnist, pytest.mark.slow]

SEEDS = (1, 2, 3)


def experiment_metrics(repo) -> dict[str, dict]:
    rows = json.loads(dvc("exp show --json", repo).stdout)
    out = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = rev["data"]["metrics"]["reports/metrics.json"]["data"]
    return out


def test_two_queue_workers_give_the_same_metrics_as_sequential_runs(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    sh("git add -A && git commit -qm base", repo)
    for seed in SEEDS:  # one after another, in the workspace
        dvc(f"exp run -n seq{seed} -S sample.seed={seed}", repo)
    sh("git checkout -- params.yaml dvc.lock && git clean -fdq reports", repo)

    # The same three, queued, two at a time. A fresh, empty weights cache makes both
    # workers convert the offline Inception weights at the same moment: the cache must
    # take concurrent writers (unique temporary file, atomic rename).
    for seed in SEEDS:
        dvc(f"exp run --queue -n par{seed} -S sample.seed={seed}", repo)
    cache = tmp_path / "cache"
    sh(f"DIGIT_CACHE={cache} {dvc_cmd()} queue start -j 2", repo, env={"PYTHONPATH": str(repo)})
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc("queue status", repo).stdout
        if "Queued" not in status and "Running" not in status and status.count("Success") + status.count(
                "Failed") >= len(SEEDS):
            break
        time.sleep(2)
    assert status.count("Success") == len(SEEDS), status + "".join(
        dvc(f"queue logs par{s}", repo, check=False).stdout[-3000:] for s in SEEDS)
    assert list(cache.glob("inception-v3-compat*.pth")) and not list(cache.glob(".*tmp*"))

    metrics = experiment_metrics(repo)
    for seed in SEEDS:
        assert metrics[f"par{seed}"] == metrics[f"seq{seed}"], seed
    assert metrics["par1"]["fid"] != metrics["par2"]["fid"]  # the seeds really differ


def dvc_cmd() -> str:
    import sys

    return f"{sys.executable} -m dvc"
