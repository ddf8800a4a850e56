"""Encoders: converted package weights are right, feature grids have the documented shapes,
and every bad `encoder.*` setting fails early with a ConfigError naming the key."""

import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file
from skimage import data

from digit import weights
from digit.encoders import DEFAULT_ENCODER, PAPER_ENCODER, build_encoder, describe, validate_encoder
from digit.errors import ConfigError

@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DIGIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield weights.package_weights_path()
    mp.undo()


def _classifier(state_dict):
    model = timm.create_model(DEFAULT_ENCODER, pretrained=False).eval()
    model.load_state_dict(state_dict)
    return model


def test_package_weights_classify_real_images(weights_file):
    model = _classifier(load_file(weights_file))
    # The package's own preprocessing: the whole photo resized to 224x224
    # (bilinear), scaled to [-1, 1] (EfficientNet-Lite's mean/std 0.5).
    tf = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                    T.Normalize([0.5] * 3, [0.5] * 3)])
    x = torch.stack([tf(Image.fromarray(data.chelsea())), tf(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        logits = model(x)
    probs = logits.softmax(-1)
    assert logits[0].argmax().item() == 285 and probs[0, 285] > 0.7  # Egyptian cat (0.79 measured)
    assert logits[1].argmax().item() == 967 and probs[1, 967] > 0.8  # espresso

    # The conversion is the raw .pth zipped in order onto timm's keys.
    raw = torch.load(weights.lite0_package_file(), weights_only=True)
    ordered = dict(zip(model.state_dict(), raw.values()))
    with torch.no_grad():
        assert torch.equal(_classifier(ordered)(x), logits)


def test_package_weights_path_idempotent_and_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGIT_CACHE", str(tmp_path))
    first = weights.package_weights_path()
    mtime = first.stat().st_mtime_ns
    assert weights.package_weights_path() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left


def test_default_encoder_grid(weights_file, monkeypatch):
    monkeypatch.setenv("DIGIT_CACHE", str(weights_file.parent))
    enc = build_encoder(DEFAULT_ENCODER, "package", -2, 112)
    assert (enc.grid, enc.dim, enc.stride) == ((7, 7), 112, 16)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    images = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = enc(images)
    assert out.shape == (2, 7, 7, enc.dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(enc(images), out)  # deterministic
    # Same features as the unpruned model's stride-16 stage (pruning changes nothing).
    full = _classifier(load_file(weights_file))
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        (ref,) = full.forward_intermediates((x - 0.5) / 0.5, indices=[3], intermediates_only=True)
    # Tolerance: the encoder runs channels-last, which reorders oneDNN's float sums.
    torch.testing.assert_close(enc(x), ref.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    assert describe(enc) == {
        "name": DEFAULT_ENCODER, "weights": "package", "layer": -2, "img_size": 112,
        "grid": [7, 7], "dim": 112, "stride": 16,
    }


def test_paper_encoder_grid():
    enc = build_encoder(PAPER_ENCODER, "none", -3, 224)
    assert enc.index == 9  # output of the 3rd block from the end of 12
    out = enc(torch.rand(2, 3, 64, 80))
    assert out.shape == (2, 16, 16, 768) and torch.isfinite(out).all()


def test_local_weights_file(tmp_path, weights_file):
    # A {"state_dict": ...} .pth works like the package weights.
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": load_file(weights_file)}, path)
    enc = build_encoder(DEFAULT_ENCODER, str(path), -2, 112)
    assert enc.grid == (7, 7)
    # A file for another architecture is a config error, not a traceback.
    with pytest.raises(ConfigError, match="encoder.weights"):
        build_encoder("tf_efficientnet_lite1", str(path), -2, 112)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(name="tf_efficientnet_lite9"), "encoder.name"),
        (dict(weights="/nonexistent/weights.safetensors"), "encoder.weights"),
        (dict(weights="hug"), "encoder.weights"),
        (dict(name=PAPER_ENCODER, weights="package", layer=-3, img_size=224), "encoder.weights"),
        (dict(layer=99), "encoder.layer"),
        (dict(layer=-99), "encoder.layer"),
        (dict(img_size=100), "encoder.img_size"),
        (dict(img_size=0), "encoder.img_size"),
        (dict(name=PAPER_ENCODER, weights="none", layer=-3, img_size=220), "encoder.img_size"),
    ],
)
def test_bad_settings(kwargs, key):
    args = dict(name=DEFAULT_ENCODER, weights="package", layer=-2, img_size=112) | kwargs
    with pytest.raises(ConfigError, match=key):
        validate_encoder(**args)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError, match="tf_efficientnet_lite"):
        validate_encoder("tf_efficientnet_lite9", "none", -2, 112)


def test_hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ConfigError, match="encoder.weights=hub: offline.*package"):
        validate_encoder(DEFAULT_ENCODER, "hub", -2, 112)
    with pytest.raises(ConfigError, match="encoder.weights=hub: offline"):
        validate_encoder(PAPER_ENCODER, "hub", -3, 224)
