"""The pixel decoder: shapes, centroid init, paired streaming, persistence, learning, image metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fmnist
from digit.decoder import DecoderConfig, PairedImages, TokenDecoder, load_decoder, save_decoder, to_unit
from digit.errors import ConfigError
from digit.gan import PatchDiscriminator, discriminator_step, generator_loss
from digit.reconstruction import PSNR_CAP, image_quality
from stages.decode import sample_grid


def tiny_config(**kw) -> DecoderConfig:
    return DecoderConfig(**{"vocab_size": 16, "code_dim": 8, "grid": (7, 7), "image_size": 28, "width": 32,
                            "n_attn": 1, "n_head": 2, **kw})


@pytest.mark.parametrize("grid,size,n_up", [((7, 7), 28, 2), ((16, 16), 224, 4), ((4, 4), 30, 3)])
def test_output_shape_for_any_grid_and_size(grid, size, n_up):
    config = tiny_config(grid=grid, image_size=size)
    assert config.n_up == n_up
    out = TokenDecoder(config)(torch.randint(0, 16, (2, grid[0] * grid[1])))
    assert out.shape == (2, 3, size, size)
    images = TokenDecoder(config).decode(torch.randint(0, 16, (2, grid[0] * grid[1])))
    assert images.shape == (2, size, size, 3) and images.dtype == torch.uint8


def test_embedding_starts_from_centroids_and_checks_their_shape():
    centroids = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    model = TokenDecoder(tiny_config(), centroids)
    assert torch.equal(model.embed.weight.data, torch.from_numpy(centroids))
    with pytest.raises(ConfigError, match=r"centroids have shape \(16, 9\).*re-run `dvc repro codebook`"):
        TokenDecoder(tiny_config(), np.zeros((16, 9), np.float32))


def test_discriminator_scores_patches():
    logits = PatchDiscriminator()(torch.zeros(2, 3, 28, 28))
    assert logits.shape == (2, 1, 7, 7)


def _hinge(disc, real, fake) -> float:
    with torch.no_grad():
        return (F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake)).mean()).item()


def test_discriminator_step_lowers_the_hinge_loss_on_an_easy_toy():
    """digit.gan.discriminator_step (train_decoder's and train_vqgan's D update) learns real vs fake, through a
    real Accelerator, and never sends gradients into the generator that made the fakes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    gen = torch.Generator().manual_seed(0)
    phase = torch.rand(8, 1, 1, 1, generator=gen) * 6.28
    rows = torch.arange(28.0).view(1, 1, 28, 1)
    real = torch.sin(rows * 0.7 + phase).expand(8, 3, 28, 28).contiguous()  # smooth stripes in [-1, 1]
    generator = torch.nn.Conv2d(3, 3, 1)  # a stand-in generator: the fakes carry its graph
    fake = generator((torch.rand(8, 3, 28, 28, generator=gen) * 2 - 1))  # noise
    torch.manual_seed(0)
    disc = PatchDiscriminator(width=8)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    accelerator = Accelerator(cpu=True)
    try:
        disc, opt = accelerator.prepare(disc, opt)
        losses = []
        for _ in range(8):
            before = _hinge(disc, real, fake)
            stats = discriminator_step(accelerator, disc, opt, real, fake)
            losses.append(stats["train/d_loss"])
            assert losses[-1] == pytest.approx(before, rel=1e-5, abs=1e-6)  # the loss of the D it updated
        final = _hinge(disc, real, fake)
    finally:
        AcceleratorState._reset_state(True)
    assert 1.5 < losses[0] < 2.5  # an untrained D: logits near 0, hinge near 2
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert final < 0.5 * losses[0], (losses, final)
    # the curves that show it separating: logits part, and most patches land on the right side
    assert stats["train/d_real"] > stats["train/d_fake"] and stats["train/d_acc"] > 0.5, stats
    with torch.no_grad():
        assert disc(real).mean() > disc(fake).mean()
    assert generator.weight.grad is None and generator.bias.grad is None  # fakes detached
    g = generator_loss(disc, fake)
    g.backward()
    assert g.item() == pytest.approx(-disc(fake).mean().item(), rel=1e-5) and generator.weight.grad is not None


