"""Stage `stability` (paper Table 1): the noise realises the asked SNR, the clean tokens are the
pipeline's, noise moves tokens more the lower the SNR, results repeat, bad input fails clearly."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import FMNIST, ROOT, expect_error, sh
from digit.params import Yaml12Loader
from digit.errors import ConfigError
from digit.stability import (
    check_config, clean_input, draw_noise, measure, noisy_input, resize_noise, signal_power, snr_key,
)
from stages.stability import log_plots, run_stability

CFG = {"snr_db": [30, 25, 20, 15, 10, 5, 1, 0.01], "num_images": 1000, "batch_size": 64, "seed": 0, "k_sweep": [], "noise_at": "stored"}
SNRS = [200, 40, 20, 10, 5, 0.01]
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed (make dataset)")


# ----------------------------------------------------------------- noise (no encoder)
def test_noise_realises_the_snr():
    x = torch.rand(32, 3, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = signal_power(x)
    for j, snr in enumerate([30, 10, 0.01, -5]):
        noise, realised = draw_noise(x, snr, 0, j, range(32))
        assert noise.dtype == torch.float64 and noise.shape == x.shape
        # sigma^2 = P / 10^(snr/10); 2352 values per image: realised SNR within ~0.13 dB (1 std)
        assert abs(float(realised.mean()) - snr) < 0.05
        assert float((realised - snr).abs().max()) < 0.6
        expected_var = p / 10 ** (snr / 10)
        assert torch.allclose(noise.var(dim=(1, 2, 3)), expected_var, rtol=0.1)
        assert abs(float(noise.mean())) < 0.01 * float(expected_var.sqrt().mean())
    noise, _ = draw_noise(x, 10, 0, 0, range(32))
    assert float((x + noise).min()) < 0 and float((x + noise).max()) > 1  # never clipped


def test_black_image_gets_no_noise():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    x[1] = 0.5
    noise, realised = draw_noise(x, 10, 0, 0, [0, 1])
    assert torch.count_nonzero(noise[0]) == 0 and math.isnan(realised[0]) and abs(realised[1] - 10) < 1


def test_noise_depends_on_seed_snr_and_image_not_on_batching():
    x = torch.rand(8, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole, _ = draw_noise(x, 20, 7, 3, range(10, 18))
    halves = torch.cat([draw_noise(x[:3], 20, 7, 3, range(10, 13))[0], draw_noise(x[3:], 20, 7, 3, range(13, 18))[0]])
    assert torch.equal(whole, halves)
    assert torch.equal(whole, draw_noise(x, 20, 7, 3, range(10, 18))[0])
    for other in (draw_noise(x, 20, 8, 3, range(10, 18))[0], draw_noise(x, 20, 7, 4, range(10, 18))[0],
                  draw_noise(x, 20, 7, 3, range(11, 19))[0]):
        assert not torch.allclose(whole, other)


def test_noise_is_resized_linearly_and_never_clamped():
    noise = torch.randn(2, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    big = resize_noise(noise, 112)
    assert big.shape == (2, 3, 112, 112) and big.dtype == torch.float64
    assert float(big.min()) < -1 and float(big.max()) > 2
    assert torch.allclose(resize_noise(2 * noise, 112), 2 * big)
    assert resize_noise(noise, 28) is not None and torch.equal(resize_noise(noise, 28), noise)
    clean = torch.rand(2, 3, 112, 112)
    assert torch.equal(noisy_input(clean, torch.zeros_like(big)), clean)  # infinite SNR: the clean input, bit for bit
    assert float(noisy_input(clean, big).min()) < -1


@pytest.mark.parametrize("value, key", [(30, "30"), (0.01, "0p01"), (1.0, "1"), (-5, "m5"), (2.5, "2p5")])
def test_snr_key_has_no_dots(value, key):
    assert snr_key(value) == key


@pytest.mark.parametrize("changes, fragment", [
    ({"snr_db": []}, "stability.snr_db"),
    ({"snr_db": "20"}, "stability.snr_db"),
    ({"snr_db": [20, "x"]}, "stability.snr_db"),
    ({"snr_db": [20, True]}, "stability.snr_db"),
    ({"snr_db": [20, float("inf")]}, "stability.snr_db"),
    ({"snr_db": [1, 1.0]}, "duplicate"),
    ({"num_images": -1}, "stability.num_images"),
    ({"batch_size": 0}, "stability.batch_size"),
    ({"seed": 1.5}, "stability.seed"),
])
def test_bad_config_is_a_config_error(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_config({**CFG, **changes})
    check_config(CFG)


# ----------------------------------------------------------------- with the real encoder
@pytest.fixture(scope="module")
def encoder():
    from digit.encoders import build_encoder

    torch.manual_seed(0)
    return build_encoder("tf_efficientnet_lite0", "package", -2, 112)


@pytest.fixture(scope="module")
def fmnist():
    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist not installed (make dataset)")
    from digit.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist(FMNIST, "val")
    return np.repeat(images[..., None], 3, axis=-1), labels  # [N, 28, 28, 3] like the shards


@pytest.fixture(scope="module")
def codebook(encoder, fmnist):
    """K=32 centroids fitted on 64 images' features (other images than the measured ones)."""
    from digit.kmeans import Assigner, fit_kmeans

    with torch.inference_mode():
        feats = encoder(torch.from_numpy(fmnist[0][1000:1064])).reshape(-1, encoder.dim).numpy()
    centroids, _ = fit_kmeans(feats, 32, 10, 0)
    return centroids, Assigner(centroids)


