"""Stage `decode`: generated token grids -> PNG files and a per-class sample grid.

data/samples/tokens.parquet is rendered by models/decoder into
data/samples/images/<key>_c<label>.png, listed with label and class name in
data/samples/images/manifest.json (which also records how the tokens were
sampled). reports/samples.png shows one row per class (the first
decode.grid_columns samples of each) and is logged with DVCLive (reports/decode/)
so `dvc plots show` / `dvc plots diff` put it beside other experiments'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from PIL import Image, ImageDraw
from tqdm import tqdm

from digit.atomic import atomic_dir, atomic_file, clean_stale_tmp
from digit.cli import require_git_commit, run, stage_parser
from digit.decoder import load_decoder
from digit.params import load_params
from digit.tokens import read_tokens


def sample_grid(images: np.ndarray, labels: np.ndarray, classes: list[str], columns: int,
                scale: int = 2, pad: int = 2, label_width: int = 90) -> Image.Image:
    """One row per class: its first `columns` images, upscaled `scale`x (nearest), class name on the left."""
    size = images.shape[1] * scale
    rows = len(classes)
    canvas = Image.new("RGB", (label_width + columns * (size + pad) + pad, rows * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(classes):
        top = pad + row * (size + pad)
        draw.text((4, top + size // 2 - 6), name[:14], fill="black")
        for col, index in enumerate(np.flatnonzero(labels == row)[:columns]):
            tile = Image.fromarray(images[index]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + col * (size + pad), top))
    return canvas


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--tokens", default="data/samples/tokens.parquet")
    parser.add_argument("--decoder", default="models/decoder")
    parser.add_argument("--out", default="data/samples/images")
    parser.add_argument("--grid", default="reports/samples.png")
    parser.add_argument("--live", default="reports/decode")
    args = parser.parse_args()
    require_git_commit()
    cfg = load_params(args.params)["decode"]
    tokens, labels, keys, meta = read_tokens(args.tokens)
    model, _ = load_decoder(args.decoder, vocab_size=meta["vocab_size"], grid=tuple(meta["grid"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    classes = meta.get("classes") or [str(c) for c in range(int(labels.max()) + 1)]

    out = Path(args.out)
    clean_stale_tmp(out)
    rendered, entries = [], []
    with atomic_dir(out) as tmp:
        for start in tqdm(range(0, len(keys), cfg["batch_size"]), desc="decode", unit="batch"):
            batch = torch.from_numpy(tokens[start:start + cfg["batch_size"]]).to(device)
            images = model.decode(batch).cpu().numpy()
            for key, label, image in zip(keys[start:], labels[start:], images):
                name = f"{key}_c{int(label)}.png"
                Image.fromarray(image).save(tmp / name)
                entries.append({"file": name, "key": key, "label": int(label), "class": classes[int(label)]})
            rendered.append(images)
        (tmp / "manifest.json").write_text(json.dumps(
            {"count": len(entries), "classes": classes, "sampling": meta.get("sampling"),
             "decoder": args.decoder, "images": entries}, indent=1) + "\n")

    grid = sample_grid(np.concatenate(rendered), labels, classes, cfg["grid_columns"])
    with atomic_file(args.grid) as tmp:
        grid.save(tmp, format="PNG")
    with Live(args.live, save_dvc_exp=False, dvcyaml=False, report=None) as live:
        live.log_image("samples.png", grid)
    print(f"decode: {len(entries)} images -> {out}, grid {args.grid}")


if __name__ == "__main__":
    run(main)
