"""digit/stage2.py: the AR decoder's cache and loss, MaskGIT's schedule and decoding, learning, persistence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from digit.errors import ConfigError
from digit.gpt import sample_next
from digit.stage2 import (Stage2AR, Stage2Config, Stage2NAR, build_stage2, cosine_schedule, load_stage2,
                          random_mask, save_stage2)

DK, VK, G = 16, 12, (4, 4)
N = G[0] * G[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(kind: str, seed: int = 0, sharpen: bool = True):
    torch.manual_seed(seed)
    model = build_stage2(Stage2Config(DK, VK, G, kind=kind, n_layer=2, n_head=2, n_embd=32))
    if sharpen:  # random init gives near-uniform logits; a larger head makes paths that differ show
        with torch.no_grad():
            model.head.weight.mul_(20)
    return model.eval()


def digits(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, DK, (batch, *G), generator=torch.Generator().manual_seed(seed))


def target(d: torch.Tensor) -> torch.Tensor:
    """A position-aligned mapping to learn: VQ token j = 5 * DiGIT token j mod VK (5 and VK=12 are coprime)."""
    return (5 * d.flatten(1)) % VK


def test_config_validation():
    assert Stage2Config(DK, VK, 7).grid == (7, 7) and Stage2Config(DK, VK, [4, 5]).positions == 20
    with pytest.raises(ConfigError, match=r"stage2.kind='mlm' must be one of \['ar', 'nar'\]"):
        Stage2Config(DK, VK, G, kind="mlm")
    with pytest.raises(ConfigError, match="stage2.n_embd=30 must be a positive multiple of stage2.n_head=4"):
        Stage2Config(DK, VK, G, n_embd=30)
    with pytest.raises(ConfigError, match=r"stage2.grid=\[0, 4\] must be two positive sides"):
        Stage2Config(DK, VK, (0, 4))


def test_ar_greedy_generation_with_the_cache_equals_full_recompute():
    model = tiny("ar")
    d = digits(3, 0)
    cached = model.generate(d, temperature=0)
    assert cached.shape == (3, N) and cached.dtype == torch.int64
    seq = torch.zeros(3, 0, dtype=torch.long)
    for _ in range(N):  # recompute the whole [DiGIT][SEP][VQ so far] sequence at every step
        seq = torch.cat([seq, model.logits(d, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    assert len(set(map(tuple, cached.tolist()))) > 1  # the output depends on the DiGIT grid


def test_ar_sampling_with_the_cache_equals_full_recompute():
    model = tiny("ar")
    d = digits(4, 1)
    cached = model.generate(d, temperature=1.0, top_p=0.8, generator=torch.Generator().manual_seed(5))
    gen, seq = torch.Generator().manual_seed(5), torch.zeros(4, 0, dtype=torch.long)
    for _ in range(N):
        seq = torch.cat([seq, sample_next(model.logits(d, seq)[:, -1], 1.0, None, 0.8, gen)[:, None]], dim=1)
    assert torch.equal(cached, seq)


def test_ar_loss_is_the_vq_tokens_likelihood_only():
    model = tiny("ar", sharpen=False)
    d, vq = digits(2, 2), torch.randint(0, VK, (2, N), generator=torch.Generator().manual_seed(3))
    loss, logits = model(d, vq, return_logits=True)
    assert logits.shape == (2, N, VK)  # one row per VQ token: the DiGIT part is never predicted
    # -log p(v_j | DiGIT, v_<j), each from its own forward on the prefix: alignment and the VQ-only mean.
    nll = torch.stack([-model.logits(d, vq[:, :j])[:, -1].log_softmax(-1)[torch.arange(2), vq[:, j]]
                       for j in range(N)])
    assert torch.isclose(loss, nll.mean(), atol=1e-5)
    assert torch.isclose(model(d.flatten(1), vq.view(2, *G)), loss)  # [B, gh, gw] and [B, N] alike


def test_cosine_schedule():
    # floor(16 * cos(pi/2 * t/8)) for t = 1..8
    assert cosine_schedule(16, 8) == [15, 14, 13, 11, 8, 6, 3, 0]
    # MaskGIT's clamps: >= 1 token committed per step, >= 1 left masked until the last step.
    assert cosine_schedule(3, 8) == [2, 1, 1, 1, 1, 1, 1, 0]
    assert cosine_schedule(16, 1) == [0]
    with pytest.raises(ConfigError, match="steps=0 must be >= 1"):
        cosine_schedule(16, 0)


def test_random_mask_follows_the_cosine_ratio():
    mask = random_mask(4000, N, torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= N
    # E[ceil(cos(pi/2 r) * N)] / N, r ~ U(0,1), by quadrature; a uniform ratio would give ~0.53.
    r = (torch.arange(100000) + 0.5) / 100000
    expected = torch.ceil(torch.cos(math.pi / 2 * r) * N).mean() / N
    assert abs(counts.float().mean() / N - expected) < 0.01 and expected > 0.65


def test_nar_loss_scores_masked_positions_and_hides_their_tokens():
    model = tiny("nar", sharpen=False)
    d, vq = digits(2, 4), torch.randint(0, VK, (2, N), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, [1, 5]] = mask[1, [0, 2, 3]] = True
    loss, logits = model(d, vq, mask=mask, return_logits=True)
    expected = F.cross_entropy(model.logits(d, vq.masked_fill(mask, model.mask_id))[mask], vq[mask])
    assert torch.isclose(loss, expected)
    other = torch.where(mask, (vq + 1) % VK, vq)  # other targets at the masked positions only
    other_loss, other_logits = model(d, other, mask=mask, return_logits=True)
    assert torch.equal(logits, other_logits) and not torch.isclose(loss, other_loss)  # inputs never show them


def test_nar_generation_is_seeded_and_follows_the_schedule():
    model = tiny("nar")
    d = digits(3, 6)
    a, history = model.generate(d, steps=8, generator=torch.Generator().manual_seed(7), return_history=True)
    b = model.generate(d, steps=8, generator=torch.Generator().manual_seed(7))
    c = model.generate(d, steps=8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, N) and a.min() >= 0 and a.max() < VK  # no mask token left
    assert len(history) == 8 and torch.equal(history[-1], a)
    for step, keep_masked in zip(history, cosine_schedule(N, 8)):
        assert ((step == model.mask_id).sum(1) == keep_masked).all()
    for before, after in zip(history, history[1:]):  # committed tokens never change
        committed = before != model.mask_id
        assert torch.equal(after[committed], before[committed])
    assert torch.equal(model.generate(d, temperature=0), model.generate(d, temperature=0))


@pytest.mark.parametrize("kind", ["ar", "nar"])
def test_learns_a_position_aligned_mapping(kind):
    torch.manual_seed(0)
    model = build_stage2(Stage2Config(DK, VK, G, kind=kind, n_layer=2, n_head=2, n_embd=64))
    opt = model.configure_optimizer(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(150):
        d = torch.randint(0, DK, (64, N), generator=gen)  # fresh grids: the map must be learned, not memorised
        loss = model(d, target(d), generator=gen) if kind == "nar" else model(d, target(d))
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = digits(64, 123)
    out = model.generate(d, temperature=0) if kind == "ar" else \
        model.generate(d, steps=8, generator=torch.Generator().manual_seed(0))
    accuracy = (out == target(d)).float().mean()
    assert accuracy > 0.95, f"{kind}: accuracy {accuracy:.3f}, last loss {loss.item():.4f}"


@pytest.mark.parametrize("kind", ["ar", "nar"])
def test_save_load_round_trip_and_mismatch_errors(tmp_path, kind):
    model = tiny(kind)
    save_stage2(model, {"vqgan": "models/vqgan"}, tmp_path / "s2")
    loaded, meta = load_stage2(tmp_path / "s2", digit_k=DK, vq_k=VK, grid=G)
    assert isinstance(loaded, Stage2AR if kind == "ar" else Stage2NAR) and meta == {"vqgan": "models/vqgan"}
    d = digits(2, 9)
    assert torch.equal(loaded.generate(d, temperature=0), model.generate(d, temperature=0))
    with pytest.raises(ConfigError, match=r"trained for a DiGIT codebook of 16 codes, the tokens have 256; re-run"):
        load_stage2(tmp_path / "s2", digit_k=256)
    with pytest.raises(ConfigError, match=r"trained for a VQGAN codebook of 12 codes, the VQGAN has 512; re-run"):
        load_stage2(tmp_path / "s2", vq_k=512)
    with pytest.raises(ConfigError, match=r"trained on a 4x4 token grid, the tokens have 7x7; re-run"):
        load_stage2(tmp_path / "s2", grid=7)
    with pytest.raises(ConfigError, match=r"missing/model.safetensors: missing; .* is not a complete `train_stage2"):
        load_stage2(tmp_path / "missing")


def test_bad_tokens_raise_clear_errors():
    model = tiny("ar")
    with pytest.raises(ConfigError, match=r"digit_tokens: expected \[B, 4, 4\] or \[B, 16\].*got \(2, 9\)"):
        model.generate(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"digit_tokens: ids 1..16 are outside 0..15"):
        model.generate(torch.arange(1, 17).view(1, 16))
    with pytest.raises(ConfigError, match=r"vq_tokens: ids 0..12 are outside 0..11"):
        tiny("nar")(digits(1, 0), torch.arange(16).clamp(max=12).view(1, 16))
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(digits(1, 0), temperature=-1)
