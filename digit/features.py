"""Image shard -> feature shard, the unit of work of the `extract` stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digit.precision import AUTOCAST, resolve_precision
from digit.shards import ShardSink, batched, encode_npy, iter_samples


@torch.inference_mode()
def encode_shard(encoder, url: str, out_dir: Path, split: str, index: int, batch_size: int,
                 precision: str = "fp32") -> int:
    """Encode one image shard into the feature shard of the same index; return its sample count."""
    device = encoder.mean.device
    precision = resolve_precision(precision, device)
    with ShardSink(out_dir, split, shard_size=10**12, start_index=index) as sink:
        for batch in batched(iter_samples([url]), batch_size):
            images = torch.from_numpy(np.stack([s["png"] for s in batch])).to(device)
            with torch.autocast(device.type, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
                feats = encoder(images)
            feats = feats.float().cpu().numpy().astype(np.float16)
            for sample, grid in zip(batch, feats):
                sink.write({"__key__": sample["__key__"], "npy": encode_npy(grid),
                            "cls": str(sample["cls"]).encode()})
        if sink.total == 0:  # an empty input shard still gets an (empty) output shard
            sink.open_next()
    return sink.total
