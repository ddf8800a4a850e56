"""digit/cost.py: FLOPs counted on the meta device, bytes and time for every stage of the DAG."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT
from digit import cost, storage
from digit.errors import ConfigError
from digit.params import load_params
from digit.preset import load_preset, merge
from helpers import dvc_stages


def test_every_stage_of_the_dag_has_a_cost():
    """A stage added to dvc.yaml without a cost model fails here (the model would under-count the run)."""
    names = [c.stage for c in cost.stage_costs(load_params(ROOT / "params.yaml"))]
    assert sorted(names) == sorted(s.name for s in dvc_stages(ROOT))


def test_gpt_counts_follow_the_transformer_rule():
    """Backward is two forwards, and a forward is at least 2 x matmul parameters x tokens (plus attention)."""
    p = load_params(ROOT / "params.yaml")
    train, forward, params = cost.gpt_flops(p, vocab=512, positions=49, classes=10)
    assert train == pytest.approx(3 * forward, rel=0.02)
    g = p["gpt"]
    matmul_params = g["n_layer"] * 12 * g["n_embd"] ** 2 + g["n_embd"] * 512  # blocks + head, no embeddings
    assert 2 * matmul_params * 49 <= forward <= 1.3 * 2 * matmul_params * 49
    assert params > matmul_params


def test_counting_leaves_real_tensors_alone():
    """count_flops lets meta tensors pass value checks; real tensors keep their values afterwards too."""
    x = torch.tensor([3])
    assert cost.count_flops(lambda: torch.ones(4, 5) @ torch.ones(5, 6)) == 2 * 4 * 5 * 6
    assert int(x) == 3 and bool(torch.tensor([0])) is False


@pytest.mark.parametrize("launcher, world", [("python", 1), ("accelerate launch --multi_gpu --num_processes 8", 8),
                                             ("torchrun --standalone --nproc_per_node=4", 4)])
def test_world_size_from_the_launcher(launcher, world):
    assert cost.world_size(launcher) == world


# ImageNet-1k as distributed: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, in bytes.
IMAGENET_RAW_BYTES = 147_897_477_120 + 6_744_924_160


@pytest.mark.parametrize("preset", ["imagenet-digit-base", "imagenet-digit-large"])
def test_imagenet_intermediate_data_fits_in_the_size_of_imagenet(preset):
    """Shards + features + tokens at most the raw dataset's size (they were 4.5x it with every feature grid
    kept: 523 GB at base, 16 x 16 x 768 float16 per image), the storage issue's goal."""
    p = load_preset(preset)
    costs = {c.stage: c for c in cost.stage_costs(p)}
    assert p["encoder"]["cache"] == "sample" and p["data"]["image_format"] == "jpeg"
    assert sum(costs[s].bytes for s in ("prepare", "extract", "tokenize")) < IMAGENET_RAW_BYTES / 2
    grids = {c.stage: c for c in cost.stage_costs(merge(p, {"encoder": {"cache": "grids"}}))}
    dim = 768 if preset.endswith("base") else 1024
    assert grids["extract"].bytes > 1_331_167 * 16 * 16 * dim * 2 > IMAGENET_RAW_BYTES * 3
    assert costs["extract"].bytes < 2 * p["codebook"]["max_points"] * dim * 2  # the sample, and tar headers
    assert costs["tokenize"].flops > grids["tokenize"].flops  # the encoder runs again there
    assert costs["train@digit"].precision == "bf16" and costs["train_stage2@ar"].precision == "fp32"
    assert costs["train@digit"].flops > 1e19


def test_a_pretrained_vqgan_is_scored_not_trained():
    """The ImageNet presets adopt LlamaGen's VQ-16 (vqgan.weights): no training FLOPs, its 72M fp32 weights
    written once, its encoder counted for vq_tokenize; the default trains its own."""
    costs = {c.stage: c for c in cost.stage_costs(load_preset("imagenet-digit-base"))}
    v = load_preset("imagenet-digit-base")["vqgan"]
    assert v["weights"] != "none" and "not trained" in costs["train_vqgan"].counted
    assert 71.5e6 * 4 < costs["train_vqgan"].bytes < 72.5e6 * 4
    assert costs["train_vqgan"].flops < costs["vq_tokenize"].flops
    default = {c.stage: c for c in cost.stage_costs(load_params(ROOT / "params.yaml"))}
    assert "steps" in default["train_vqgan"].counted


def test_pre_flight_refuses_what_the_disk_cannot_hold(tmp_path):
    """free_bytes asks the nearest existing folder (outputs do not exist yet); both numbers in the error."""
    assert storage.free_bytes(tmp_path / "not" / "yet") == pytest.approx(storage.free_bytes(tmp_path), rel=0.01)
    storage.require_space("extract", tmp_path / "out", 1, "one byte")
    with pytest.raises(ConfigError, match=r"extract: 1e18 bytes need about 1000000.0 TB at .*/out, but its file "
                                          r"system has [\d.]+ [KMGT]?B free; free space there"):
        storage.require_space("extract", tmp_path / "out", 1e18, "1e18 bytes")


def test_cli_json_on_this_cpu(capsys, monkeypatch):
    monkeypatch.setattr(cost, "matmul_peak", lambda dtype, **kw: 1e11)
    monkeypatch.setattr("sys.argv", ["digit.cost", "--here", "--json", "--params", str(ROOT / "params.yaml")])
    cost.main()
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == 1 and out["peaks_flops"]["fp32"] == 1e11
    train = next(s for s in out["stages"] if s["stage"] == "train@digit")
    assert train["seconds"] == pytest.approx(train["flops"] / (1e11 * 0.4))


def test_set_overrides_a_key_as_dvc_exp_run_does(capsys, monkeypatch):
    """-S gpt.max_steps=N scales the GPT's training FLOPs with N; an unknown key or a bad value is refused."""
    def train_flops(*overrides):
        monkeypatch.setattr("sys.argv", ["digit.cost", "imagenet-digit-base", "--json", *overrides])
        cost.main()
        stages = json.loads(capsys.readouterr().out)["stages"]
        return next(s["flops"] for s in stages if s["stage"] == "train@digit")

    assert train_flops("-S", "gpt.max_steps=400000") == pytest.approx(2 * train_flops(), rel=1e-3)
    for bad, message in (("gpt.max_step=5", "expected an existing SECTION.KEY=VALUE"),
                         ("gpt.max_steps=-1", "gpt.max_steps: -1 is below the minimum")):
        monkeypatch.setattr("sys.argv", ["digit.cost", "imagenet-digit-base", "-S", bad])
        with pytest.raises(ConfigError, match=message):
            cost.main()
