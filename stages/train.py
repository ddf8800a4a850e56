"""Stage `train`: GPT next-token training on data/tokens with Accelerate.

Resumable: `accelerator.save_state` every gpt.checkpoint_every steps into
checkpoints/train-<fingerprint>/step_NNNNNNNN (written under a temporary name,
renamed when complete, last 2 kept), where the fingerprint covers the gpt.*
params and the token files. A run killed mid-way and started again
with the same inputs resumes from the newest checkpoint and ends with the
same weights as an uninterrupted run. Metrics go through Accelerate's DVCLive
tracker into reports/train/ (metrics.json + per-step plots).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

import digit.gpt as gpt_module
import digit.training as training_module
from digit.checkpoint import Progress, resume_latest, save_checkpoint
from digit.cli import require_git_commit, run, stage_parser
from digit.distributed import finish, make_accelerator
from digit.gpt import GPT
from digit.params import load_params, seed_for
from digit.tokens import TokenBatches, read_metadata
from digit.training import (drop_labels, evaluate, gpt_config, lr_lambda, run_fingerprint, save_trained,
                            sequence_loss, unigram_cross_entropy)


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--out", default="models/gpt")
    parser.add_argument("--live", default="reports/train", help="DVCLive directory")
    parser.add_argument("--checkpoints", default="checkpoints")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg = {**params["gpt"], "seed": seed_for(params, "gpt")}  # gpt.seed moved by base.seed
    train_path, val_path = Path(args.tokens) / "train.parquet", Path(args.tokens) / "val.parquet"
    meta = read_metadata(train_path)
    read_metadata(val_path)
    config = gpt_config(cfg, meta)

    # The code is part of a run's identity too: never resume from a checkpoint written by other code.
    code = [Path(__file__), Path(gpt_module.__file__), Path(training_module.__file__)]
    ckpt_root = Path(args.checkpoints) / f"train-{run_fingerprint(cfg, train_path, val_path, *code)}"
    accelerator = make_accelerator(
        mixed_precision="no" if cfg["precision"] == "fp32" else cfg["precision"],
        gradient_accumulation_steps=cfg["grad_accum"], log_with="dvclive")
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg["seed"])
    train_batches = TokenBatches(train_path, cfg["batch_size"], cfg["seed"], rank, world)
    val_batches = TokenBatches(val_path, cfg["batch_size"], 0, rank, world, shuffle=False, drop_last=False)

    model = GPT(config)
    optimizer = model.configure_optimizer(cfg["weight_decay"], cfg["lr"], (cfg["beta1"], cfg["beta2"]))
    # Not passed to prepare(): Accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], cfg["min_lr_ratio"]))
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)

    resumed = resume_latest(accelerator, ckpt_root, Path(args.live), "train")
    accelerator.init_trackers("train", init_kwargs={"dvclive": {
        "dir": args.live, "resume": resumed, "save_dvc_exp": False, "dvcyaml": False,
        "report": None}})

    conditional = config.num_classes > 0
    null_class = accelerator.unwrap_model(model).null_class
    steps_per_epoch = len(train_batches)
    micro = progress.step * cfg["grad_accum"]
    epoch, offset = divmod(micro, steps_per_epoch)
    stream = train_batches.epoch(epoch, skip=offset)
    tokens_per_step = cfg["batch_size"] * cfg["grad_accum"] * world * (config.block_size - 1)
    bar = tqdm(total=cfg["max_steps"], initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_main_process)
    model.train()
    last_eval: dict = {}
    while progress.step < cfg["max_steps"]:
        started = time.perf_counter()
        loss_sum = 0.0
        for _ in range(cfg["grad_accum"]):
            try:
                labels, tokens = next(stream)
            except StopIteration:
                epoch += 1
                stream = train_batches.epoch(epoch)
                labels, tokens = next(stream)
            labels = drop_labels(torch.from_numpy(labels), null_class, cfg["label_dropout"], cfg["seed"], micro,
                                 rank, world).to(accelerator.device)
            tokens = torch.from_numpy(tokens).to(accelerator.device)
            micro += 1
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
        progress.step += 1
        train_loss = accelerator.reduce(torch.tensor(loss_sum / cfg["grad_accum"], device=accelerator.device),
                                        "mean").item()
        tok_s = tokens_per_step / (time.perf_counter() - started)
        metrics = {"train/loss": train_loss, "train/lr": lr, "train/tokens_per_s": tok_s}
        if progress.step % cfg["eval_every"] == 0 or progress.step == cfg["max_steps"]:
            sums = torch.tensor(evaluate(model, val_batches, accelerator.device, conditional),
                                dtype=torch.float64, device=accelerator.device)
            loss_total, correct, count = accelerator.reduce(sums, "sum").tolist()
            last_eval = {"val/loss": loss_total / count, "val/token_acc": correct / count}
            metrics.update(last_eval)
        accelerator.log(metrics, step=progress.step)  # one call per step: DVCLive writes one row per metric
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if progress.step % cfg["checkpoint_every"] == 0 and progress.step < cfg["max_steps"]:
            save_checkpoint(accelerator, ckpt_root, progress.step, Path(args.live))
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unigram = unigram_cross_entropy(train_path, val_path, config.vocab_size)
        live = accelerator.get_tracker("dvclive").tracker
        # Nested like DVCLive's own "a/b" metrics, so `dvc exp show` lists them beside val.loss.
        live.summary.setdefault("unigram", {})["val_ce"] = unigram
        live.summary["val"]["gain_over_unigram"] = unigram - last_eval["val/loss"]
        live.summary["params"] = sum(p.numel() for p in model.parameters())
        save_trained(accelerator.unwrap_model(model), meta, args.out)
        shutil.rmtree(ckpt_root, ignore_errors=True)  # finished: nothing to resume
        print(f"train: val loss {last_eval['val/loss']:.4f} vs unigram {unigram:.4f} nats/token, "
              f"val token acc {last_eval['val/token_acc']:.4f} -> {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # writes the DVCLive summary; also tears down the process group
    finish(accelerator)


if __name__ == "__main__":
    run(main)
