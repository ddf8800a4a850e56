"""Stage train_encoder: a ViT trained without labels (DINO) on the test images, its grid, its resume, and the
frozen record every other encoder setting publishes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import expect_error, needs_fmnist, sh
from digit.encoders import TRAINED, build_encoder, frozen_record, resolve_encoder
from digit.errors import ConfigError
from digit.shards import iter_samples, read_manifest, shard_urls
from digit.ssl import add_noise, at_encoder_size, make_views, seed_step, view_transform
from helpers import kill_after_checkpoint, stage_cmd
from test_full_dag import params_file, refusal, stage

# A tiny ViT with the default 7x7 grid (112 px, patch 16): a few DINO steps on the tiny project's 200 images.
SSL = {"encoder": {"name": "vit_tiny_patch16_224", "weights": TRAINED, "layer": -1},
       "train_encoder": {"depth": 1, "embed_dim": 32, "num_heads": 2, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                         "head_output_dim": 64, "local_views": 2, "batch_size": 16, "max_steps": 8, "warmup_steps": 2,
                         "freeze_last_layer_steps": 2, "eval_every": 4, "checkpoint_every": 4, "probe_images": 100,
                         "probe_steps": 5}}


def outputs(tmp_path) -> list[str]:
    return ["--out", str(tmp_path / "enc"), "--live", str(tmp_path / "live"), "--report",
            str(tmp_path / "enc.json"), "--checkpoints", str(tmp_path / "ck")]


def read_json(path):
    return json.loads(path.read_text())


@needs_fmnist
@pytest.mark.slow
def test_dino_trains_a_vit_on_the_dag_grid_that_resumes_exactly_and_extract_encodes(tiny_repo, tmp_path):
    cmd = stage_cmd("train_encoder", *outputs(tmp_path), *params_file(tiny_repo, SSL))
    env = {"PYTHONPATH": str(tiny_repo)}
    sh(cmd, tiny_repo, env=env)
    record = read_json(tmp_path / "enc" / "encoder.json")
    assert record["trained"] and record["weights"] == TRAINED and record["grid"] == [7, 7]
    assert record["model_kwargs"] == {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 0}
    report = read_json(tmp_path / "enc.json")
    for probe in ("probe", "random_init_probe"):
        assert 0 <= report[probe]["val_top1"] <= 1, report
    assert report["steps"] == 8 and report["images_seen"] == 8 * 16
    live = read_json(tmp_path / "live" / "metrics.json")
    assert live["step"] == 8 and np.isfinite(live["val"]["loss"]) and live["val"]["teacher_std"] > 0
    reference = load_file(str(tmp_path / "enc" / "model.safetensors"))

    # SIGKILL after the step-4 checkpoint; the re-run resumes and ends with the same teacher
    sh(f"rm -rf {tmp_path / 'enc'} {tmp_path / 'enc.json'}", tmp_path)
    kill_after_checkpoint(cmd, tiny_repo, tmp_path / "ck", 4, env=env)
    assert not (tmp_path / "enc").exists()
    out = sh(cmd, tiny_repo, env=env)
    assert "resumed from" in out.stdout + out.stderr
    resumed = load_file(str(tmp_path / "enc" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    assert not list((tmp_path / "ck").iterdir())  # checkpoints removed once published

    # extract reads the trained weights from the folder, as a 7x7 grid of the ViT's width
    proc = stage(tiny_repo, "extract", "--encoder", str(tmp_path / "enc"), "--out", str(tmp_path / "feat"),
                 "--report", str(tmp_path / "extract.json"), params=SSL)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "feat")
    assert manifest["encoder"]["grid"] == [7, 7] and manifest["encoder"]["dim"] == 32
    assert manifest["encoder"]["model_kwargs"]["depth"] == 1
    assert manifest["encoder"]["weights"] == str(tmp_path / "enc" / "model.safetensors")


@needs_fmnist
@pytest.mark.parametrize("changes, fragments", [
    ({"encoder": {"img_size": 96}}, ["a 6x6 grid", "vqgan.grid=7", "encoder.img_size=112"]),
    ({"encoder": {"name": "tf_efficientnet_lite0"}}, ["is not a ViT", "vit_tiny_patch16_224"]),
    ({"encoder": {"name": "pixels"}}, ["trains a ViT"]),
    ({"train_encoder": {"local_crop_size": 40}}, ["train_encoder.local_crop_size=40", "patch size 16"]),
    ({"train_encoder": {"noise_snr_db": [30, 5]}}, ["train_encoder.noise_snr_db", "[low, high]"]),
])
def test_settings_without_the_dag_grid_or_a_vit_are_refused_before_training(tiny_repo, tmp_path, changes, fragments):
    merged = {section: {**SSL.get(section, {}), **changes.get(section, {})} for section in {*SSL, *changes}}
    expect_error(refusal(tiny_repo, "train_encoder", *outputs(tmp_path), params=merged), *fragments)
    assert not (tmp_path / "enc").exists() and not (tmp_path / "ck").exists()


@needs_fmnist
def test_a_frozen_encoder_is_recorded_and_a_stale_record_refused(tiny_repo, tmp_path):
    """The default run trains nothing: the folder names the frozen encoder, and extract refuses a folder
    published for other encoder settings instead of encoding with the wrong network."""
    params = json.loads(json.dumps(SSL))
    defaults = read_json(tiny_repo / "models" / "encoder" / "encoder.json")
    assert defaults == {"trained": False, "name": "tf_efficientnet_lite0", "weights": "package", "img_size": 112}
    assert read_json(tiny_repo / "reports" / "encoder.json") == defaults
    expect_error(refusal(tiny_repo, "extract", "--out", str(tmp_path / "feat"), "--report", str(tmp_path / "r.json"),
                         params=params),
                 "models/encoder was published for encoder", "re-run `dvc repro train_encoder`")
    assert not (tmp_path / "feat").exists()
    with pytest.raises(ConfigError, match="encoder_from_params"):
        build_encoder("vit_tiny_patch16_224", TRAINED, -1, 112)
    default = {"name": "tf_efficientnet_lite0", "weights": "package", "img_size": 112, "layer": -2, "patch_size": 16}
    assert frozen_record(default) == defaults
    assert resolve_encoder(default, tiny_repo / "models" / "encoder") == ("package", {})


@needs_fmnist
def test_views_are_a_pure_function_of_seed_and_step_and_noise_follows_its_snr(tiny_repo):
    """Resume exactness rests on this: the same (seed, step, rank) gives the same views, another step others;
    the noise lands at the SNR it was drawn at (the stability stage's definition)."""
    cfg = {**SSL["train_encoder"], "blur": True, "local_crop_size": 48}
    images = np.stack([s["image"] for _, s in zip(range(8), iter_samples(shard_urls(tiny_repo / "data/images",
                                                                                      "train")))])
    transform = view_transform(cfg, 28, 112)

    def views(step):
        seed_step(0, step)
        return at_encoder_size(add_noise(make_views(transform, images), 1.0, (20.0, 20.0)), 4.0)

    a, b, c = views(3), views(3), views(4)
    assert [v.shape[-1] for v in a] == [112, 112, 48, 48]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    seed_step(0, 0)
    clean = make_views(transform, images)[0]
    seed_step(0, 0)
    noisy = add_noise([clean], 1.0, (20.0, 20.0))[0]
    snr = 10 * torch.log10(clean.double().pow(2).flatten(1).mean(1) / (noisy - clean).double().pow(2).flatten(1).mean(1))
    assert snr.mean().item() == pytest.approx(20.0, abs=1.0)
