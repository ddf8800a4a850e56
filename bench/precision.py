"""Benchmark: one training step of each trainer's model, bf16 autocast / fp32, side by side in one run.

The four models at the default params.yaml shapes (GPT, direct decoder with its PatchGAN,
VQGAN with its PatchGAN, stage-2 AR), random inputs of the default batch, forward + loss +
backward + AdamW step. Rounds alternate fp32 and bf16 so both see the same machine load.
The ratio is why `precision: auto` trains in bf16 where the CPU has it (and how much it buys per model).

    python bench/precision.py [--steps 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from digit.decoder import DecoderConfig, TokenDecoder
from digit.gan import PatchDiscriminator, generator_loss
from digit.gpt import GPT, GPTConfig
from digit.params import load_params
from digit.precision import native_bf16, unsupported
from digit.stage2 import Stage2Config, build_stage2
from digit.training import sequence_loss
from digit.vqgan import VQGAN, VQGANConfig

GRID, K, CLASSES, SIZE, CODE_DIM = (7, 7), 512, 10, 28, 112  # the default run's tokens and images


def steps(p: dict) -> dict:
    """name -> step(bf16: bool) for the four trainers' models at the default shapes."""
    torch.manual_seed(0)
    g = p["gpt"]
    gpt = GPT(GPTConfig(vocab_size=K, block_size=GRID[0] * GRID[1] + 1, num_classes=CLASSES, n_layer=g["n_layer"],
                        n_head=g["n_head"], n_embd=g["n_embd"], dropout=g["dropout"], bias=g["bias"])).train()
    gpt_opt = gpt.configure_optimizer(g["weight_decay"], g["lr"], (g["beta1"], g["beta2"]))
    labels, tokens = torch.randint(0, CLASSES, (g["batch_size"],)), torch.randint(0, K, (g["batch_size"], 49))
    d = p["decoder"]
    dec = TokenDecoder(DecoderConfig(vocab_size=K, code_dim=CODE_DIM, grid=GRID, image_size=SIZE, width=d["width"],
                                     n_attn=d["n_attn"], n_head=d["n_head"], n_res=d["n_res"])).train()
    v = p["vqgan"]
    vq = VQGAN(VQGANConfig(image_size=SIZE, grid=v["grid"], k=v["k"], dim=v["dim"], width=v["width"],
                           n_res=v["n_res"], seed=0)).train()
    disc = PatchDiscriminator(3)
    dec_opt, vq_opt = torch.optim.AdamW(dec.parameters()), torch.optim.AdamW(vq.parameters())
    images = torch.rand(d["batch_size"], 3, SIZE, SIZE)
    s = p["stage2"]
    s2 = build_stage2(Stage2Config(digit_k=K, vq_k=v["k"], grid=GRID, kind="ar", n_layer=s["n_layer"],
                                   n_head=s["n_head"], n_embd=s["n_embd"], dropout=s["dropout"])).train()
    s2_opt = s2.configure_optimizer(s["weight_decay"], s["lr"], (0.9, 0.95))
    digit, vq_tokens = torch.randint(0, K, (s["batch_size"], 49)), torch.randint(0, v["k"], (s["batch_size"], 49))

    def run(model_loss, opt):
        def step(bf16: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def vq_loss():
        recon, commit, _, _ = vq(images)
        return (recon.float() - images).abs().mean() + commit.float() + generator_loss(disc, recon * 2 - 1)

    return {
        "gpt": run(lambda: sequence_loss(gpt(labels, tokens[:, :-1]), tokens, g["label_smoothing"]), gpt_opt),
        "decoder": run(lambda: (dec(tokens).float() - (images * 2 - 1)).abs().mean()
                       + generator_loss(disc, dec(tokens)), dec_opt),
        "vqgan": run(vq_loss, vq_opt),
        "stage2_ar": run(lambda: s2(digit, vq_tokens), s2_opt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if not native_bf16("cpu"):  # `precision: auto` trains in fp32 here; an emulated bf16 step takes minutes
        raise SystemExit(f"bench/precision.py: nothing to compare on this machine: {unsupported('bf16', 'cpu')}")
    for name, step in steps(load_params()).items():
        for bf16 in (False, True, False, True):  # warm-up, both precisions
            step(bf16)
        times = {False: [], True: []}
        for _ in range(args.steps):
            for bf16 in (False, True):
                started = time.perf_counter()
                step(bf16)
                times[bf16].append(time.perf_counter() - started)
        fp32, bf16 = float(np.median(times[False])), float(np.median(times[True]))
        print(f"{name:10s} fp32 {fp32:.3f} s/step  bf16 {bf16:.3f} s/step  bf16 speed-up {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
