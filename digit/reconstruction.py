"""Reconstruction quality on val, one report for every renderer: PSNR, SSIM and rFID.

rFID is the FID between rendered val images and the cached Inception features of
the val reference set (stage `reference`), so it is directly comparable with
`fid_floor` (two disjoint real sets of the same sizes) and with sample FID.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from digit.fid import InceptionFeatures, fid_between, load_features

PSNR_CAP = 100.0  # a pixel-exact reconstruction has infinite PSNR; cap it so means stay finite


def image_quality(originals: np.ndarray, recons: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of uint8 [N, H, W, C] pairs (scikit-image, data range 255)."""
    psnr, ssim = [], []
    for a, b in zip(originals, recons):
        exact = np.array_equal(a, b)  # skimage would divide by a zero error
        psnr.append(PSNR_CAP if exact else min(PSNR_CAP, float(peak_signal_noise_ratio(a, b, data_range=255))))
        ssim.append(float(structural_similarity(a, b, channel_axis=-1, data_range=255)))
    return psnr, ssim


@torch.no_grad()
def mean_l1(model: torch.nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean per-image L1 of (reconstruction, target) float [B, C, H, W] pairs that `pairs` makes with `model`
    (in eval mode while it runs; same value on every rank)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for recon, target in pairs:
        total += (recon.float() - target.to(recon.device)).abs().mean(dim=(1, 2, 3)).sum().item()
        count += len(recon)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def reconstruction_report(render: Callable, batches: Iterable, reference: str | Path, inception_weights: str,
                          device, batch_size: int) -> dict:
    """Render each (inputs, original uint8 [B, H, W, 3]) of `batches` with render(inputs) -> uint8 images:
    PSNR, SSIM, rFID against the cached val reference, and seconds per image (rendering only)."""
    originals, recons, seconds = [], [], 0.0
    for inputs, images in batches:
        started = time.perf_counter()
        recons.append(np.asarray(render(inputs)))
        seconds += time.perf_counter() - started
        originals.append(images)
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    psnr, ssim = image_quality(originals, recons)
    ref = load_features(Path(reference) / "val.npz")
    feats = InceptionFeatures(inception_weights, device=device)(recons, batch_size=batch_size, desc="rFID")
    return {"images": len(recons), "reference_size": len(ref["pool"]),
            "psnr": round(float(np.mean(psnr)), 4), "ssim": round(float(np.mean(ssim)), 5),
            "rfid": round(float(fid_between(feats, ref)), 4),
            "seconds_per_image": round(seconds / len(recons), 6), "device": str(device)}
