"""Benchmark: the `codebook` stage vs bare faiss.Kmeans on the same features, side by side.

Two ratios, each measured in alternating rounds in one run:
- K-Means step (the floor, >= 0.9): the stage's fit_kmeans (faiss + the
  cluster-size statistics of reports/codebook.json) vs bare
  faiss.Kmeans(d, k, niter, seed).train() on the very same in-memory array.
- Whole stage: stream-sampling codebook.max_points features out of the train
  feature shards + fit_kmeans, vs the same bare faiss call. Reading shards is
  a fixed cost (~15k images/s here) that K-Means does not have; it matters at
  the tiny default K and vanishes at the paper's K=8192.
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

    def sample() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        x = sample_features(urls, n_images, gh * gw, cfg["max_points"], cfg["seed"], progress=False)
        return time.perf_counter() - start, x

    def fit(x: np.ndarray) -> float:
        start = time.perf_counter()
        fit_kmeans(x, cfg["k"], cfg["niter"], cfg["seed"])
        return time.perf_counter() - start

    def bare(x: np.ndarray) -> float:
        start = time.perf_counter()
        faiss.Kmeans(x.shape[1], cfg["k"], niter=cfg["niter"], seed=cfg["seed"], verbose=False).train(x)
        return time.perf_counter() - start

    times = {"sample": [], "fit": [], "bare": []}
    for _ in range(args.rounds):
        t, x = sample()
        times["sample"].append(t)
        times["fit"].append(fit(x))
        times["bare"].append(bare(x))
    best = {k: min(v) for k, v in times.items()}

    def line(name, key):
        print(f"{name:28s}: {best[key]:7.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in times[key])})")

    print(f"K={cfg['k']}, niter={cfg['niter']}, {len(x)} x {x.shape[1]} features from {n_images} images, "
          f"{faiss.omp_get_max_threads()} threads")
    line("bare faiss.Kmeans", "bare")
    line("stage K-Means (fit_kmeans)", "fit")
    line("stage sampling from shards", "sample")
    print(f"ratio K-Means step, stage/bare throughput : {best['bare'] / best['fit']:.3f}   (floor 0.9)")
    print(f"ratio whole stage (sampling + K-Means)   : {best['bare'] / (best['fit'] + best['sample']):.3f}   "
          f"(shard reading {n_images / best['sample']:,.0f} images/s)")

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
