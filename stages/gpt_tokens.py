"""Stage `gpt_tokens`: the token files the GPT models -> data/gpt_tokens/{train,val}.parquet.

tokenizer.kind picks them: `discriminative` copies data/tokens (DiGIT: K-Means over
the frozen encoder's features), `vq` copies data/vq_tokens (the VQGAN's tokens, the
paper's baseline). Both have the same schema, so train, sample and probe read either;
the file metadata (`tokenizer`, vocab_size, grid) travels with the GPT to `decode`.

Why a stage that only copies: DVC deps are static. Reading both token folders in
`train` would retrain the GPT on DiGIT tokens whenever the VQGAN changes. This stage
re-runs instead, writes the same bytes, and DVC then leaves train untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from digit.atomic import atomic_dir, clean_stale_tmp
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.params import load_params
from digit.tokens import read_metadata

SPLITS = ("train", "val")


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--discriminative", default="data/tokens", help="stage tokenize's output")
    parser.add_argument("--vq", default="data/vq_tokens", help="stage vq_tokenize's output")
    parser.add_argument("--out", default="data/gpt_tokens")
    args = parser.parse_args()
    kind = load_params(args.params)["tokenizer"]["kind"]
    source = Path(args.vq if kind == "vq" else args.discriminative)
    metas = {split: read_metadata(source / f"{split}.parquet") for split in SPLITS}
    found = metas["train"].get("tokenizer", "discriminative")
    if found != kind:  # e.g. the two paths swapped on the command line
        raise ConfigError(f"{source}: holds {found} tokens, but tokenizer.kind is {kind}; pass the "
                          f"{kind} tokens' folder")
    if metas["train"]["grid"] != metas["val"]["grid"] or metas["train"]["vocab_size"] != metas["val"]["vocab_size"]:
        raise ConfigError(f"{source}: train and val token files disagree on grid/vocabulary; re-run the stage "
                          "that wrote them")
    out = Path(args.out)
    clean_stale_tmp(out)
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            shutil.copyfile(source / f"{split}.parquet", tmp / f"{split}.parquet")
    gh, gw = metas["train"]["grid"]
    print(f"gpt_tokens: {kind} tokens ({gh}x{gw} grid, {metas['train']['vocab_size']} codes) from {source} -> {out}")


if __name__ == "__main__":
    run(main)
