"""Presets: each is a complete, valid params set; the ImageNet ones build the paper's shapes."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from conftest import ROOT, sh
from digit.encoders import _resolve
from digit.errors import ConfigError
from digit.gpt import GPT, GPTConfig
from digit.params import Yaml12Loader, validate
from digit.preset import load_preset, names, set_flags


def test_every_preset_validates():
    assert names() == ["fashion-mnist-cpu", "imagenet-digit-base", "imagenet-digit-large"]
    for name in names():
        _, params = load_preset(name)
        assert validate(params) == []


def test_default_preset_is_the_shipped_params():
    _, preset = load_preset("fashion-mnist-cpu")
    assert preset == yaml.load((ROOT / "params.yaml").read_text(), Loader=Yaml12Loader)


@pytest.mark.parametrize("name, grid, dim, k, layers, width, params_m", [
    ("imagenet-digit-base", (16, 16), 768, 8192, 16, 1024, (200, 240)),
    ("imagenet-digit-large", (16, 16), 1024, 16384, 24, 1536, (700, 780)),
])
def test_imagenet_presets_build_the_paper_shapes(name, grid, dim, k, layers, width, params_m):
    _, p = load_preset(name)
    enc = p["encoder"]
    geo = _resolve(enc["name"], "none", enc["layer"], enc["img_size"])  # meta device: shapes only, no weights
    assert geo["grid"] == grid and geo["dim"] == dim and geo["stride"] == 14
    assert p["codebook"]["k"] == k and p["sample"]["top_k"] == 200 and p["sample"]["num_per_class"] * 1000 == 50_000
    config = GPTConfig(vocab_size=k, block_size=grid[0] * grid[1] + 1, num_classes=1000,
                       n_layer=p["gpt"]["n_layer"], n_head=p["gpt"]["n_head"], n_embd=p["gpt"]["n_embd"],
                       dropout=p["gpt"]["dropout"], bias=p["gpt"]["bias"])
    with torch.device("meta"):
        model = GPT(config)
    n = sum(t.numel() for t in model.parameters()) / 1e6
    assert (config.n_layer, config.n_embd, config.block_size) == (layers, width, 257)
    assert params_m[0] < n < params_m[1], n


def test_apply_and_set_flags(tmp_path):
    target = tmp_path / "params.yaml"
    sh([sys.executable, "-m", "digit.preset", "imagenet-digit-base", "--params", str(target)], tmp_path)
    text, _ = load_preset("imagenet-digit-base")
    assert target.read_text() == text
    out = sh([sys.executable, "-m", "digit.preset", "imagenet-digit-base", "--set", "--params",
              str(ROOT / "params.yaml")], tmp_path).stdout
    assert "-S codebook.k=8192" in out and "-S gpt.n_layer=16" in out and "gpt.dropout" not in out
    _, base = load_preset("imagenet-digit-base")
    assert set_flags(base, base) == []
    proc = sh([sys.executable, "-m", "digit.preset", "imagenet-digit-huge"], tmp_path, check=False)
    assert proc.returncode == 2 and "choose one of fashion-mnist-cpu, imagenet-digit-base" in proc.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset("nope")
