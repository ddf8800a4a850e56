"""Stage `tokenize`: every patch -> id of its nearest centroid -> data/tokens/{train,val}.parquet.

Also reports/tokens.json: codebook usage and token perplexity per split.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from digit.atomic import atomic_dir, clean_stale_tmp, write_json
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.kmeans import Assigner
from digit.params import load_params
from digit.shards import batched, iter_samples, read_manifest, shard_urls
from digit.storage import require_space, token_bytes
from digit.tokens import TokenWriter, token_schema, token_stats


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--features", default="data/features")
    parser.add_argument("--codebook", default="models/codebook")
    parser.add_argument("--out", default="data/tokens")
    parser.add_argument("--report", default="reports/tokens.json")
    args = parser.parse_args()
    cfg = load_params(args.params)["tokenize"]
    manifest = read_manifest(args.features)
    centroids = np.load(Path(args.codebook) / "centroids.npy", allow_pickle=False)
    k, dim = centroids.shape
    grid = tuple(manifest["encoder"]["grid"])
    if dim != manifest["encoder"]["dim"]:
        raise ConfigError(f"{args.codebook}: centroids have dim {dim} but the features have "
                          f"{manifest['encoder']['dim']}; re-run `dvc repro codebook`")
    rows = sum(manifest["splits"][split]["count"] for split in ("train", "val"))
    require_space("tokenize", args.out, token_bytes(rows, grid[0] * grid[1]), f"{rows:,} token sequences")
    assign = Assigner(centroids)
    schema = token_schema(grid, k, {"encoder": manifest["encoder"], "classes": manifest["classes"]})

    out = Path(args.out)
    clean_stale_tmp(out)
    report = {"k": k, "grid": list(grid)}
    started = time.time()
    with atomic_dir(out) as tmp:
        for split in ("train", "val"):
            counts = np.zeros(k, dtype=np.int64)
            writer = TokenWriter(tmp / f"{split}.parquet", schema, cfg["row_group_size"])
            samples = iter_samples(shard_urls(args.features, split))
            with tqdm(total=manifest["splits"][split]["count"], desc=f"tokenize {split}", unit="img") as bar:
                for batch in batched(samples, cfg["batch_size"]):
                    ids = assign(np.stack([s["npy"] for s in batch]))  # [B, gh, gw]
                    ids = ids.reshape(len(batch), -1)
                    counts += np.bincount(ids.ravel(), minlength=k)
                    writer.write([s["__key__"] for s in batch], [s["cls"] for s in batch], ids)
                    bar.update(len(batch))
            writer.close()
            report[split] = {"rows": writer.rows, **token_stats(counts)}
    seconds = time.time() - started
    n_tokens = sum(report[s]["tokens"] for s in ("train", "val"))
    report.update(seconds=round(seconds, 2), assignments_per_second=round(n_tokens / seconds, 1))
    write_json(args.report, report)
    print(f"tokenize: train usage {report['train']['usage_pct']}%, perplexity "
          f"{report['train']['perplexity']} -> {out}")


if __name__ == "__main__":
    run(main)
