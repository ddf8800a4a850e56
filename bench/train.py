"""Benchmark: `train` stage tokens/s vs a bare PyTorch loop over the same model and batch, side by side.

Stage = `python -m stages.train` itself (Accelerate, streamed Parquet batches,
label dropout, clipping, scheduler, DVCLive logging every step) for --steps
steps; its per-step tokens/s comes from its DVCLive curve (median after warm-up).
Bare = the same GPT config and batch size: forward, label-smoothed CE,
backward, AdamW step on ready tensors, nothing else. Rounds alternate.
Also: bare loop in bf16 autocast and with torch.compile, vs bare fp32.

    python bench/train.py [--steps 40] [--rounds 2] [--compile]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from digit.gpt import GPT
from digit.params import Yaml12Loader, load_params
from digit.precision import native_bf16, resolve_precision, unsupported
from digit.tokens import TokenBatches, read_metadata
from digit.training import gpt_config, sequence_loss


def bare_tokens_per_s(cfg, meta, batch, steps: int, precision: str = "fp32", compile_: bool = False) -> float:
    torch.manual_seed(0)
    model = GPT(gpt_config(cfg, meta)).train()
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["lr"], (cfg["beta1"], cfg["beta2"]))
    fwd = torch.compile(model) if compile_ else model
    labels, tokens = batch

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sequence_loss(fwd(labels, tokens[:, :-1]), tokens, cfg["label_smoothing"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return tokens.numel() / float(np.median(times))


def stage_tokens_per_s(params: Path, tokens_dir: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        p = yaml.load(params.read_text(), Loader=Yaml12Loader)
        p["gpt"].update(max_steps=steps, eval_every=10 * steps, checkpoint_every=10 * steps)
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(p))
        root = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, "-m", "stages.train", "--name", "bench_train", "--params", f"{tmp}/params.yaml",
                        "--tokens", str(Path(tokens_dir).resolve()), "--out", f"{tmp}/gpt", "--live", f"{tmp}/live",
                        "--checkpoints", f"{tmp}/ck"], cwd=tmp, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(root)})
        curve = pd.read_csv(Path(tmp) / "live" / "plots" / "metrics" / "train" / "tokens_per_s.tsv", sep="\t")
        return float(curve["tokens_per_s"].iloc[3:].median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokens", default="data/tokens", help="a tokenizer's tokens: data/tokens (`tokenize`) or "
                        "data/vq_tokens (`vq_tokenize`)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = parser.parse_args()
    cfg = load_params(args.params)["gpt"]
    path = Path(args.tokens) / "train.parquet"
    meta = read_metadata(path)
    labels, tokens = next(TokenBatches(path, cfg["batch_size"], 0).epoch(0))
    batch = (torch.from_numpy(labels), torch.from_numpy(tokens))

    # The bare loop runs at the stage's precision (gpt.precision), so the ratio is the stage's overhead only.
    precision = "bf16" if resolve_precision(cfg["precision"], "cpu") == "bf16" else "fp32"
    results = {"stage": [], "bare": []}
    for _ in range(args.rounds):
        results["stage"].append(stage_tokens_per_s(Path(args.params), args.tokens, args.steps))
        results["bare"].append(bare_tokens_per_s(cfg, meta, batch, args.steps, precision=precision))
    best = {k: max(v) for k, v in results.items()}
    print(f"GPT {cfg['n_layer']}x{cfg['n_embd']} ({cfg['n_head']} heads), batch {cfg['batch_size']} x "
          f"{tokens.shape[1]} tokens, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps, "
          f"{precision}")
    for key, name in (("bare", "bare PyTorch loop"), ("stage", "train stage")):
        print(f"{name:22s}: {best[key]:9,.0f} tok/s  (rounds: {', '.join(f'{v:,.0f}' for v in results[key])})")
    print(f"ratio stage/bare       : {best['stage'] / best['bare']:.3f}   (floor 0.9)")
    other = "fp32" if precision == "bf16" else "bf16"
    if other == "bf16" and not native_bf16("cpu"):  # emulated bf16 runs about 100x slower: not worth the wait
        print(f"bare bf16             : skipped, {unsupported('bf16', 'cpu')}")
    else:
        alt = bare_tokens_per_s(cfg, meta, batch, args.steps, precision=other)
        print(f"bare {other:17s}: {alt:9,.0f} tok/s  ({alt / best['bare']:.2f}x {precision})")
    if args.compile:
        compiled = bare_tokens_per_s(cfg, meta, batch, args.steps, compile_=True)
        print(f"bare torch.compile     : {compiled:9,.0f} tok/s  ({compiled / best['bare']:.2f}x eager)")


if __name__ == "__main__":
    main()
