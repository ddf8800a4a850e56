"""Token grid -> pixels: the decoder DiGIT trains separately on the frozen tokenizer.

A DiGIT token says what a patch *is* (K-Means over discriminative features),
not exactly how it looks, so the decoder needs context: token embeddings
(initialised from the codebook centroids, so similar codes start close) pass
through a few transformer blocks at grid resolution, then a convolutional
upsampler doubles the resolution until it reaches the image size. Trained
with L1 and, optionally, a hinge PatchGAN term that sharpens what L1 alone
would average into blur (LPIPS is not an option offline: its VGG weights
cannot be fetched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F

from digit.artifact import load_weights, read_artifact, save_artifact
from digit.errors import ConfigError
from digit.shards import WindowedShards, iter_samples, read_manifest, shard_urls
from digit.tokens import checked_tokens, read_metadata



@dataclass
class DecoderConfig:
    vocab_size: int
    code_dim: int            # width of the codebook centroids the embedding starts from
    grid: tuple[int, int]
    image_size: int
    channels: int = 3
    width: int = 128         # channels at grid resolution; halved per upsampling, never below 32
    n_attn: int = 2          # transformer blocks at grid resolution (context across patches)
    n_head: int = 4
    n_res: int = 1           # residual blocks per resolution

    @property
    def n_up(self) -> int:
        """x2 upsamplings needed to reach at least image_size from the grid."""
        return max(0, math.ceil(math.log2(self.image_size / min(self.grid))))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(min(32, ch // 4), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(min(32, ch // 4), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class TokenDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, centroids: np.ndarray | None = None):
        super().__init__()
        self.config = c = config
        gh, gw = c.grid
        self.embed = nn.Embedding(c.vocab_size, c.code_dim)
        if centroids is not None:
            if centroids.shape != (c.vocab_size, c.code_dim):
                raise ConfigError(f"centroids have shape {centroids.shape}, the decoder expects "
                                  f"({c.vocab_size}, {c.code_dim}); re-run `dvc repro codebook`")
            self.embed.weight.data.copy_(torch.from_numpy(np.asarray(centroids, np.float32)))
        # Centroid scales differ per encoder: normalise before projecting.
        self.proj = nn.Sequential(nn.LayerNorm(c.code_dim), nn.Linear(c.code_dim, c.width))
        self.pos = nn.Parameter(torch.zeros(1, gh * gw, c.width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(c.width, c.n_head, 4 * c.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.attn = nn.TransformerEncoder(layer, c.n_attn, enable_nested_tensor=False) if c.n_attn else None
        blocks, ch = [], c.width
        for _ in range(c.n_up):
            out = max(32, ch // 2)
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1)]
            blocks += [ResBlock(out) for _ in range(c.n_res)]
            ch = out
        self.up = nn.Sequential(*[ResBlock(c.width) for _ in range(c.n_res)], *blocks)
        self.out = nn.Sequential(nn.GroupNorm(min(32, ch // 4), ch), nn.SiLU(), nn.Conv2d(ch, c.channels, 3, padding=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, gh*gw] int64 -> images [B, C, S, S] in about [-1, 1] (unclamped, for the loss)."""
        gh, gw = self.config.grid
        x = self.proj(self.embed(tokens)) + self.pos
        if self.attn is not None:
            x = self.attn(x)
        x = x.transpose(1, 2).reshape(len(tokens), -1, gh, gw)
        x = self.out(self.up(x))
        if x.shape[-1] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, gh*gw] -> uint8 images [B, S, S, C]."""
        x = self(tokens).float().clamp(-1, 1)
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float [B, C, H, W] in [-1, 1], the decoder's target space."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- persistence
def save_decoder(model: TokenDecoder, meta: dict, directory: str | Path) -> None:
    save_artifact(model, meta, directory)


def load_decoder(directory: str | Path, vocab_size: int | None = None,
                 grid: tuple[int, int] | None = None) -> tuple[TokenDecoder, dict]:
    """The decoder written by `train_decoder`, checked against the tokens it will decode."""
    config, meta = read_artifact(directory, DecoderConfig, "train_decoder",
                                 convert=lambda raw: {**raw, "grid": tuple(raw["grid"])})
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise ConfigError(f"{directory}: decoder was trained for {config.vocab_size} codes but the tokens have "
                          f"{vocab_size}; re-run `dvc repro train_decoder` on this codebook")
    if grid is not None and tuple(grid) != config.grid:
        raise ConfigError(f"{directory}: decoder expects a {config.grid} token grid but the tokens have "
                          f"{tuple(grid)}; re-run `dvc repro train_decoder`")
    return load_weights(TokenDecoder(config), directory, "train_decoder"), meta


# ---------------------------------------------------------------- data
class PairedImages(WindowedShards):
    """(tokens, image) pairs streamed from token Parquet + image shards of one split.

    `tokenize` writes rows in image-shard order, so shard i's images are rows
    offsets[i]:offsets[i+1] of the token file: both are read shard by shard in
    lockstep (keys are checked to match) and never loaded whole. Shuffling
    permutes the shard order per epoch and mixes rows within a window of
    `window` shards, so memory is bounded by window x shard size.
    """

    def __init__(self, images: str | Path, tokens: str | Path, split: str, window: int = 4):
        self.meta = read_metadata(tokens)
        manifest = read_manifest(images)
        self.urls = shard_urls(images, split)
        self.counts = manifest["splits"][split]["counts"]
        self.image_size, self.classes = manifest["image_size"], manifest["classes"]
        self.path, self.file = Path(tokens), pq.ParquetFile(tokens)
        self.num_rows = self.file.metadata.num_rows
        if sum(self.counts) != self.num_rows:
            raise ConfigError(f"{tokens}: {self.num_rows} rows but {images} has {sum(self.counts)} {split} "
                              "images; the tokens are of other images, re-run `dvc repro tokenize`")
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        starts = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(starts)])
        self.positions = self.meta["grid"][0] * self.meta["grid"][1]
        self.window = window

    def _token_rows(self, lo: int, hi: int):
        g0 = int(np.searchsorted(self.group_starts, lo, side="right") - 1)
        g1 = int(np.searchsorted(self.group_starts, hi, side="left"))
        table = self.file.read_row_groups(list(range(g0, g1)), columns=["key", "tokens"])
        table = table.slice(lo - int(self.group_starts[g0]), hi - lo)
        tokens = checked_tokens(table, self.positions, self.meta["vocab_size"], str(self.path))
        return table.column("key").to_pylist(), tokens

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [n, P] int64, images [n, H, W, 3] uint8) of image shard `index`."""
        keys, tokens = self._token_rows(int(self.offsets[index]), int(self.offsets[index + 1]))
        samples = list(iter_samples([self.urls[index]]))
        image_keys = [s["__key__"] for s in samples]
        if image_keys != keys:
            raise ConfigError(f"{self.urls[index]}: image keys do not match the token rows "
                              f"({image_keys[:2]} vs {keys[:2]}); re-run `dvc repro tokenize`")
        return tokens, np.stack([s["image"] for s in samples])

    parts = shard

    def batches(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True, limit: int = 0):
        """Yield (tokens, images) batches; with shuffle, a pure function of (seed, epoch)."""
        return self.windowed_batches(batch_size, seed, epoch, shuffle, limit)
