"""Stage `codebook`: faiss K-Means over patch features sampled from the train shards (or over the sample
`extract` kept, with encoder.cache: sample: the same vectors).

Writes models/codebook/centroids.npy (float32 [K, D]) and reports/codebook.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from digit.atomic import atomic_dir, clean_stale_tmp, write_json
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.kmeans import codebook_sample, fit_kmeans
from digit.params import load_params, seed_for
from digit.shards import read_manifest


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--features", default="data/features")
    parser.add_argument("--out", default="models/codebook")
    parser.add_argument("--report", default="reports/codebook.json")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = {**params["codebook"], "seed": seed_for(params, "codebook")}  # codebook.seed moved by base.seed
    manifest = read_manifest(args.features)
    gh, gw = manifest["encoder"]["grid"]
    n_images = manifest["splits"]["train"]["count"]
    available = n_images * gh * gw
    n_points = min(cfg["max_points"], available)
    if cfg["k"] > n_points:  # checked before reading a single feature
        raise ConfigError(
            f"codebook.k: {cfg['k']} centroids but only {n_points} features can be sampled "
            f"({n_images} train images x {gh * gw} patches, codebook.max_points={cfg['max_points']}); "
            "lower codebook.k or add train images (data.train_size)")

    started = time.time()
    x = codebook_sample(args.features, cfg["max_points"], cfg["seed"])
    sample_seconds = time.time() - started
    centroids, stats = fit_kmeans(x, cfg["k"], cfg["niter"], cfg["seed"])

    out = Path(args.out)
    clean_stale_tmp(out)
    with atomic_dir(out) as tmp:
        np.save(tmp / "centroids.npy", centroids)
        (tmp / "codebook.json").write_text(json.dumps(
            {"k": cfg["k"], "dim": int(centroids.shape[1]), "grid": [gh, gw],
             "encoder": manifest["encoder"], "seed": cfg["seed"], "niter": cfg["niter"],
             "points": int(len(x))}, indent=2) + "\n")
    stats.update(sample_seconds=round(sample_seconds, 2), seconds=round(time.time() - started, 2))
    write_json(args.report, stats)
    print(f"codebook: K={cfg['k']} on {len(x)} features, objective {stats['objective']:.4g}, "
          f"{stats['empty_clusters']} empty clusters -> {out}")


if __name__ == "__main__":
    run(main)
