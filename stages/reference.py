"""Stage `reference`: Inception features of real images, computed once and cached by DVC.

data/reference/val.npz     evaluate.reference_size val images (class-stratified, seeded):
                           the set samples and reconstructions are compared with (FID/KID, rFID)
data/reference/train.npz   evaluate.floor_pool train images: `evaluate` draws from them a real
                           set with the samples' size and class mix, for fid_floor

The Inception forward is the slow part of evaluation on CPU (~6 img/s), so it
is its own stage: re-sampling or re-training never recomputes these features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from digit.atomic import atomic_dir, clean_stale_tmp
from digit.cli import run, stage_parser
from digit.datasets import stratified_subset
from digit.errors import ConfigError
from digit.fid import InceptionFeatures, save_features
from digit.params import load_params
from digit.shards import iter_samples, read_manifest, shard_urls


def chosen_images(images: str, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A seeded class-stratified subset of n images of a split: (uint8 [n, H, W, 3], labels, keys)."""
    urls = shard_urls(images, split)
    labels = np.array([s["cls"] for s in iter_samples(urls)])  # one cheap pass for the labels
    if n > len(labels):
        raise ConfigError(f"evaluate: asked for {n} {split} images but {images} has {len(labels)}; lower "
                          f"evaluate.{'reference_size' if split == 'val' else 'floor_pool'} or raise data."
                          f"{split}_size")
    keep = set(stratified_subset(labels, n, seed).tolist())
    picked = [s for i, s in enumerate(iter_samples(urls)) if i in keep]
    return (np.stack([s["image"] for s in picked]), np.array([s["cls"] for s in picked]),
            [s["__key__"] for s in picked])


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--out", default="data/reference")
    args = parser.parse_args()
    cfg = load_params(args.params)["evaluate"]
    read_manifest(args.images)
    extractor = InceptionFeatures(cfg["inception_weights"])  # resolves/validates the weights first
    out = Path(args.out)
    clean_stale_tmp(out)
    summary = {"inception": extractor.description}
    with atomic_dir(out) as tmp:
        for split, n in (("val", cfg["reference_size"]), ("train", cfg["floor_pool"])):
            images, labels, keys = chosen_images(args.images, split, n, cfg["seed"])
            feats = extractor(images, batch_size=cfg["batch_size"], desc=f"reference {split}")
            save_features(tmp / f"{split}.npz", {**feats, "labels": labels, "keys": np.array(keys)})
            summary[split] = {"images": len(labels), "per_class": np.bincount(labels).tolist()}
        (tmp / "reference.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"reference: Inception features of {summary['val']['images']} val + {summary['train']['images']} "
          f"train images -> {out}")


if __name__ == "__main__":
    run(main)
