"""The whole DAG, prepare -> evaluate, on a tiny real config through `dvc repro` and `dvc exp show`."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import dvc, expect_error, needs_fmnist, sh, update_params
from digit.decoder import DecoderConfig, TokenDecoder, save_decoder
from digit.fid import load_features, save_features

pytestmark = [needs_fmnist, pytest.mark.slow]


def test_every_stage_ran_and_is_up_to_date(full_repo):
    status = dvc("status", full_repo).stdout
    assert "up to date" in status, status
    lock = (full_repo / "dvc.lock").read_text()
    for stage in ("prepare", "extract", "codebook", "tokenize", "train", "sample", "probe", "reference",
                  "train_decoder", "decode", "evaluate", "stability", "train_vqgan", "vq_tokenize"):
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


def stage(repo, name: str, *args: str, params: dict | None = None):
    """Run one stage in `repo` (optionally with changed params in a separate file)."""
    extra = []
    if params:
        path = repo / "params-test.yaml"
        path.write_text((repo / "params.yaml").read_text())
        update_params(path, params)
        extra = ["--params", str(path)]
    return sh([sys.executable, "-m", f"stages.{name}", *args, *extra], repo, check=False,
              env={"PYTHONPATH": str(repo)})


def test_bad_inputs_of_the_pixel_stages_fail_early_and_clearly(full_repo, tmp_path):
    proc = stage(full_repo, "evaluate", "--live", str(tmp_path / "live"),
                 params={"evaluate": {"inception_weights": str(tmp_path / "missing.pth")}})
    expect_error(proc, "evaluate.inception_weights=", "no such file")
    assert not (tmp_path / "live").exists()

    pool = load_features(full_repo / "data" / "reference" / "train.npz")
    keep = np.concatenate([np.flatnonzero(pool["labels"] == c)[:1] for c in range(10)])
    small = tmp_path / "reference"
    small.mkdir()
    save_features(small / "train.npz", {k: (v[keep] if v is not None else None) for k, v in pool.items()})
    shutil.copy(full_repo / "data" / "reference" / "val.npz", small / "val.npz")
    proc = stage(full_repo, "evaluate", "--reference", str(small), "--live", str(tmp_path / "live"))
    expect_error(proc, "evaluate.floor_pool", "has 1 images of class 0 but the samples have 2")

    other = TokenDecoder(DecoderConfig(vocab_size=16, code_dim=8, grid=(7, 7), image_size=28, width=32, n_attn=0))
    save_decoder(other, {"grid": [7, 7], "vocab_size": 16}, tmp_path / "decoder")
    proc = stage(full_repo, "decode", "--decoder", str(tmp_path / "decoder"), "--out", str(tmp_path / "png"),
                 "--grid", str(tmp_path / "grid.png"), "--live", str(tmp_path / "live"))
    expect_error(proc, "trained for 16 codes but the tokens have 32", "dvc repro train_decoder")
    assert not (tmp_path / "png").exists() and not (tmp_path / "grid.png").exists()

    proc = stage(full_repo, "train_decoder", "--out", str(tmp_path / "dec"), "--report", str(tmp_path / "r.json"),
                 "--live", str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ck"),
                 params={"decoder": {"batch_size": 500}})
    expect_error(proc, "decoder.batch_size: 500 is more than the 200 train images")


def test_vq_tokens_share_the_digit_token_schema_and_rows(full_repo):
    """data/vq_tokens is row-aligned with data/tokens (the stage-2 pairs) and reads like it."""
    import pyarrow.parquet as pq

    from digit.tokens import read_metadata

    for split in ("train", "val"):
        digit_t = pq.read_table(full_repo / "data" / "tokens" / f"{split}.parquet")
        vq_t = pq.read_table(full_repo / "data" / "vq_tokens" / f"{split}.parquet")
        assert vq_t.schema.names == digit_t.schema.names == ["key", "label", "tokens"]
        assert vq_t.column("key").to_pylist() == digit_t.column("key").to_pylist()
        assert vq_t.column("label").to_pylist() == digit_t.column("label").to_pylist()
        meta = read_metadata(full_repo / "data" / "vq_tokens" / f"{split}.parquet")
        assert meta["grid"] == [7, 7] and meta["vocab_size"] == 16 and meta["tokenizer"] == "vq"
        tokens = np.stack(vq_t.column("tokens").to_numpy(zero_copy_only=False))
        assert tokens.shape == (len(vq_t), 49) and tokens.min() >= 0 and tokens.max() < 16
    report = json.loads((full_repo / "reports" / "vqgan.json").read_text())
    assert report["images"] == 20 and 0 < report["psnr"] < 100 and report["rfid"] > 0
    assert 0 < report["usage"] <= 1 and 1 <= report["perplexity"] <= 16
    stability = json.loads((full_repo / "reports" / "stability.json").read_text())
    vq = stability["vq"]
    assert vq["k"] == 16 and vq["num_images"] == 10 and vq["clean_vs_pipeline_change_rate"] == 0
    assert [r["snr_db"] for r in vq["rows"]] == stability["snr_db"]
    rates = [r["change_rate"] for r in vq["rows"]]
    assert all(0 <= r <= 1 for r in rates) and rates[-1] >= rates[0]  # 0.01 dB moves more tokens than 30 dB


def test_bad_vqgan_settings_fail_before_training(full_repo, tmp_path):
    outs = ["--out", str(tmp_path / "vq"), "--report", str(tmp_path / "r.json"), "--live", str(tmp_path / "live"),
            "--checkpoints", str(tmp_path / "ck")]
    expect_error(stage(full_repo, "train_vqgan", *outs, params={"vqgan": {"grid": 5}}),
                 "vqgan.grid=5", "power of two")
    expect_error(stage(full_repo, "train_vqgan", *outs, params={"vqgan": {"k": 1}}), "vqgan.k: 1 is below the minimum 2")
    expect_error(stage(full_repo, "train_vqgan", *outs, params={"vqgan": {"batch_size": 500}}),
                 "vqgan.batch_size: 500 is more than the 200 train images")
    assert not (tmp_path / "vq").exists() and not (tmp_path / "live").exists()
    proc = stage(full_repo, "vq_tokenize", "--vqgan", str(tmp_path / "nothing"), "--out", str(tmp_path / "t"),
                 "--report", str(tmp_path / "t.json"))
    expect_error(proc, "not a complete VQGAN output")
    assert not (tmp_path / "t").exists()


def test_killed_decoder_training_resumes_to_the_same_weights(full_repo, tmp_path):
    """SIGKILL after a checkpoint (adversarial term already on), re-run: same weights and metrics."""
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    params = {"decoder": {"max_steps": 24, "checkpoint_every": 8, "adv_start": 6, "eval_every": 8}}
    args = ("--out", "dec", "--report", "dec.json", "--live", "live", "--checkpoints", "ck")
    stage(repo, "train_decoder", *args, params=params)
    reference = load_file(str(repo / "dec" / "model.safetensors"))
    report = json.loads((repo / "dec.json").read_text())
    shutil.rmtree(repo / "dec")

    path = repo / "params-test.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train_decoder", *args, "--params", str(path)], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((repo / "ck").glob("*/step_00000016")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("decoder training finished before it could be killed; make the run longer")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (repo / "dec").exists()
    out = sh([sys.executable, "-m", "stages.train_decoder", *args, "--params", str(path)], repo,
             env={"PYTHONPATH": str(repo)})
    assert "resumed from" in out.stdout + out.stderr
    resumed = load_file(str(repo / "dec" / "model.safetensors"))
    for name, tensor in reference.items():  # exact on CPU: same batches, RNG and optimizer states
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    again = json.loads((repo / "dec.json").read_text())
    assert again["psnr"] == pytest.approx(report["psnr"], abs=1e-3)
    assert again["rfid"] == pytest.approx(report["rfid"], abs=1e-3)
    l1 = (repo / "live" / "plots" / "metrics" / "train" / "l1.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in l1[1:]] == list(range(1, 25))  # curve before the kill kept
    assert not any((repo / "ck").iterdir())
