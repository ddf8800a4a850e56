"""Bytes the stages write, and the pre-flight check that refuses to start a stage that would fill its disk.

One model of bytes for two readers: the cost model (`python -m digit.cost PRESET`, per stage before
renting GPUs) and the stages themselves, which call `require_space` with their actual counts before
any heavy work. At ImageNet scale the worst failure is a full disk after hours; this turns it into
an error in the first second that names both numbers.

The figures are estimates from measured ratios (below), tokens before Parquet's compression.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from digit.errors import ConfigError

# Bytes per stored image pixel, by data.image_format and data.source, measured (docs/scaling.md, "Storage"):
# PNG of 256 px photographs (scikit-image's sample photos) 1.5, JPEG at quality 95 of the same 0.5
# (0.40 over all eight, 0.44-0.60 for the five natural photos); Fashion-MNIST's 28 px PNGs 0.64, with
# their headers (JPEG 1.1: its headers outweigh 784 pixels).
BYTES_PER_PIXEL = {"png": {"fashion-mnist": 0.64, "imagefolder": 1.5},
                   "jpeg": {"fashion-mnist": 1.1, "imagefolder": 0.5}}
# A WebDataset shard is a tar: each member costs a 512-byte header and pads its data to 512 bytes.
TAR_BLOCK = 512
FEATURE_BYTES = 2  # float16 feature grids (stage extract)
TOKEN_BYTES = 2    # uint16-equivalent per token position, before Parquet compression


def tar_member(nbytes: float) -> float:
    """Bytes of one tar member holding nbytes of data: a header block, the data, half a block of padding."""
    return TAR_BLOCK + nbytes + TAR_BLOCK / 2


def image_bytes(n: int, size: int, source: str, image_format: str = "png") -> float:
    """n image samples of size x size px in shards (the image, its label and its origin as three members)."""
    return n * (tar_member(size * size * BYTES_PER_PIXEL[image_format][source]) + 2 * tar_member(TAR_BLOCK / 2))


def feature_bytes(n: int, positions: int, dim: int) -> float:
    """n float16 arrays of positions x dim in shards (with its label member), e.g. one feature grid per image."""
    return n * (tar_member(positions * dim * FEATURE_BYTES + 128) + tar_member(TAR_BLOCK / 2))


def token_bytes(n: int, positions: int) -> float:
    return n * positions * TOKEN_BYTES


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def free_bytes(path: str | Path) -> int:
    """Free bytes of the file system `path` is (or will be) on: its nearest existing ancestor's."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_space(stage: str, out: str | Path, needed: float, what: str) -> None:
    """Refuse, before any work, when `needed` bytes will not fit on out's file system."""
    free = free_bytes(out)
    if needed > free:
        raise ConfigError(f"{stage}: {what} need about {human_bytes(needed)} at {out}, but its file system has "
                          f"{human_bytes(free)} free; free space there, or put the workspace on a larger disk "
                          f"(DVC's cache may need as much again unless cache.type links)")
