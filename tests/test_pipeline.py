"""End-to-end: the tokenizer half of the DAG on a tiny real config, through `dvc repro`."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import dvc, needs_fmnist, sh, update_params
from digit.errors import ConfigError
from digit.kmeans import codebook_sample
from digit.shards import iter_samples, read_manifest, shard_urls
from digit.tokens import read_tokens
from helpers import stage_cmd, stages_ran

pytestmark = [needs_fmnist, pytest.mark.slow]


def test_repro_writes_readable_tokens(tiny_repo):
    k = 32
    for split, count in (("train", 200), ("val", 50)):
        path = tiny_repo / "data" / "tokens" / f"{split}.parquet"
        table = pq.read_table(path)
        assert table.num_rows == count
        assert table.schema.field("tokens").type.list_size == 49  # 7x7 grid
        frame = pd.read_parquet(path)
        assert list(frame.columns) == ["key", "label", "tokens"] and len(frame) == count
        assert frame["key"].is_unique
        tokens, labels, keys, meta = read_tokens(path)
        assert tokens.shape == (count, 49) and 0 <= tokens.min() and tokens.max() < k
        assert meta["grid"] == [7, 7] and meta["vocab_size"] == k
        assert set(labels) == set(range(10))  # stratified: every class present
        n, lo, hi = duckdb.sql(
            f"select count(*), min(list_min(tokens)), max(list_max(tokens)) from '{path}'").fetchall()[0]
        assert (n, lo >= 0, hi < k) == (count, True, True)
    report = json.loads((tiny_repo / "reports" / "tokens.json").read_text())
    assert report["train"]["rows"] == 200 and 0 < report["train"]["usage_pct"] <= 100
    assert 1 < report["train"]["perplexity"] <= k
    codebook = json.loads((tiny_repo / "reports" / "codebook.json").read_text())
    assert codebook["k"] == k and codebook["points"] == 4000
    centroids = np.load(tiny_repo / "models" / "codebook" / "centroids.npy")
    assert centroids.shape == (k, read_manifest(tiny_repo / "data" / "features")["encoder"]["dim"])
    assert centroids.dtype == np.float32
    assert (tiny_repo / "dvc.lock").is_file()


def test_changing_k_reruns_exactly_codebook_and_tokenize(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {tiny_repo} {repo}", tmp_path)
    update_params(repo / "params.yaml", {"codebook": {"k": 16}})
    status = dvc("status", repo).stdout
    assert "codebook:" in status and "prepare:" not in status and "extract:" not in status
    out = dvc("repro tokenize", repo).stdout
    assert stages_ran(out) == {"codebook", "tokenize"}, out
    assert "Stage 'prepare' didn't change" in out and "Stage 'extract' didn't change" in out
    tokens, *_ = read_tokens(repo / "data" / "tokens" / "train.parquet")
    assert tokens.max() < 16
    # A later stage's key changes nothing upstream.
    update_params(repo / "params.yaml", {"tokenize": {"row_group_size": 32}})
    out = dvc("repro tokenize", repo).stdout
    assert stages_ran(out) == {"tokenize"}, out


def run_codebook_and_tokenize(repo, tag: str, seed: int):
    update_params(repo / "params.yaml", {"codebook": {"seed": seed}})
    env = {"PYTHONPATH": str(repo)}
    sh(stage_cmd("codebook", "--out", f"cb-{tag}", "--report", f"cb-{tag}.json"), repo, env=env)
    sh(stage_cmd("tokenize", "--codebook", f"cb-{tag}", "--out", f"tok-{tag}", "--report", f"tok-{tag}.json"),
       repo, env=env)
    return np.load(repo / f"cb-{tag}" / "centroids.npy"), read_tokens(repo / f"tok-{tag}" / "train.parquet")[0]


def test_same_seed_same_tokens_other_seed_other_codebook(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {tiny_repo} {repo}", tmp_path)
    # Seed 0 again, outside dvc: the same codebook and tokens as the dvc-produced ones (seed 0).
    c1, t1 = run_codebook_and_tokenize(repo, "a", seed=0)
    assert np.array_equal(c1, np.load(tiny_repo / "models" / "codebook" / "centroids.npy"))
    assert np.array_equal(t1, read_tokens(tiny_repo / "data" / "tokens" / "train.parquet")[0])
    c2, _ = run_codebook_and_tokenize(repo, "b", seed=1)
    assert not np.allclose(c1, c2)


def test_two_process_extract_matches_one_process(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {tiny_repo} {repo}", tmp_path)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    sh(stage_cmd("extract", "--out", "features2", "--report", "extract2.json", launcher=accelerate), repo,
       env={"PYTHONPATH": str(repo)})
    assert json.loads((repo / "extract2.json").read_text())["processes"] == 2
    for split in ("train", "val"):
        one = {s["__key__"]: s["npy"] for s in iter_samples(shard_urls(repo / "data" / "features", split))}
        two = list(iter_samples(shard_urls(repo / "features2", split)))
        assert len(two) == len(one) == len({s["__key__"] for s in two})
        # Ranks batch each shard exactly as one process does; what differs is the
        # thread count per process, which moves oneDNN's float sums by ~1 fp16 ulp.
        for s in two:
            np.testing.assert_allclose(s["npy"].astype(np.float32), one[s["__key__"]].astype(np.float32),
                                       rtol=2e-3, atol=1e-3)
    assert not list(repo.glob(".features2.tmp-*"))


def test_sample_cache_keeps_a_fraction_of_the_bytes_and_gives_the_same_codebook_and_tokens(tiny_repo, tmp_path):
    """encoder.cache: sample (the ImageNet presets' storage): extract keeps only the codebook's draw, tokenize
    encodes the images again in the same shard-wise batches, so every byte of the codebook and the tokens is
    what the cached grids gave."""
    repo = tmp_path / "repo"
    sh(f"cp -a {tiny_repo} {repo}", tmp_path)
    update_params(repo / "params.yaml", {"encoder": {"cache": "sample"}})
    out = dvc("repro tokenize", repo).stdout
    assert stages_ran(out) == {"extract", "codebook", "tokenize"}, out
    manifest = read_manifest(repo / "data" / "features")
    assert manifest["cache"] == "sample" and manifest["sample"]["points"] == 4000 and list(manifest["splits"]) == ["train"]
    assert sum(len(s["npy"]) for s in iter_samples(shard_urls(repo / "data" / "features", "train"))) == 4000

    def size(root):
        return sum(p.stat().st_size for p in (root / "data" / "features").iterdir())

    assert size(repo) < size(tiny_repo) / 2  # 4,000 of 250 x 49 = 12,250 vectors
    for path in ("models/codebook/centroids.npy", "data/tokens/train.parquet", "data/tokens/val.parquet"):
        assert (repo / path).read_bytes() == (tiny_repo / path).read_bytes(), path
    # The kept sample answers only for its own draw: another size or seed is sent back to extract.
    for max_points, seed in ((3000, 0), (4000, 1)):
        with pytest.raises(ConfigError, match=r"holds the sample drawn with max_points=4000, seed 0, .*"
                                              r"re-run `dvc repro extract`"):
            codebook_sample(repo / "data" / "features", max_points, seed, progress=False)


def test_jpeg_shards_read_as_images_like_png(tiny_repo, tmp_path):
    """data.image_format: jpeg writes .jpg members; every reader gets them as sample["image"], close to the PNG."""
    params = tmp_path / "params.yaml"
    params.write_text((tiny_repo / "params.yaml").read_text())
    update_params(params, {"data": {"image_format": "jpeg", "jpeg_quality": 95}})
    sh(stage_cmd("prepare", "--out", str(tmp_path / "images"), "--report", str(tmp_path / "p.json"),
                 "--params", str(params)), tiny_repo, env={"PYTHONPATH": str(tiny_repo)})
    assert read_manifest(tmp_path / "images")["image_format"] == "jpeg"
    url = shard_urls(tmp_path / "images", "val")[0]
    jpeg, png = list(iter_samples([url])), list(iter_samples([shard_urls(tiny_repo / "data" / "images", "val")[0]]))
    assert [s["__key__"] for s in jpeg] == [s["__key__"] for s in png]
    with tarfile.open(url) as tar:
        assert {Path(name).suffix for name in tar.getnames()} == {".jpg", ".cls", ".json"}
    error = np.mean([np.abs(a["image"].astype(float) - b["image"].astype(float)).mean() for a, b in zip(jpeg, png)])
    assert jpeg[0]["image"].shape == png[0]["image"].shape == (28, 28, 3) and 0 < error < 3
