"""Stage `train`: GPT next-token training on one tokenizer's token files, with Accelerate.

Run once per tokenizer (dvc.yaml `train@digit`, `train@vq`): the same GPT and budget on
DiGIT tokens and on the VQGAN's tokens, the paper's comparison. The loop is
digit.trainer's: resumable checkpoints in checkpoints/train_<tokenizer>-<fingerprint>/
(params + token bytes + code), DVCLive curves in reports/train/<tokenizer>/, a stop at
the first non-finite loss. A run killed mid-way and started again with the same inputs
resumes from the newest checkpoint and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from digit.cli import require_git_commit, run, stage_parser
from digit.gpt import GPT
from digit.params import load_params, seed_for
from digit.tokens import TokenBatches, read_metadata
from digit.trainer import Trainer, lr_lambda
from digit.training import drop_labels, evaluate, gpt_config, save_trained, sequence_loss, unigram_cross_entropy


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--out", default="models/gpt/digit")
    parser.add_argument("--live", default="reports/train/digit", help="DVCLive directory")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--name", default="train", help="run name: checkpoint folder and DVCLive run")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg = {**params["gpt"], "seed": seed_for(params, "gpt")}  # gpt.seed moved by base.seed
    train_path, val_path = Path(args.tokens) / "train.parquet", Path(args.tokens) / "val.parquet"
    meta = read_metadata(train_path)
    read_metadata(val_path)
    config = gpt_config(cfg, meta)

    trainer = Trainer(args.name, cfg, live=args.live, checkpoints=args.checkpoints, inputs=[train_path, val_path],
                      entry=__file__, grad_accum=cfg["grad_accum"])
    accelerator, rank, world = trainer.accelerator, trainer.rank, trainer.world
    train_batches = TokenBatches(train_path, cfg["batch_size"], cfg["seed"], rank, world)
    val_batches = TokenBatches(val_path, cfg["batch_size"], 0, rank, world, shuffle=False, drop_last=False)
    model = GPT(config)
    optimizer = model.configure_optimizer(cfg["weight_decay"], cfg["lr"], (cfg["beta1"], cfg["beta2"]))
    # Not passed to prepare(): Accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], cfg["min_lr_ratio"]))
    model, optimizer = trainer.prepare(model, optimizer, state=[scheduler])

    conditional = config.num_classes > 0
    null_class = accelerator.unwrap_model(model).null_class
    accum = cfg["grad_accum"]
    # Micro-batches: one optimizer step takes grad_accum of them.
    stream = trainer.stream(lambda epoch, skip: train_batches.epoch(epoch, skip=skip),
                            lambda epoch: len(train_batches), trainer.step * accum)

    def train_step(step: int) -> dict:
        loss_sum = 0.0
        for micro in range(step * accum, (step + 1) * accum):
            labels, tokens = next(stream)
            labels = drop_labels(torch.from_numpy(labels), null_class, cfg["label_dropout"], cfg["seed"], micro,
                                 rank, world).to(accelerator.device)
            tokens = torch.from_numpy(tokens).to(accelerator.device)
            with accelerator.accumulate(model):
                logits = model(labels if conditional else None, tokens[:, :-1])
                loss = sequence_loss(logits, tokens, cfg["label_smoothing"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg["grad_clip"] > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        train_loss = accelerator.reduce(torch.tensor(loss_sum / accum, device=accelerator.device), "mean").item()
        return {"train/loss": train_loss, "train/lr": lr}

    def validate() -> dict:
        sums = torch.tensor(evaluate(model, val_batches, accelerator.device, conditional),
                            dtype=torch.float64, device=accelerator.device)
        loss_total, correct, count = accelerator.reduce(sums, "sum").tolist()
        return {"val/loss": loss_total / count, "val/token_acc": correct / count}

    tokens_per_step = cfg["batch_size"] * accum * world * (config.block_size - 1)
    last_eval = trainer.fit(train_step, validate, items_per_step=tokens_per_step, throughput="train/tokens_per_s",
                            show=("train/loss",))

    def publish(live) -> None:
        unigram = unigram_cross_entropy(train_path, val_path, config.vocab_size)
        # Nested like DVCLive's own "a/b" metrics, so `dvc exp show` lists them beside val.loss.
        live.summary.setdefault("unigram", {})["val_ce"] = unigram
        live.summary["val"]["gain_over_unigram"] = unigram - last_eval["val/loss"]
        live.summary["params"] = sum(p.numel() for p in model.parameters())
        save_trained(accelerator.unwrap_model(model), meta, args.out)
        print(f"{args.name}: val loss {last_eval['val/loss']:.4f} vs unigram {unigram:.4f} nats/token, "
              f"val token acc {last_eval['val/token_acc']:.4f} -> {args.out}")

    trainer.publish(publish)


if __name__ == "__main__":
    run(main)
