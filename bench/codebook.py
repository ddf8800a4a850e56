"""Benchmark: the `codebook` stage vs bare faiss.Kmeans on the same features, side by side.

Stage = stream-sample codebook.max_points features from the train feature
shards + the stage's fit_kmeans (which also computes cluster-size stats).
Bare = faiss.Kmeans(d, k, niter, seed).train() on the very same array.
Also reports `tokenize` assignment throughput (patches/s through the Assigner).

    python bench/codebook.py [--features data/features] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from digit.kmeans import Assigner, fit_kmeans, sample_features
from digit.params import load_params
from digit.shards import iter_samples, read_manifest, shard_urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--features", default="data/features", help="output of `dvc repro extract`")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cfg = load_params(args.params)["codebook"]
    manifest = read_manifest(args.features)
    gh, gw = manifest["encoder"]["grid"]
    n_images = manifest["splits"]["train"]["count"]
    urls = shard_urls(args.features, "train")

    def stage() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        x = sample_features(urls, n_images, gh * gw, cfg["max_points"], cfg["seed"], progress=False)
        fit_kmeans(x, cfg["k"], cfg["niter"], cfg["seed"])
        return time.perf_counter() - start, x

    def bare(x: np.ndarray) -> float:
        start = time.perf_counter()
        faiss.Kmeans(x.shape[1], cfg["k"], niter=cfg["niter"], seed=cfg["seed"], verbose=False).train(x)
        return time.perf_counter() - start

    times = {"stage": [], "bare": []}
    for _ in range(args.rounds):
        t, x = stage()
        times["stage"].append(t)
        times["bare"].append(bare(x))
    best = {k: min(v) for k, v in times.items()}
    print(f"K={cfg['k']}, niter={cfg['niter']}, {len(x)} x {x.shape[1]} features, {faiss.omp_get_max_threads()} threads")
    print(f"bare faiss.Kmeans    : {best['bare']:7.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in times['bare'])})")
    print(f"codebook stage       : {best['stage']:7.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in times['stage'])})")
    print(f"ratio stage/bare throughput: {best['bare'] / best['stage']:.3f}   (floor 0.9)")

    centroids, _ = fit_kmeans(x[: 20 * cfg["k"]], cfg["k"], 1, cfg["seed"])
    assign = Assigner(centroids)
    grids = np.stack([s["npy"] for _, s in zip(range(2000), iter_samples(urls))])
    start = time.perf_counter()
    assign(grids)
    seconds = time.perf_counter() - start
    print(f"tokenize assignment  : {grids.shape[0] * gh * gw / seconds:,.0f} patches/s "
          f"({grids.shape[0] / seconds:,.0f} images/s, K={cfg['k']}, exact L2)")


if __name__ == "__main__":
    main()
