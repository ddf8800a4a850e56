"""Look inside a token file: statistics, and one image beside its token map.

    python -m digit.inspect data/tokens/train.parquet
    python -m digit.inspect data/tokens/val.parquet --key val_0000012 --out token_map.png
    python -m digit.inspect data/samples/digit/tokens.parquet --key sample_0000003 --samples data/renders/direct --out sample.png

Prints rows, grid, vocabulary, codebook usage, unigram perplexity and the
most frequent codes. With --key, draws the image, its token map (each code a
colour, ids printed) and, for the codes in that image, example patches of
other images carrying the same code (the code's cluster members). Images are
found in the image shards (real tokens, --images) or in the decoded samples
(generated tokens, --samples); without an image only the token map is drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from digit.cli import run
from digit.errors import ConfigError
from digit.tokens import read_metadata, token_stats

CELL = 32  # pixels per grid cell in the drawing


def file_stats(path: str | Path, top: int = 10) -> dict:
    """Statistics of a token file, streamed row group by row group."""
    meta = read_metadata(path)
    k, (gh, gw) = meta["vocab_size"], meta["grid"]
    counts = np.zeros(k, dtype=np.int64)
    file = pq.ParquetFile(path)
    labels = []
    for g in range(file.num_row_groups):
        table = file.read_row_group(g, columns=["label", "tokens"])
        counts += np.bincount(table.column("tokens").combine_chunks().flatten().to_numpy(), minlength=k)[:k]
        labels.append(table.column("label").to_numpy())
    labels = np.concatenate(labels) if labels else np.zeros(0, int)
    order = np.argsort(-counts, kind="stable")[:top]
    return {"rows": file.metadata.num_rows, "grid": [gh, gw], "vocab_size": k, **token_stats(counts),
            "rows_per_label": np.bincount(labels).tolist() if len(labels) else [],
            "top_codes": [{"code": int(c), "count": int(counts[c]), "share": round(counts[c] / max(counts.sum(), 1), 4)}
                          for c in order],
            "sampling": meta.get("sampling")}


def find_row(path: str | Path, key: str) -> tuple[np.ndarray, int]:
    table = pq.read_table(path, columns=["key", "label", "tokens"], filters=[("key", "==", key)])
    if table.num_rows == 0:
        raise ConfigError(f"{path}: no row with key {key!r}; list keys with "
                          f"`duckdb.sql(\"select key from '{path}' limit 10\")`")
    return np.asarray(table.column("tokens")[0].as_py()), int(table.column("label")[0].as_py())


def find_image(key: str, label: int, images: str | None, samples: str | None) -> np.ndarray | None:
    if samples and (Path(samples) / f"{key}_c{label}.png").is_file():
        with Image.open(Path(samples) / f"{key}_c{label}.png") as img:
            return np.asarray(img.convert("RGB"))
    if images:
        from digit.shards import iter_samples, read_manifest, shard_urls

        try:
            splits = read_manifest(images)["splits"]
        except ConfigError:  # no shards there: draw the token map only
            return None
        split = key.split("_", 1)[0]
        if split in splits:
            for sample in iter_samples(shard_urls(images, split)):
                if sample["__key__"] == key:
                    return sample["image"]
    return None


def code_colours(k: int) -> np.ndarray:
    """A fixed, well-spread colour per code (golden-ratio hues)."""
    import colorsys

    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.65, 0.95)] for i in range(k)],
                    dtype=np.uint8)


def member_patches(path: str | Path, images: str | None, codes: list[int], per_code: int = 4,
                   max_rows: int = 2000) -> dict[int, list[np.ndarray]]:
    """A few image patches (grid cells) carrying each code, from the first rows of a real token file."""
    from digit.shards import iter_samples, read_manifest, shard_urls

    try:
        read_manifest(images)
    except ConfigError:
        return {}

    meta = read_metadata(path)
    gh, gw = meta["grid"]
    table = pq.read_table(path, columns=["key", "tokens"]).slice(0, max_rows)
    keys = table.column("key").to_pylist()
    tokens = np.stack(table.column("tokens").to_numpy(zero_copy_only=False)).reshape(-1, gh, gw)
    wanted = {}
    for row, grid in enumerate(tokens):
        for code in codes:
            if len(wanted.get(code, [])) < per_code:
                hits = np.argwhere(grid == code)
                if len(hits):
                    wanted.setdefault(code, []).append((keys[row], tuple(hits[0])))
    by_key = {}
    for code, items in wanted.items():
        for key, cell in items:
            by_key.setdefault(key, []).append((code, cell))
    out: dict[int, list[np.ndarray]] = {}
    split = keys[0].split("_", 1)[0] if keys else "train"
    for sample in iter_samples(shard_urls(images, split)):
        for code, (i, j) in by_key.pop(sample["__key__"], []):
            img = sample["image"]
            h, w = img.shape[0] // gh, img.shape[1] // gw
            out.setdefault(code, []).append(img[i * h:(i + 1) * h, j * w:(j + 1) * w])
        if not by_key:
            break
    return out


def draw(tokens: np.ndarray, grid: tuple[int, int], k: int, image: np.ndarray | None,
         patches: dict[int, list[np.ndarray]]) -> Image.Image:
    gh, gw = grid
    colours = code_colours(k)
    side_w, side_h = gw * CELL, gh * CELL
    codes = list(dict.fromkeys(int(t) for t in tokens))[:8]
    rows_h = len([c for c in codes if c in patches]) * (CELL + 4)
    canvas = Image.new("RGB", (2 * side_w + 30, side_h + 20 + rows_h), "white")
    d = ImageDraw.Draw(canvas)
    if image is not None:
        canvas.paste(Image.fromarray(image).resize((side_w, side_h), Image.NEAREST), (10, 10))
    tmap = colours[tokens.reshape(gh, gw)].repeat(CELL, 0).repeat(CELL, 1)
    canvas.paste(Image.fromarray(tmap), (side_w + 20, 10))
    for idx, code in enumerate(tokens):
        i, j = divmod(idx, gw)
        d.text((side_w + 22 + j * CELL, 12 + i * CELL), str(int(code)), fill="black")
    y = side_h + 20
    for code in codes:
        if code not in patches:
            continue
        d.rectangle([10, y, 10 + CELL, y + CELL], fill=tuple(int(c) for c in colours[code]))
        d.text((12, y + 2), str(code), fill="black")
        for n, patch in enumerate(patches[code]):
            tile = Image.fromarray(patch).resize((CELL, CELL), Image.NEAREST)
            canvas.paste(tile, (20 + CELL + n * (CELL + 4), y))
        y += CELL + 4
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet")
    parser.add_argument("--key")
    parser.add_argument("--out", default="token_map.png")
    parser.add_argument("--images", default="data/images", help="image shards (for real tokens)")
    parser.add_argument("--samples", default="data/renders/direct", help="rendered samples (for generated tokens): data/renders/<renderer>")
    parser.add_argument("--members", default="data/tokens/train.parquet",
                        help="real token file whose images give example patches per code")
    args = parser.parse_args()
    stats = file_stats(args.parquet)
    print(json.dumps(stats, indent=1))
    if args.key:
        meta = read_metadata(args.parquet)
        tokens, label = find_row(args.parquet, args.key)
        image = find_image(args.key, label, args.images, args.samples)
        codes = list(dict.fromkeys(int(t) for t in tokens))[:8]
        patches = member_patches(args.members, args.images, codes) if Path(args.members).is_file() else {}
        draw(tokens, tuple(meta["grid"]), meta["vocab_size"], image, patches).save(args.out)
        print(f"{args.key} (label {label}): image {'found' if image is not None else 'not found'}, "
              f"{len(patches)} codes with example patches -> {args.out}")


if __name__ == "__main__":
    run(main)
