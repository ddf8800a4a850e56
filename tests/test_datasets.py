import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digit.datasets import (FASHION_MNIST_CLASSES, load_fashion_mnist, load_image, read_idx,
                            scan_imagefolder, stratified_subset)
from digit.errors import BadImageError, ConfigError

SIZE = 32
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _rgb(h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _make_tree(base: Path) -> tuple[list[Path], list[Path]]:
    """Write every supported image form plus three bad files; return (good, bad)."""
    for c in ("cat", "dog", "fox"):
        (base / c).mkdir(parents=True)
    good = {
        "cat/rgb.jpg": lambda p: Image.fromarray(_rgb()).save(p),
        "cat/gray.png": lambda p: Image.fromarray(_rgb()[..., 0]).save(p),
        "cat/rgba.png": lambda p: Image.fromarray(np.dstack([_rgb(), _rgb(seed=1)[..., :1]])).save(p),
        "dog/pal.gif": lambda p: Image.fromarray(_rgb(30, 30)).convert("P").save(p),
        "dog/deep.png": lambda p: Image.fromarray(
            np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)).save(p),
        "dog/cmyk.jpg": lambda p: Image.fromarray(_rgb()).convert("CMYK").save(p),
        "fox/pic.webp": lambda p: Image.fromarray(_rgb(64, 20)).save(p),
        "fox/sub/pic.bmp": lambda p: Image.fromarray(_rgb(20, 64)).save(p),
    }
    for rel, write in good.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        write(base / rel)
    assert Image.open(base / "dog/deep.png").mode.startswith("I")
    assert Image.open(base / "dog/cmyk.jpg").mode == "CMYK"
    full = (base / "cat/gray.png").read_bytes()
    (base / "fox/trunc.png").write_bytes(full[: len(full) // 2])
    (base / "fox/empty.png").write_bytes(b"")
    (base / "dog/notes.txt").write_text("not an image\n")
    (base / "cat/.DS_Store").write_bytes(b"hidden junk")  # hidden: must be ignored
    return ([base / r for r in good],
            [base / "fox/trunc.png", base / "fox/empty.png", base / "dog/notes.txt"])


# ----------------------------------------------------------------------------- images

def test_load_every_form_and_reject_bad(tmp_path):
    good, bad = _make_tree(tmp_path)
    classes, splits = scan_imagefolder(tmp_path, val_size=3, seed=0)
    assert classes == ["cat", "dog", "fox"]
    found = sorted(p for s in splits.values() for p, _ in s)
    assert found == sorted(str(p) for p in good + bad)
    for p in good:
        arr = load_image(p, SIZE)
        assert arr.dtype == np.uint8 and arr.shape == (SIZE, SIZE, 3), p
    for p in bad:
        with pytest.raises(BadImageError, match=re.escape(str(p))):
            load_image(p, SIZE)


def test_16bit_white_is_255_and_alpha_on_white(tmp_path):
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / "w.png")
    Image.fromarray(np.full((20, 30), 32896, np.uint16)).save(tmp_path / "g.png")  # 128 * 257
    assert (load_image(tmp_path / "w.png", 16) >= 254).all()
    assert (np.abs(load_image(tmp_path / "g.png", 16).astype(int) - 128) <= 1).all()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png", 8) == 255).all()


def test_resize_and_center_crop(tmp_path):
    # Left third red, middle green, right third blue: a center crop of a wide image is green.
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 10)
    assert out.shape == (10, 10, 3)
    assert (out[:, 2:8, 1] > 200).all() and (out[:, 2:8, [0, 2]] < 50).all()


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 * 100 -> error
    with pytest.raises(BadImageError, match="big.png"):
        load_image(tmp_path / "big.png", 8)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "anim.gif", 8)
    assert (out[..., 0] > 200).all() and (out[..., 2] < 50).all()


# ----------------------------------------------------------------------------- folder layouts

def _write_files(base: Path, counts: dict[str, int]):
    for c, n in counts.items():
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (base / c / f"{i:03d}.jpg").write_bytes(b"x")  # content irrelevant for scanning


