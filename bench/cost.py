"""Benchmark: the cost model (digit/cost.py) against this machine, side by side in one run.

For each trainer at the default shapes (the step functions of bench/precision.py: forward, loss,
backward, AdamW step on random inputs of the default batch), three numbers:

    counted   FLOPs of one real step under FlopCounterMode (what the machine actually ran)
    predicted FLOPs per step from digit.cost's meta-device count (what the cost model assumes)
    measured  median wall time of the step, here

and utilisation = counted / (time x this CPU's matmul peak, measured in the same run at the
precision the stage trains at). predicted/counted checks the model's FLOP counts; utilisation is
the number to put into `python -m digit.cost --utilisation` for a machine like this one.

    python bench/cost.py [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from digit import cost
from digit.params import load_params
from digit.precision import native_bf16, resolve_precision
from precision import CLASSES, CODE_DIM, GRID, K, SIZE, steps


def predicted_per_step(p: dict) -> dict[str, float]:
    """FLOPs of one step of each bench step function, from digit.cost's meta-device counts."""
    positions = GRID[0] * GRID[1]
    gpt_train, _, _ = cost.gpt_flops(p, K, positions, CLASSES)
    dec_train, _, _, _ = cost.decoder_flops(p, K, CODE_DIM, GRID, SIZE)
    vq_train, _, _, _, _ = cost.vqgan_flops(p, SIZE)
    s2_train, _, _ = cost.stage2_flops(p, K, p["vqgan"]["k"], GRID)
    # The bench's decoder step runs the decoder twice (L1 and generator loss), and it and the VQGAN step
    # add the generator loss through the discriminator (forward + backward into the image).
    with torch.device("meta"):
        from digit.gan import PatchDiscriminator

        disc, image = PatchDiscriminator(3), torch.empty(1, 3, SIZE, SIZE, requires_grad=True)
    through_disc = cost.count_flops(lambda: disc(image).sum().backward())
    return {"gpt": gpt_train * p["gpt"]["batch_size"],
            "decoder": (2 * dec_train + through_disc) * p["decoder"]["batch_size"],
            "vqgan": (vq_train + through_disc) * p["vqgan"]["batch_size"],
            "stage2_ar": s2_train * p["stage2"]["batch_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    p = load_params()
    fp32_peak = cost.matmul_peak(torch.float32, seconds=2.0)
    bf16_peak = cost.matmul_peak(torch.bfloat16, seconds=2.0) if native_bf16("cpu") else None
    print(f"{torch.get_num_threads()} threads; matmul peak fp32 {fp32_peak / 1e9:.0f} GFLOP/s, bf16 "
          + (f"{bf16_peak / 1e9:.0f} GFLOP/s" if bf16_peak else "not native here (trainers run fp32)"))
    predicted = predicted_per_step(p)
    section = {"gpt": "gpt", "decoder": "decoder", "vqgan": "vqgan", "stage2_ar": "stage2"}
    for name, step in steps(p).items():
        bf16 = resolve_precision(p[section[name]]["precision"], "cpu") == "bf16"
        step(bf16)  # warm-up
        counted = cost.count_flops(lambda: step(bf16))
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            step(bf16)
            times.append(time.perf_counter() - started)
        seconds = float(np.median(times))
        peak = bf16_peak if bf16 else fp32_peak
        print(f"{name:10s} {'bf16' if bf16 else 'fp32'}  counted {counted / 1e9:7.1f} GFLOP/step, predicted "
              f"{predicted[name] / 1e9:7.1f} ({predicted[name] / counted:.2f}x), measured {seconds:.3f} s/step "
              f"-> {counted / seconds / 1e9:5.1f} GFLOP/s = utilisation {counted / seconds / peak:.2f}")


if __name__ == "__main__":
    main()
