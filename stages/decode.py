"""Stage `decode`: generated token grids -> PNG files and a per-class sample grid, once per renderer.

dvc.yaml runs it per renderer (`decode@direct`, `decode@stage2_ar`, `decode@vqgan`): a GPT's
samples (data/samples/<tokenizer>/tokens.parquet) are rendered by digit.render into
data/renders/<renderer>/<key>_c<label>.png: DiGIT tokens by the direct decoder or
through a stage-2 model into VQ tokens and its VQGAN; VQ tokens by the VQGAN. The images are
listed with label and class name in manifest.json, which also records how the tokens were
sampled and rendered; the rendering time per image goes to the --report JSON (kept out of the
images folder, so the same tokens always give byte-identical outputs). The sample grid (one
row per class, the first decode.grid_columns samples of each) is logged with DVCLive so
`dvc plots show` / `dvc plots diff` put it beside other experiments'.

The token round-trip (--roundtrip JSON): do the rendered images carry the tokens they were rendered
from? The samples' images and the first decode.roundtrip_images real val token grids (--val-tokens,
rendered the same way) are tokenized again by the tokens' own tokenizer (--tokenizer: the codebook
with its encoder, or the VQGAN), and the fraction of grid positions whose token comes back unchanged
is reported for each. A real image keeps all of its tokens; `evaluate` sets beside it what a real image
with 30 dB of noise keeps (stage `stability`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from PIL import Image, ImageDraw
from tqdm import tqdm

from digit.atomic import atomic_dir, atomic_file, clean_stale_tmp, write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.errors import ConfigError
from digit.params import load_params, seed_for
from digit.render import KINDS, load_renderer, stage2_sampling
from digit.stability import image_tokenizer, kept_fraction
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
    parser.add_argument("--tokens", default="data/samples/digit/tokens.parquet")
    parser.add_argument("--renderer", default="direct", choices=KINDS)
    parser.add_argument("--model", default="models/decoder", help="the renderer's folder")
    parser.add_argument("--out", default="data/renders/direct")
    parser.add_argument("--grid", default="reports/samples/direct.png")
    parser.add_argument("--live", default="reports/decode/direct")
    parser.add_argument("--report", default="reports/decode/direct.json", help="renderer and time per image")
    parser.add_argument("--val-tokens", default="data/tokens/val.parquet",
                        help="the real val images' tokens of the same tokenizer (the round-trip's first half)")
    parser.add_argument("--tokenizer", default="models/codebook",
                        help="that tokenizer: the codebook folder (DiGIT tokens) or the VQGAN's (VQ tokens)")
    parser.add_argument("--roundtrip", default="reports/roundtrip/direct.json", help="the token round-trip report")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg, kind = params["decode"], args.renderer
    tokens, labels, keys, meta = read_tokens(args.tokens)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampling = stage2_sampling(params["stage2"], kind) if kind.startswith("stage2") else None
    renderer = load_renderer(meta, kind, args.model, device, sampling=sampling, seed=seed_for(params, "decode"))
    val = roundtrip_tokens(args.val_tokens, meta, cfg["roundtrip_images"])  # checked before any rendering
    tokenize = image_tokenizer(meta, args.tokenizer, device)
    classes = meta.get("classes") or [str(c) for c in range(int(labels.max()) + 1)]

    out = Path(args.out)
    clean_stale_tmp(out)
    rendered, entries, seconds = [], [], 0.0
    with atomic_dir(out) as tmp:
        for start in tqdm(range(0, len(keys), cfg["batch_size"]), desc=f"decode ({renderer.kind})", unit="batch"):
            started = time.perf_counter()
            images = renderer.render(tokens[start:start + cfg["batch_size"]])
            seconds += time.perf_counter() - started
            for key, label, image in zip(keys[start:], labels[start:], images):
                name = f"{key}_c{int(label)}.png"
                Image.fromarray(image).save(tmp / name)
                entries.append({"file": name, "key": key, "label": int(label), "class": classes[int(label)]})
            rendered.append(images)
        (tmp / "manifest.json").write_text(json.dumps(
            {"count": len(entries), "classes": classes, "sampling": meta.get("sampling"),
             "tokenizer": meta.get("tokenizer", "discriminative"), "renderer": renderer.kind,
             "stage2_sampling": sampling, "images": entries}, indent=1) + "\n")

    grid = sample_grid(np.concatenate(rendered), labels, classes, cfg["grid_columns"])
    clean_stale_tmp(Path(args.grid))  # a killed run's half-written grid: this stage is its only writer
    with atomic_file(args.grid) as tmp:
        grid.save(tmp, format="PNG")
    write_json(args.report, {"renderer": renderer.kind, "images": len(entries), "device": str(device),
                             "seconds_per_image": round(seconds / max(len(entries), 1), 6)})
    # The val grids through a fresh renderer: its stage-2 draws do not depend on how many samples came first.
    roundtrip = token_roundtrip(tokenize, load_renderer(meta, kind, args.model, device, sampling=sampling,
                                                        seed=seed_for(params, "decode")),
                                val, np.concatenate(rendered), tokens, cfg["batch_size"])
    write_json(args.roundtrip, {"renderer": kind, "tokenizer": meta.get("tokenizer", "discriminative"), **roundtrip})
    with Live(args.live, save_dvc_exp=False, dvcyaml=False, report=None) as live:
        live.log_image("samples.png", grid)
    print(f"decode: {len(entries)} images rendered by {renderer.kind} ({1000 * seconds / max(len(entries), 1):.2f} "
          f"ms/image) -> {out}, grid {args.grid}; tokens kept when tokenized again: real val tokens "
          f"{roundtrip['val']:.4f}, samples {roundtrip['samples']:.4f} -> {args.roundtrip}")


def roundtrip_tokens(path: str, meta: dict, n: int) -> np.ndarray:
    """The first n real val token grids of the samples' own tokenizer."""
    val, _, _, val_meta = read_tokens(path)
    described = lambda m: (list(m["grid"]), m["vocab_size"], m.get("tokenizer") or "discriminative")  # noqa: E731
    if described(val_meta) != described(meta):
        raise ConfigError(f"{path}: (grid, codes, tokenizer) {described(val_meta)} but the samples have "
                          f"{described(meta)}; pass the val tokens of the samples' tokenizer (--val-tokens)")
    return val[:n]


def token_roundtrip(tokenize, renderer, val: np.ndarray, images: np.ndarray, tokens: np.ndarray,
                    batch_size: int) -> dict:
    """Do the rendered images carry the tokens they were rendered from? The real val grids (rendered here) and the
    samples' images are tokenized again: the fraction of positions whose token comes back unchanged."""
    val_images = np.concatenate([renderer.render(val[i:i + batch_size]) for i in range(0, len(val), batch_size)])
    return {"val": round(kept_fraction(tokenize, val_images, val, batch_size), 6), "val_images": len(val),
            "samples": round(kept_fraction(tokenize, images, tokens, batch_size), 6), "sample_images": len(tokens)}


if __name__ == "__main__":
    run(main)
