"""Presets: overlays on params.yaml that state only what differs; merged, each is a valid params set and the
ImageNet ones build the paper's shapes; applying keeps params.yaml's comments; `--set` is the same change."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, sh
from digit import schema
from digit.encoders import encoder_geometry
from digit.errors import ConfigError
from digit.gpt import GPT, GPTConfig
from digit.params import Yaml12Loader
from digit.schema import _flatten, validate
from digit.preset import load_preset, names, overlay, set_flags

PRESET = [sys.executable, "-m", "digit.preset"]


def default() -> dict:
    return yaml.load((ROOT / "params.yaml").read_text(), Loader=Yaml12Loader)


def test_every_preset_validates():
    assert names() == ["fashion-mnist-cpu", "imagenet-digit-base", "imagenet-digit-large"]
    for name in names():
        assert validate(load_preset(name)) == []


def test_default_preset_is_the_shipped_params():
    assert overlay("fashion-mnist-cpu")[1] == {}
    assert load_preset("fashion-mnist-cpu") == default()


@pytest.mark.parametrize("name", ["imagenet-digit-base", "imagenet-digit-large"])
def test_an_overlay_states_only_differences(name):
    flat, base = _flatten(overlay(name)[1]), _flatten(default())
    assert flat, name
    for key, value in flat.items():
        assert key in base, f"{name}: {key} is not in params.yaml"
        assert value != base[key], f"{name}: {key} = {value!r} is the default; drop it from the overlay"


def test_a_key_added_to_params_yaml_needs_no_preset_edit(tmp_path, monkeypatch):
    base = _flatten(default())
    for name in names():
        assert set(_flatten(load_preset(name))) == set(base)  # every params.yaml key, none added
    monkeypatch.setitem(schema.SCHEMA, "gpt.new_knob", schema.Spec(int, min=0))
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("  n_layer: 6\n", "  n_layer: 6\n  new_knob: 3\n"))
    for name in names():
        merged = load_preset(name, params)
        assert merged["gpt"]["new_knob"] == 3 and validate(merged) == []


def test_a_bad_overlay_gets_every_problem_naming_its_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("gpt:\n  n_layr: 16\ncodebook:\n  k: big\nsample:\n  top_p: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_preset("typo", presets=tmp_path)
    text = str(err.value)
    assert str(bad) in text and "3 problem(s)" in text
    assert "gpt.n_layr: unknown parameter (did you mean `gpt.n_layer`?)" in text
    assert "codebook.k: expected int, got str 'big'" in text and "sample.top_p: 1.5 is above the maximum 1.0" in text
    (tmp_path / "list.yaml").write_text("- gpt\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_preset("list", presets=tmp_path)


@pytest.mark.parametrize("name, grid, dim, k, layers, width, params_m", [
    ("imagenet-digit-base", (16, 16), 768, 8192, 16, 1024, (200, 240)),
    ("imagenet-digit-large", (16, 16), 1024, 16384, 24, 1536, (700, 780)),
])
def test_imagenet_presets_build_the_paper_shapes(name, grid, dim, k, layers, width, params_m):
    p = load_preset(name)
    enc = p["encoder"]
    geo = encoder_geometry(enc["name"], "none", enc["layer"], enc["img_size"])  # meta device: shapes only, no weights
    assert geo["grid"] == grid and geo["dim"] == dim and geo["stride"] == 14
    assert p["codebook"]["k"] == k and p["sample"]["top_k"] == 200 and p["sample"]["num_per_class"] * 1000 == 50_000
    assert p["vqgan"]["grid"] == grid[0] and p["data"]["image_size"] % grid[0] == 0
    config = GPTConfig(vocab_size=k, block_size=grid[0] * grid[1] + 1, num_classes=1000,
                       n_layer=p["gpt"]["n_layer"], n_head=p["gpt"]["n_head"], n_embd=p["gpt"]["n_embd"],
                       dropout=p["gpt"]["dropout"], bias=p["gpt"]["bias"])
    with torch.device("meta"):
        model = GPT(config)
    n = sum(t.numel() for t in model.parameters()) / 1e6
    assert (config.n_layer, config.n_embd, config.block_size) == (layers, width, 257)
    assert params_m[0] < n < params_m[1], n


def test_apply_edits_values_in_place_keeping_comments(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    before = target.read_text().splitlines()
    sh([*PRESET, "imagenet-digit-base", "--params", str(target)], tmp_path)
    after = target.read_text()
    assert yaml.load(after, Loader=Yaml12Loader) == load_preset("imagenet-digit-base")
    assert len(after.splitlines()) == len(before)
    comments = [line.split("#", 1)[1] for line in before if "#" in line]
    assert all(c in after for c in comments)  # every comment kept, whole-line and inline
    assert 'precision: "no"' in after  # a string for YAML 1.1 readers too
    sh([*PRESET, "imagenet-digit-base", "--params", str(target)], tmp_path)
    assert target.read_text() == after  # idempotent


@pytest.mark.parametrize("name", names())
def test_set_flags_round_trip_through_dvc(tmp_path, name):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` does to params.yaml

    out = sh([*PRESET, name, "--set", "--params", str(ROOT / "params.yaml")], tmp_path).stdout
    argv = shlex.split(out)
    assert argv[:3] == ["dvc", "exp", "run"] and argv[3::2] == ["-S"] * len(argv[4::2])
    over = _flatten(overlay(name)[1])
    assert [a.split("=", 1)[0] for a in argv[4::2]] == list(over)  # exactly the overlay's keys
    assert argv[3:] == set_flags(overlay(name)[1])
    if name == "imagenet-digit-base":
        assert "-S codebook.k=8192" in out and "-S gpt.n_layer=16" in out and "gpt.dropout" not in out
        assert "-S 'base.launcher=accelerate launch --multi_gpu --num_processes 8'" in out
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    if argv[4::2]:
        apply_overrides(target, argv[4::2])
    assert yaml.load(target.read_text(), Loader=Yaml12Loader) == load_preset(name)


def test_applying_over_a_changed_params_yaml_says_what_stays(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "default"]):
        subprocess.run([*git, *cmd], cwd=tmp_path, check=True, capture_output=True)
    assert "note:" not in sh([*PRESET, "imagenet-digit-base"], tmp_path).stderr
    err = sh([*PRESET, "imagenet-digit-large"], tmp_path).stderr
    assert "gpt.batch_size" in err and "git checkout params.yaml" in err  # base's 128, not large's 64
    assert "note:" in sh([*PRESET, "fashion-mnist-cpu"], tmp_path).stderr  # an empty overlay resets nothing


def test_unknown_preset():
    proc = sh([*PRESET, "imagenet-digit-huge"], ROOT, check=False)
    assert proc.returncode == 2 and "choose one of fashion-mnist-cpu, imagenet-digit-base" in proc.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset("nope")
    assert sh(PRESET, ROOT).stdout.split() == names()
