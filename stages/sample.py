"""Stage `sample`: GPT -> generated token grids in data/samples/<tokenizer>/tokens.parquet.

KV-cache generation (prefill + per-token decode), uniform class labels
(sample.num_per_class of each class). Batch b always covers the same
samples and draws from a generator seeded with (sample.seed, b), so the
output is the same for any number of processes: under
`accelerate launch`/`torchrun`, rank r generates batches r, r+N, ..., and
rank 0 merges the parts, checks that every key is there exactly once, and
publishes the file. Its metadata records how the samples were made.

Memory does not grow with the number of samples: each rank writes one row
group per batch, and the merge streams batch b from row group b // N of part
b % N straight into the output (ROW_GROUP_SIZE rows per row group), so rows
come out in key order without ever holding the whole set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from digit.atomic import atomic_file
from digit.cli import run, stage_parser
from digit.distributed import finish, make_accelerator, shared_tmp_output
from digit.errors import ConfigError
from digit.params import load_params, seed_for
from digit.training import load_trained
from digit.tokens import TokenWriter, token_schema

ROW_GROUP_SIZE = 16384  # rows per output row group (~2 MB of tokens): the merge holds at most this + one batch


def sample_key(index: int) -> str:
    return f"sample_{index:07d}"


def merge_parts(parts: Path, world: int, n_batches: int, batch_size: int, n_rows: int, schema, out: Path) -> int:
    """Stream the ranks' part files into `out` in batch (= key) order; return the rows written.

    Part r holds batches r, r+world, ... one row group each. Every batch's keys
    are checked against the keys it must have, so a missing, duplicated or
    foreign row stops the merge before anything is published.
    """
    files = []
    for r in range(world):
        path = parts / f"part-{r:05d}.parquet"
        expected = len(range(r, n_batches, world))
        files.append(pq.ParquetFile(path) if path.is_file() else None)
        groups = files[-1].num_row_groups if files[-1] else None
        if groups != expected:
            raise RuntimeError(f"sample: {path.name} holds {groups} batches but rank {r} had {expected}; "
                               "a rank failed, output not published")
    # The parts' schema as Parquet reads it back (what the output always had), with the stage's metadata.
    out_schema = files[0].schema_arrow.with_metadata(schema.metadata)
    pending: list[pa.Table] = []
    rows = 0
    with atomic_file(out) as tmp, pq.ParquetWriter(str(tmp), out_schema, compression="zstd") as writer:
        def flush(n: int) -> None:
            nonlocal pending
            table = pa.concat_tables(pending).combine_chunks()
            writer.write_table(table.slice(0, n), row_group_size=ROW_GROUP_SIZE)
            pending = [table.slice(n)] if n < table.num_rows else []

        for b in range(n_batches):
            table = files[b % world].read_row_group(b // world)
            keys = table.column("key").to_pylist()
            if keys != [sample_key(i) for i in range(b * batch_size, min(n_rows, (b + 1) * batch_size))]:
                raise RuntimeError(f"sample: batch {b} of rank {b % world} has keys {keys[:1]}..{keys[-1:]} "
                                   f"({len(keys)} rows), not the batch's; a rank failed, output not published")
            pending.append(table)
            rows += len(keys)
            while sum(t.num_rows for t in pending) >= ROW_GROUP_SIZE:
                flush(ROW_GROUP_SIZE)
        if pending:
            flush(sum(t.num_rows for t in pending))
    return rows


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", default="models/gpt/digit")
    parser.add_argument("--out", default="data/samples/digit/tokens.parquet")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = {**params["sample"], "seed": seed_for(params, "sample")}  # sample.seed moved by base.seed
    model, meta = load_trained(args.model)
    conditional = model.config.num_classes > 0
    if cfg["cfg_scale"] != 1.0 and not conditional:
        raise ConfigError("sample.cfg_scale: classifier-free guidance needs a class-conditional GPT "
                          "(gpt.class_conditional: true); set sample.cfg_scale: 1")
    gh, gw = meta["grid"]
    settings = {k: cfg[k] for k in ("temperature", "top_k", "top_p", "cfg_scale", "seed", "num_per_class",
                                    "batch_size")}

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    model = model.to(accelerator.device).eval()
    n_classes = len(meta["classes"])
    labels = np.repeat(np.arange(n_classes), cfg["num_per_class"])
    n_batches = -(-len(labels) // cfg["batch_size"])
    out = Path(args.out)

    # Rank 0 makes the parts folder; a failing rank removes it again (a full disk gets its space back).
    with shared_tmp_output(accelerator, out) as parts:
        schema = token_schema((gh, gw), model.config.vocab_size,
                              {"classes": meta["classes"], "sampling": settings, "encoder": meta.get("encoder"),
                               "tokenizer": meta.get("tokenizer", "discriminative")})
        # One row group per batch (every batch but the last is full): the merge reads batch by batch.
        writer = TokenWriter(parts / f"part-{rank:05d}.parquet", schema, row_group_size=cfg["batch_size"])
        mine = range(rank, n_batches, world)
        for b in tqdm(mine, desc=f"sample rank {rank}" if world > 1 else "sample", unit="batch", position=rank):
            index = np.arange(b * cfg["batch_size"], min(len(labels), (b + 1) * cfg["batch_size"]))
            cond = torch.from_numpy(labels[index]).to(accelerator.device) if conditional else None
            generator = torch.Generator(device=accelerator.device).manual_seed(cfg["seed"] * 1_000_003 + b)
            tokens = model.generate(cond, steps=gh * gw, temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                                    top_p=cfg["top_p"] if cfg["top_p"] < 1.0 else None, cfg_scale=cfg["cfg_scale"],
                                    generator=generator, batch_size=len(index))
            writer.write([sample_key(i) for i in index], labels[index], tokens.cpu().numpy())
        writer.close()
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            rows = merge_parts(parts, world, n_batches, cfg["batch_size"], len(labels), schema, out)
            for part in parts.iterdir():
                part.unlink()
            parts.rmdir()
            print(f"sample: {rows} sequences ({cfg['num_per_class']} per class x {n_classes}) "
                  f"from {world} process(es) -> {out}")
    finish(accelerator)


if __name__ == "__main__":
    run(main)
