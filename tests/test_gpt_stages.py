"""The train / sample / probe stages on tiny synthetic token files: resume, multi-process, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, _merge, expect_error, run_module, sh, update_params
from digit.tokens import TokenWriter, token_schema
from helpers import kill_after_checkpoint, stage_cmd, torchrun

pytestmark = pytest.mark.slow  # every test runs a stage end to end

K, GRID, CLASSES = 32, (4, 4), 4
TINY_GPT = {
    "gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32, "batch_size": 16, "max_steps": 12, "warmup_steps": 2,
            "eval_every": 4, "checkpoint_every": 4, "lr": 0.01, "dropout": 0.1},
    "sample": {"num_per_class": 5, "batch_size": 3},
    "probe": {"batch_size": 32, "steps": 20},
}


def write_tokens(path: Path, n: int, seed: int, vocab: int = K, hi: int = K) -> None:
    """Class-structured sequences: a GPT can learn them, a probe can read the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    base = (labels[:, None] * 7 + np.arange(GRID[0] * GRID[1])[None]) % hi
    noise = rng.integers(0, hi, base.shape)
    tokens = np.where(rng.random(base.shape) < 0.2, noise, base)
    schema = token_schema(GRID, vocab, {"classes": [f"c{i}" for i in range(CLASSES)]})
    writer = TokenWriter(path, schema, row_group_size=64)
    writer.write([f"k{i:05d}" for i in range(n)], labels, tokens)
    writer.close()


def make_work(root: Path) -> Path:
    """A folder with tiny class-structured token files and TINY + TINY_GPT params."""
    (root / "data" / "tokens").mkdir(parents=True)
    write_tokens(root / "data" / "tokens" / "train.parquet", 192, 0)
    write_tokens(root / "data" / "tokens" / "val.parquet", 48, 1)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params(root / "params.yaml", _merge(TINY, TINY_GPT))
    return root


