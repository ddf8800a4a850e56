"""Stage `sample`: GPT -> generated token grids in data/samples/tokens.parquet.

KV-cache generation (prefill + per-token decode), uniform class labels
(sample.num_per_class of each class). Batch b always covers the same
samples and draws from a generator seeded with (sample.seed, b), so the
output is the same for any number of processes: under
`accelerate launch`/`torchrun`, rank r generates batches r, r+N, ..., and
rank 0 merges the parts, checks that every key is there exactly once, and
publishes the file. Its metadata records how the samples were made.
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
from digit.distributed import finish, make_accelerator, shared_tmp_dir
from digit.errors import ConfigError
from digit.params import load_params
from digit.training import load_trained
from digit.tokens import TokenWriter, token_schema


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", default="models/gpt")
    parser.add_argument("--out", default="data/samples/tokens.parquet")
    args = parser.parse_args()
    cfg = load_params(args.params)["sample"]
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

    parts = shared_tmp_dir(accelerator, out)

    schema = token_schema((gh, gw), model.config.vocab_size,
                          {"classes": meta["classes"], "sampling": settings, "encoder": meta.get("encoder")})
    writer = TokenWriter(parts / f"part-{rank:05d}.parquet", schema, row_group_size=1 << 20)
    mine = range(rank, n_batches, world)
    for b in tqdm(mine, desc=f"sample rank {rank}" if world > 1 else "sample", unit="batch", position=rank):
        index = np.arange(b * cfg["batch_size"], min(len(labels), (b + 1) * cfg["batch_size"]))
        cond = torch.from_numpy(labels[index]).to(accelerator.device) if conditional else None
        generator = torch.Generator(device=accelerator.device).manual_seed(cfg["seed"] * 1_000_003 + b)
        tokens = model.generate(cond, steps=gh * gw, temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                                top_p=cfg["top_p"] if cfg["top_p"] < 1.0 else None, cfg_scale=cfg["cfg_scale"],
                                generator=generator, batch_size=len(index))
        writer.write([f"sample_{i:07d}" for i in index], labels[index], tokens.cpu().numpy())
    writer.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        table = pa.concat_tables(pq.read_table(p) for p in sorted(parts.glob("part-*.parquet")))
        table = table.sort_by("key").replace_schema_metadata(schema.metadata)
        keys = table.column("key").to_pylist()
        if len(keys) != len(labels) or len(set(keys)) != len(keys):
            raise RuntimeError(f"sample: merged {len(keys)} rows ({len(set(keys))} unique) but expected "
                               f"{len(labels)}; a rank failed, output not published")
        with atomic_file(out) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()
        print(f"sample: {len(keys)} sequences ({cfg['num_per_class']} per class x {n_classes}) "
              f"from {world} process(es) -> {out}")
    finish(accelerator)


if __name__ == "__main__":
    run(main)
