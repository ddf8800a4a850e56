"""tokenizer.kind and decoder.kind on the tiny DAG: what re-runs, what renders, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import dvc, expect_error, needs_fmnist, sh, update_params
from digit.stage2 import Stage2Config, build_stage2, save_stage2
from digit.tokens import TokenWriter, read_tokens, token_schema
from test_full_dag import stage

pytestmark = [needs_fmnist, pytest.mark.slow]


def copy_repo(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    return repo


def repro(repo) -> set[str]:
    out = dvc("repro", repo).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def read_json(path):
    return json.loads(path.read_text())


def test_stage2_reports_and_every_path_in_the_metrics(full_repo):
    for kind in ("ar", "nar"):
        report = read_json(full_repo / "reports" / f"stage2_{kind}.json")
        assert report["kind"] == f"stage2_{kind}" and report["images"] == 20 and report["steps"] == 6
        assert 0 < report["psnr"] < 100 and 0 < report["ssim"] < 1 and report["rfid"] > 0
        assert 0 <= report["vq_token_accuracy"] <= 1 and report["seconds_per_image"] > 0
        live = read_json(full_repo / "reports" / f"stage2_{kind}" / "metrics.json")
        assert live["step"] == 6 and np.isfinite(live["val"]["loss"]) and 0 <= live["val"]["token_accuracy"] <= 1
    assert report["sampling"] == {"temperature": 1.0, "steps": 8}
    metrics = read_json(full_repo / "reports" / "metrics.json")
    assert metrics["tokenizer_kind"] == "discriminative" and metrics["decoder_kind"] == "direct"
    assert metrics["decoder_rfid"] == read_json(full_repo / "reports" / "decoder.json")["rfid"]
    sources = {"direct": "decoder.json", "vqgan": "vqgan.json", "stage2_ar": "stage2_ar.json",
               "stage2_nar": "stage2_nar.json"}
    for kind, name in sources.items():
        assert metrics["rec"][kind]["rfid"] == read_json(full_repo / "reports" / name)["rfid"]
    assert set(metrics["rec"]["stage2_ar"]) == {"psnr", "ssim", "rfid"}  # no timings: metrics.json repeats exactly
    decode = read_json(full_repo / "reports" / "decode.json")
    assert decode["renderer"] == "direct" and decode["images"] == 20 and decode["seconds_per_image"] > 0


def test_decoder_kind_reruns_only_decode_and_evaluate_and_renders_deterministically(full_repo, tmp_path):
    repo = copy_repo(full_repo, tmp_path)
    for kind in ("stage2_ar", "stage2_nar"):
        update_params(repo / "params.yaml", {"decoder": {"kind": kind}})
        assert repro(repo) == {"decode", "evaluate"}
        manifest = read_json(repo / "data" / "samples" / "images" / "manifest.json")
        assert manifest["renderer"] == kind and manifest["count"] == 20 and manifest["tokenizer"] == "discriminative"
        metrics = read_json(repo / "reports" / "metrics.json")
        assert metrics["decoder_kind"] == kind
        assert metrics["decoder_rfid"] == read_json(repo / "reports" / f"{kind}.json")["rfid"]
        # The same seed renders the same pixels: a second decode into another folder is byte-identical.
        proc = stage(repo, "decode", "--out", str(tmp_path / kind), "--grid", str(tmp_path / f"{kind}.png"),
                     "--live", str(tmp_path / "live"), "--report", str(tmp_path / "decode.json"))
        assert proc.returncode == 0, proc.stderr
        for entry in manifest["images"]:
            a = (repo / "data" / "samples" / "images" / entry["file"]).read_bytes()
            assert (tmp_path / kind / entry["file"]).read_bytes() == a, entry["file"]
    # Back to direct: decode renders the first run's bytes again, so DVC may take evaluate from its run cache.
    update_params(repo / "params.yaml", {"decoder": {"kind": "direct"}})
    ran = repro(repo)
    assert "decode" in ran and ran <= {"decode", "evaluate"}, ran
    assert read_json(repo / "reports" / "metrics.json") == read_json(full_repo / "reports" / "metrics.json")
    assert dvc("status", repo).stdout.strip().endswith("up to date.")


def test_tokenizer_kind_vq_trains_and_samples_the_gpt_on_vq_tokens(full_repo, tmp_path):
    repo = copy_repo(full_repo, tmp_path)
    update_params(repo / "params.yaml", {"tokenizer": {"kind": "vq"}})
    assert repro(repo) == {"gpt_tokens", "train", "sample", "probe", "decode", "evaluate"}
    for split in ("train", "val"):  # byte copies of the VQ tokens
        assert (repo / "data" / "gpt_tokens" / f"{split}.parquet").read_bytes() == \
            (repo / "data" / "vq_tokens" / f"{split}.parquet").read_bytes()
    gpt_meta = read_json(repo / "models" / "gpt" / "tokens.json")
    assert gpt_meta["tokenizer"] == "vq" and gpt_meta["vocab_size"] == 16
    tokens, labels, _, meta = read_tokens(repo / "data" / "samples" / "tokens.parquet")
    assert meta["tokenizer"] == "vq" and meta["vocab_size"] == 16 and tokens.shape == (20, 49) and tokens.max() < 16
    manifest = read_json(repo / "data" / "samples" / "images" / "manifest.json")
    assert manifest["renderer"] == "vqgan" and manifest["tokenizer"] == "vq"
    metrics = read_json(repo / "reports" / "metrics.json")
    assert metrics["tokenizer_kind"] == "vq" and metrics["decoder_kind"] == "vqgan"
    assert metrics["decoder_rfid"] == read_json(repo / "reports" / "vqgan.json")["rfid"]
    assert 0 <= read_json(repo / "reports" / "probe.json")["best_val_top1"] <= 1

    # Stage 2 translates DiGIT tokens: with VQ samples it is a configuration error, said before any stage runs.
    update_params(repo / "params.yaml", {"decoder": {"kind": "stage2_ar"}})
    proc = dvc("repro", repo, check=False)
    assert proc.returncode != 0
    assert "tokenizer.kind is vq" in proc.stdout + proc.stderr and "set decoder.kind: direct" in proc.stdout + proc.stderr


def test_a_new_vqgan_leaves_the_discriminative_gpt_alone(full_repo, tmp_path):
    """gpt_tokens re-runs and writes the same bytes, so DVC does not retrain or resample the GPT."""
    repo = copy_repo(full_repo, tmp_path)
    update_params(repo / "params.yaml", {"vqgan": {"seed": 1}})
    ran = repro(repo)
    assert {"train_vqgan", "vq_tokenize", "gpt_tokens", "train_stage2_ar", "train_stage2_nar"} <= ran
    assert not ran & {"train", "sample", "probe", "extract", "codebook", "tokenize", "train_decoder"}, ran


def test_bad_stage2_inputs_fail_early_and_clearly(full_repo, tmp_path):
    outs = ["--kind", "ar", "--out", str(tmp_path / "s2"), "--live", str(tmp_path / "live"),
            "--report", str(tmp_path / "s2.json"), "--checkpoints", str(tmp_path / "ck")]

    def write_vq(folder, grid, reverse=False):
        folder.mkdir()
        for split in ("train", "val"):
            _, labels, keys, _ = read_tokens(full_repo / "data" / "tokens" / f"{split}.parquet")
            order = slice(None, None, -1) if reverse else slice(None)
            writer = TokenWriter(folder / f"{split}.parquet",
                                 token_schema(grid, 16, {"tokenizer": "vq"}), 64)
            writer.write(keys[order], labels[order], np.zeros((len(keys), grid[0] * grid[1]), np.int16))
            writer.close()

    write_vq(tmp_path / "vq14", (14, 14))
    expect_error(stage(full_repo, "train_stage2", *outs, "--vq-tokens", str(tmp_path / "vq14")),
                 "the VQ grid is 14x14 but the DiGIT grid is 7x7", "vqgan.grid: 7")
    write_vq(tmp_path / "shuffled", (7, 7), reverse=True)
    expect_error(stage(full_repo, "train_stage2", *outs, "--vq-tokens", str(tmp_path / "shuffled")),
                 "do not list the same images in the same order")
    expect_error(stage(full_repo, "train_stage2", *outs, params={"stage2": {"batch_size": 500}}),
                 "stage2.batch_size: 500 is more than the 200 train pairs")
    expect_error(stage(full_repo, "train_stage2", *outs, "--tokens", "data/vq_tokens"),
                 "stage 2 maps DiGIT tokens")
    assert not any((tmp_path / name).exists() for name in ("s2", "live", "s2.json", "ck"))

    # A stage-2 model trained for another DiGIT codebook (64 codes; the tokens have 32), or of the other kind.
    other = build_stage2(Stage2Config(digit_k=64, vq_k=16, grid=(7, 7), kind="ar", n_layer=1, n_head=2, n_embd=32))
    save_stage2(other, {}, tmp_path / "other")
    decode_outs = ["--out", str(tmp_path / "png"), "--grid", str(tmp_path / "grid.png"),
                   "--live", str(tmp_path / "dlive"), "--report", str(tmp_path / "d.json")]
    expect_error(stage(full_repo, "decode", "--stage2-ar", str(tmp_path / "other"), *decode_outs,
                       params={"decoder": {"kind": "stage2_ar"}}),
                 "trained for a DiGIT codebook of 64 codes, the tokens have 32")
    expect_error(stage(full_repo, "decode", "--stage2-nar", "models/stage2_ar", *decode_outs,
                       params={"decoder": {"kind": "stage2_nar"}}),
                 "holds a stage-2 ar model, decoder.kind is stage2_nar")
    assert not (tmp_path / "png").exists() and not (tmp_path / "grid.png").exists()

    # tokenizer.kind picks the folder; a folder holding the other kind is refused.
    expect_error(stage(full_repo, "gpt_tokens", "--discriminative", "data/vq_tokens", "--out", str(tmp_path / "g")),
                 "holds vq tokens, but tokenizer.kind is discriminative")
    expect_error(stage(full_repo, "gpt_tokens", "--out", str(tmp_path / "g"),
                       params={"tokenizer": {"kind": "vq"}, "decoder": {"kind": "stage2_nar"}}),
                 "decoder.kind: stage2_nar translates DiGIT tokens into VQ tokens")
    assert not (tmp_path / "g").exists()


def test_killed_stage2_nar_training_resumes_to_the_same_weights(full_repo, tmp_path):
    """SIGKILL after a checkpoint, re-run: the same weights (the masks are keyed by step, not by stream state)."""
    params = {"stage2": {"max_steps": 240, "checkpoint_every": 80, "eval_every": 80}}
    args = ("--kind", "nar", "--out", "s2", "--report", "s2.json", "--live", "live", "--checkpoints", "ck")
    repo = copy_repo(full_repo, tmp_path)
    assert stage(repo, "train_stage2", *args, params=params).returncode == 0
    reference = load_file(str(repo / "s2" / "model.safetensors"))
    (repo / "s2.json").unlink()
    sh("rm -rf s2", repo)

    proc = subprocess.Popen([sys.executable, "-m", "stages.train_stage2", *args, "--params", "params-test.yaml"],
                            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((repo / "ck").glob("*/step_00000160")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("stage-2 training finished before it could be killed; make the run longer")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (repo / "s2").exists()
    out = sh([sys.executable, "-m", "stages.train_stage2", *args, "--params", "params-test.yaml"], repo,
             env={"PYTHONPATH": str(repo)})
    assert "resumed from" in out.stdout + out.stderr
    resumed = load_file(str(repo / "s2" / "model.safetensors"))
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    assert not list((repo / "ck").iterdir())  # checkpoints removed once the model is published
