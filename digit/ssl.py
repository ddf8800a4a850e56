"""Self-supervised encoder training by self-distillation (DINO, Caron et al. 2021) for stage `train_encoder`.

The paper's tokens come from DINOv2, a ViT trained without labels. DINOv2 weights cannot
be fetched here, so a small ViT (timm, `encoder.name` with the keywords of the
`train_encoder` section) is trained on the train images the same way:

- a student and an EMA teacher of the same architecture, each a backbone (the ViT's class
  token) + a projection head to `head_output_dim` prototypes;
- multi-crop views: two global crops at the encoder's input size go through both networks,
  `local_views` small crops through the student only; the student matches the teacher's
  output of every *other* view (cross-entropy);
- centring and sharpening of the teacher's output keep it from collapsing.

lightly provides the DINO pieces (DINOProjectionHead, DINOLoss with its centre,
update_momentum, cosine_schedule, DINOTransform); this module only wires them to our
data, adds Gaussian noise as an optional augmentation (the same SNR definition as the
stability measurement, digit.stability.signal_power), and holds the linear probe of the
encoder's pooled features.

Augmentations are data, not decoration, for the paper's stability claim: `blur` (DINO's
Gaussian blur) and `noise_prob` (Gaussian noise at an SNR drawn from `noise_snr_db`)
switch the two corruptions that could teach the encoder to ignore noise, so an arm
without them tells self-supervision apart from the augmentation list.

Every random draw of a step (crops, jitter, blur, noise) is seeded by (seed, step), so a
resumed run repeats the views of an uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image

from digit.errors import ConfigError

# timm keywords of encoder.name that the train_encoder section sets (recorded with the weights).
ARCH_KEYS = ("depth", "embed_dim", "num_heads")


def model_kwargs(cfg: dict) -> dict:
    """The architecture keywords a consumer needs to rebuild the trained backbone (no classifier)."""
    return {**{k: cfg[k] for k in ARCH_KEYS}, "num_classes": 0}


def check_vit(name: str, img_size: int, kwargs: dict, local_crop_size: int) -> int:
    """ConfigError unless `name` is a timm ViT whose patches tile both crop sizes; returns its patch size."""
    from digit.encoders import PIXELS, meta_model

    if name == PIXELS or not name:
        raise ConfigError(f"encoder.name={name!r}: encoder.weights=trained trains a ViT; set encoder.name to a "
                          "timm ViT, e.g. vit_tiny_patch16_224")
    try:
        plain = meta_model(name)
    except RuntimeError as e:  # timm: unknown model
        raise ConfigError(f"encoder.name={name!r}: {e}; pick a timm ViT, e.g. vit_tiny_patch16_224")
    if getattr(plain, "patch_embed", None) is None or not hasattr(plain, "cls_token"):
        raise ConfigError(f"encoder.name={name!r} is not a ViT with a class token; encoder.weights=trained "
                          "trains one, e.g. vit_tiny_patch16_224")
    try:
        model = meta_model(name, img_size, kwargs)
    except (TypeError, RuntimeError, AssertionError) as e:
        raise ConfigError(f"encoder.name={name!r} does not take the train_encoder keywords {kwargs}: {e}")
    embed = model.patch_embed
    patch = int(embed.patch_size[0])
    for key, size in (("encoder.img_size", img_size), ("train_encoder.local_crop_size", local_crop_size)):
        if size % patch:
            raise ConfigError(f"{key}={size} is not a multiple of {name}'s patch size {patch}, e.g. "
                              f"{patch * max(1, round(size / patch))}")
    return patch


def backbone(name: str, img_size: int, kwargs: dict) -> nn.Module:
    """The ViT as trained: its class token out (no classifier); other input sizes (local crops) allowed."""
    return timm.create_model(name, pretrained=False, img_size=img_size, dynamic_img_size=True, **kwargs)


class Projected(nn.Module):
    """backbone -> DINO projection head: one network of the student/teacher pair."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def student_and_teacher(name: str, img_size: int, cfg: dict) -> tuple[Projected, Projected]:
    """A fresh student (seeded by the caller) and its teacher: the same weights, frozen, updated only by EMA."""
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad

    def network() -> Projected:
        net = backbone(name, img_size, model_kwargs(cfg))
        return Projected(net, DINOProjectionHead(net.num_features, cfg["head_hidden_dim"], cfg["head_bottleneck_dim"],
                                                 cfg["head_output_dim"],
                                                 freeze_last_layer=cfg["freeze_last_layer_steps"]))

    student = network()
    with torch.random.fork_rng(devices=[]):  # the teacher's own init is overwritten: leave the RNG as it was
        teacher = network()
    teacher.load_state_dict(student.state_dict())  # (deepcopy fails on the head's weight norm)
    deactivate_requires_grad(teacher)
    return student, teacher


