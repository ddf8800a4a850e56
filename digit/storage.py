"""Bytes the stages write, and the pre-flight check that refuses to start a stage that would fill its disk.

One model of bytes for two readers: the cost model (`python -m digit.cost PRESET`, per stage before
renting GPUs) and the stages themselves, which call `require_space` with their actual counts before
any heavy work. At ImageNet scale the worst failure is a full disk after hours; this turns it into
an error in the first second that names both numbers.

The figures are upper bounds before compression (PNG's ratio is a measured assumption, below).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from digit.errors import ConfigError

# Bytes per stored image pixel (RGB): lossless PNG of natural photos is about half the raw bytes;
# Fashion-MNIST's flat backgrounds compress to about a tenth (measured on the default shards).
PNG_BYTES_PER_PIXEL = {"fashion-mnist": 0.3, "imagefolder": 1.5}
FEATURE_BYTES = 2  # float16 feature grids (stage extract)
TOKEN_BYTES = 2    # uint16-equivalent per token position, before Parquet compression


def image_bytes(n: int, size: int, source: str) -> float:
    """n PNG images of size x size px (data shards, decoded samples)."""
    return n * size * size * PNG_BYTES_PER_PIXEL[source]


def feature_bytes(n: int, positions: int, dim: int) -> float:
    return n * positions * dim * FEATURE_BYTES


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
