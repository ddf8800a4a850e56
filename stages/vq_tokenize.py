"""Stage `vq_tokenize`: every image -> its VQGAN token grid -> data/vq_tokens/{train,val}.parquet.

The same schema as the DiGIT tokens of `tokenize` (key, label, tokens[gh*gw]; metadata
grid, vocab_size, classes), plus `"tokenizer": "vq"`: everything that reads token files
reads these. Rows follow the image shards, like data/tokens, so the two files are
row-aligned (the stage-2 pairs). reports/vq_tokens.json: codebook usage and perplexity.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from digit.atomic import atomic_dir, clean_stale_tmp, write_json
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.params import load_params
from digit.shards import batched, iter_samples, read_manifest, shard_urls
from digit.storage import require_space, token_bytes
from digit.tokens import TokenWriter, token_schema, token_stats
from digit.vqgan import load_vqgan


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--vqgan", default="models/vqgan")
    parser.add_argument("--out", default="data/vq_tokens")
    parser.add_argument("--report", default="reports/vq_tokens.json")
    args = parser.parse_args()
    cfg = load_params(args.params)["tokenize"]
    manifest = read_manifest(args.images)
    model, meta = load_vqgan(args.vqgan, image_size=manifest["image_size"])
    if meta.get("classes") != manifest["classes"]:
        raise ConfigError(f"{args.vqgan} was trained on images with classes {meta.get('classes')}, "
                          f"{args.images} has {manifest['classes']}; re-run `dvc repro train_vqgan`")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    grid, k = (model.config.grid, model.config.grid), model.config.k
    rows = sum(info["count"] for info in manifest["splits"].values())
    require_space("vq_tokenize", args.out, token_bytes(rows, grid[0] * grid[1]), f"{rows:,} token sequences")
    schema = token_schema(grid, k, {"tokenizer": "vq", "image_size": manifest["image_size"],
                                    "classes": manifest["classes"]})
    out = Path(args.out)
    clean_stale_tmp(out)
    report = {"k": k, "grid": list(grid)}
    started = time.time()
    with atomic_dir(out) as tmp, torch.inference_mode():
        for split in ("train", "val"):
            counts = np.zeros(k, dtype=np.int64)
            writer = TokenWriter(tmp / f"{split}.parquet", schema, cfg["row_group_size"])
            samples = iter_samples(shard_urls(args.images, split))
            with tqdm(total=manifest["splits"][split]["count"], desc=f"vq_tokenize {split}", unit="img") as bar:
                for batch in batched(samples, cfg["batch_size"]):
                    images = torch.from_numpy(np.stack([s["image"] for s in batch])).to(device)
                    ids = model.encode(images).reshape(len(batch), -1).cpu().numpy()
                    counts += np.bincount(ids.ravel(), minlength=k)
                    writer.write([s["__key__"] for s in batch], [s["cls"] for s in batch], ids)
                    bar.update(len(batch))
            writer.close()
            report[split] = {"rows": writer.rows, **token_stats(counts)}
    report["seconds"] = round(time.time() - started, 2)
    write_json(args.report, report)
    print(f"vq_tokenize: train usage {report['train']['usage_pct']}%, perplexity "
          f"{report['train']['perplexity']} -> {out}")


if __name__ == "__main__":
    run(main)
