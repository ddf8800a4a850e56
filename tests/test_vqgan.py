"""digit/vqgan.py: config errors, shapes, learning, the EMA update, dead-code restarts, DDP agreement, persistence."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from digit.errors import ConfigError
from digit.vqgan import (VQGAN, VectorQuantizer, VQGANConfig, codebook_stats, load_vqgan, reconstruction_loss,
                         save_vqgan, uint8_images, unit_images)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs gain nothing from a second thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, **kw) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(**{"image_size": 28, "grid": 7, "k": 16, "dim": 8, "width": 8, "restart_every": 20,
                                **kw}))


def shapes(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """n images [n,3,size,size] in [0,1]: a dark background with two coloured discs or squares."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.zeros(n, 3, size, size)
    for i in range(n):
        images[i] = (torch.rand(3, generator=g) * 0.3)[:, None, None]
        for _ in range(2):
            colour = torch.rand(3, generator=g)
            cx, cy, r = torch.randint(6, 22, (3,), generator=g).tolist()
            r = r % 6 + 3
            if torch.rand(1, generator=g) < 0.5:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            else:
                inside = ((xx - cx).abs() < r) & ((yy - cy).abs() < r)
            images[i][:, inside] = colour[:, None]
    return images


def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"vqgan.k=1 must be >= 2"):
        VQGANConfig(k=1)
    with pytest.raises(ConfigError, match=r"vqgan.image_size=30 is not vqgan.grid=7 times a power of two.*"
                                          r"use image_size 14 or 28, or a grid in \[30, 15\]"):
        VQGANConfig(image_size=30, grid=7)
    with pytest.raises(ConfigError, match=r"vqgan.image_size=4 is not vqgan.grid=7"):
        VQGANConfig(image_size=4, grid=7)
    with pytest.raises(ConfigError, match=r"vqgan.grid: \[7, 8\] must be square"):
        VQGANConfig(grid=[7, 8])
    assert VQGANConfig(grid=[7, 7]).grid == 7 and VQGANConfig(image_size=56, grid=7).n_down == 3
    assert VQGANConfig(image_size=7, grid=7).n_down == 0


def test_shapes_and_encode_decode_match_forward():
    model = tiny().eval()
    x = shapes(3)
    recon, vq_loss, tokens, stats = model(x)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    assert tokens.shape == (3, 7, 7) and tokens.dtype == torch.int64 and 0 <= tokens.min() and tokens.max() < 16
    assert vq_loss.dim() == 0 and vq_loss > 0 and set(stats) == {"usage", "perplexity", "dead", "restarted"}
    assert torch.equal(model.encode(x), tokens)
    # Straight-through q = z + (q - z).detach() is q up to rounding.
    assert torch.allclose(model.decode_tokens(tokens), recon, atol=1e-6)
    assert torch.equal(model.decode_tokens(tokens.flatten(1)), model.decode_tokens(tokens))  # stage 2's flat grids
    u8 = uint8_images(x)
    assert u8.shape == (3, 28, 28, 3) and u8.dtype == torch.uint8
    assert torch.allclose(unit_images(u8), x, atol=0.5 / 255 + 1e-6)
    assert torch.equal(model.encode(u8), model.encode(unit_images(u8)))
    assert torch.isclose(reconstruction_loss(recon, u8), reconstruction_loss(recon, unit_images(u8)))
    with pytest.raises(ConfigError, match=r"expected float \[B, 3, 28, 28\].*got torch.float32 \(3, 3, 32, 32\)"):
        model.encode(torch.rand(3, 3, 32, 32))
    bad = torch.zeros(1, 7, 7, dtype=torch.long)
    bad[0, 3, 3] = 16
    with pytest.raises(ConfigError, match=r"ids must be in 0..15 \(vqgan.k=16\), got 0..16"):
        model.decode_tokens(bad)


def test_encode_never_updates_the_codebook_even_in_train_mode():
    model = tiny().train()
    model(shapes(4))  # initialise the codebook from data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(shapes(4, seed=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(shapes(4, seed=1))  # a training forward does move the EMA codebook
    assert not torch.equal(before["quantizer.embed"], model.quantizer.embed)


@pytest.mark.parametrize("ema", [True, False])
def test_learns_a_tiny_set_better_than_the_mean_image_and_uses_its_codes(ema):
    x = shapes(32)
    model = tiny(ema=ema).train()
    assert ("quantizer.embed" in dict(model.named_parameters())) == (not ema)  # EMA codes are not optimized
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    restarted = 0
    for _ in range(200):
        recon, vq_loss, tokens, stats = model(x)
        loss = reconstruction_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        restarted += stats["restarted"]
    assert restarted > 0  # codes went dead during training and were moved back onto data
    model.eval()
    mse = ((model.decode_tokens(model.encode(x)) - x) ** 2).mean()
    mean_image_mse = ((x.mean(0, keepdim=True) - x) ** 2).mean()
    assert mse < 0.5 * mean_image_mse, (mse, mean_image_mse)
    assert codebook_stats(model.encode(x), 16)["usage"] > 0.5