def _batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i:i + batch_size])


def test_clean_input_is_the_pipeline_path(encoder, fmnist):
    batch = torch.from_numpy(fmnist[0][:6])
    with torch.inference_mode():
        assert torch.equal(encoder(clean_input(batch, 112)), encoder(batch))


@pytest.fixture(scope="module")
def result(encoder, codebook, fmnist):
    return measure(encoder, codebook[1], _batches(fmnist[0][:16], 16), SNRS, 0, progress=False)


@needs_fmnist
def test_no_change_at_very_high_snr(result):
    top = result["rows"][0]
    assert top["snr_db"] == 200 and top["change_rate"] == 0.0 and top["cosine"] > 1 - 1e-6
    assert result["clean_repeat_change_rate"] == 0.0 and result["clean_vs_pipeline_change_rate"] == 0.0
    assert result["num_images"] == 16 and result["positions"] == 16 * 49 and result["grid"] == [7, 7]


@needs_fmnist
def test_tokens_change_more_as_snr_falls(result):
    change = [r["change_rate"] for r in result["rows"]]
    cosine = [r["cosine"] for r in result["rows"]]
    assert change == sorted(change), change
    assert all(a > b for a, b in zip(cosine, cosine[1:])), cosine
    # a wide, real effect: almost every token moves at 0 dB, few at 40 dB
    assert change[-1] > 0.6 and change[1] < change[-1] - 0.4, change
    assert cosine[1] > 0.9 and cosine[-1] < 0.6, cosine
    for row in result["rows"]:
        assert abs(row["realised_snr_db"] - row["snr_db"]) < 0.1
    assert result["change_rate_snr0p01"] == change[-1] and result["cosine_snr20"] == cosine[2]


@needs_fmnist
def test_same_seed_same_rows(encoder, codebook, fmnist):
    def rows(seed, batch_size):
        return measure(encoder, codebook[1], _batches(fmnist[0][:6], batch_size), [20, 5], seed,
                       progress=False)["rows"]

    first = rows(0, 6)
    assert rows(0, 6) == first
    assert rows(1, 6) != first
    # The noise is per image, so batching only changes float rounding inside the encoder.
    for a, b in zip(rows(0, 4), first):
        assert abs(a["change_rate"] - b["change_rate"]) <= 2 / (6 * 49)
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-5)


# ----------------------------------------------------------------- stage inputs and outputs
@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, encoder, codebook, fmnist):
    """A tiny data/images (val: 8 images in 2 shards) and models/codebook."""
    from digit.encoders import describe
    from digit.shards import ShardSink, encode_png, write_manifest

    root = tmp_path_factory.mktemp("stability")
    images = root / "images"
    images.mkdir()
    with ShardSink(images, "val", shard_size=5) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:06d}", "png": encode_png(fmnist[0][i, :, :, 0]),
                        "cls": str(int(fmnist[1][i])).encode()})
    write_manifest(images, {"splits": {"val": {"count": 8, "counts": sink.counts, "shards": sink.shards}}})
    cb = root / "codebook"
    cb.mkdir()
    np.save(cb / "centroids.npy", codebook[0])
    (cb / "codebook.json").write_text(json.dumps({"k": 32, "encoder": describe(encoder)}))
    return images, cb


