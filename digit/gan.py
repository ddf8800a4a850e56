"""The adversarial term shared by the pixel decoders (`train_decoder`, `train_vqgan`): a PatchGAN with hinge loss."""

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
                       fake: torch.Tensor) -> float:
    """One hinge-loss update of the discriminator on real vs detached fake images; its loss, averaged over ranks."""
    with accelerator.autocast():
        loss = (F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake.detach())).mean()).float()
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return accelerator.reduce(loss.detach(), "mean").item()