def view_transform(cfg: dict, source_size: int, img_size: int):
    """DINO's multi-crop transform (lightly), made at the stored image size: PIL image -> [2 global +
    local_views] float [3, s, s] tensors in [0, 1]. Crops are cut at the stored resolution and resized to the
    encoder's afterwards (`at_encoder_size`), as the encoder resizes every image it sees, and as the
    stability stage adds its noise (at the stored resolution): a global crop is the whole stored size, a
    local crop local_crop_size * source_size / img_size, and the blur's sigmas are DINO's in encoder
    pixels. Normalisation comes after the noise (`normalized`)."""
    from lightly.transforms.dino_transform import DINOTransform

    scale = source_size / img_size
    local = cfg["local_crop_size"] * source_size // img_size
    if local * img_size != cfg["local_crop_size"] * source_size or local < 1:
        raise ConfigError(f"train_encoder.local_crop_size={cfg['local_crop_size']}: crops are cut at the stored "
                          f"{source_size} px and resized by {img_size}/{source_size}; pick a multiple of "
                          f"{img_size // np.gcd(img_size, source_size)}")
    blur = (1.0, 0.1, 0.5) if cfg["blur"] else (0.0, 0.0, 0.0)  # DINO's per-view probabilities
    return DINOTransform(global_crop_size=source_size, local_crop_size=local, n_local_views=cfg["local_views"],
                         local_crop_scale=(0.05, 0.4), gaussian_blur=blur, sigmas=(0.1 * scale, 2.0 * scale),
                         normalize=None)


def at_encoder_size(views: list[torch.Tensor], factor: float) -> list[torch.Tensor]:
    """Each view resized by img_size / source_size with the encoder's float path (bicubic, antialiased)."""
    import torch.nn.functional as F

    return [v if factor == 1 else F.interpolate(v, size=(round(v.shape[-2] * factor), round(v.shape[-1] * factor)),
                                                mode="bicubic", antialias=True, align_corners=False)
            for v in views]


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed every generator the transforms and the noise draw from (torch, numpy, random) for one step
    of one process: the views depend on (seed, step, rank) only, so a resumed run repeats them."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def make_views(transform, images: np.ndarray) -> list[torch.Tensor]:
    """uint8 [B, H, W, 3] -> one float [B, 3, S, S] batch per view (globals first)."""
    per_image = [transform(Image.fromarray(image)) for image in images]
    return [torch.stack(view) for view in zip(*per_image)]


def add_noise(views: list[torch.Tensor], prob: float, snr_db: tuple[float, float]) -> list[torch.Tensor]:
    """Gaussian noise on each view of each image with probability `prob`, at an SNR drawn uniformly in dB
    from `snr_db` (sigma^2 = P / 10^(SNR/10), P = mean(x^2): the stability stage's definition); not clipped."""
    from digit.stability import signal_power

    if prob <= 0:
        return views
    out = []
    for x in views:
        snr = torch.empty(len(x), dtype=torch.float64).uniform_(*snr_db)
        sigma = (signal_power(x) / 10.0 ** (snr / 10.0)).sqrt().float()
        hit = (torch.rand(len(x)) < prob).float()
        out.append(x + torch.randn_like(x) * (sigma * hit).view(-1, 1, 1, 1))
    return out


def normalized(views: list[torch.Tensor], mean, std) -> list[torch.Tensor]:
    """The encoder's own input normalisation (timm's data config, as digit.encoders applies it)."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return [(v - mean) / std for v in views]


@torch.no_grad()
def pooled_features(encoders: dict, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean over the token grid of each frozen FeatureEncoder's features, per image, with the labels:
    what a linear probe of an encoder reads. `batches` yields (uint8 images [B, H, W, 3], labels [B]);
    each batch is read once and goes through every encoder."""
    feats, labels = {name: [] for name in encoders}, []
    for images, y in batches:
        for name, encoder in encoders.items():
            feats[name].append(encoder(images).float().mean(dim=(1, 2)).cpu())
        labels.append(torch.as_tensor(y))
    if not labels:
        raise ConfigError("the encoder probe got no images; raise train_encoder.probe_images")
    return {name: torch.cat(f) for name, f in feats.items()}, torch.cat(labels).long()
