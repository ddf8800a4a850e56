"""The paper presets run for real on CPU: `dvc repro` of imagenet-digit-base / -large on a tiny colour image folder.

The real architectures and shapes of each preset (DINOv2 ViT-B/14 or ViT-L/14 with registers, random weights
since the hub is offline; 224 px, 16x16 grid; K as in the preset; the 16- and 24-layer GPTs; the preset's
decoder and stage-2 shapes at 256 px, LlamaGen's VQ-16 adopted from a random checkpoint of its layout), with only the amounts cut to a tiny set: a few dozen images in
four classes (K-Means points adapted: enough images for K), two optimizer steps at batch 2, one sample per
class through decode and evaluate. Each stage runs as its own `dvc repro` under /usr/bin/time, which gives
its wall time and the peak RSS of its largest process. Minutes per preset and several GiB at the large
preset: run by hand with `make paper-smoke` (DIGIT_PAPER_SMOKE=1), skipped in `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import dvc, make_project, needs_fmnist, sh
from digit.preset import load_preset, merge
from helpers import dvc_stages, llamagen_checkpoint

pytestmark = [
    needs_fmnist,
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("DIGIT_PAPER_SMOKE"), reason="minutes per preset: run by `make paper-smoke`"),
]

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 18, 3  # 72 train images x 256 positions = 18,432 >= K = 16,384
TWO_STEPS = {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 1, "checkpoint_every": 1}


def tiny(images: Path) -> dict:
    """The amounts cut to the tiny folder at `images`; every shape stays the preset's."""
    return {
        "base": {"launcher": "python"},  # one CPU process
        "data": {"root": str(images), "train_size": 0, "val_size": 0, "shard_size": 32},
        "encoder": {"weights": "none", "batch_size": 8},  # the real architecture, random weights
        "codebook": {"max_points": CLASSES * TRAIN_PER_CLASS * 256, "niter": 2},
        "tokenize": {"batch_size": 16, "row_group_size": 64},
        "gpt": TWO_STEPS,
        "sample": {"num_per_class": 1, "batch_size": 2},
        "probe": {"max_train": 8, "batch_size": 8, "steps": 2},
        "decoder": {**TWO_STEPS, "disc_start": 1, "adv_start": 1, "eval_images": 4, "shuffle_shards": 1},
        "vqgan": {"weights": str(images.parent / "vq_ds16_c2i.pt"), "eval_images": 4, "batch_size": 2},
        "stage2": {**TWO_STEPS, "eval_images": 4},
        "decode": {"batch_size": 2},
        "evaluate": {"reference_size": CLASSES * VAL_PER_CLASS, "floor_pool": CLASSES, "batch_size": 4,
                     "kid_subsets": 2},
        "stability": {"num_images": 4, "batch_size": 4, "snr_db": [20], "headline_snr": 20, "k_sweep": [64]},
    }


def colour_folder(root: Path) -> None:
    """train/<class>/, val/<class>/ of 300x260 colour images: a class colour under smooth random blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:260, 0:300] / 260.0
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True)
            base = np.array([(c * 70) % 256, (c * 130 + 60) % 256, (c * 200 + 20) % 256], float)
            for i in range(n):
                cx, cy, r = rng.uniform(0.2, 1.0), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
                blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
                image = base * (1 - blob) + rng.uniform(0, 255, 3) * blob + rng.normal(0, 8, (260, 300, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / split / f"class{c}" / f"{i}.jpg")


@pytest.mark.parametrize("preset", ["imagenet-digit-base", "imagenet-digit-large"])
def test_preset_runs_end_to_end_on_a_tiny_colour_folder(preset, tmp_path):
    colour_folder(tmp_path / "images")
    # The preset adopts LlamaGen's VQ-16 (vqgan.weights): a random checkpoint of its exact layout and sizes.
    llamagen_checkpoint(tmp_path / "vq_ds16_c2i.pt", image_size=256, ch=128, z_channels=256, k=16384, dim=8)
    repo = make_project(tmp_path / "repo")
    params = merge(load_preset(preset), tiny(tmp_path / "images"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git add -A && git commit -qm preset", repo)

    rows = []
    for stage in dvc_stages(repo):
        proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e s %M KiB", sys.executable, "-m", "dvc", "repro",
                               stage.name], cwd=repo, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo)})
        found = re.search(r"TIME ([\d.]+) s (\d+) KiB", proc.stderr)
        assert proc.returncode == 0, f"{preset}: {stage.name} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        rows.append((stage.name, float(found[1]), int(found[2]) / 2**20))
    table = "\n".join(f"  {name:18s} {seconds:7.1f} s  {gib:5.2f} GiB" for name, seconds, gib in rows)
    total = sum(seconds for _, seconds, _ in rows)
    report = f"{preset} on {CLASSES * (TRAIN_PER_CLASS + VAL_PER_CLASS)} images, {os.cpu_count()} CPUs: " \
             f"{total:.0f} s, peak {max(g for *_, g in rows):.2f} GiB\n{table}"
    print(report)
    if out := os.environ.get("DIGIT_PAPER_SMOKE_REPORT"):
        with open(out, "a") as f:
            f.write(report + "\n")
    assert "up to date" in dvc("status", repo).stdout
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)  # GiBs of weights per preset
