"""How both pixel decoders learn to paint: one recipe for `train_decoder` (DiGIT tokens -> pixels) and
`train_vqgan` (the baseline's decoder, which the stage-2 renderers also paint through), so the comparison
stays fair.

The loss on a rendered batch is

    L1  +  feature_weight * feature distance  +  adv_weight * PatchGAN hinge term (from adv_start)

- **Feature distance** (FeatureLoss): LPIPS's recipe with a network we have offline. LPIPS's VGG weights
  cannot be fetched here; the `feature_loss` section names a frozen ImageNet encoder instead, by default
  the tokenizer's own (tf_efficientnet_lite0, read at the same 112 px). Features of the rendered and the
  real image are unit-normalised over channels at each tapped layer and their squared distance averaged
  (no learned per-channel weights: those are LPIPS's calibration, not available either). Tapping the
  tokenizer's layer itself asks for exactly what the decoder is for: an image whose features, hence
  tokens, are the ones it was given. It is never the Inception that scores FID.
- **Adversarial term** (digit.gan): the discriminator trains from `disc_start`, before the generator's
  term switches on at `adv_start`, so the decoder meets a critic that already separates real from
  decoded rather than a random one it can fool with noise (the old recipe started both together and the
  hinge loss never left chance, about 2). d_real / d_fake (mean logits) and d_acc (patches on the right
  side of 0) go to DVCLive, so `dvc plots` shows the separation and the decoder's answer to it.
- **Input corruption** (`corrupt_tokens`): each training grid has a fraction of its tokens, drawn per
  image up to `token_noise`, replaced by uniform random codes, while the target stays the clean image:
  the decoder learns to paint plausible images from grids with the kind of errors a sampled grid has
  (RobusTok's point; RAE adds noise to its latents for the same reason).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from digit.errors import ConfigError
from digit.gan import discriminator_step, generator_loss


class FeatureLoss(nn.Module):
    """Mean over tapped layers of the squared distance between channel-normalised features of two image
    batches in [-1, 1]; gradients flow into the first (the rendering), never into the frozen network."""

    def __init__(self, name: str, weights: str, layers: list[int], img_size: int):
        super().__init__()
        from digit.encoders import build_encoder, meta_model

        if not layers:
            raise ConfigError("feature_loss.layers is empty; list the encoder layers to compare, e.g. [-4, -3, -2]")
        n = len(meta_model(name).feature_info)
        bad = [layer for layer in layers if not -n <= layer < n]
        if bad:
            raise ConfigError(f"feature_loss.layers {bad} out of range for {name!r}: use integers in 0..{n - 1} "
                              f"or -{n}..-1")
        self.indices = sorted({layer % n for layer in layers})
        # Built at the deepest layer: build_encoder drops every block after it.
        self.encoder = build_encoder(name, weights, self.indices[-1], img_size)
        self.img_size = img_size

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] in [-1, 1] -> the tapped feature maps, unit-normalised over channels."""
        enc = self.encoder
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.img_size:  # the tokenizer's resize, differentiable
            x = F.interpolate(x, size=(self.img_size,) * 2, mode="bicubic", align_corners=False)
        x = ((x - enc.mean) / enc.std).contiguous(memory_format=torch.channels_last)
        feats = enc.model.forward_intermediates(x, indices=self.indices, intermediates_only=True, stop_early=True)
        return [F.normalize(f.float(), dim=1, eps=1e-6) for f in feats]

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = self.features(target)
        fake = self.features(recon)
        return sum((a - b).pow(2).sum(1).mean() for a, b in zip(fake, real)) / len(real)


def feature_loss_from_params(params: dict, weight: float) -> FeatureLoss | None:
    """The `feature_loss` section's network, or None when the decoder's feature_weight is 0 (nothing built)."""
    if weight <= 0:
        return None
    cfg = params["feature_loss"]
    return FeatureLoss(cfg["name"], cfg["weights"], list(cfg["layers"]), cfg["img_size"])


def corrupt_tokens(tokens: torch.Tensor, max_rate: float, vocab_size: int, seed: int, step: int,
                   rank: int = 0, world: int = 1) -> torch.Tensor:
    """Replace a fraction of each row's tokens (drawn per row in [0, max_rate)) with uniform random codes.

    A pure function of (seed, step) over the global batch of `world` equal parts, of which `tokens` is part
    `rank`: a resumed run corrupts the same positions, and the corruption does not depend on the number of
    processes."""
    if max_rate <= 0:
        return tokens
    n = len(tokens)
    shape = (n * world, *tokens.shape[1:])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rate = torch.rand(shape[0], 1, generator=gen) * max_rate
    rows = slice(rank * n, (rank + 1) * n)
    hit = (torch.rand(shape, generator=gen) < rate)[rows]
    noise = torch.randint(0, vocab_size, shape, generator=gen)[rows]
    return torch.where(hit.to(tokens.device), noise.to(tokens.device), tokens)


class PaintLoss:
    """The recipe above for one decoder section `cfg` (feature_weight, adv_weight, disc_start, adv_start).

    Use, in a training step, with images in [-1, 1]:
        loss, metrics = paint.generator(recon, target, step)   # backward + step the decoder
        metrics.update(paint.discriminator(target, recon, step))
    """

    def __init__(self, cfg: dict, accelerator, disc, opt_d, feature: FeatureLoss | None, feature_images: int = 0):
        self.cfg, self.accelerator, self.disc, self.opt_d = cfg, accelerator, disc, opt_d
        self.feature_images = feature_images
        self.feature = feature.to(accelerator.device) if feature is not None else None
        if cfg["adv_weight"] > 0 and cfg["disc_start"] > cfg["adv_start"]:
            raise ConfigError(f"disc_start={cfg['disc_start']} is after adv_start={cfg['adv_start']}: the decoder "
                              "would meet an untrained discriminator; set disc_start <= adv_start")

    def adversarial(self, step: int) -> bool:
        return self.cfg["adv_weight"] > 0 and step >= self.cfg["adv_start"]

    def generator(self, recon: torch.Tensor, target: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        reduce = self.accelerator.reduce
        l1 = F.l1_loss(recon.float(), target.float())
        loss, metrics = l1, {"train/l1": l1}
        if self.feature is not None:
            n = self.feature_images or len(recon)  # the first n of the batch: the loss network costs 2-4x the decoder
            feat = self.feature(recon[:n], target[:n])
            loss = loss + self.cfg["feature_weight"] * feat
            metrics["train/feature"] = feat
        if self.adversarial(step):
            g = generator_loss(self.disc, recon)
            loss = loss + self.cfg["adv_weight"] * g
            metrics["train/g_adv"] = g
        return loss, {k: reduce(v.detach().float(), "mean").item() for k, v in metrics.items()}

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> dict:
        if self.cfg["adv_weight"] <= 0 or step < self.cfg["disc_start"]:
            return {}
        return discriminator_step(self.accelerator, self.disc, self.opt_d, real, fake)
