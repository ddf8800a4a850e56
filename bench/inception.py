"""Benchmark: Inception feature throughput (img/s) for 28x28 grayscale images, side by side.

Pipeline = `digit.fid.InceptionFeatures` on numpy uint8 [B, 28, 28] grayscale
batches: repeat to RGB, NHWC -> NCHW, forward (TF1 resize to 299, pool3),
float64 to cpu, tqdm. Bare = torch-fidelity's extractor forward alone on
ready uint8 [B, 3, 28, 28] tensors on the device. Both use the same weights
(`--weights`, default the offline ones), batch size and device.
Rounds alternate so machine noise hits both alike; the best round of each counts.
On CPU it also times torch-fidelity's eager network against the one InceptionFeatures runs there
(BatchNorm folded into the convolutions, channels-last), with the largest feature difference between them.

    python bench/inception.py [--images 16] [--batch-size 8] [--rounds 3] [--weights offline]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from digit.fid import InceptionFeatures
from digit.weights import INCEPTION_EXTRACTOR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", default="offline", help="evaluate.inception_weights setting")
    args = parser.parse_args()

    feats = InceptionFeatures(args.weights, batch_size=args.batch_size, progress=False)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8)
    batches = [gray[i: i + args.batch_size] for i in range(0, args.images, args.batch_size)]
    ready = [torch.from_numpy(np.repeat(b[:, None], 3, axis=1)).to(feats.device) for b in batches]

    def sync() -> None:
        if feats.device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for x in ready:
                feats.extractor(x)
        sync()
        return args.images / (time.perf_counter() - start)

    def pipeline() -> float:
        start = time.perf_counter()
        out = feats(np.repeat(b[..., None], 3, axis=-1) for b in batches)  # grayscale -> RGB, NHWC
        assert out["pool"].shape == (args.images, 2048)
        return args.images / (time.perf_counter() - start)

    with torch.inference_mode():  # warm-up: allocator, oneDNN/cuDNN kernels
        feats.extractor(ready[0])
    results = {"bare": [], "pipeline": []}
    for _ in range(args.rounds):
        results["bare"].append(bare())
        results["pipeline"].append(pipeline())
    best = {k: max(v) for k, v in results.items()}
    print(f"inception-v3-compat ({feats.description}), {feats.device}, 28x28 gray->RGB, batch {args.batch_size}, "
          f"{args.images} images/round, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"bare extractor forward: {best['bare']:8.2f} img/s   "
          f"(rounds: {', '.join(f'{v:.2f}' for v in results['bare'])})")
    print(f"InceptionFeatures     : {best['pipeline']:8.2f} img/s   "
          f"(rounds: {', '.join(f'{v:.2f}' for v in results['pipeline'])})")
    print(f"ratio pipeline/bare   : {best['pipeline'] / best['bare']:.3f}   (expected ~1.0)")
    if feats.device.type == "cpu":  # InceptionFeatures' CPU layout (BN folded, channels-last) vs torch-fidelity eager
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        eager = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=feats.path,
                                            verbose=False).eval()
        with torch.inference_mode():
            eager(ready[0])
            speed = {"eager": [], "folded_channels_last": []}
            for _ in range(args.rounds):
                for name, model in (("eager", eager), ("folded_channels_last", feats.extractor)):
                    start = time.perf_counter()
                    for x in ready:
                        model(x)
                    speed[name].append(args.images / (time.perf_counter() - start))
            diff = max(float((eager(x)[0] - feats.extractor(x)[0]).abs().max()) for x in ready)
        fast, slow = max(speed["folded_channels_last"]), max(speed["eager"])
        print(f"BN folded + channels-last / eager: {fast:.2f} / {slow:.2f} img/s = {fast / slow:.2f}x, "
              f"max |feature difference| {diff:.2e}")

if __name__ == "__main__":
    main()