@pytest.fixture
def work(tmp_path) -> Path:
    return make_work(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`work` after one uninterrupted `train` run: shared read-only by the tests that need a finished model."""
    root = make_work(tmp_path_factory.mktemp("trained"))
    stage("train", root, *TRAIN_ARGS)
    return root


@pytest.fixture
def trained_copy(trained, tmp_path) -> Path:
    """A private copy of `trained`, for tests that write next to the model."""
    sh(f"cp -a {trained} {tmp_path / 'work'}", tmp_path)
    return tmp_path / "work"


ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def stage(name: str, work: Path, *args: str, launcher: list[str] | None = None, check: bool = True):
    return sh(stage_cmd(name, *args, launcher=launcher), work, check=check, env=ENV, timeout=300)


TRAIN_ARGS = ("--tokens", "data/tokens", "--out", "models/gpt", "--live", "reports/train", "--checkpoints", "ck")


def weights(work: Path) -> dict:
    return load_file(work / "models" / "gpt" / "model.safetensors")


def test_train_logs_metrics_and_beats_unigram(trained):
    work = trained
    metrics = json.loads((work / "reports" / "train" / "metrics.json").read_text())
    assert metrics["step"] == 12
    assert metrics["val"]["loss"] < metrics["unigram"]["val_ce"]
    assert 0 < metrics["val"]["token_acc"] <= 1
    loss_tsv = pd.read_csv(work / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert list(loss_tsv["step"]) == list(range(1, 13))
    val_tsv = pd.read_csv(work / "reports" / "train" / "plots" / "metrics" / "val" / "loss.tsv", sep="\t")
    assert list(val_tsv["step"]) == [4, 8, 12]
    config = json.loads((work / "models" / "gpt" / "config.json").read_text())
    assert config["vocab_size"] == K and config["block_size"] == 17 and config["num_classes"] == CLASSES
    meta = json.loads((work / "models" / "gpt" / "meta.json").read_text())  # the tokens the GPT learned
    assert meta["grid"] == list(GRID) and meta["vocab_size"] == K and len(meta["classes"]) == CLASSES
    assert not any((work / "ck").iterdir())  # finished: checkpoints removed


def test_killed_run_resumes_to_the_same_weights(trained, tmp_path_factory):
    work = trained  # the uninterrupted run
    reference = weights(work)
    ref_metrics = json.loads((work / "reports" / "train" / "metrics.json").read_text())

    other = tmp_path_factory.mktemp("resume")
    for rel in ("data", "params.yaml"):
        sh(f"cp -a {work / rel} {other / rel}", other)
    update_params(other / "params.yaml", {"gpt": {"max_steps": 12}})
    kill_after_checkpoint(stage_cmd("train", *TRAIN_ARGS), other, other / "ck", 8, env=ENV)
    assert not (other / "models" / "gpt").exists()
    out = stage("train", other, *TRAIN_ARGS)
    assert "resumed from" in out.stdout + out.stderr
    resumed = weights(other)
    for name, tensor in reference.items():  # exact on CPU: same data order, RNG, optimizer state
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    metrics = json.loads((other / "reports" / "train" / "metrics.json").read_text())
    assert metrics["val"]["loss"] == pytest.approx(ref_metrics["val"]["loss"], abs=1e-6)
    loss_tsv = pd.read_csv(other / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert list(loss_tsv["step"]) == list(range(1, 13))  # the curve before the kill survived


# AdamW's decoupled weight decay multiplies the matrices by (1 - lr * weight_decay) = -999999 each step:
# the weights blow up and the loss is NaN after a few steps (step 3 on CPU), a real divergence.
DIVERGE = {"lr": 1.0, "weight_decay": 1e6, "warmup_steps": 0, "grad_clip": 0.0, "precision": "no", "max_steps": 40}


@pytest.mark.parametrize("checkpoint_every", [2, 40])
def test_training_stops_at_the_first_non_finite_loss_and_publishes_nothing(work, checkpoint_every):
    update_params(work / "params.yaml", {"gpt": {**DIVERGE, "checkpoint_every": checkpoint_every}})
    proc = stage("train", work, *TRAIN_ARGS, "--name", "train_digit", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    found = re.search(r"error: train_digit: non-finite train/loss = (nan|inf|-inf) at step (\d+); "
                      r"stopped, nothing published; (.*)", proc.stderr)
    assert found, proc.stderr
    step = int(found.group(2))
    assert 1 < step < DIVERGE["max_steps"]
    # The curve holds every step before the bad one, each finite; the bad step is never logged.
    loss = pd.read_csv(work / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert list(loss["step"]) == list(range(1, step)) and np.isfinite(loss["loss"]).all()
    saved = sorted((work / "ck").glob("train_digit-*/step_*"))
    if checkpoint_every < step:  # the message names the newest checkpoint, which is kept for a resume
        last = (step - 1) // checkpoint_every * checkpoint_every
        assert saved and saved[-1].name == f"step_{last:08d}"
        assert f"the last good checkpoint is {Path('ck') / saved[-1].relative_to(work / 'ck')} (step {last})" \
            in found.group(3), proc.stderr
    else:
        assert not saved and "no checkpoint was written before it" in found.group(3), proc.stderr
    assert not (work / "models").exists()  # nothing published, not even a temporary folder


def test_two_process_training_runs_and_loss_goes_down(work):
    update_params(work / "params.yaml", {"gpt": {"max_steps": 20, "batch_size": 8}})
    stage("train", work, *TRAIN_ARGS, launcher=torchrun(2))
    loss = pd.read_csv(work / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")["loss"]
    assert loss.iloc[-3:].mean() < loss.iloc[:3].mean() - 0.3


def test_sample_one_and_two_processes_give_the_same_complete_set(trained_copy):
    work = trained_copy
    stage("sample", work, "--model", "models/gpt", "--out", "s1.parquet")
    stage("sample", work, "--model", "models/gpt", "--out", "s2.parquet", launcher=torchrun(2))
    one, two = pd.read_parquet(work / "s1.parquet"), pd.read_parquet(work / "s2.parquet")
    assert len(two) == 5 * CLASSES and two["key"].is_unique
    assert sorted(two["label"].value_counts().tolist()) == [5] * CLASSES
    assert one["key"].tolist() == two["key"].tolist()
    assert np.array_equal(np.stack(one["tokens"]), np.stack(two["tokens"]))
    assert np.stack(two["tokens"]).max() < K
    meta = json.loads(pq.read_schema(work / "s2.parquet").metadata[b"digit"])
    assert meta["grid"] == list(GRID) and meta["sampling"]["seed"] == 0 and meta["sampling"]["num_per_class"] == 5


def test_probe_reports_every_layer(trained_copy):
    work = trained_copy
    stage("probe", work, "--model", "models/gpt", "--tokens", "data/tokens", "--report", "probe.json",
          "--live", "probe")
    report = json.loads((work / "probe.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2]  # embeddings + 2 blocks
    assert report["best_val_top1"] == max(r["val_top1"] for r in report["layers"])
    assert report["best_val_top1"] > 0.5  # the class is readable from the tokens (chance 0.25)


def test_tokens_beyond_vocab_are_rejected(work):
    write_tokens(work / "data" / "tokens" / "train.parquet", 64, 0, vocab=16, hi=K)
    expect_error(run_module("stages.train", *TRAIN_ARGS, cwd=work), "train.parquet", "vocabulary has 16 codes")


@pytest.mark.parametrize("changes, fragment", [
    ({"top_p": 0.0}, "sample.top_p"),
    ({"top_p": 1.5}, "sample.top_p"),
    ({"temperature": -1.0}, "sample.temperature"),
])
def test_bad_sampling_params(work, changes, fragment):
    update_params(work / "params.yaml", {"sample": changes})
    expect_error(run_module("stages.sample", "--model", "models/gpt", cwd=work), fragment)
