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
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from webdataset.gopen import Pipe as WdsPipe
from webdataset import utils as wds_utils
from PIL import Image

from digit.errors import ConfigError



def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_url_template(root: str | os.PathLike) -> bool:
    """True when a shard root is a URL template: `{}` stands for a file name."""
    return "{}" in str(root)


def shard_location(root: str | os.PathLike, name: str) -> str:
    """Where the file `name` (a shard, manifest.json) of a stage output lives.

    `root` is a directory (`data/features`) or a URL template in which `{}`
    stands for the file name: `pipe:cat /data/images/{}`,
    `pipe:aws s3 cp s3://bucket/features/{} -`, `https://host/images/{}`.
    """
    root = str(root)
    if is_url_template(root):
        return root.replace("{}", name)
    return f"{root.rstrip('/')}/{name}"


def shard_urls(root: str | os.PathLike, split: str) -> list[str]:
    """Shard paths/URLs of one split, in order, as listed by the stage's manifest.

    Going through the manifest (not a directory glob) means a partial or
    foreign .tar in the directory is never read, and `root` may be a URL
    template (see shard_location) that webdataset opens: `pipe:` commands,
    http(s), object storage through its command-line client.
    """
    manifest = read_manifest(root)
    try:
        names = manifest["splits"][split]["shards"]
    except (KeyError, TypeError):
        raise ConfigError(f"{shard_location(root, 'manifest.json')}: no split '{split}'; "
                          f"re-run the stage that writes {root}")
    return [shard_location(root, name) for name in names]


# --- encoding ---------------------------------------------------------------

def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    mode = "L" if image.ndim == 2 else "RGB"
    # compress_level fixed so the same pixels always give the same bytes.
    Image.fromarray(image, mode=mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> tuple[str, bytes]:
    """(member extension, bytes) of one image for `data.image_format`: lossless PNG, or JPEG at `quality`,
    what 256 px ImageNet pipelines store (about a quarter of PNG's bytes on photographs, docs/scaling.md).
    Readers see either as sample["image"]."""
    if image_format == "png":
        return "png", encode_png(image)
    if image_format != "jpeg":
        raise ConfigError(f"data.image_format: {image_format!r} is not png or jpeg")
    buf = io.BytesIO()
    # Fixed settings (no optimize pass): the same pixels always give the same bytes.
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buf, format="JPEG", quality=quality)
    return "jpg", buf.getvalue()


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


IMAGE_MEMBERS = {"png", "jpg", "jpeg", "webp"}  # decoded into sample["image"], whichever format was stored


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
        out["image" if ext.lower() in IMAGE_MEMBERS else ext.lower()] = decoder(data)
    return out


def iter_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Yield decoded samples from shard paths/URLs/`pipe:` commands, in order.

    A shard that cannot be opened or read (missing file, failed command) is a
    ConfigError naming its URL.
    """
    urls = list(urls)
    if not urls:
        return iter(())
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None,
                             workersplitter=None).map(decode_sample)
    return _reading(iter(dataset), set(urls))


def _reading(samples: Iterator[dict], urls: set[str]) -> Iterator[dict]:
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except (OSError, tarfile.TarError) as exc:
            # webdataset appends the shard's URL (and its stream) to the arguments of errors from opening
            # or reading it; a local file that cannot be opened names itself.
            named = [getattr(exc, "filename", None), *reversed(exc.args)]
            url = next((a for a in named if isinstance(a, str) and a in urls), None)
            if url is None:
                raise
            raise ConfigError(f"{url}: cannot read this shard ({_read_failure(exc)}); check that the file "
                              "exists and the command/URL prints it (try it in a shell); if the manifest "
                              "lists a shard that is gone, re-run the stage that wrote it") from None
        yield sample


def _read_failure(exc: Exception) -> str:
    """What went wrong reading a shard, in words: a failed command's exit status over its symptom."""
    pipe = next((a for a in exc.args if isinstance(a, WdsPipe)), None)
    if pipe is not None:  # a command (pipe:, curl, ...) whose output ended early: did it fail?
        try:
            pipe.stream.close()
            status = pipe.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - best effort, the symptom below still names the problem
            status = None
        if status not in (None, 0, 141, -13):  # 141 / -13: SIGPIPE after we stopped reading
            return f"the command exited with status {status}"
    what = getattr(exc, "strerror", None) or str(exc.args[0] if exc.args else exc)
    status = re.search(r": exit (-?\d+) \(read\)", what)  # a webdataset Pipe's own error: raw arguments + status
    return f"the command exited with status {status.group(1)}" if status else what


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


