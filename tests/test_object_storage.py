"""Shard roots given as URL templates (`pipe:cat /data/{}`, object storage) work wherever shards are read.

`pipe:cat <dir>/{}` stands in for object storage (`pipe:aws s3 cp s3://bucket/features/{} -`): the
manifest and every shard go through the same opener as remote data would. Stages and library readers
must give exactly what the local directory gives, and a URL that cannot be read must be one clear
error naming it (exit status 2 from a stage). A training's checkpoint fingerprint must tell two
URL-template inputs apart (by their manifest), as it tells two local folders apart by their bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, expect_error, needs_fmnist, sh
from digit.errors import ConfigError
from digit.shards import iter_samples, read_manifest, shard_location, shard_urls
from digit.tokens import read_tokens
from helpers import stage_cmd

pytestmark = [needs_fmnist]
slow = pytest.mark.slow  # the tests on tiny_repo: it runs `dvc repro tokenize`, and they run stages end to end


def piped(directory: Path) -> str:
    return f"pipe:cat {directory.resolve()}/{{}}"


def stage(repo: Path, name: str, *args: str, check: bool = True):
    return sh(stage_cmd(name, "--params", str(repo / "params.yaml"), *args), repo,
              check=check, env={"PYTHONPATH": str(repo)}, timeout=300)


def test_templates_name_files_and_plain_paths_are_unchanged(tmp_path):
    assert shard_location("data/features", "train-000000.tar") == "data/features/train-000000.tar"
    assert shard_location("data/features/", "manifest.json") == "data/features/manifest.json"
    assert (shard_location("pipe:aws s3 cp s3://b/features/{} -", "val-000001.tar")
            == "pipe:aws s3 cp s3://b/features/val-000001.tar -")
    with pytest.raises(ConfigError, match=r"needs `\{\}` where the file name goes"):
        read_manifest("pipe:cat /data/features")


@slow
def test_extract_from_piped_images_writes_the_same_features(tiny_repo, tmp_path):
    out = tmp_path / "features"
    stage(tiny_repo, "extract", "--images", piped(tiny_repo / "data" / "images"), "--out", str(out),
          "--report", str(tmp_path / "extract.json"))
    local = tiny_repo / "data" / "features"
    assert read_manifest(out) == read_manifest(local)
    for split in ("train", "val"):
        names = [Path(u).name for u in shard_urls(local, split)]
        assert [Path(u).name for u in shard_urls(out, split)] == names
        for name in names:  # feature shards are byte-deterministic: same arrays, same keys, same labels
            assert (out / name).read_bytes() == (local / name).read_bytes(), name


@slow
def test_codebook_and_tokenize_from_piped_features_match_local(tiny_repo, tmp_path):
    features = piped(tiny_repo / "data" / "features")
    stage(tiny_repo, "codebook", "--features", features, "--out", str(tmp_path / "codebook"),
          "--report", str(tmp_path / "codebook.json"))
    assert np.array_equal(np.load(tmp_path / "codebook" / "centroids.npy"),
                          np.load(tiny_repo / "models" / "codebook" / "centroids.npy"))
    stage(tiny_repo, "tokenize", "--features", features, "--codebook", str(tiny_repo / "models" / "codebook"),
          "--out", str(tmp_path / "tokens"), "--report", str(tmp_path / "tokens.json"))
    for split in ("train", "val"):
        got, want = read_tokens(tmp_path / "tokens" / f"{split}.parquet"), \
            read_tokens(tiny_repo / "data" / "tokens" / f"{split}.parquet")
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


@slow
def test_library_readers_take_piped_images(tiny_repo):
    from digit.decoder import PairedImages
    from digit.stability import image_batches
    from digit.vqgan import ImageBatches

    images = tiny_repo / "data" / "images"
    tokens = tiny_repo / "data" / "tokens" / "train.parquet"
    local, remote = PairedImages(images, tokens, "train"), PairedImages(piped(images), tokens, "train")
    assert remote.urls[0].startswith("pipe:cat ") and remote.counts == local.counts
    pairs = list(zip(local.batches(16, seed=0, epoch=1), remote.batches(16, seed=0, epoch=1), strict=True))
    assert len(pairs) == 200 // 16
    for (t1, i1), (t2, i2) in pairs:
        assert np.array_equal(t1, t2) and np.array_equal(i1, i2)
    # The VQGAN's reader (the same windowed shard batches, without tokens).
    local, remote = ImageBatches(images, "train"), ImageBatches(piped(images), "train")
    assert remote.urls[0].startswith("pipe:cat ") and remote.counts == local.counts
    assert remote.manifest == local.manifest
    pairs = list(zip(local.batches(16, seed=0, epoch=1), remote.batches(16, seed=0, epoch=1), strict=True))
    assert len(pairs) == local.epoch_length(16, seed=0, epoch=1) > 0
    assert all(np.array_equal(a, b) for a, b in pairs)
    got = list(image_batches(piped(images), "val", 30, 8))
    want = list(image_batches(images, "val", 30, 8))
    assert [len(b) for b in got] == [8, 8, 8, 6]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@slow
def test_unreadable_urls_are_one_clear_error(tiny_repo, tmp_path):
    # The manifest cannot be read: the command fails, or the file is not there.
    proc = stage(tiny_repo, "extract", "--images", "pipe:false {}", "--out", str(tmp_path / "f"),
                 "--report", str(tmp_path / "r.json"), check=False)
    expect_error(proc, "pipe:false manifest.json: cannot read the manifest", "exited with status 1")
    missing = tmp_path / "nowhere"
    proc = stage(tiny_repo, "tokenize", "--features", piped(missing), "--codebook",
                 str(tiny_repo / "models" / "codebook"), "--out", str(tmp_path / "t"),
                 "--report", str(tmp_path / "t.json"), check=False)
    expect_error(proc, f"pipe:cat {missing}/manifest.json: cannot read the manifest", "No such file")
    # A URL without `{}` is refused with the fix.
    proc = stage(tiny_repo, "codebook", "--features", f"pipe:cat {missing}", "--out", str(tmp_path / "c"),
                 "--report", str(tmp_path / "c.json"), check=False)
    expect_error(proc, "needs `{}` where the file name goes")
    # The manifest is there but a shard it lists is gone: the shard's URL is named, nothing is published.
    partial = tmp_path / "partial"
    shutil.copytree(tiny_repo / "data" / "features", partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    gone = manifest["splits"]["train"]["shards"][1]
    (partial / gone).unlink()
    proc = stage(tiny_repo, "tokenize", "--features", piped(partial), "--codebook",
                 str(tiny_repo / "models" / "codebook"), "--out", str(tmp_path / "t"),
                 "--report", str(tmp_path / "t.json"), check=False)
    expect_error(proc, f"pipe:cat {partial.resolve()}/{gone}: cannot read this shard")
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))
    # The library readers raise the same error.
    with pytest.raises(ConfigError, match=r"pipe:false manifest\.json"):
        shard_urls("pipe:false {}", "train")
    with pytest.raises(ConfigError, match=f"{partial.resolve()}/{gone}: cannot read this shard"):
        list(iter_samples(shard_urls(piped(partial), "train")))


def test_a_piped_training_input_is_fingerprinted_by_its_manifest(tmp_path):
    """A training resumes only a checkpoint of the same params, data and code: with images behind a URL
    template, other images (another manifest) must give another checkpoint folder."""
    from digit.trainer import run_fingerprint

    for name, count in (("a", 64), ("b", 65)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"splits": {"train": {"counts": [count]}}}))
    entry = ROOT / "stages" / "train_vqgan.py"
    local = [run_fingerprint({"seed": 0}, [tmp_path / name], entry) for name in ("a", "b")]
    assert local[0] != local[1]  # local folders: their bytes
    remote = [run_fingerprint({"seed": 0}, [piped(tmp_path / name)], entry) for name in ("a", "b")]
    assert remote[0] != remote[1]
