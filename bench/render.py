"""Benchmark: the rendering paths of `decode` side by side, on the same sampled DiGIT tokens.

Loads the trained renderers of the workspace run (models/decoder, models/stage2_ar, and
models/stage2_nar when `train_stage2@nar` was run: a stage-2 folder holds its VQGAN) and the DiGIT
GPT's samples (data/samples/digit/tokens.parquet), then times per image:

    direct      DiGIT tokens -> decoder
    stage2_ar   DiGIT tokens -> Stage2AR (KV cache, top-p) -> VQGAN decoder
    stage2_nar  DiGIT tokens -> Stage2NAR (MaskGIT, nar_steps passes) -> VQGAN decoder (if trained)

and, for stage 2 AR, KV-cache decoding against recomputing the whole sequence for every token
(greedy, so both must give identical tokens; checked). Rounds alternate between paths so background
load hits all alike; the best round of each is reported, as ratios to `direct`. Needs `dvc repro`.

    python bench/render.py [--batch 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from digit.params import load_params
from digit.render import load_renderer, stage2_sampling
from digit.tokens import read_tokens


@torch.no_grad()
def recompute_greedy(model, digit: torch.Tensor) -> torch.Tensor:
    """Stage-2 AR greedy decoding without a cache: the whole [DiGIT][SEP][VQ prefix] sequence per token."""
    out = torch.zeros(len(digit), 0, dtype=torch.long)
    for _ in range(model.config.positions):
        logits = model.logits(digit, out)[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", default="data/samples/digit/tokens.parquet", help="output of `sample@digit`")
    args = parser.parse_args()
    params = load_params()
    tokens, _, _, meta = read_tokens(args.tokens)
    batch = tokens[:args.batch]
    models = {"direct": "models/decoder", "stage2_ar": "models/stage2_ar", "stage2_nar": "models/stage2_nar"}
    renderers = {kind: load_renderer(meta, kind, folder, "cpu",
                                     sampling=stage2_sampling(params["stage2"], kind) if kind != "direct" else None)
                 for kind, folder in models.items()
                 if kind != "stage2_nar" or Path(folder).is_dir()}  # NAR: not in the default DAG
    best = {kind: float("inf") for kind in renderers}
    for _ in range(args.rounds):
        for kind, renderer in renderers.items():
            started = time.perf_counter()
            images = renderer.render(batch)
            best[kind] = min(best[kind], (time.perf_counter() - started) / len(batch))
            assert images.shape[0] == len(batch)
    print(f"per image, best of {args.rounds} rounds on {len(batch)} sampled DiGIT grids ({torch.get_num_threads()} threads):")
    for kind, seconds in best.items():
        print(f"  {kind:<11} {1000 * seconds:8.3f} ms   {seconds / best['direct']:7.1f}x direct")

    ar = renderers["stage2_ar"].stage2
    digit = torch.as_tensor(batch[:16]).long()
    cache_s = recompute_s = float("inf")
    for _ in range(args.rounds):
        started = time.perf_counter()
        cached = ar.generate(digit, temperature=0.0)
        cache_s = min(cache_s, time.perf_counter() - started)
        started = time.perf_counter()
        full = recompute_greedy(ar, digit)
        recompute_s = min(recompute_s, time.perf_counter() - started)
    assert torch.equal(cached, full), "KV-cache and full-recompute greedy decoding disagree"
    print(f"stage2_ar greedy on 16 grids: KV cache {1000 * cache_s:.1f} ms, full recompute {1000 * recompute_s:.1f} ms "
          f"-> cache {recompute_s / cache_s:.1f}x faster, identical tokens")


if __name__ == "__main__":
    main()
