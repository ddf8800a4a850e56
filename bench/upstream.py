"""Benchmark: the GPT trained from cached tokens (this pipeline) vs tokens made on every batch (upstream), side by side.

The upstream DiGIT code runs the frozen encoder and the nearest-centroid search on every training batch,
then the GPT step. This pipeline runs both once per image (`extract` + `tokenize`) and trains the GPT from
the token files. One training step at the default params.yaml shapes, on this machine:

    cached    the GPT step on a batch of token ids (forward, loss, backward, AdamW step, gpt.precision)
    upstream  the same batch as images: encoder forward (encoder.precision) + faiss nearest centroid
              (digit.kmeans.Assigner, K = codebook.k) + the same GPT step

Rounds alternate, so both see the same machine load; medians are printed with the ratio upstream/cached.
The whole GPT training of the default (gpt.max_steps steps) is projected both ways: cached = one encoder +
assignment pass over the train images (what extract + tokenize pay once) + the steps; upstream = the steps
with the encoder on every batch. Then, by the cost model (digit/cost.py, FLOPs from the model shapes), the
same FLOP ratio per training sequence for every preset, the paper's included (no ImageNet, no GPU needed):

    python bench/upstream.py [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from digit import cost
from digit.encoders import build_encoder
from digit.gpt import GPT
from digit.kmeans import Assigner
from digit.params import load_params
from digit.precision import AUTOCAST, resolve_precision
from digit.preset import load_preset, names
from digit.training import gpt_config, sequence_loss

CLASSES = 10  # Fashion-MNIST


def gpt_step(p: dict, vocab: int, grid: tuple[int, int]):
    """step(labels, tokens) -> None: one optimizer step of the default GPT, as the trainer takes it."""
    g = p["gpt"]
    torch.manual_seed(0)
    model = GPT(gpt_config(g, {"grid": grid, "vocab_size": vocab, "classes": list(range(CLASSES))})).train()
    opt = model.configure_optimizer(g["weight_decay"], g["lr"], (g["beta1"], g["beta2"]))
    precision = resolve_precision(g["precision"], torch.device("cpu"))

    def step(labels: torch.Tensor, tokens: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            loss = sequence_loss(model(labels, tokens[:, :-1]), tokens, g["label_smoothing"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, precision


def tokenizer(p: dict):
    """images (uint8 [B, S, S, 3]) -> token ids [B, positions]: the encoder and the nearest-centroid search."""
    e = p["encoder"]
    encoder = build_encoder(e["name"], e["weights"], e["layer"], e["img_size"], e["patch_size"])
    precision = resolve_precision(e["precision"], torch.device("cpu"))
    rng = np.random.default_rng(0)
    assign = Assigner(rng.standard_normal((p["codebook"]["k"], encoder.dim)).astype(np.float32))

    def tokens(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            feats = encoder(images)
        ids = assign(feats.float().numpy())
        return torch.from_numpy(ids.reshape(len(images), -1))

    return tokens, encoder.grid


def flop_ratios() -> list[str]:
    """Per preset: cost-model FLOPs of one training sequence, cached vs upstream (encoder + assignment on it)."""
    lines = []
    for name in ["default", *names()]:
        p = load_params() if name == "default" else load_preset(name)
        grid, dim, enc = cost.encoder_geometry_and_flops(p)
        positions, k = grid[0] * grid[1], p["codebook"]["k"]
        train, _, _ = cost.gpt_flops(p, k, positions, 1000 if p["data"]["source"] == "imagefolder" else CLASSES)
        assign = positions * k * dim * 2
        lines.append(f"  {name:22s} GPT {train / 1e9:9.3f} GFLOP/seq  encoder {enc / 1e9:8.3f}  assignment "
                     f"{assign / 1e9:7.3f}  upstream/cached {(train + enc + assign) / train:5.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path (after 2 warm-up rounds)")
    args = parser.parse_args()
    p = load_params()
    g, size = p["gpt"], p["data"]["image_size"]
    make_tokens, grid = tokenizer(p)
    step, precision = gpt_step(p, p["codebook"]["k"], tuple(grid))
    gen = torch.Generator().manual_seed(0)
    batch = g["batch_size"] * g["grad_accum"]
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    cached_tokens = make_tokens(images)  # what tokenize wrote for these images

    times: dict[str, list[float]] = {"cached": [], "upstream": [], "tokens": []}
    for round_ in range(args.steps + 2):
        started = time.perf_counter()
        step(labels, cached_tokens)
        cached = time.perf_counter() - started
        started = time.perf_counter()
        tokens = make_tokens(images)
        made = time.perf_counter() - started
        step(labels, tokens)
        upstream = time.perf_counter() - started
        if round_ >= 2:
            times["cached"].append(cached)
            times["upstream"].append(upstream)
            times["tokens"].append(made)
    cached, upstream, made = (float(np.median(times[k])) for k in ("cached", "upstream", "tokens"))
    n_train, _ = cost.split_sizes(p)
    once = made / batch * n_train  # the encoder + assignment pass over the train images
    print(f"default GPT step, batch {batch}, gpt.precision {precision}, encoder {p['encoder']['name']} "
          f"at {p['encoder']['img_size']} px ({p['encoder']['precision']}), K={p['codebook']['k']}, "
          f"median of {args.steps}:")
    print(f"  cached   {cached:.3f} s/step")
    print(f"  upstream {upstream:.3f} s/step (encoder + assignment {made:.3f} s)  upstream/cached {upstream / cached:.2f}x")
    steps = g["max_steps"]
    print(f"  the default's {steps} steps: cached {once + steps * cached:.0f} s (encoder pass over {n_train:,} "
          f"train images once {once:.0f} s + steps {steps * cached:.0f} s), upstream {steps * upstream:.0f} s: "
          f"{steps * upstream / (once + steps * cached):.2f}x")
    print("cost model, FLOPs per training sequence (GPT forward + backward; upstream adds the encoder forward and the"
          " assignment):")
    print("\n".join(flop_ratios()))


if __name__ == "__main__":
    main()
