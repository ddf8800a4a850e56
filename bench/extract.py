"""Benchmark: `extract` pipeline images/s vs the bare encoder forward, side by side.

Pipeline = read image shards, decode PNG, resize, normalize, encoder forward,
float16, encode npy, write tar (`digit.features.encode_shard`, the stage's unit
of work). Bare = the timm model's forward_intermediates alone, on a ready,
normalized float batch at encoder.img_size.
Rounds alternate so machine noise hits both alike; the best round of each counts.

    python bench/extract.py [--images data/images] [--shards 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from digit.encoders import build_encoder
from digit.features import encode_shard
from digit.params import load_params
from digit.shards import read_manifest, shard_urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", default="data/images", help="output of `dvc repro prepare`")
    parser.add_argument("--shards", type=int, default=2, help="image shards per pipeline round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = load_params(args.params)["encoder"]
    manifest = read_manifest(args.images)
    urls = shard_urls(args.images, "train")[: args.shards]
    n_images = sum(manifest["splits"]["train"]["counts"][: len(urls)])
    encoder = build_encoder(cfg["name"], cfg["weights"], cfg["layer"], cfg["img_size"])
    batch = (torch.rand(cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"]) - encoder.mean) / encoder.std
    n_batches = -(-n_images // cfg["batch_size"])

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n_batches):
                encoder.model.forward_intermediates(batch, indices=[encoder.index], intermediates_only=True,
                                                    stop_early=True)
        return n_batches * cfg["batch_size"] / (time.perf_counter() - start)

    def pipeline() -> float:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            count = sum(encode_shard(encoder, url, Path(out), "train", i, cfg["batch_size"], cfg["precision"])
                        for i, url in enumerate(urls))
            return count / (time.perf_counter() - start)

    bare()  # warm-up: allocator, oneDNN kernels
    results = {"bare": [], "pipeline": []}
    for _ in range(args.rounds):
        results["bare"].append(bare())
        results["pipeline"].append(pipeline())
    best = {k: max(v) for k, v in results.items()}
    print(f"encoder {cfg['name']} @ {cfg['img_size']}px, layer {cfg['layer']}, batch {cfg['batch_size']}, "
          f"{n_images} images/round, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"bare encoder forward : {best['bare']:8.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in results['bare'])})")
    print(f"extract pipeline     : {best['pipeline']:8.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in results['pipeline'])})")
    print(f"ratio pipeline/bare  : {best['pipeline'] / best['bare']:.3f}   (floor 0.85)")


if __name__ == "__main__":
    main()
