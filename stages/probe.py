"""Stage `probe`: linear probe of every layer of one frozen GPT -> reports/probe/<tokenizer>.json.

Each layer's hidden states are mean-pooled over the sequence (with the class
token replaced by the null class, so the label is not given away), a linear
classifier is fitted on train and scored on val. DVCLive plots val top-1
over layers in reports/probe/.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from dvclive import Live
from tqdm import tqdm

from digit.atomic import write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.params import load_params
from digit.probe import fit_linear_probe, pooled_hidden_states
from digit.training import load_trained
from digit.tokens import TokenBatches


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", default="models/gpt/digit")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--report", default="reports/probe/digit.json")
    parser.add_argument("--live", default="reports/probe/digit")
    args = parser.parse_args()
    require_git_commit()
    cfg = load_params(args.params)["probe"]
    model, meta = load_trained(args.model)
    train_path = Path(args.tokens) / "train.parquet"
    n_train = pq.ParquetFile(train_path).metadata.num_rows
    # probe.max_train caps the rows read, taken from a seeded shuffle so every class is represented.
    train = TokenBatches(train_path, cfg["batch_size"], 0, shuffle=True, drop_last=False)
    val = TokenBatches(Path(args.tokens) / "val.parquet", cfg["batch_size"], 0, shuffle=False, drop_last=False)
    x_train, y_train = pooled_hidden_states(model, train, "cpu", limit=cfg["max_train"])
    x_val, y_val = pooled_hidden_states(model, val, "cpu")

    layers = []
    with Live(args.live, save_dvc_exp=False, dvcyaml=False) as live:
        for layer in tqdm(range(len(x_train)), desc="probe", unit="layer"):
            scores = fit_linear_probe(x_train[layer], y_train, x_val[layer], y_val, len(meta["classes"]),
                                      cfg["steps"], cfg["weight_decay"])
            layers.append({"layer": layer, **scores})
            live.step = layer
            live.log_metric("probe/val_top1", scores["val_top1"])
            live.log_metric("probe/train_top1", scores["train_top1"])
            live.next_step()
    best = max(layers, key=lambda r: r["val_top1"])
    write_json(args.report, {"best_layer": best["layer"], "best_val_top1": best["val_top1"],
                             "train_rows": int(len(y_train)), "train_rows_available": n_train,
                             "val_rows": int(len(y_val)), "layers": layers})
    print(f"probe: best layer {best['layer']} val top-1 {best['val_top1']:.4f} -> {args.report}")


if __name__ == "__main__":
    run(main)
