"""Stage `tokenize`: every patch -> id of its nearest centroid -> data/tokens/{train,val}.parquet.

The patch features are extract's cached grids, or, with encoder.cache: sample (extract kept only the
codebook's sample), the images encoded again here by the same encoder in the same shard-wise batches,
so the tokens are the same bytes either way. Also reports/tokens.json: codebook usage and token
perplexity per split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from digit.atomic import atomic_dir, clean_stale_tmp, write_json
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.features import split_grids
from digit.kmeans import Assigner
from digit.params import load_params
from digit.shards import batched, read_manifest
from digit.storage import require_space, token_bytes
from digit.tokens import TokenWriter, token_schema, token_stats


def reencoder(manifest: dict, params: dict, features: str, encoder_dir: str):
    """The encoder extract used (encoder.cache: sample), rebuilt from params and checked against its record."""
    import torch

    from digit.encoders import describe, encoder_from_params
    from digit.params import seed_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder_from_params(params["encoder"], encoder_dir, seed_for(params, None)).to(device)
    if json.loads(json.dumps(describe(encoder))) != manifest["encoder"]:
        raise ConfigError(f"{features} was extracted with another encoder ({manifest['encoder']}) than the encoder.* "
                          f"params give; re-run `dvc repro extract`")
    return encoder


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images", help="encoded here when extract kept only the sample")
    parser.add_argument("--features", default="data/features")
    parser.add_argument("--codebook", default="models/codebook")
    parser.add_argument("--encoder", default="models/encoder", help="stage train_encoder's folder (encoder.cache: sample)")
    parser.add_argument("--out", default="data/tokens")
    parser.add_argument("--report", default="reports/tokens.json")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = params["tokenize"]
    manifest = read_manifest(args.features)
    centroids = np.load(Path(args.codebook) / "centroids.npy", allow_pickle=False)
    k, dim = centroids.shape
    grid = tuple(manifest["encoder"]["grid"])
    if dim != manifest["encoder"]["dim"]:
        raise ConfigError(f"{args.codebook}: centroids have dim {dim} but the features have "
                          f"{manifest['encoder']['dim']}; re-run `dvc repro codebook`")
    encoder = reencoder(manifest, params, args.features, args.encoder) if manifest.get("cache") == "sample" else None
    source = read_manifest(args.images if encoder else args.features)
    rows_of = {split: source["splits"][split]["count"] for split in ("train", "val")}
    rows = sum(rows_of.values())
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
            with tqdm(total=rows_of[split], desc=f"tokenize {split}", unit="img") as bar:
                grids = split_grids(split, args.features, args.images, encoder, params["encoder"]["batch_size"],
                                    params["encoder"]["precision"])
                for batch in batched(grids, cfg["batch_size"]):
                    ids = assign(np.stack([grid for _, grid in batch]))  # [B, gh, gw]
                    ids = ids.reshape(len(batch), -1)
                    counts += np.bincount(ids.ravel(), minlength=k)
                    writer.write([s["__key__"] for s, _ in batch], [s["cls"] for s, _ in batch], ids)
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
