"""Image shard -> feature grids: the one place images meet the encoder (stages extract and tokenize)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from digit.precision import AUTOCAST, resolve_precision
from digit.shards import ShardSink, batched, encode_npy, iter_samples, shard_urls


@torch.inference_mode()
def encoded_batches(encoder, url: str, batch_size: int, precision: str = "fp32") -> Iterator[tuple[list, np.ndarray]]:
    """(samples, float16 feature grids [B, gh, gw, D]) per batch of one image shard, in shard order.

    Batches never cross a shard boundary, so a shard's features do not depend on which process or stage
    encodes it: `tokenize` re-encoding a shard (encoder.cache: sample) gets the bits `extract` got."""
    device = encoder.mean.device
    precision = resolve_precision(precision, device)
    for batch in batched(iter_samples([url]), batch_size):
        images = torch.from_numpy(np.stack([s["image"] for s in batch])).to(device)
        with torch.autocast(device.type, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            feats = encoder(images)
        yield batch, feats.float().cpu().numpy().astype(np.float16)


def encode_shard(encoder, url: str, out_dir: Path, split: str, index: int, batch_size: int,
                 precision: str = "fp32", rows: Callable[[int], np.ndarray] | None = None) -> int:
    """Encode one image shard into the feature shard of the same index; return its image count.

    rows(i) -> the flattened grid positions to keep of the shard's i-th image ([n, D] rows are written;
    an image with none is not written): the K-Means sample only (encoder.cache: sample). None keeps
    every image's whole grid [gh, gw, D]."""
    images = 0
    with ShardSink(out_dir, split, shard_size=10**12, start_index=index) as sink:
        for batch, feats in encoded_batches(encoder, url, batch_size, precision):
            for sample, grid in zip(batch, feats):
                if rows is None:
                    sink.write({"__key__": sample["__key__"], "npy": encode_npy(grid),
                                "cls": str(sample["cls"]).encode()})
                elif len(keep := rows(images)):
                    sink.write({"__key__": sample["__key__"], "npy": encode_npy(grid.reshape(-1, grid.shape[-1])[keep]),
                                "cls": str(sample["cls"]).encode()})
                images += 1
        if sink.total == 0:  # an empty input shard (or one without sampled rows) still gets an (empty) output shard
            sink.open_next()
    return images


def split_grids(split: str, features: str, images: str | None = None, encoder=None, batch_size: int = 0,
                precision: str = "fp32") -> Iterator[tuple[dict, np.ndarray]]:
    """(sample, float16 grid [gh, gw, D]) of every image of a split, in order: extract's cached grids, or,
    given the encoder, the image shards encoded now (encoder.cache: sample), the same bits."""
    if encoder is None:
        for sample in iter_samples(shard_urls(features, split)):
            yield sample, sample["npy"]
        return
    for url in shard_urls(images, split):
        for batch, feats in encoded_batches(encoder, url, batch_size, precision):
            yield from zip(batch, feats)
