"""Reconstruction quality of tokenizer + decoder on val: PSNR, SSIM and rFID.

rFID is the FID between decoded val token grids and the cached Inception
features of the val reference set (stage `reference`), so it is directly
comparable with `fid_floor` (two disjoint real sets of the same sizes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from digit.decoder import PairedImages, TokenDecoder
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
def reconstruct(decoder: TokenDecoder, val: PairedImages, n_images: int, batch_size: int, device):
    """(originals, reconstructions) uint8 [n, H, W, C] of the first n val images, in file order."""
    decoder = decoder.to(device).eval()
    originals, recons = [], []
    for tokens, images in val.batches(batch_size, 0, 0, shuffle=False, limit=n_images):
        recons.append(decoder.decode(torch.from_numpy(tokens).to(device)).cpu().numpy())
        originals.append(images)
    return np.concatenate(originals), np.concatenate(recons)


def reconstruction_report(decoder: TokenDecoder, val: PairedImages, n_images: int, batch_size: int,
                          reference: str | Path, inception_weights: str, device) -> dict:
    originals, recons = reconstruct(decoder, val, n_images, batch_size, device)
    psnr, ssim = image_quality(originals, recons)
    ref = load_features(Path(reference) / "val.npz")
    feats = InceptionFeatures(inception_weights, device=device)(recons, batch_size=batch_size, desc="rFID")
    return {"images": len(recons), "reference_size": len(ref["pool"]),
            "psnr": round(float(np.mean(psnr)), 4), "ssim": round(float(np.mean(ssim)), 5),
            "rfid": round(float(fid_between(feats, ref)), 4)}
