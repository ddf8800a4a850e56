"""The whole DAG, prepare -> evaluate, on a tiny real config through `dvc repro` and `dvc exp show`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_DAG, dvc, needs_fmnist, sh, update_params

pytestmark = [needs_fmnist, pytest.mark.slow]


@pytest.fixture(scope="module")
def full_repo(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("full") / "repo"
    sh(f"cp -a {tiny_repo} {repo}", repo.parent)
    update_params(repo / "params.yaml", TINY_DAG)
    proc = dvc("repro", repo)
    (repo / "repro-full.log").write_text(proc.stdout + proc.stderr)
    return repo


def test_every_stage_ran_and_is_up_to_date(full_repo):
    status = dvc("status", full_repo).stdout
    assert "up to date" in status, status
    lock = (full_repo / "dvc.lock").read_text()
    for stage in ("prepare", "extract", "codebook", "tokenize", "train", "sample", "probe", "reference",
                  "train_decoder", "decode", "evaluate", "stability"):
        assert f"  {stage}:" in lock, stage


def test_decode_writes_pngs_manifest_and_class_grid(full_repo):
    out = full_repo / "data" / "samples" / "images"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["sampling"]["num_per_class"] == 2
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == sorted(e["file"] for e in manifest["images"]) and len(files) == 20
    assert all(f"_c{e['label']}.png" in e["file"] for e in manifest["images"])
    with Image.open(out / files[0]) as img:
        assert img.size == (28, 28) and img.mode == "RGB"
    with Image.open(full_repo / "reports" / "samples.png") as grid:
        assert grid.size[1] == 10 * (28 * 2 + 2) + 2  # one row per class
    assert (full_repo / "reports" / "decode" / "plots" / "images" / "samples.png").is_file()


def test_reports_hold_the_headline_numbers(full_repo):
    decoder = json.loads((full_repo / "reports" / "decoder.json").read_text())
    assert decoder["images"] == 20 and decoder["reference_size"] == 30
    assert 0 < decoder["psnr"] < 100 and -1 <= decoder["ssim"] <= 1 and decoder["rfid"] > 0
    metrics = json.loads((full_repo / "reports" / "metrics.json").read_text())
    for key in ("fid", "fid_floor", "kid_mean", "kid_std", "train_loss", "val_loss", "probe_top1",
                "decoder_psnr", "decoder_rfid"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["num_samples"] == 20 and metrics["num_reference"] == 30
    assert metrics["isc_mean"] is None and "no classifier" in metrics["isc_unavailable"]
    assert metrics["fid"] > 0 and metrics["fid_floor"] > 0
    assert metrics["decoder_rfid"] == decoder["rfid"]
    reference = np.load(full_repo / "data" / "reference" / "train.npz")
    assert reference["pool"].shape == (20, 2048) and np.bincount(reference["labels"]).tolist() == [2] * 10


def test_dvc_exp_show_lists_fid(full_repo):
    sh("git add -A && git commit -qm tiny", full_repo)
    rows = json.loads(dvc("exp show --json", full_repo).stdout)
    metrics = rows[0]["data"]["metrics"]["reports/metrics.json"]["data"]
    assert isinstance(metrics["fid"], float) and isinstance(metrics["fid_floor"], float)
    assert "no classifier" in metrics["isc_unavailable"]  # (dvc drops the null isc_mean from its table)


def test_changing_the_decoder_reruns_only_its_descendants(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    update_params(repo / "params.yaml", {"decoder": {"max_steps": 11}})
    out = dvc("repro", repo).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_decoder", "decode", "evaluate"}, out
    update_params(repo / "params.yaml", {"decoder": {"max_steps": 10}, "sample": {"seed": 1}})
    out = dvc("repro", repo).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"sample", "decode", "evaluate"}, out  # the real images' Inception features stay cached
