"""The whole DAG, prepare -> evaluate, on a tiny real config through `dvc repro` and `dvc exp show`."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import dvc, expect_error, needs_fmnist, run_module, sh, update_params
from digit import storage
from digit.decoder import DecoderConfig, TokenDecoder, save_decoder
from digit.fid import load_features, save_features
from helpers import dvc_stages, kill_after_checkpoint, llamagen_checkpoint, stage_cmd, stages_ran

pytestmark = [needs_fmnist, pytest.mark.slow]

# Every stage of the DAG, foreach items expanded (what `dvc repro` runs from scratch).
STAGES = {"prepare", "train_encoder", "extract", "codebook", "tokenize", "reference", "train_vqgan", "vq_tokenize",
          "train@digit", "train@vq", "sample@digit", "sample@vq", "probe@digit", "probe@vq", "train_decoder",
          "train_stage2@ar", "decode@direct", "decode@stage2_ar", "decode@vqgan", "score@direct",
          "score@stage2_ar", "score@vqgan", "stability", "evaluate"}
RENDERERS = {"direct": "digit", "stage2_ar": "digit", "vqgan": "vq"}  # renderer -> the GPT whose samples it renders


# ---------------------------------------------------------------- the DAG's structure, as DVC resolves it

def param_readers(repo: Path, key: str) -> set[str]:
    """The stages that list params key `key` (e.g. "vqgan.lr") in dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {stage.name for stage in dvc_repo.index.stages
                if any(isinstance(dep, ParamsDependency) and key in dep.params for dep in stage.deps)}


def dependents(repo: Path, names: set[str]) -> tuple[set[str], set[str]]:
    """(stages with a dep on an output of `names`, every stage downstream of `names`), from DVC's own graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges run from a stage to the stages it depends on
        by_name = {stage.name: stage for stage in graph}
        direct = {s.name for name in names for s in graph.predecessors(by_name[name])}
        downstream = {s.name for name in names for s in nx.ancestors(graph, by_name[name])}
    return direct, downstream


def lock_inputs(repo: Path) -> dict[str, str]:
    """Per stage in dvc.lock, what it ran on: its command, deps' hashes and params values."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: json.dumps([entry.get("cmd"), entry.get("deps"), entry.get("params")], sort_keys=True)
            for name, entry in lock.items()}


def repro_after_param_change(repo: Path, changes: dict) -> tuple[set[str], set[str], set[str], set[str]]:
    """Change params, `dvc repro`; returns (stages run, stages taken from DVC's run cache, readers of the changed
    keys with their direct dependents: what must re-run when the readers' outputs change, every stage the
    change can reach)."""
    keys = {f"{section}.{key}" for section, values in changes.items() for key in values}
    readers = set().union(*(param_readers(repo, key) for key in keys))
    assert readers, keys
    direct, downstream = dependents(repo, readers)
    before = lock_inputs(repo)
    update_params(repo / "params.yaml", changes)
    out = dvc("repro", repo).stdout
    after = lock_inputs(repo)
    ran = stages_ran(out)
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", out))
    changed = {name for name in after if after[name] != before.get(name)}
    # DVC re-made exactly the stages whose recorded inputs changed (a stage whose upstream outputs came
    # out byte-identical is skipped), each once, and only stages the change can reach.
    assert not ran & restored and ran | restored == changed, out
    assert changed <= readers | downstream, out
    assert dvc("status", repo).stdout.strip().endswith("up to date."), out
    return ran, restored, readers | direct, readers | downstream


# ---------------------------------------------------------------- tests

