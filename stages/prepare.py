"""Stage `prepare`: source images -> WebDataset shards data/images/{train,val}-NNNNNN.tar.

Each sample: `__key__`, the image at data.image_size (`png`, lossless, or `jpg` at data.jpeg_quality:
data.image_format), `cls` (label), and `json` (where it came from); readers see either as "image". A manifest lists shards, counts and classes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from digit import datasets
from digit.atomic import atomic_dir, clean_stale_tmp, write_json
from digit.cli import run, stage_parser
from digit.errors import BadImageError, ConfigError
from digit.params import load_params
from digit.shards import ShardSink, encode_image, write_manifest
from digit.storage import image_bytes, require_space


def fashion_mnist_samples(cfg: dict, split: str):
    images, labels = datasets.load_fashion_mnist(cfg["root"], split)
    size = cfg["train_size"] if split == "train" else cfg["val_size"]
    index = datasets.stratified_subset(labels, size, cfg["seed"])
    side = cfg["image_size"]
    for i in index:
        image = images[i]
        if side != image.shape[0]:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
        yield f"{split}_{i:06d}", image, int(labels[i]), {"source_index": int(i)}


def imagefolder_samples(cfg: dict, split: str, items: list, bad: list):
    labels = np.array([label for _, label in items], dtype=np.int64)
    # Caps the count (stratified); a no-op for a flat layout whose val split
    # scan_imagefolder already cut to exactly val_size.
    size = cfg["train_size"] if split == "train" else cfg["val_size"]
    keep = datasets.stratified_subset(labels, size, cfg["seed"]) if len(labels) else []
    root = Path(cfg["root"])
    for n, i in enumerate(keep):
        path, label = items[i]
        try:
            image = datasets.load_image(path, cfg["image_size"])
        except BadImageError as exc:
            if cfg["on_bad_image"] == "fail":
                raise ConfigError(f"{exc}; fix or remove the file, or set data.on_bad_image: skip") from exc
            bad.append(str(exc))
            continue
        yield f"{split}_{n:07d}", image, int(label), {"path": str(Path(path).relative_to(root))}


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", default="data/images")
    parser.add_argument("--report", default="reports/prepare.json")
    args = parser.parse_args()
    cfg = load_params(args.params)["data"]
    out = Path(args.out)
    started = time.time()

    # Resolve the source completely (cheap) before writing anything.
    if cfg["source"] == "fashion-mnist":
        classes = list(datasets.FASHION_MNIST_CLASSES)
        splits = {split: fashion_mnist_samples(cfg, split) for split in ("train", "val")}
        totals = {}
        for split in ("train", "val"):  # validates the files before the first shard
            _, labels = datasets.load_fashion_mnist(cfg["root"], split)
            size = cfg["train_size"] if split == "train" else cfg["val_size"]
            totals[split] = len(labels) if size == 0 else min(size, len(labels))
    else:
        classes, items = datasets.scan_imagefolder(cfg["root"], cfg["val_size"], cfg["seed"])
        bad: list[str] = []
        splits = {split: imagefolder_samples(cfg, split, items[split], bad) for split in ("train", "val")}
        totals = {split: min(cfg["train_size" if split == "train" else "val_size"] or len(items[split]),
                             len(items[split])) for split in splits}  # before skipping unreadable files

    require_space("prepare", out, image_bytes(sum(totals.values()), cfg["image_size"], cfg["source"],
                                              cfg["image_format"]), f"{sum(totals.values()):,} images")
    clean_stale_tmp(out)
    manifest = {"source": cfg["source"], "image_size": cfg["image_size"], "image_format": cfg["image_format"],
                "classes": classes, "splits": {}}
    report = {"source": cfg["source"], "splits": {}}
    with atomic_dir(out) as tmp:
        for split, samples in splits.items():
            counts = np.zeros(len(classes), dtype=np.int64)
            with ShardSink(tmp, split, cfg["shard_size"]) as sink:
                for key, image, label, meta in tqdm(samples, total=totals[split], desc=f"prepare {split}", unit="img"):
                    ext, data = encode_image(image, cfg["image_format"], cfg["jpeg_quality"])
                    sink.write({"__key__": key, ext: data, "cls": str(label).encode(),
                                "json": json.dumps(meta).encode()})
                    counts[label] += 1
            if sink.total == 0:
                raise ConfigError(f"data.root: no usable {split} images under {cfg['root']}; "
                                  "check the folder layout (train/<class>/..., val/<class>/... or <class>/...)")
            manifest["splits"][split] = {"count": sink.total, "shards": sink.shards, "counts": sink.counts}
            report["splits"][split] = {"count": sink.total, "per_class": counts.tolist()}
        write_manifest(tmp, manifest)
    if cfg["source"] == "imagefolder":
        report["bad_images"] = {"count": len(bad), "files": bad}
    else:
        report["bad_images"] = {"count": 0, "files": []}
    report["seconds"] = round(time.time() - started, 2)
    write_json(args.report, report)
    counts = ", ".join(f"{split}={v['count']}" for split, v in manifest["splits"].items())
    print(f"prepare: {counts} -> {out}")


if __name__ == "__main__":
    run(main)