def _read_url(url: str) -> bytes:
    """The bytes behind a URL: `pipe:` commands through the shell, anything else through webdataset's gopen."""
    if url.startswith("pipe:"):
        if wds_utils.enforce_security:
            raise OSError("pipe: URLs are disabled (WDS_SECURE=1)")
        proc = subprocess.run(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(f"the command exited with status {proc.returncode}" + (f": {said[-1]}" if said else ""))
        return proc.stdout
    stream = wds.gopen(url, "rb")
    try:
        with stream:
            return stream.read()
    except OSError as exc:
        status = getattr(stream, "status", None)
        if status is None:
            raise
        # webdataset runs curl/gsutil/... as a Pipe whose own message is its raw argument tuple.
        raise OSError(f"the download command exited with status {status}") from exc


def read_manifest(root: str | os.PathLike) -> dict:
    """manifest.json of a stage output: a directory, or a URL template (see shard_location)."""
    if is_url_template(root):
        url = shard_location(root, "manifest.json")
        try:
            data = _read_url(url)
            manifest = json.loads(data)
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, or gopen without a handler for the scheme
            hint = ("webdataset opens pipe:, file:, http(s):, gs:, ais:, hf: URLs; for other storage "
                    "use its command-line client, e.g. 'pipe:aws s3 cp s3://bucket/features/{} -'"
                    if "no gopen handler" in str(exc) else
                    "check that the command/URL prints the file (try it in a shell) and that it points at "
                    "a complete stage output (re-run `dvc repro`, or upload the whole directory)")
            raise ConfigError(f"{url}: cannot read the manifest through this URL ({exc}); `{{}}` in "
                              f"{root} stands for a file name; {hint}") from None
        return manifest
    text = str(root)
    if text.startswith("pipe:") or "://" in text:
        raise ConfigError(f"{root}: a URL or pipe: command as shard root needs `{{}}` where the file name goes, "
                          "e.g. 'pipe:cat /data/images/{}' or 'pipe:aws s3 cp s3://bucket/features/{} -'")
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{path}: manifest missing; {root} is not a complete stage output, re-run `dvc repro`")
    return json.loads(path.read_text())


def write_manifest(directory: Path, manifest: dict) -> None:
    (Path(directory) / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class WindowedShards:
    """Batches of one split streamed shard by shard, never loaded whole; subclasses say what a shard holds.

    `parts(index)` returns a shard's arrays (same first dimension). Shuffling permutes the
    shard order per epoch and mixes rows within a window of `window` shards (memory:
    window x shard size), a pure function of (seed, epoch); a shuffled epoch yields full
    batches only, `epoch_length` of them.
    """

    counts: list[int]
    window: int

    def parts(self, index: int) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def _order(self, seed: int, epoch: int, shuffle: bool):
        rng = np.random.default_rng([seed, epoch])
        return rng, (rng.permutation(len(self.counts)) if shuffle else np.arange(len(self.counts)))

    def epoch_length(self, batch_size: int, seed: int, epoch: int) -> int:
        """How many batches batches(batch_size, seed, epoch) yields (shuffled): no shard is read."""
        _, order = self._order(seed, epoch, True)
        return sum(sum(self.counts[int(i)] for i in order[s:s + self.window]) // batch_size
                   for s in range(0, len(order), self.window))

    def windowed_batches(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True, limit: int = 0):
        """Yield tuples of arrays; with shuffle, full batches only, in an order fixed by (seed, epoch)."""
        rng, order = self._order(seed, epoch, shuffle)
        served = 0
        for start in range(0, len(order), self.window):
            shards = [self.parts(int(i)) for i in order[start:start + self.window]]
            arrays = [np.concatenate(column) for column in zip(*shards)]
            rows = len(arrays[0])
            if shuffle:
                perm = rng.permutation(rows)
                arrays = [a[perm] for a in arrays]
            stop = rows - rows % batch_size if shuffle else rows
            for i in range(0, stop, batch_size):
                if limit and served >= limit:
                    return
                take = slice(i, min(i + batch_size, stop, i + (limit - served if limit else batch_size)))
                served += take.stop - take.start
                yield tuple(a[take] for a in arrays)
