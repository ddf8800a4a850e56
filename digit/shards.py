"""WebDataset shards: writing them deterministically, reading them safely.

Reading never uses webdataset's default decoders, because those unpickle
`.pyd`/`.pickle` members: a shard from object storage is untrusted input.
Each member extension has one explicit decoder below; any other extension is
rejected with a message naming the shard and the member.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from digit.errors import ConfigError



def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_urls(root: str | os.PathLike, split: str) -> list[str]:
    """Shard paths of one split, in order, as listed by the stage's manifest.

    Going through the manifest (not a directory glob) means a partial or
    foreign .tar in the directory is never read, and `root` may be any URL
    webdataset opens (`pipe:` commands, object storage) in later stages.
    """
    manifest = read_manifest(root)
    try:
        names = manifest["splits"][split]["shards"]
    except KeyError:
        raise ConfigError(f"{root}/manifest.json: no split '{split}'; re-run the stage that writes {root}")
    return [f"{str(root).rstrip('/')}/{name}" for name in names]


# --- encoding ---------------------------------------------------------------

def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    mode = "L" if image.ndim == 2 else "RGB"
    # compress_level fixed so the same pixels always give the same bytes.
    Image.fromarray(image, mode=mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class ShardSink:
    """Writes numbered shards of at most `shard_size` samples into a directory.

    mtime is fixed so identical samples give byte-identical tars (DVC then
    sees an unchanged output and skips downstream stages).
    """

    def __init__(self, directory: Path, split: str, shard_size: int, start_index: int = 0):
        self.directory, self.split, self.shard_size = Path(directory), split, shard_size
        self.index, self.count_in_shard, self.total = start_index, 0, 0
        self.writer = None
        self.shards: list[str] = []
        self.counts: list[int] = []  # samples per shard, for the manifest

    def open_next(self):
        name = shard_name(self.split, self.index)
        self.writer = wds.TarWriter(str(self.directory / name), encoder=False, mtime=0)
        self.shards.append(name)
        self.counts.append(0)
        self.count_in_shard = 0

    def write(self, sample: dict[str, bytes]) -> None:
        if self.writer is None:
            self.open_next()
        self.writer.write(sample)
        self.count_in_shard += 1
        self.counts[-1] += 1
        self.total += 1
        if self.count_in_shard >= self.shard_size:
            self.writer.close()
            self.writer = None
            self.index += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- decoding (explicit allow-list) ----------------------------------------

def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}


def _decode_npy(data: bytes) -> np.ndarray:
    """np.load without pickles, parsing each distinct .npy header once.

    Every feature grid of a run has the same header, and parsing it (a Python
    literal) costs more than reading the array: caching it makes reading
    feature shards about twice as fast.
    """
    if data[:8] != b"\x93NUMPY\x01\x00":  # only format 1.0 takes the fast path
        return np.load(io.BytesIO(data), allow_pickle=False)
    end = 10 + int.from_bytes(data[8:10], "little")
    header = data[:end]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        buf = io.BytesIO(data)
        np.lib.format.read_magic(buf)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        if dtype.hasobject:
            raise ValueError("object arrays would need pickle; refused")
        parsed = _NPY_HEADERS[header] = (dtype, shape, fortran)
    dtype, shape, fortran = parsed
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=end)
    return array.reshape(shape, order="F" if fortran else "C")


DECODERS = {
    "png": _decode_image,
    "jpg": _decode_image,
    "jpeg": _decode_image,
    "webp": _decode_image,
    "npy": _decode_npy,
    "json": lambda b: json.loads(b.decode("utf-8")),
    "cls": lambda b: int(b.decode("ascii").strip()),
    "txt": lambda b: b.decode("utf-8"),
}


def decode_sample(sample: dict) -> dict:
    out = {"__key__": sample["__key__"], "__url__": sample.get("__url__")}
    for ext, data in sample.items():
        if ext.startswith("__"):
            continue
        decoder = DECODERS.get(ext.lower())
        if decoder is None:
            raise ConfigError(
                f"{sample.get('__url__')}: member {sample['__key__']}.{ext} has a disallowed type "
                f"'.{ext}'; shards may only hold {', '.join(sorted(DECODERS))} (pickles are never loaded)"
            )
        out[ext.lower()] = decoder(data)
    return out


def iter_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Yield decoded samples from shard paths/URLs/`pipe:` commands, in order."""
    urls = list(urls)
    if not urls:
        return iter(())
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None,
                             workersplitter=None).map(decode_sample)
    return iter(dataset)


def batched(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group a sample stream into lists of `size` (the last may be shorter)."""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{path}: manifest missing; {root} is not a complete stage output, re-run `dvc repro`")
    return json.loads(path.read_text())


def write_manifest(directory: Path, manifest: dict) -> None:
    (Path(directory) / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
