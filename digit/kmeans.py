"""K-Means codebook over encoder patch features (faiss), and nearest-centroid assignment.

faiss runs on every GPU it sees (faiss-gpu-cu12, the `gpu` extra) and on CPU otherwise.
"""

from __future__ import annotations

import math
import time

import faiss
import numpy as np
from tqdm import tqdm

from digit.errors import ConfigError
from digit.shards import iter_samples, read_manifest, shard_urls


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def sample_indices(n_images: int, positions: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices, over the virtual [n_images * positions] array of train patch vectors, of the
    min(max_points, all) vectors the codebook is fitted on: drawn without replacement from (seed) alone."""
    total = n_images * positions
    return np.sort(np.random.default_rng(seed).choice(total, size=min(max_points, total), replace=False))


def rows_in_image(chosen: np.ndarray, image_index: int, positions: int) -> np.ndarray:
    """The positions of image `image_index`'s grid (flattened) that `chosen` samples, ascending."""
    lo = image_index * positions
    start, end = np.searchsorted(chosen, [lo, lo + positions])
    return chosen[start:end] - lo


def load_sample(urls: list[str], n: int, progress: bool = True) -> np.ndarray:
    """The codebook's sample as `extract` kept it (encoder.cache: sample): the [m, D] rows of each written
    image, in order -- the very vectors sample_features would pick from whole grids."""
    parts = [s["npy"] for s in tqdm(iter_samples(urls), desc="codebook sample", unit="img", disable=not progress)]
    x = np.concatenate(parts).astype(np.float32) if parts else np.empty((0, 0), np.float32)
    if len(x) != n:
        raise RuntimeError(f"codebook: expected {n} sampled features, read {len(x)}; feature shards are incomplete")
    return x


def codebook_sample(features_dir, max_points: int, seed: int, progress: bool = True) -> np.ndarray:
    """The train vectors a codebook is fitted on (stages codebook and stability's K sweep): min(max_points, all)
    drawn by `seed` from extract's feature grids, or read as extract kept them (encoder.cache: sample), which
    is the same draw."""
    manifest = read_manifest(features_dir)
    gh, gw = manifest["encoder"]["grid"]
    n_images = manifest["splits"]["train"]["count"]
    urls, total = shard_urls(features_dir, "train"), n_images * gh * gw
    if manifest.get("cache") != "sample":
        return sample_features(urls, n_images, gh * gw, max_points, seed, progress)
    drawn = manifest["sample"]
    if (min(drawn["max_points"], total), drawn["seed"]) != (min(max_points, total), seed):
        raise ConfigError(f"{features_dir} holds the sample drawn with max_points={drawn['max_points']}, seed "
                          f"{drawn['seed']}, not max_points={max_points}, seed {seed}; re-run `dvc repro extract`")
    return load_sample(urls, min(max_points, total), progress)


def sample_features(urls: list[str], n_images: int, positions: int, max_points: int, seed: int,
                    progress: bool = True) -> np.ndarray:
    """Sample min(max_points, all) patch vectors uniformly without replacement, streaming.

    Indices are drawn up front over the virtual [n_images * positions] array,
    so memory is O(max_points * D) whatever the dataset size, and the sample
    depends only on (seed, shard order), not on batch sizes or process count.
    """
    chosen = sample_indices(n_images, positions, max_points, seed)
    n = len(chosen)
    out, filled, ptr = None, 0, 0
    for image_index, sample in enumerate(tqdm(iter_samples(urls), total=n_images, desc="codebook sample",
                                              unit="img", disable=not progress)):
        lo, hi = image_index * positions, (image_index + 1) * positions
        end = np.searchsorted(chosen, hi, side="left")
        if end > ptr:
            grid = sample["npy"]
            flat = grid.reshape(positions, -1)
            if out is None:
                out = np.empty((n, flat.shape[1]), dtype=np.float32)
            picked = flat[chosen[ptr:end] - lo]
            out[filled:filled + len(picked)] = picked
            filled += len(picked)
            ptr = end
        if ptr == n:
            break
    if filled != n:
        raise RuntimeError(f"codebook: expected {n} sampled features, read {filled}; feature shards are incomplete")
    return out


def fit_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[np.ndarray, dict]:
    """faiss K-Means on exactly the given points; returns centroids [k, D] float32 and stats."""
    n, d = x.shape
    started = time.time()
    kmeans = faiss.Kmeans(
        d, k, niter=niter, seed=seed, gpu=num_gpus() > 0, verbose=False,
        # faiss would silently subsample to 256 points per centroid; the user
        # already chose the sample size with codebook.max_points, so keep all.
        max_points_per_centroid=math.ceil(n / k) + 1,
        min_points_per_centroid=1,
    )
    kmeans.train(x)
    seconds = time.time() - started
    _, assign = kmeans.index.search(x, 1)
    sizes = np.bincount(assign.ravel(), minlength=k)
    obj = [float(v) for v in kmeans.obj]
    stats = {
        "k": k, "points": n, "dim": d, "niter": niter, "gpus": num_gpus(),
        "objective": obj[-1] if obj else None,
        "objective_first": obj[0] if obj else None,
        "mse_per_point": (obj[-1] / n) if obj else None,
        "empty_clusters": int((sizes == 0).sum()),
        "cluster_size": {
            "min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
            "std": float(sizes.std()),
            "p10": float(np.percentile(sizes, 10)), "p50": float(np.percentile(sizes, 50)),
            "p90": float(np.percentile(sizes, 90)),
        },
        "fit_seconds": round(seconds, 2),
    }
    return kmeans.centroids.astype(np.float32), stats


class Assigner:
    """Nearest-centroid lookup (exact L2) on all GPUs faiss sees, else CPU."""

    def __init__(self, centroids: np.ndarray):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        self.index = faiss.index_cpu_to_all_gpus(index) if num_gpus() > 0 else index
        self.k = centroids.shape[0]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """features [..., D] -> token ids [...] (int64)."""
        shape = features.shape[:-1]
        flat = np.ascontiguousarray(features.reshape(-1, features.shape[-1]), dtype=np.float32)
        _, ids = self.index.search(flat, 1)
        return ids.reshape(shape)
