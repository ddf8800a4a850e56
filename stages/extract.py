"""Stage `extract`: image shards -> frozen-encoder patch-feature grids (float16 shards).

data/features/{split}-NNNNNN.tar holds the features of data/images/{split}-NNNNNN.tar,
sample for sample (`__key__`, `npy` [gh, gw, D] float16, `cls`). With encoder.cache: sample
(the ImageNet presets) only the train vectors the codebook is fitted on are kept, as `npy`
[n, D] rows of the images that have any (digit.kmeans.sample_indices: the codebook's own
draw, so its K-Means sees the same vectors either way), and `tokenize` encodes the images
again: 3 GB instead of 523 GB at imagenet-digit-base (docs/scaling.md, "Storage"). Under
`accelerate launch --num_processes N`, rank r takes input shards r, r+N, ...,
so each rank writes its own shards and no key is lost or duplicated
(on CPU: `torchrun --nproc_per_node N -m stages.extract`); rank 0
checks every shard's count against the input before publishing the directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from digit.atomic import publish, write_json
from digit.cli import run, stage_parser
from digit.distributed import finish, make_accelerator, shared_tmp_output
from digit.encoders import build_encoder, describe, encoder_geometry, resolve_encoder
from digit.params import load_params, seed_for
from digit.features import encode_shard
from digit.kmeans import rows_in_image, sample_indices
from digit.shards import read_manifest, shard_urls, write_manifest
from digit.storage import feature_bytes, require_space

def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--encoder", default="models/encoder", help="stage train_encoder's folder")
    parser.add_argument("--out", default="data/features")
    parser.add_argument("--report", default="reports/extract.json")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = params["encoder"]
    images_manifest = read_manifest(args.images)
    # before any heavy work: the settings, then the disk
    weights, model_kwargs = resolve_encoder(cfg, args.encoder)  # "trained": train_encoder's weights
    geometry = encoder_geometry(cfg["name"], weights, cfg["layer"], cfg["img_size"], cfg["patch_size"], model_kwargs)
    positions = geometry["grid"][0] * geometry["grid"][1]
    splits = ("train", "val") if cfg["cache"] == "grids" else ("train",)
    n_images = sum(images_manifest["splits"][split]["count"] for split in splits)
    if cfg["cache"] == "grids":
        require_space("extract", args.out, feature_bytes(n_images, positions, geometry["dim"]),
                      f"{n_images:,} float16 feature grids")
        rows_of = None
    else:
        sample = {"max_points": params["codebook"]["max_points"], "seed": seed_for(params, "codebook")}
        chosen = sample_indices(n_images, positions, sample["max_points"], sample["seed"])
        written = len(np.unique(chosen // positions))
        require_space("extract", args.out, feature_bytes(written, len(chosen) / max(written, 1), geometry["dim"]),
                      f"{len(chosen):,} sampled float16 feature vectors")
        offsets = np.cumsum([0] + images_manifest["splits"]["train"]["counts"])

        def rows_of(index: int):  # train shard index -> (i-th image of the shard -> its sampled positions)
            return lambda i: rows_in_image(chosen, int(offsets[index]) + i, positions)
    seed = seed_for(params, None)  # of the random init (encoder.weights=none) only

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(args.out)
    started = time.time()

    # All ranks must write into the same fresh temporary directory: rank 0 makes it; a failing
    # rank removes it again (a full disk gets its space back).
    with shared_tmp_output(accelerator, out) as tmp:
        encoder = build_encoder(cfg["name"], weights, cfg["layer"], cfg["img_size"], cfg["patch_size"],
                                seed, model_kwargs).to(accelerator.device)
        mine = [(split, i, url) for split in splits
                for i, url in enumerate(shard_urls(args.images, split)) if i % world == rank]
        total = sum(images_manifest["splits"][s]["counts"][i] for s, i, _ in mine)
        counts = {}
        with tqdm(total=total, desc=f"extract rank {rank}" if world > 1 else "extract", unit="img",
                  position=rank) as bar:
            for split, index, url in mine:
                n = encode_shard(encoder, url, tmp, split, index, cfg["batch_size"], cfg["precision"],
                                 rows_of(index) if rows_of else None)
                counts[f"{split}/{index}"] = n
                bar.update(n)
        (tmp / f".rank{rank}.json").write_text(json.dumps(counts))
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            done = {}
            for part in sorted(tmp.glob(".rank*.json")):
                done.update(json.loads(part.read_text()))
                part.unlink()
            manifest = {"encoder": describe(encoder), "weights": cfg["weights"], "dtype": "float16",
                        "classes": images_manifest["classes"], "splits": {}}
            if cfg["cache"] == "sample":
                manifest.update(cache="sample", sample={**sample, "points": len(chosen)})
            for split in splits:
                info = images_manifest["splits"][split]
                got = [done.get(f"{split}/{i}") for i in range(len(info["shards"]))]
                if got != info["counts"]:
                    raise RuntimeError(f"extract: {split} shard counts {got} differ from the input's "
                                       f"{info['counts']}; a rank failed, output not published")
                manifest["splits"][split] = {"count": info["count"], "shards": info["shards"], "counts": got}
            write_manifest(tmp, manifest)
            publish(tmp, out)
            elapsed = time.time() - started
            write_json(args.report, {"images": n_images, "seconds": round(elapsed, 2), "processes": world,
                                     "images_per_second": round(n_images / elapsed, 1), **manifest["encoder"]})
            print(f"extract: {n_images} images -> {out} grid {manifest['encoder']['grid']} "
                  f"dim {manifest['encoder']['dim']}")
    finish(accelerator)


if __name__ == "__main__":
    run(main)
