"""Token sequences in Parquet: one row per image, `key`, `label`, `tokens` (raster order).

The grid shape and codebook size live in the file's schema metadata, so a
reader can rebuild the [H, W] grid and check token ranges without the
pipeline. Open with pandas/pyarrow/duckdb directly:

    pd.read_parquet("data/tokens/train.parquet")
    duckdb.sql("select label, count(*) from 'data/tokens/train.parquet' group by 1")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digit.errors import ConfigError

META_KEY = b"digit"


def token_dtype(k: int) -> pa.DataType:
    return pa.int16() if k <= np.iinfo(np.int16).max + 1 else pa.int32()


def token_schema(grid: tuple[int, int], k: int, extra: dict | None = None) -> pa.Schema:
    meta = {"grid": list(grid), "vocab_size": k, **(extra or {})}
    return pa.schema(
        [("key", pa.string()), ("label", pa.int32()),
         ("tokens", pa.list_(token_dtype(k), grid[0] * grid[1]))],
        metadata={META_KEY: json.dumps(meta).encode()},
    )


class TokenWriter:
    """Buffers rows and writes a row group every `row_group_size` rows."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int):
        self.schema, self.row_group_size = schema, row_group_size
        self.positions = schema.field("tokens").type.list_size
        self.np_dtype = np.int16 if schema.field("tokens").type.value_type == pa.int16() else np.int32
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.rows = 0

    def write(self, keys, labels, tokens: np.ndarray) -> None:
        self.keys.extend(keys)
        self.labels.extend(int(v) for v in labels)
        self.tokens.append(np.asarray(tokens, dtype=self.np_dtype).reshape(len(keys), self.positions))
        # Emit exactly row_group_size rows per group so the file layout does
        # not depend on the caller's batch size.
        while len(self.keys) >= self.row_group_size:
            self._emit(self.row_group_size)

    def _emit(self, n: int) -> None:
        tokens = np.concatenate(self.tokens)
        table = pa.table({"key": pa.array(self.keys[:n], pa.string()),
                          "label": pa.array(self.labels[:n], pa.int32()),
                          "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens[:n].reshape(-1)),
                                                                      self.positions)},
                         schema=self.schema)
        self.writer.write_table(table, row_group_size=self.row_group_size)
        self.rows += n
        self.keys, self.labels, self.tokens = self.keys[n:], self.labels[n:], [tokens[n:]]

    def close(self) -> None:
        if self.keys:  # the last, partial row group
            self._emit(len(self.keys))
        self.writer.close()


def read_metadata(path: str | Path) -> dict:
    """The digit metadata (grid, vocab_size, ...) of a token file, validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: token file not found; run `dvc repro tokenize`")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from exc
    meta = json.loads((schema.metadata or {}).get(META_KEY, b"null"))
    if not isinstance(meta, dict) or "grid" not in meta or "vocab_size" not in meta:
        raise ConfigError(f"{path}: missing digit metadata (grid, vocab_size); write token files with digit.tokens")
    for name, kind in (("key", pa.types.is_string), ("label", pa.types.is_integer),
                       ("tokens", pa.types.is_fixed_size_list)):
        if name not in schema.names or not kind(schema.field(name).type):
            raise ConfigError(f"{path}: column `{name}` missing or of the wrong type; expected key:string, "
                              "label:int, tokens:fixed_size_list<int>")
    h, w = meta["grid"]
    if schema.field("tokens").type.list_size != h * w:
        raise ConfigError(f"{path}: tokens have length {schema.field('tokens').type.list_size} but the grid "
                          f"metadata says {h}x{w}")
    return meta


def checked_tokens(table: pa.Table, positions: int, vocab_size: int, where: str) -> np.ndarray:
    """The `tokens` column as int64 [N, positions], every id checked against the vocabulary."""
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(-1, positions)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ConfigError(f"{where}: token ids span [{tokens.min()}, {tokens.max()}] but the vocabulary has "
                          f"{vocab_size} codes; the file does not belong to this codebook, re-run `dvc repro tokenize`")
    return tokens


def read_tokens(path: str | Path, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Load a whole token file as (tokens [N, H*W] int64, labels [N], keys, metadata), range-checked."""
    meta = read_metadata(path)
    table = pq.read_table(path)
    tokens = checked_tokens(table, meta["grid"][0] * meta["grid"][1], vocab_size or meta["vocab_size"], str(path))
    return tokens, table.column("label").to_numpy(), table.column("key").to_pylist(), meta


def token_stats(counts: np.ndarray) -> dict:
    """Codebook usage and unigram perplexity from per-code counts."""
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum())
    return {"tokens": int(total), "codes_used": int((counts > 0).sum()),
            "usage_pct": round(100.0 * float((counts > 0).mean()), 3),
            "entropy_nats": round(entropy, 5), "perplexity": round(float(np.exp(entropy)), 3)}


class TokenBatches:
    """Seeded, shuffled, rank-sharded batches streamed from a token Parquet file.

    The file is read a window of row groups at a time (never copied whole per
    epoch). Each global batch of `batch_size * world` rows is a pure function
    of (seed, epoch, index): rank r takes its slice, so the data a run sees is
    the same for any process count, and a resumed run can skip straight to
    the batch it stopped at. Token ids are range-checked as they are read.
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, window: int = 8):
        self.path, self.meta = Path(path), read_metadata(path)
        self.file = pq.ParquetFile(self.path)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle, self.drop_last, self.window = shuffle, drop_last, window
        self.num_rows = self.file.metadata.num_rows
        self.positions = self.meta["grid"][0] * self.meta["grid"][1]
        global_batch = batch_size * world
        if drop_last and self.num_rows < global_batch:
            raise ConfigError(f"{path}: {self.num_rows} rows cannot fill one batch of {batch_size} x {world} "
                              "processes; lower the batch size")

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        global_batch = self.batch_size * self.world
        return self.num_rows // global_batch if self.drop_last else -(-self.num_rows // global_batch)

    def _read_group(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        table = self.file.read_row_group(index, columns=["label", "tokens"])
        tokens = checked_tokens(table, self.positions, self.meta["vocab_size"], f"{self.path} (row group {index})")
        return table.column("label").to_numpy().astype(np.int64), tokens

    def epoch(self, epoch: int, skip: int = 0):
        """Yield this rank's (labels [B], tokens [B, H*W]) int64 batches of one epoch, after `skip` batches."""
        rng = np.random.default_rng([self.seed, epoch])
        groups = list(range(self.file.num_row_groups))
        if self.shuffle:
            groups = [int(g) for g in rng.permutation(groups)]
        global_batch = self.batch_size * self.world
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        labels = np.empty(0, np.int64)
        tokens = np.empty((0, self.positions), np.int64)
        emitted = 0
        for start in range(0, len(groups), self.window):
            parts = [self._read_group(g) for g in groups[start:start + self.window]]
            new_labels = np.concatenate([p[0] for p in parts])
            new_tokens = np.concatenate([p[1] for p in parts])
            if self.shuffle:  # rows mix within the window; the window order is already random
                order = rng.permutation(len(new_labels))
                new_labels, new_tokens = new_labels[order], new_tokens[order]
            labels, tokens = np.concatenate([labels, new_labels]), np.concatenate([tokens, new_tokens])
            while len(labels) >= global_batch:
                if emitted >= skip:
                    yield labels[lo:hi], tokens[lo:hi]
                emitted += 1
                labels, tokens = labels[global_batch:], tokens[global_batch:]
        if len(labels) and not self.drop_last and emitted >= skip:
            yield labels[lo:hi], tokens[lo:hi]