def test_every_stage_ran_and_is_up_to_date(full_repo):
    status = dvc("status", full_repo).stdout
    assert "up to date" in status, status
    assert {s.name for s in dvc_stages(full_repo)} == STAGES
    lock = yaml.safe_load((full_repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == STAGES, sorted(set(lock) ^ STAGES)


def test_decode_writes_pngs_manifest_and_class_grid(full_repo):
    for renderer, gpt in RENDERERS.items():
        out = full_repo / "data" / "renders" / renderer
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["count"] == 20 and manifest["sampling"]["num_per_class"] == 2
        assert manifest["renderer"] == renderer
        assert manifest["tokenizer"] == ("vq" if gpt == "vq" else "discriminative")
        files = sorted(p.name for p in out.glob("*.png"))
        assert files == sorted(e["file"] for e in manifest["images"]) and len(files) == 20
        assert all(f"_c{e['label']}.png" in e["file"] for e in manifest["images"])
        with Image.open(out / files[0]) as img:
            assert img.size == (28, 28) and img.mode == "RGB"
        with Image.open(full_repo / "reports" / "samples" / f"{renderer}.png") as grid:
            assert grid.size[1] == 10 * (28 * 2 + 2) + 2  # one row per class
        assert (full_repo / "reports" / "decode" / renderer / "plots" / "images" / "samples.png").is_file()
        report = json.loads((full_repo / "reports" / "decode" / f"{renderer}.json").read_text())
        assert report["renderer"] == renderer and report["images"] == 20 and report["seconds_per_image"] > 0


def test_reports_hold_the_headline_numbers(full_repo):
    decoder = json.loads((full_repo / "reports" / "decoder.json").read_text())
    assert decoder["images"] == 20 and decoder["reference_size"] == 30
    assert 0 < decoder["psnr"] < 100 and -1 <= decoder["ssim"] <= 1 and decoder["rfid"] > 0
    metrics = json.loads((full_repo / "reports" / "metrics.json").read_text())
    for tok in ("digit", "vq"):
        for key in ("fid", "kid", "val_loss", "val_token_acc", "train_loss", "probe_top1", "change_rate", "cosine"):
            assert isinstance(metrics[tok][key], float) and math.isfinite(metrics[tok][key]), (tok, key)
        assert metrics[tok]["fid"] > 0
    for renderer in RENDERERS:
        for key in ("fid", "kid", "ceiling_rfid", "ceiling_psnr", "ceiling_ssim"):
            value = metrics["render"][renderer][key]
            assert isinstance(value, float) and math.isfinite(value), (renderer, key)
        score = json.loads((full_repo / "reports" / "score" / f"{renderer}.json").read_text())
        assert metrics["render"][renderer]["fid"] == score["fid"] > 0
        assert score["isc_mean"] is None and "no classifier" in score["isc_unavailable"]
    for key in ("fid_floor", "kid_floor"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["num_samples"] == 20 and metrics["num_reference"] == 30
    assert "isc_mean" not in metrics and "no classifier" in metrics["isc_unavailable"]
    assert metrics["fid_floor"] > 0 and metrics["stability_snr_db"] == 20.0
    assert metrics["render"]["direct"]["ceiling_rfid"] == decoder["rfid"]
    for renderer in RENDERERS:  # decode's token round-trip, beside what a 30 dB noisy real image keeps
        roundtrip = json.loads((full_repo / "reports" / "roundtrip" / f"{renderer}.json").read_text())
        assert roundtrip["val_images"] == 20 and roundtrip["sample_images"] == 20
        assert metrics["render"][renderer]["roundtrip_val"] == roundtrip["val"]
        assert 0 <= roundtrip["val"] <= 1 and 0 <= roundtrip["samples"] <= 1
    stability = json.loads((full_repo / "reports" / "stability.json").read_text())
    assert metrics["digit"]["kept_snr30"] == 1 - stability["change_rate_snr30"]
    assert metrics["vq"]["kept_snr30"] == 1 - stability["vq"]["change_rate_snr30"]
    assert metrics["digit"]["fid"] == metrics["render"]["direct"]["fid"]  # each GPT's headline renderer
    assert metrics["vq"]["fid"] == metrics["render"]["vqgan"]["fid"]
    reference = np.load(full_repo / "data" / "reference" / "train.npz")
    assert reference["pool"].shape == (20, 2048) and np.bincount(reference["labels"]).tolist() == [2] * 10


def test_the_round_trip_tokenizers_give_real_images_back_their_stored_tokens(full_repo):
    """The round-trip's tokenizers read an image as the pipeline does: the real val images come back with their
    own tokens (DiGIT: encoder + codebook as `extract`/`tokenize`; VQ: the VQGAN as `vq_tokenize`), up to a rare
    near-tie that another batch size of the fp32 encoder can flip."""
    from digit.stability import image_batches, image_tokenizer, kept_fraction
    from digit.tokens import read_tokens

    images = np.concatenate([b.numpy() for b in image_batches(full_repo / "data/images", "val", 0, 16)])
    for tokens_dir, tokenizer in (("data/tokens", "models/codebook"), ("data/vq_tokens", "models/vqgan")):
        tokens, _, _, meta = read_tokens(full_repo / tokens_dir / "val.parquet")
        assert kept_fraction(image_tokenizer(meta, full_repo / tokenizer), images, tokens, 16) >= 0.999, tokens_dir


def test_dvc_exp_show_lists_fid(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    sh("git add -A && git commit -qm tiny", repo)
    rows = json.loads(dvc("exp show --json", repo).stdout)
    metrics = rows[0]["data"]["metrics"]["reports/metrics.json"]["data"]
    assert isinstance(metrics["digit"]["fid"], float) and isinstance(metrics["vq"]["fid"], float)
    assert isinstance(metrics["render"]["stage2_ar"]["fid"], float) and isinstance(metrics["fid_floor"], float)
    assert "no classifier" in metrics["isc_unavailable"]


def test_changing_the_decoder_reruns_only_its_descendants(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    ran, restored, _, reachable = repro_after_param_change(repo, {"decoder": {"max_steps": 11}})
    assert ran == reachable == {"train_decoder", "decode@direct", "score@direct", "evaluate"} and not restored
    # Back to the old value: the decoder comes back from DVC's run cache, not trained again, and so do its
    # renders (decode's sample grid is a plot, so DVC caches the stage's run), score (Inception) and evaluate.
    # (What a changed sampling key re-runs: test_stage2_stages.py, the temperature.)
    ran, restored, _, _ = repro_after_param_change(repo, {"decoder": {"max_steps": 10}})
    assert restored == {"train_decoder", "decode@direct", "score@direct", "evaluate"} and not ran, (ran, restored)
    assert (repo / "reports/metrics.json").read_bytes() == (full_repo / "reports/metrics.json").read_bytes()


def params_file(repo: Path, params: dict | None) -> list[str]:
    """`--params` args for a copy of repo's params.yaml with `params` changed (none when params is None).

    The copy goes to a fresh temporary folder, never into `repo`: the shared `full_repo` stays read-only
    while other pytest-xdist workers read it."""
    if not params:
        return []
    path = Path(tempfile.mkdtemp(prefix="params-")) / "params.yaml"
    path.write_text((repo / "params.yaml").read_text())
    update_params(path, params)
    return ["--params", str(path)]


def stage(repo, name: str, *args: str, params: dict | None = None):
    """Run one stage in `repo` as a `python -m` process (optionally with changed params in a separate file)."""
    return sh(stage_cmd(name, *args, *params_file(repo, params)), repo, check=False, env={"PYTHONPATH": str(repo)})


def refusal(repo, name: str, *args: str, params: dict | None = None):
    """Like `stage`, for a stage expected to refuse its input: run in this process (conftest.run_module)."""
    return run_module(f"stages.{name}", *args, *params_file(repo, params), cwd=repo)


def test_bad_inputs_of_the_pixel_stages_fail_early_and_clearly(full_repo, tmp_path):
    score_out = ["--samples", "data/renders/direct", "--report", str(tmp_path / "score.json")]
    proc = refusal(full_repo, "score", *score_out,
                 params={"evaluate": {"inception_weights": str(tmp_path / "missing.pth")}})
    expect_error(proc, "evaluate.inception_weights=", "no such file")
    assert not (tmp_path / "score.json").exists()

    pool = load_features(full_repo / "data" / "reference" / "train.npz")
    keep = np.concatenate([np.flatnonzero(pool["labels"] == c)[:1] for c in range(10)])
    small = tmp_path / "reference"
    small.mkdir()
    save_features(small / "train.npz", {k: (v[keep] if v is not None else None) for k, v in pool.items()})
    shutil.copy(full_repo / "data" / "reference" / "val.npz", small / "val.npz")
    proc = refusal(full_repo, "score", *score_out, "--reference", str(small))
    expect_error(proc, "evaluate.floor_pool", "has 1 images of class 0 but the samples have 2")
    assert not (tmp_path / "score.json").exists()

    other = TokenDecoder(DecoderConfig(vocab_size=16, code_dim=8, grid=(7, 7), image_size=28, width=32, n_attn=0))
    save_decoder(other, {"grid": [7, 7], "vocab_size": 16}, tmp_path / "decoder")
    proc = refusal(full_repo, "decode", "--renderer", "direct", "--model", str(tmp_path / "decoder"),
                 "--out", str(tmp_path / "png"), "--grid", str(tmp_path / "grid.png"),
                 "--live", str(tmp_path / "live"), "--report", str(tmp_path / "decode.json"))
    expect_error(proc, "trained for 16 codes but the tokens have 32", "dvc repro train_decoder")
    assert not any((tmp_path / name).exists() for name in ("png", "grid.png", "live", "decode.json"))

    # The round-trip's val tokens must be the samples' tokenizer's: refused before anything is rendered.
    proc = refusal(full_repo, "decode", "--renderer", "direct", "--model", "models/decoder",
                   "--val-tokens", "data/vq_tokens/val.parquet", "--out", str(tmp_path / "png"),
                   "--grid", str(tmp_path / "grid.png"), "--live", str(tmp_path / "live"),
                   "--report", str(tmp_path / "decode.json"), "--roundtrip", str(tmp_path / "rt.json"))
    expect_error(proc, "vq_tokens/val.parquet", "'vq'", "'discriminative'", "--val-tokens")
    assert not any((tmp_path / name).exists() for name in ("png", "grid.png", "live", "decode.json", "rt.json"))

    proc = refusal(full_repo, "train_decoder", "--out", str(tmp_path / "dec"), "--report", str(tmp_path / "r.json"),
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
    expect_error(refusal(full_repo, "train_vqgan", *outs, params={"vqgan": {"grid": 5}}),
                 "vqgan.grid=5", "power of two")
    expect_error(refusal(full_repo, "train_vqgan", *outs, params={"vqgan": {"k": 1}}), "vqgan.k: 1 is below the minimum 2")
    expect_error(refusal(full_repo, "train_vqgan", *outs, params={"vqgan": {"batch_size": 500}}),
                 "vqgan.batch_size: 500 is more than the 200 train images")
    # A pretrained VQGAN (vqgan.weights) is checked before any scoring: the default 28 px images do not
    # divide by the VQ-16's 16, another K is named with the fix, a missing file says where to put it.
    ckpt = llamagen_checkpoint(tmp_path / "vq16.pt")
    expect_error(refusal(full_repo, "train_vqgan", *outs, params={"vqgan": {"weights": str(ckpt)}}),
                 "data.image_size=28", "must be a multiple of 16")
    expect_error(refusal(full_repo, "train_vqgan", *outs, params={"vqgan": {"weights": str(tmp_path / "no.pt")}}),
                 "no.pt does not exist; download LlamaGen's VQ-16 checkpoint")
    assert not (tmp_path / "vq").exists() and not (tmp_path / "live").exists()
    proc = refusal(full_repo, "vq_tokenize", "--vqgan", str(tmp_path / "nothing"), "--out", str(tmp_path / "t"),
                 "--report", str(tmp_path / "t.json"))
    expect_error(proc, "is not a complete `train_vqgan` output", "dvc repro train_vqgan")
    assert not (tmp_path / "t").exists()


def test_a_stage_that_would_fill_its_disk_refuses_before_any_work(full_repo, tmp_path, monkeypatch):
    """Pre-flight: the stages that write the bulk (image shards, feature grids, tokens) compare the bytes of
    digit.storage's model with the free space of their output's file system, here a disk with 1 KB left."""
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    runs = {"prepare": ["--report", str(tmp_path / "r.json")],
            "extract": ["--images", "data/images", "--report", str(tmp_path / "r.json")],
            "tokenize": ["--features", "data/features", "--report", str(tmp_path / "r.json")],
            "vq_tokenize": ["--report", str(tmp_path / "r.json")]}
    what = {"prepare": "250 images", "extract": "250 float16 feature grids", "tokenize": "250 token sequences",
            "vq_tokenize": "250 token sequences"}
    for name, args in runs.items():
        out = tmp_path / name
        expect_error(refusal(full_repo, name, "--out", str(out), *args), f"{name}: {what[name]} need about",
                     f"at {out}, but its file system has 1.0 KB free")
        assert not out.exists() and not (tmp_path / "r.json").exists()


def test_killed_decoder_training_resumes_to_the_same_weights(full_repo, tmp_path):
    """SIGKILL after a checkpoint (adversarial term already on), re-run: same weights and metrics."""
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    params = {"decoder": {"max_steps": 24, "checkpoint_every": 8, "disc_start": 4, "adv_start": 6, "eval_every": 8}}
    args = ("--out", "dec", "--report", "dec.json", "--live", "live", "--checkpoints", "ck")
    cmd = stage_cmd("train_decoder", *args, *params_file(repo, params))
    sh(cmd, repo, env={"PYTHONPATH": str(repo)})
    reference = load_file(str(repo / "dec" / "model.safetensors"))
    report = json.loads((repo / "dec.json").read_text())
    shutil.rmtree(repo / "dec")

    kill_after_checkpoint(cmd, repo, repo / "ck", 16, env={"PYTHONPATH": str(repo)})
    assert not (repo / "dec").exists()
    out = sh(cmd, repo, env={"PYTHONPATH": str(repo)})
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