def clustered(n_per: int = 64, centers: int = 16, seed: int = 0) -> torch.Tensor:
    """Encoder-shaped z [1, 4, n_per, centers]: `centers` tight clusters in 4-D."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, 4, generator=g) * 5
    points = mu[None] + 0.1 * torch.randn(n_per, centers, 4, generator=g)
    return points.permute(2, 0, 1)[None]


def test_ema_update_without_decay_is_a_kmeans_step():
    q = VectorQuantizer(VQGANConfig(k=4, dim=4, decay=0.0, restart_every=0)).train()
    z = clustered(centers=4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    q.initialized.fill_(True)
    q.embed.copy_(flat[:4] + 0.5)  # one point of each cluster, shifted off it
    start = q.embed.clone()
    quantized, loss, tokens, stats = q(z)
    assert torch.equal(tokens[0], torch.arange(4).expand(64, 4))  # column j is cluster j
    assert torch.allclose(quantized, start[tokens].permute(0, 3, 1, 2))  # quantized with the codes before the update
    assert torch.isclose(loss, 0.25 * ((quantized - z) ** 2).mean())  # the commitment term only
    means = torch.stack([flat[tokens.flatten() == j].mean(0) for j in range(4)])
    assert torch.allclose(q.embed, means, atol=1e-4)
    assert float(stats["usage"]) == 1.0 and abs(float(stats["perplexity"]) - 4) < 1e-4


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_are_restarted_onto_data(ema):
    z = clustered()

    def run(restart_every: int, seed: int = 0) -> VectorQuantizer:
        torch.manual_seed(0)
        q = VectorQuantizer(VQGANConfig(k=16, dim=4, ema=ema, restart_every=restart_every, seed=seed)).train()
        q(z)  # initialises every code from the batch
        with torch.no_grad():  # then all codes but one far away and long unused (usage below dead_threshold=1)
            q.embed.data[1:] = 1e3
            q.cluster_size[1:] = 0.5
            if ema:
                q.embed_sum[1:] = 1e3 * q.cluster_size[1:, None]
        assert codebook_stats(q.lookup(z), 16)["usage"] == 1 / 16
        for _ in range(10):
            stats = q(z)[3]
        return q, stats

    stuck, stats = run(restart_every=0)
    assert codebook_stats(stuck.lookup(z), 16)["usage"] == 1 / 16 and int(stats["dead"]) == 15
    fixed, stats = run(restart_every=5)
    assert int(stats["dead"]) == 0 and codebook_stats(fixed.lookup(z), 16)["usage"] > 0.5
    assert (fixed.embed.abs() < 100).all()
    # The draws are a function of (seed, step): the same seed restarts identically, another seed differently.
    assert torch.equal(run(restart_every=5)[0].embed, fixed.embed)
    assert not torch.equal(run(restart_every=5, seed=1)[0].embed, fixed.embed)


def _ddp_worker(rank: int, rdv: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial module on both ranks, as DDP guarantees
    q = VectorQuantizer(VQGANConfig(k=16, dim=4, decay=0.5, restart_every=3)).train()  # fast decay: codes die
    restarted = sum(q(clustered(n_per=8, seed=10 * rank + step))[3]["restarted"]  # each rank sees other data
                    for step in range(7))
    torch.save({"restarted": restarted, **q.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rdv"), str(tmp_path / "state")), nprocs=2)
    a, b = (torch.load(tmp_path / f"state.{r}") for r in (0, 1))
    restarted = a.pop("restarted"), b.pop("restarted")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert int(a["step"]) == 7 and restarted[0] == restarted[1] > 0  # the restart path ran, in step on both


def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    model = tiny().train()
    x = shapes(4)
    model(x)
    save_vqgan(model, {"dataset": "shapes"}, tmp_path / "vq")
    loaded, meta = load_vqgan(tmp_path / "vq", k=16, grid=[7, 7], image_size=28)
    assert meta == {"dataset": "shapes"} and not loaded.training
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert int(loaded.quantizer.step) == 1 and bool(loaded.quantizer.initialized)  # training state for resuming
    with pytest.raises(ConfigError, match="trained with codebook size 16, expected 32"):
        load_vqgan(tmp_path / "vq", k=32)
    with pytest.raises(ConfigError, match="trained with token grid 7, expected 8"):
        load_vqgan(tmp_path / "vq", grid=8)
    with pytest.raises(ConfigError, match=r"missing/model.safetensors: missing; .* is not a complete `train_vqgan` "
                                          r"output, re-run `dvc repro train_vqgan`"):
        load_vqgan(tmp_path / "missing")
