"""Dataset readers: Fashion-MNIST (IDX files) and ImageNet-style image folders.

Everything here is deterministic for a given seed so that DVC stages are reproducible.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from digit.errors import BadImageError, ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

_FASHION_FIX = ("install it with `apt-get install dataset-fashion-mnist` (puts the files in "
                "/usr/share/datasets/fashion-mnist) or point data.root at a folder holding them")

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST

def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian array."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{path}: cannot read IDX file ({e}); re-download it or fix data.root") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ConfigError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()}); "
                          "re-download it or fix data.root")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: IDX header truncated; re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(f"{path}: IDX payload is {len(raw) - header} bytes but dims {shape} need "
                          f"{expected}; the file is truncated or corrupt, re-download it")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # copy: writable and native byte order


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(root, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) for split "train" or "val" (= t10k)."""
    prefixes = {"train": "train", "val": "t10k"}
    if split not in prefixes:
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root: Fashion-MNIST folder {root} does not exist; {_FASHION_FIX}")
    stems = [f"{prefixes[split]}-images-idx3-ubyte", f"{prefixes[split]}-labels-idx1-ubyte"]
    found = [_find_idx(root, s) for s in stems]
    missing = [s + "(.gz)" for s, p in zip(stems, found) if p is None]
    if missing:
        raise ConfigError(f"data.root: {root} lacks {', '.join(missing)}; {_FASHION_FIX}")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ConfigError(f"{found[0]}: expected uint8 images of shape [N,28,28], got "
                          f"{images.dtype} {images.shape}; fix data.root")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ConfigError(f"{found[1]}: {labels.shape} labels for {len(images)} images; fix data.root")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- subsets and splits

def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded class-stratified subset of exactly n items (n=0 or n>=len: all)."""
    labels = np.asarray(labels)
    if n < 0:
        raise ConfigError(f"subset size must be >= 0, got {n}")
    if n == 0 or n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(np.int64)
    # Largest remainder: give the leftover slots to the classes with the biggest fractional
    # parts (stable sort -> ties go to the lower class id, so it stays deterministic).
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(class_dir: Path) -> list[str]:
    # No extension filter on purpose: a stray non-image must surface as a BadImageError later.
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames
                if not f.startswith(".") and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(out)


def scan_imagefolder(root, val_size: int, seed: int
                     ) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """List (path, class_idx) pairs for train and val, for either supported folder layout."""
    root = Path(root)
    fix = "point data.root at a folder laid out as <root>/<class>/<img> or <root>/{train,val}/<class>/<img>"
    if not root.exists():
        raise ConfigError(f"data.root: {root} does not exist; {fix}")
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a directory; {fix}")

    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        raise ConfigError(f"data.root: {root} has a '{'train' if has_train else 'val'}' folder but no "
                          f"'{'val' if has_train else 'train'}' folder; add it or {fix}")

    if has_train:  # ImageNet layout: the split is given by the folders
        classes = [d.name for d in _visible_dirs(root / "train")]
        if not classes:
            raise ConfigError(f"data.root: {root / 'train'} has no class folders; {fix}")
        index = {c: i for i, c in enumerate(classes)}
        splits = {}
        for split in ("train", "val"):
            extra = [d.name for d in _visible_dirs(root / split) if d.name not in index]
            if extra:
                raise ConfigError(f"data.root: {root / split} has class folders not in train: "
                                  f"{extra[:5]}; remove them or add them to train")
            splits[split] = [(p, index[d.name]) for d in _visible_dirs(root / split)
                             for p in _files_under(d)]
        if not splits["train"] and not splits["val"]:
            raise ConfigError(f"data.root: no files found under {root}; {fix}")
        return classes, splits

    # Flat layout: carve a seeded, stratified validation set out of all images.
    class_dirs = _visible_dirs(root)
    if not class_dirs:
        raise ConfigError(f"data.root: {root} has no class folders; {fix}")
    classes = [d.name for d in class_dirs]
    items = [(p, i) for i, d in enumerate(class_dirs) for p in _files_under(d)]
    if not items:
        raise ConfigError(f"data.root: no files found in the class folders of {root}; {fix}")
    if not 0 < val_size < len(items):
        raise ConfigError(f"data.val_size must be between 1 and {len(items) - 1} for a folder "
                          f"without train/val subfolders ({len(items)} images), got {val_size}; "
                          "set data.val_size accordingly")
    val_idx = set(stratified_subset(np.array([c for _, c in items]), val_size, seed).tolist())
    return classes, {"train": [it for k, it in enumerate(items) if k not in val_idx],
                     "val": [it for k, it in enumerate(items) if k in val_idx]}


# ----------------------------------------------------------------------------- image decoding

# Exceptions PIL raises on corrupt data (decoders are not consistent about which one).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                  Image.DecompressionBombError)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit data: map 0..65535 onto 0..255 (PIL's own convert would clip at 255).
        arr = np.asarray(img).astype(np.float64).clip(0, 65535) / 257.0
        img = Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr  # [0,1] floats are common
        img = Image.fromarray(np.rint(np.nan_to_num(arr).clip(0, 255)).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent pixels become white rather than whatever colour hides under alpha=0.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def load_image(path, size: int) -> np.ndarray:
    """Decode any image to RGB, resize its shorter side to `size`, center-crop: uint8 [size,size,3]."""
    path = str(path)
    if os.path.getsize(path) == 0:
        raise BadImageError(f"{path}: empty file")
    try:
        with Image.open(path) as img:  # first frame for animated formats
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # DCT-domain downscale: much faster, stays >= size
            img.load()  # force the full decode so truncation is caught here
            img = _to_rgb(img)
    except _DECODE_ERRORS as e:
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)
