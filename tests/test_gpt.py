"""digit/gpt.py: learning, the KV cache against full recomputation, sampling filters, bad input, persistence."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import digit.gpt as gpt_module
from digit.errors import ConfigError
from digit.gpt import PRESETS, GPT, GPTConfig, filter_logits, sample_next
from digit.training import load_trained, save_trained

K, T, CLASSES = 32, 16, 4


def tiny(num_classes: int = CLASSES, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=K, block_size=T + 1, num_classes=num_classes, n_layer=2, n_head=2, n_embd=64)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    # Random init gives near-uniform logits; scale the head up so sampling is not
    # a coin toss over 32 near-equal logits and differences between paths would show.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and 2 OpenMP threads on a
    busy 2-core machine (another job running) can be 30x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_a_few_sequences():
    torch.manual_seed(0)
    # One class per sequence: with shared classes the first token would be ambiguous
    # and the loss could not go below ln(2)/16 per token.
    model = GPT(GPTConfig(vocab_size=K, block_size=T + 1, num_classes=8, n_layer=2, n_head=2, n_embd=64))
    tokens = torch.randint(0, K, (8, T))
    labels = torch.arange(8)
    opt = model.configure_optimizer(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95))
    model.train()
    for step in range(300):
        logits = model(labels, tokens[:, :-1])
        assert logits.shape == (8, T, K)
        loss = F.cross_entropy(logits.reshape(-1, K), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"did not overfit: loss {loss.item():.4f} after {step + 1} steps"


def test_forward_shapes_and_hidden_states():
    model = tiny()
    tokens = torch.randint(0, K, (3, T))
    logits, hidden = model(torch.tensor([0, 1, CLASSES]), tokens, return_hidden=True)
    assert logits.shape == (3, T + 1, K)
    assert len(hidden) == model.config.n_layer + 1
    assert all(h.shape == (3, T + 1, 64) for h in hidden)
    # The last hidden state is taken before the final LayerNorm.
    assert torch.allclose(model.lm_head(model.transformer.ln_f(hidden[-1])), logits, atol=1e-6)
    # Causal: changing a later token leaves earlier logits unchanged.
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % K
    assert torch.allclose(model(None, tokens)[:, :6], model(None, changed)[:, :6], atol=1e-6)


def record_logits(monkeypatch) -> list[torch.Tensor]:
    """Capture the (guided) logits generate() samples from at each step."""
    seen: list[torch.Tensor] = []
    real = gpt_module.sample_next

    def spy(logits, *args, **kw):
        seen.append(logits.clone())
        return real(logits, *args, **kw)

    monkeypatch.setattr(gpt_module, "sample_next", spy)
    return seen


@pytest.mark.parametrize("num_classes,cfg_scale", [(CLASSES, 1.0), (CLASSES, 2.0), (0, 1.0)])
def test_cache_matches_full_recompute(monkeypatch, num_classes, cfg_scale):
    model = tiny(num_classes)
    cond = torch.tensor([0, 1, 2, 3, CLASSES, 1]) if num_classes else torch.zeros(6, dtype=torch.long)
    seen = record_logits(monkeypatch)

    def gen(use_cache, **kw):
        seen.clear()
        out = model.generate(cond, T, cfg_scale=cfg_scale, use_cache=use_cache, **kw)
        assert out.shape == (6, T) and out.dtype == torch.long
        return out, torch.stack(seen)

    for kw in ({"temperature": 0.0}, {"top_k": 1}):  # greedy, two ways
        cached, logits_cached = gen(True, **kw)
        full, logits_full = gen(False, **kw)
        assert torch.equal(cached, full)
        assert (logits_cached - logits_full).abs().max() < 1e-5
    assert torch.equal(gen(True, top_k=1)[0], gen(True, temperature=0.0)[0])

    for seed in range(3):  # sampled: same seed, same tokens
        kw = {"temperature": 1.0, "top_k": 20, "top_p": 0.95}
        cached, logits_cached = gen(True, generator=torch.Generator().manual_seed(seed), **kw)
        full, logits_full = gen(False, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(cached, full)
        assert (logits_cached - logits_full).abs().max() < 1e-5
    assert len(set(cached.flatten().tolist())) > 1  # actually sampled, not collapsed


def test_cached_logits_equal_full_forward_at_every_step():
    model = tiny()
    cond = torch.tensor([2, CLASSES])
    tokens = torch.randint(0, K, (2, T))
    full = model(cond, tokens[:, :-1])  # [2, T, K]
    caches = model.new_cache(2)
    with torch.no_grad():
        step_logits = [model._forward(cond, tokens[:, :0], 0, caches)[:, -1]]
        for i in range(1, T):
            step_logits.append(model._forward(None, tokens[:, i - 1:i], i, caches)[:, -1])
        # A multi-token chunk after a cached history takes the masked path.
        chunk_caches = model.new_cache(2)
        model._forward(cond, tokens[:, :3], 0, chunk_caches)
        chunk = model._forward(None, tokens[:, 3:9], 4, chunk_caches)
    for i, logits in enumerate(step_logits):
        assert (logits - full[:, i]).abs().max() < 1e-5, f"step {i}"
    assert (chunk - full[:, 4:10]).abs().max() < 1e-5
    assert caches[0].k.shape == (2, 2, T + 1, 32)  # preallocated to block_size


def test_cfg_scale_one_is_plain_conditional(monkeypatch):
    model = tiny()
    cond = torch.tensor([0, 1, 2])
    seen = record_logits(monkeypatch)
    guided = model.generate(cond, T, temperature=0.0, cfg_scale=1.0)
    plain_logits = model(cond, guided[:, :-1])
    for i, logits in enumerate(seen):
        assert (logits - plain_logits[:, i]).abs().max() < 1e-5

    calls = []
    real = model._forward
    monkeypatch.setattr(model, "_forward", lambda *a, **kw: calls.append(a[1].size(0)) or real(*a, **kw))
    g = torch.Generator().manual_seed(1)
    a = model.generate(cond, T, cfg_scale=1.0, generator=g)
    assert set(calls) == {3}  # no doubled batch
    b = model.generate(cond, T, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # reproducible for a seed
    calls.clear()
    guided = model.generate(cond, T, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert set(calls) == {6}  # cond + null rows in one batch
    assert not torch.equal(a, guided)  # guidance changes what is sampled


def test_cfg_mixes_cond_and_null_logits(monkeypatch):
    model = tiny()
    cond = torch.tensor([1, 3])
    seen = record_logits(monkeypatch)
    out = model.generate(cond, 4, temperature=0.0, cfg_scale=2.5)
    c = model(cond, out[:, :-1])
    u = model(torch.full_like(cond, model.null_class), out[:, :-1])
    for i, logits in enumerate(seen):
        assert (logits - (u[:, i] + 2.5 * (c[:, i] - u[:, i]))).abs().max() < 1e-5


def test_top_k_one_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, K)
    for seed in range(3):
        picked = sample_next(logits, 1.0, 1, None, torch.Generator().manual_seed(seed))
        assert torch.equal(picked, logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, None, None), logits.argmax(-1))
    kept = filter_logits(logits, 5, None)
    assert (torch.isfinite(kept).sum(-1) == 5).all()


@pytest.mark.parametrize("p,n_kept", [(0.3, 1), (0.5, 1), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_p(p, n_kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # shuffled: the filter must sort
    logits = probs.log().repeat(2, 1)
    kept = torch.isfinite(filter_logits(logits, None, p))
    assert (kept.sum(-1) == n_kept).all()
    order = probs.argsort(descending=True)
    assert kept[0, order[:n_kept]].all()  # the most probable ones
    # The kept set is renormalized when sampling, and only kept tokens come out.
    draws = torch.stack([sample_next(logits, 1.0, None, p, torch.Generator().manual_seed(s)) for s in range(50)])
    assert kept[0, draws.flatten()].all()


def test_top_k_then_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # top_k=2 leaves [0.625, 0.375] after renormalizing: p=0.6 keeps only the first.
    assert torch.isfinite(filter_logits(logits, 2, 0.6)).sum() == 1
    assert torch.isfinite(filter_logits(logits, 2, 0.7)).sum() == 2


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    tokens = torch.randint(0, K, (2, 4))
    with pytest.raises(ConfigError, match=r"token id 32 .*vocab.*gpt.vocab_size=32"):
        model(None, torch.tensor([[1, 2, K]]))
    with pytest.raises(ConfigError, match=r"token id -1"):
        model(None, torch.tensor([[1, -1]]))
    with pytest.raises(ConfigError, match=r"gpt.block_size.*sequence length 18.*gpt.block_size=17"):
        model(None, torch.randint(0, K, (1, T + 1)))
    with pytest.raises(ConfigError, match=r"class id 5 .*table of size 5"):
        model(torch.tensor([0, CLASSES + 1]), tokens)
    with pytest.raises(ConfigError, match=r"class id -1"):
        model(torch.tensor([0, -1]), tokens)
    with pytest.raises(ConfigError, match=r"cond: expected class ids of shape \[2\]"):
        model(torch.tensor([0, 1, 2]), tokens)
    cond = torch.tensor([0, 1])
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"sample.top_p: .* must be in \(0, 1\]"):
            model.generate(cond, 4, top_p=top_p)
    with pytest.raises(ConfigError, match=r"sample.temperature: -0.5 must be >= 0"):
        model.generate(cond, 4, temperature=-0.5)
    with pytest.raises(ConfigError, match=r"sample.top_k: 0 must be >= 1"):
        model.generate(cond, 4, top_k=0)
    with pytest.raises(ConfigError, match=r"gpt.block_size: 17 tokens .* exceed gpt.block_size=17"):
        model.generate(cond, T + 1)
    with pytest.raises(ConfigError, match=r"class id 7"):
        model.generate(torch.tensor([7]), 4)
    with pytest.raises(ConfigError, match=r"sample.cfg_scale: .*class-conditional"):
        tiny(num_classes=0).generate(None, 4, cfg_scale=2.0)
    with pytest.raises(ConfigError, match=r"gpt.n_embd: 60 must be a positive multiple of gpt.n_head=8"):
        GPTConfig(vocab_size=K, block_size=T + 1, n_head=8, n_embd=60)


def test_unconditional_ignores_cond_and_batch_size():
    model = tiny(num_classes=0)
    tokens = torch.randint(0, K, (2, 5))
    assert torch.equal(model(None, tokens), model(torch.tensor([99, -3]), tokens))
    assert model.null_class == 0 and model.transformer.wce.weight.shape == (1, 64)
    assert model.generate(None, 5, batch_size=4, temperature=0.0).shape == (4, 5)
    assert model.generate(torch.zeros(3, dtype=torch.long), 5).shape == (3, 5)


def test_conditional_null_class_and_generate_keeps_mode():
    model = tiny()
    assert model.null_class == CLASSES and model.transformer.wce.weight.shape == (CLASSES + 1, 64)
    tokens = torch.randint(0, K, (2, 5))
    assert torch.equal(model(None, tokens), model(torch.full((2,), CLASSES), tokens))
    model.train()
    model.generate(torch.tensor([0, 1]), 3)
    assert model.training


def test_save_load_round_trip(tmp_path):
    model = tiny(dropout=0.1, bias=True)
    meta = {"grid": [4, 4], "vocab_size": K, "classes": ["a", "b", "c", "d"]}
    save_trained(model, meta, tmp_path / "gpt")
    assert sorted(p.name for p in (tmp_path / "gpt").iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert config["vocab_size"] == K and config["block_size"] == T + 1 and config["num_classes"] == CLASSES
    loaded, loaded_meta = load_trained(tmp_path / "gpt")
    assert loaded.config == model.config and loaded_meta == meta and not loaded.training
    cond, tokens = torch.tensor([0, 4]), torch.randint(0, K, (2, T))
    assert torch.equal(model(cond, tokens), loaded(cond, tokens))
    save_trained(model, meta, tmp_path / "gpt")  # overwriting an existing save works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt"]  # no temporary folder left behind
    (tmp_path / "gpt" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"gpt/model.safetensors: missing; .*not a complete `train` output, "
                                          r"re-run `dvc repro train`"):
        load_trained(tmp_path / "gpt")
    save_trained(model, meta, tmp_path / "gpt")
    (tmp_path / "gpt" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"gpt/config.json: missing; .*not a complete `train` output"):
        load_trained(tmp_path / "gpt")
    with pytest.raises(ConfigError, match=r"nowhere/model.safetensors: missing"):
        load_trained(tmp_path / "nowhere")


def test_configure_optimizer_decays_only_matrices():
    model = tiny(bias=True)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["params"]
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # every parameter in exactly one group
    assert len({id(p) for g in opt.param_groups for p in g["params"]}) == len(list(model.parameters()))


def test_init_and_presets():
    model = GPT(GPTConfig(vocab_size=K, block_size=T + 1, n_layer=4, n_head=2, n_embd=64))
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(8)) < 0.002
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.003
    assert PRESETS["paper"] == {"n_layer": 16, "n_head": 16, "n_embd": 1024}
    for preset in PRESETS.values():  # size keys only, each a valid config once K and H*W are known
        assert set(preset) <= {"n_layer", "n_head", "n_embd"}
        GPTConfig(vocab_size=512, block_size=50, **preset)
    GPTConfig(vocab_size=8192, block_size=257, **PRESETS["paper"])
