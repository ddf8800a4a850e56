"""digit.paint, the pixel decoders' shared recipe: the feature loss, token corruption, and the loss's schedule."""

from __future__ import annotations

import pytest
import torch

from digit.errors import ConfigError
from digit.paint import FeatureLoss, PaintLoss, corrupt_tokens


@pytest.fixture(scope="module")
def feature_loss() -> FeatureLoss:
    # The default network's architecture with random weights: the same code path, no weight files read.
    return FeatureLoss("tf_efficientnet_lite0", "none", [-4, -3, -2], 112)


def test_feature_loss_is_zero_on_the_image_itself_and_sends_gradients_only_to_the_rendering(feature_loss):
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 28, 28, generator=gen) * 2 - 1
    assert feature_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    recon = (target + 0.3 * torch.randn(2, 3, 28, 28, generator=gen)).requires_grad_(True)
    loss = feature_loss(recon, target)
    loss.backward()
    assert loss.item() > 0 and recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in feature_loss.parameters())  # the network stays frozen
    assert feature_loss.indices == [1, 2, 3]  # -2 is the tokenizer's layer (the 7x7 grid at 112 px)


def test_feature_loss_names_a_bad_layer():
    with pytest.raises(ConfigError, match=r"feature_loss.layers \[7\] out of range"):
        FeatureLoss("tf_efficientnet_lite0", "none", [-2, 7], 112)
    with pytest.raises(ConfigError, match="feature_loss.layers is empty"):
        FeatureLoss("tf_efficientnet_lite0", "none", [], 112)


def test_corrupt_tokens_is_bounded_deterministic_and_independent_of_the_process_count():
    tokens = torch.arange(64 * 49).reshape(64, 49) % 512
    out = corrupt_tokens(tokens, 0.2, 512, seed=3, step=7)
    changed = (out != tokens).float().mean(1)
    assert 0 < changed.mean() < 0.2 and changed.max() <= 0.35  # per-row rates drawn in [0, 0.2)
    assert torch.equal(out, corrupt_tokens(tokens, 0.2, 512, seed=3, step=7))  # a resumed run: same positions
    assert not torch.equal(out, corrupt_tokens(tokens, 0.2, 512, seed=3, step=8))
    halves = [corrupt_tokens(tokens[r * 32:(r + 1) * 32], 0.2, 512, seed=3, step=7, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), out)  # two ranks' parts = one process's batch
    assert corrupt_tokens(tokens, 0.0, 512, seed=3, step=7) is tokens


def test_paint_loss_switches_terms_on_at_their_steps(feature_loss):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from digit.gan import PatchDiscriminator

    cfg = {"feature_weight": 1.0, "adv_weight": 0.1, "disc_start": 2, "adv_start": 4}
    torch.manual_seed(0)
    disc = PatchDiscriminator(width=8)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True)
    try:
        paint = PaintLoss(cfg, accelerator, disc, opt, feature_loss, feature_images=1)
        real, fake = torch.rand(2, 3, 28, 28) * 2 - 1, torch.zeros(2, 3, 28, 28)
        _, early = paint.generator(fake, real, step=0)
        _, late = paint.generator(fake, real, step=4)
        assert set(early) == {"train/l1", "train/feature"} and "train/g_adv" in late
        assert paint.discriminator(real, fake, step=1) == {}
        assert set(paint.discriminator(real, fake, step=2)) == {"train/d_loss", "train/d_real", "train/d_fake",
                                                                  "train/d_acc"}
        with pytest.raises(ConfigError, match="disc_start=5 is after adv_start=4"):
            PaintLoss({**cfg, "disc_start": 5}, accelerator, disc, opt, None)
    finally:
        AcceleratorState._reset_state(True)


def test_vqgan_paints_corrupted_codes_without_changing_its_tokens_or_losses():
    from digit.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(image_size=28, grid=7, k=16, dim=8, width=8)).eval()
    images = torch.rand(2, 3, 28, 28)
    clean, loss, tokens, _ = vq(images)
    noisy, loss_noisy, tokens_noisy, _ = vq(images, lambda t: corrupt_tokens(t, 0.9, 16, seed=0, step=0))
    assert torch.equal(tokens, tokens_noisy) and torch.equal(loss, loss_noisy)
    assert not torch.allclose(clean, noisy)
    same, *_ = vq(images, lambda t: t)
    assert torch.allclose(same, clean, atol=1e-6)