def test_save_load_roundtrip_and_mismatch_errors(tmp_path):
    model = TokenDecoder(tiny_config()).eval()
    save_decoder(model, {"grid": [7, 7], "vocab_size": 16}, tmp_path / "dec")
    loaded, meta = load_decoder(tmp_path / "dec", vocab_size=16, grid=(7, 7))
    tokens = torch.randint(0, 16, (3, 49))
    assert torch.equal(loaded.decode(tokens), model.decode(tokens)) and meta["vocab_size"] == 16
    with pytest.raises(ConfigError, match="trained for 16 codes but the tokens have 32"):
        load_decoder(tmp_path / "dec", vocab_size=32)
    with pytest.raises(ConfigError, match=r"expects a \(7, 7\) token grid but the tokens have \(8, 8\)"):
        load_decoder(tmp_path / "dec", grid=(8, 8))
    with pytest.raises(ConfigError, match="not a complete `train_decoder` output"):
        load_decoder(tmp_path / "missing")


def test_decoder_learns_a_tiny_set_better_than_the_mean_image():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (32, 49), generator=gen)
    # Images that are a deterministic function of the tokens: each code paints its 4x4 cell.
    palette = torch.rand(16, 3, generator=gen) * 2 - 1
    target = palette[tokens].view(32, 7, 7, 3).permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.manual_seed(0)
    model = TokenDecoder(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(150):
        loss = F.l1_loss(model(tokens), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean_image_l1 = F.l1_loss(target.mean(0, keepdim=True).expand_as(target), target).item()
    assert loss.item() < 0.3 * mean_image_l1


def test_image_quality_metrics():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    psnr, ssim = image_quality(images, images)
    assert psnr == [PSNR_CAP] * 4 and np.allclose(ssim, 1.0)
    noisy = np.clip(images.astype(int) + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    psnr_noisy, ssim_noisy = image_quality(images, noisy)
    assert 18 < np.mean(psnr_noisy) < 30 and np.mean(ssim_noisy) < 0.99
    assert to_unit(images).shape == (4, 3, 28, 28) and to_unit(images).min() >= -1


def test_sample_grid_has_one_row_per_class():
    images = np.full((6, 28, 28, 3), 255, np.uint8)
    grid = sample_grid(images, np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"], columns=2, scale=2, pad=2,
                       label_width=10)
    assert grid.size == (10 + 2 * 58 + 2, 3 * 58 + 2)


@needs_fmnist
def test_paired_images_stream_in_lockstep(tiny_repo):
    tokens_path = tiny_repo / "data" / "tokens" / "train.parquet"
    pairs = PairedImages(tiny_repo / "data" / "images", tokens_path, "train", window=2)
    from digit.tokens import read_tokens
    all_tokens, _, keys, _ = read_tokens(tokens_path)
    seen = [t for t, _ in pairs.batches(50, 0, 0, shuffle=False)]
    assert np.array_equal(np.concatenate(seen), all_tokens)  # file order, every row once
    first, second = (np.concatenate([t for t, _ in pairs.batches(32, 7, 1)]) for _ in range(2))
    assert np.array_equal(first, second)  # shuffle is a pure function of (seed, epoch)
    assert len(first) == 192  # 200 rows, whole batches of 32 only
    other = np.concatenate([t for t, _ in pairs.batches(32, 7, 2)])
    assert not np.array_equal(first, other)
    assert pairs.epoch_length(32, 7, 1) == 6 and pairs.epoch_length(32, 7, 2) == len(other) // 32
    tokens, images = pairs.shard(1)
    assert images.shape == (len(tokens), 28, 28, 3) and images.dtype == np.uint8
    limited = sum(len(t) for t, _ in pairs.batches(30, 0, 0, shuffle=False, limit=45))
    assert limited == 45
    with pytest.raises(ConfigError, match="re-run `dvc repro tokenize`"):
        PairedImages(tiny_repo / "data" / "images", tiny_repo / "data" / "tokens" / "val.parquet", "train")