@needs_fmnist
def test_run_stability_report_and_plots(stage_inputs, tmp_path, encoder, monkeypatch):
    import digit.encoders

    # The codebook.json settings are those of the module's encoder: reuse it, skip rebuilding.
    monkeypatch.setattr(digit.encoders, "build_encoder", lambda *args: encoder)
    images, cb = stage_inputs
    cfg = {**CFG, "snr_db": [20, 0.01], "num_images": 7, "batch_size": 4}  # crosses a shard boundary
    report = run_stability(cfg, images, cb, progress=False)
    json.dumps(report, allow_nan=False)  # strict JSON
    assert report["num_images"] == 7 and report["k"] == 32 and report["encoder"]["name"] == "tf_efficientnet_lite0"
    assert report["snr_db"] == [20.0, 0.01] and [r["snr_db"] for r in report["rows"]] == [20.0, 0.01]
    assert report["change_rate_snr20"] <= report["change_rate_snr0p01"]
    assert report["clean_repeat_change_rate"] == 0.0 and report["clean_vs_pipeline_change_rate"] == 0.0
    paths = log_plots(report["rows"], tmp_path / "live")
    for path, y in zip(paths, ("change_rate", "cosine")):
        points = json.loads(path.read_text())
        assert [p["snr_db"] for p in points] == [20.0, 0.01] and all(isinstance(p[y], float) for p in points)
    # num_images=0 = the whole split
    assert run_stability({**cfg, "num_images": 0, "snr_db": [10]}, images, cb, progress=False)["num_images"] == 8


def test_missing_inputs_are_config_errors(tmp_path, stage_inputs):
    images, _ = stage_inputs
    with pytest.raises(ConfigError, match="centroids.npy"):
        run_stability(CFG, images, tmp_path / "nocodebook", progress=False)
    with pytest.raises(ConfigError, match="manifest"):
        run_stability(CFG, tmp_path / "noimages", tmp_path, progress=False)
    (tmp_path / "cb").mkdir()
    np.save(tmp_path / "cb" / "centroids.npy", np.zeros((4, 112), np.float32))
    (tmp_path / "cb" / "codebook.json").write_text(json.dumps({"k": 4}))
    with pytest.raises(ConfigError, match="encoder"):
        run_stability(CFG, images, tmp_path / "cb", progress=False)
    with pytest.raises(ConfigError, match="stability.snr_db"):
        run_stability({**CFG, "snr_db": []}, images, tmp_path / "cb", progress=False)


def _schema_has_stability() -> bool:
    from digit.schema import SCHEMA

    return "stability.snr_db" in SCHEMA


@needs_fmnist
@pytest.mark.skipif(not _schema_has_stability(), reason="digit/schema.py has no stability.* keys yet")
def test_stage_cli(stage_inputs, tmp_path):
    images, cb = stage_inputs
    params = yaml.load((ROOT / "params.yaml").read_text(), Loader=Yaml12Loader)
    params["stability"] = {**CFG, "snr_db": [30, 5], "headline_snr": 30, "num_images": 3, "batch_size": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    args = [sys.executable, "-m", "stages.stability", "--params", str(tmp_path / "params.yaml"),
            "--images", str(images), "--report", str(tmp_path / "r.json"), "--live", str(tmp_path / "live"),
            "--vqgan", ""]  # no VQ tokenizer in this fixture: an empty --vqgan skips its row
    env = {"PYTHONPATH": str(ROOT)}
    proc = sh([*args, "--codebook", str(cb)], ROOT, env=env)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_images"] == 3 and set(report) >= {"change_rate_snr30", "cosine_snr5", "rows"}
    assert "stability:" in proc.stdout
    assert (tmp_path / "live" / "plots" / "custom" / "change_rate.json").is_file()
    assert (tmp_path / "live" / "plots" / "custom" / "cosine.json").is_file()
    # The VQ tokenizer's row is on by default: a missing VQGAN is named, not a traceback.
    proc = sh([*args[:-2], "--vqgan", str(tmp_path / "novq"), "--codebook", str(cb),
               "--report", str(tmp_path / "r2.json")], ROOT, env=env, check=False)
    expect_error(proc, "novq", "not a complete `train_vqgan` output")
    assert not (tmp_path / "r2.json").exists()

    expect_error(sh([*args, "--codebook", str(tmp_path / "none")], ROOT, check=False, env=env), "centroids.npy")


@pytest.mark.skipif(not _schema_has_stability(), reason="digit/schema.py has no stability.* keys yet")
@pytest.mark.parametrize("snr_db", [[], [20, "x"], 20])
def test_params_file_with_bad_snr_list(tmp_path, snr_db):
    from digit.params import load_params

    params = yaml.load((ROOT / "params.yaml").read_text(), Loader=Yaml12Loader)
    params["stability"] = {**CFG, "headline_snr": 20, "snr_db": snr_db}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ConfigError, match="stability.snr_db"):
        check_config(load_params(tmp_path / "params.yaml")["stability"])
    with pytest.raises(ConfigError, match="stability.snr_db"):  # the list itself, not only the headline rule
        check_config(params["stability"])