def test_train_val_layout(tmp_path):
    _write_files(tmp_path / "train", {"a": 3, "b": 2, "c": 1})
    _write_files(tmp_path / "val", {"a": 1, "c": 2})
    classes, splits = scan_imagefolder(tmp_path, val_size=0, seed=0)
    assert classes == ["a", "b", "c"]
    assert [c for _, c in splits["train"]] == [0, 0, 0, 1, 1, 2]
    assert [c for _, c in splits["val"]] == [0, 2, 2]
    assert all("/val/" in p for p, _ in splits["val"])
    assert [p for p, _ in splits["train"]] == sorted(p for p, _ in splits["train"])


def test_flat_layout_seeded_stratified_split(tmp_path):
    _write_files(tmp_path, {"a": 30, "b": 20, "c": 10})
    classes, s0 = scan_imagefolder(tmp_path, val_size=12, seed=0)
    _, s0b = scan_imagefolder(tmp_path, val_size=12, seed=0)
    _, s1 = scan_imagefolder(tmp_path, val_size=12, seed=1)
    assert classes == ["a", "b", "c"]
    assert len(s0["val"]) == 12 and len(s0["train"]) == 48
    assert s0 == s0b and s0["val"] != s1["val"]
    assert sorted(np.bincount([c for _, c in s0["val"]])) == [2, 4, 6]
    assert not {p for p, _ in s0["val"]} & {p for p, _ in s0["train"]}
    with pytest.raises(ConfigError, match="data.val_size"):
        scan_imagefolder(tmp_path, val_size=0, seed=0)


@pytest.mark.parametrize("setup", ["missing", "file", "empty", "empty_classes", "half_split"])
def test_scan_errors_name_data_root(tmp_path, setup):
    root = tmp_path / "root"
    if setup == "file":
        root.write_text("x")
    elif setup == "empty":
        root.mkdir()
    elif setup == "empty_classes":
        (root / "a").mkdir(parents=True)
        (root / ".hidden").mkdir()
        (root / "a" / ".junk").write_text("x")
    elif setup == "half_split":
        _write_files(root / "train", {"a": 2})
    with pytest.raises(ConfigError, match="data.root"):
        scan_imagefolder(root, val_size=1, seed=0)


# ----------------------------------------------------------------------------- stratified_subset

def test_stratified_subset():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    rng = np.random.default_rng(3)
    labels = labels[rng.permutation(len(labels))]
    for n in (1, 7, 33, 99):
        idx = stratified_subset(labels, n, seed=5)
        assert len(idx) == n and len(set(idx.tolist())) == n
        assert (np.diff(idx) > 0).all()
        expected = np.bincount(labels) * n / len(labels)
        assert (np.abs(np.bincount(labels[idx], minlength=4) - expected) < 1).all()
        assert (stratified_subset(labels, n, seed=5) == idx).all()
    assert not (stratified_subset(labels, 33, 1) == stratified_subset(labels, 33, 2)).all()
    assert (stratified_subset(labels, 0, 0) == np.arange(100)).all()
    assert (stratified_subset(labels, 500, 0) == np.arange(100)).all()


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST

def _write_idx(path: Path, arr: np.ndarray, code: int):
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(data)


def test_idx_roundtrip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 1], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x08)  # plain file also accepted
    x, y = load_fashion_mnist(tmp_path, "val")
    assert x.dtype == np.uint8 and (x == imgs).all()
    assert y.dtype == np.int64 and (y == labels).all()
    ints = np.arange(6, dtype=">i4").reshape(2, 3)
    _write_idx(tmp_path / "ints.idx", ints, 0x0C)
    assert (read_idx(tmp_path / "ints.idx") == ints).all()
    with pytest.raises(ConfigError, match="data.root"):
        load_fashion_mnist(tmp_path, "train")  # train files missing


def test_idx_malformed(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ConfigError, match="bad.idx"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ConfigError, match="short.idx"):
        read_idx(tmp_path / "short.idx")


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_fashion_mnist(tmp_path / "nope", "train")


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist(REAL_FMNIST, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert set(np.unique(y).tolist()) == set(range(len(FASHION_MNIST_CLASSES)))
