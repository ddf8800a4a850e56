"""Bad input stops a stage before heavy work, with one message naming the parameter and the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY, _merge, expect_error, run_module, sh, update_params


def run_stage(tmp_path: Path, stage: str, changes: dict, *args, env: dict | None = None, refuses: bool = True):
    """Run a stage on TINY params + `changes`: in this process where it is expected to refuse (conftest.run_module),
    as a `python -m` process where it is expected to work."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    update_params(params, _merge(TINY, changes))
    if refuses:
        return run_module(f"stages.{stage}", "--params", str(params), *args, cwd=tmp_path, env=env)
    return sh([sys.executable, "-m", f"stages.{stage}", "--params", str(params), *args],
              tmp_path, check=False, env={"PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """A minimal data/images output (prepare on a 2-class image folder)."""
    root = tmp_path_factory.mktemp("imgs")
    for c in ("a", "b"):
        (root / "src" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / "src" / c / f"{i}.png")
    proc = run_stage(root, "prepare", {"data": {"source": "imagefolder", "root": str(root / "src"), "val_size": 2,
                                                "train_size": 0, "image_size": 28}}, "--out", str(root / "images"),
                     "--report", str(root / "prepare.json"), refuses=False)
    assert proc.returncode == 0, proc.stderr
    return root / "images"


@pytest.mark.parametrize("changes, fragments", [
    ({"encoder": {"name": "tf_efficientnet_lite9"}}, ["encoder.name", "tf_efficientnet_lite9"]),
    ({"encoder": {"weights": "/no/such/weights.safetensors"}}, ["encoder.weights", "/no/such/weights.safetensors"]),
    ({"encoder": {"weights": "hub"}}, ["encoder.weights", "offline"]),
    ({"encoder": {"layer": 99}}, ["encoder.layer", "99"]),
    ({"encoder": {"layer": -99}}, ["encoder.layer", "-99"]),
])
def test_extract_bad_encoder_params(tmp_path, image_shards, changes, fragments):
    proc = run_stage(tmp_path, "extract", changes, "--images", str(image_shards), "--out", str(tmp_path / "f"),
                     "--report", str(tmp_path / "r.json"), env={"HF_HUB_OFFLINE": "1"})
    expect_error(proc, *fragments)
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.tmp-*"))


def test_codebook_k_larger_than_sampled_features(tmp_path, image_shards):
    features = tmp_path / "features"
    proc = run_stage(tmp_path, "extract", {}, "--images", str(image_shards), "--out", str(features),
                     "--report", str(tmp_path / "e.json"), refuses=False)
    assert proc.returncode == 0, proc.stderr
    # 6 train images x 49 patches = 294 features < k=500 (max_points 4000 passes the schema).
    proc = run_stage(tmp_path, "codebook", {"codebook": {"k": 500}}, "--features", str(features),
                     "--out", str(tmp_path / "cb"), "--report", str(tmp_path / "c.json"))
    expect_error(proc, "codebook.k: 500 centroids but only 294 features", "lower codebook.k")
    assert not (tmp_path / "cb").exists()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_prepare_missing_or_empty_data_dir(tmp_path, kind):
    root = tmp_path / "data_root"
    if kind == "empty":
        root.mkdir()
    for source in ("fashion-mnist", "imagefolder"):
        proc = run_stage(tmp_path, "prepare", {"data": {"source": source, "root": str(root)}},
                         "--out", str(tmp_path / "images"), "--report", str(tmp_path / "p.json"))
        expect_error(proc, "data.root")
        assert not (tmp_path / "images").exists()


def test_unknown_param_key_is_reported(tmp_path):
    proc = run_stage(tmp_path, "codebook", {"codebook": {"codebok_k": 8}}, "--features", str(tmp_path))
    expect_error(proc, "codebook.codebok_k: unknown parameter (did you mean `codebook.k`?)")


def make_messy_tree(root: Path) -> None:
    """Good images in many modes plus a corrupt, an empty and a text file."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        d = root / c
        d.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / f"rgb{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L").save(root / "cat" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "dog" / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(root / "dog" / "deep16.png")
    good = (root / "cat" / "gray.png").read_bytes()
    (root / "cat" / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_skip_counts_bad_files_and_fail_names_the_first(tmp_path):
    src = tmp_path / "src"
    make_messy_tree(src)
    data = {"source": "imagefolder", "root": str(src), "train_size": 0, "val_size": 4, "image_size": 24}
    proc = run_stage(tmp_path, "prepare", {"data": {**data, "on_bad_image": "skip"}},
                     "--out", str(tmp_path / "images"), "--report", str(tmp_path / "p.json"), refuses=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["bad_images"]["count"] == 3
    assert sorted(Path(f.split(":")[0]).name for f in report["bad_images"]["files"]) == \
        ["corrupt.png", "empty.png", "notes.txt"]
    total = report["splits"]["train"]["count"] + report["splits"]["val"]["count"]
    assert total == 16 - 3
    from digit.shards import iter_samples, shard_urls

    samples = [s for split in ("train", "val") for s in iter_samples(shard_urls(tmp_path / "images", split))]
    assert len(samples) == 13 and all(s["image"].shape == (24, 24, 3) for s in samples)
    assert {s["json"]["path"] for s in samples} >= {"cat/gray.png", "dog/rgba.png", "dog/deep16.png"}

    proc = run_stage(tmp_path, "prepare", {"data": {**data, "on_bad_image": "fail"}},
                     "--out", str(tmp_path / "images2"), "--report", str(tmp_path / "p2.json"))
    expect_error(proc, "data.on_bad_image: skip")
    named = [name for name in ("corrupt.png", "empty.png", "notes.txt") if name in proc.stderr]
    assert len(named) == 1, proc.stderr  # the first bad file met, and only it
    assert not (tmp_path / "images2").exists() and not list(tmp_path.glob(".images2.tmp-*"))


def test_logging_stage_in_a_git_repo_without_commits_says_how_to_fix(tmp_path):
    """DVCLive would crash with "Empty git repo"; the stage stops first, naming the fix."""
    sh("git init -q", tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = run_module("stages.decode", "--tokens", str(tmp_path / "none.parquet"), cwd=tmp_path)
    expect_error(proc, "no commit yet", "git add -A && git commit")


def test_score_names_a_missing_or_wrong_ceiling_report_before_inception(tmp_path):
    args = ["--samples", str(tmp_path / "renders"), "--reference", str(tmp_path / "ref"),
            "--report", str(tmp_path / "score.json")]
    proc = run_stage(tmp_path, "score", {}, *args, "--ceiling", str(tmp_path / "decoder.json"))
    expect_error(proc, "--ceiling", "decoder.json", "missing")
    (tmp_path / "probe.json").write_text(json.dumps({"best_val_top1": 0.9}))
    proc = run_stage(tmp_path, "score", {}, *args, "--ceiling", str(tmp_path / "probe.json"))
    expect_error(proc, "--ceiling", "rfid, psnr, ssim", "training report")
    assert not (tmp_path / "score.json").exists()
