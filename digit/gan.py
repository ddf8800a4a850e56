"""The adversarial term of the pixel decoders' recipe (digit.paint): a PatchGAN with hinge loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: real/fake logits per receptive field (~11 px), not per image. Inputs in [-1, 1]."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, width * 2, 3, 1, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, 1, 3, 1, 1))

    def forward(self, x):
        return self.net(x)


def generator_loss(disc: PatchDiscriminator, fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge term: raise the discriminator's logits on its images."""
    return -disc(fake).float().mean()


def discriminator_step(accelerator, disc: PatchDiscriminator, optimizer, real: torch.Tensor,
                       fake: torch.Tensor) -> dict:
    """One hinge-loss update of the discriminator on real vs detached fake images. Returns, averaged over ranks,
    its loss (2 at chance, 0 when every patch is beyond the margin), the mean logits on real and fake patches,
    and d_acc, the fraction of patches on the right side of 0: the curves that show it separating them."""
    with accelerator.autocast():
        real_logits, fake_logits = disc(real).float(), disc(fake.detach()).float()
        loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    with torch.no_grad():
        acc = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
        stats = {"train/d_loss": loss, "train/d_real": real_logits.mean(), "train/d_fake": fake_logits.mean(),
                 "train/d_acc": acc}
    return {k: accelerator.reduce(v.detach(), "mean").item() for k, v in stats.items()}
