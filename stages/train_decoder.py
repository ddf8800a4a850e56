"""Stage `train_decoder`: token grids of real images -> pixels, trained on the frozen tokenizer.

Pairs (data/tokens/train.parquet row, data/images train image) are streamed
shard by shard. L1 loss, plus a hinge PatchGAN term from step
decoder.adv_start when decoder.adv_weight > 0. Accelerate (device, precision,
DDP), atomic resumable checkpoints in checkpoints/decoder-<fingerprint>/, DVCLive
curves in reports/decoder/. At the end the first decoder.eval_images val images
are reconstructed from their tokens: PSNR, SSIM and rFID (Inception features of
the reconstructions vs the cached val reference set) go to reports/decoder.json.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm import tqdm

import digit.decoder as decoder_module
from digit.atomic import write_json
from digit.checkpoint import Progress, resume_latest, save_checkpoint
from digit.cli import require_git_commit, run, stage_parser
from digit.decoder import DecoderConfig, PairedImages, PatchDiscriminator, TokenDecoder, save_decoder, to_unit
from digit.distributed import finish, make_accelerator
from digit.errors import ConfigError
from digit.params import load_params, seed_for
from digit.reconstruction import reconstruction_report
from digit.training import lr_lambda, run_fingerprint


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--codebook", default="models/codebook")
    parser.add_argument("--reference", default="data/reference", help="cached Inception features (stage reference)")
    parser.add_argument("--out", default="models/decoder")
    parser.add_argument("--live", default="reports/decoder")
    parser.add_argument("--report", default="reports/decoder.json")
    parser.add_argument("--checkpoints", default="checkpoints")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg = {**params["decoder"], "seed": seed_for(params, "decoder")}  # decoder.seed moved by base.seed
    tokens_dir = Path(args.tokens)
    train = PairedImages(args.images, tokens_dir / "train.parquet", "train", cfg["shuffle_shards"])
    val = PairedImages(args.images, tokens_dir / "val.parquet", "val")
    centroids = np.load(Path(args.codebook) / "centroids.npy", allow_pickle=False)
    meta = train.meta
    if centroids.shape[0] != meta["vocab_size"]:
        raise ConfigError(f"{args.codebook}: {centroids.shape[0]} centroids but the tokens use "
                          f"{meta['vocab_size']} codes; re-run `dvc repro tokenize`")
    if train.num_rows < cfg["batch_size"]:
        raise ConfigError(f"decoder.batch_size: {cfg['batch_size']} is more than the {train.num_rows} train "
                          "images; lower it")
    config = DecoderConfig(vocab_size=meta["vocab_size"], code_dim=int(centroids.shape[1]),
                           grid=tuple(meta["grid"]), image_size=train.image_size, width=cfg["width"],
                           n_attn=cfg["n_attn"], n_head=cfg["n_head"], n_res=cfg["n_res"])

    accelerator = make_accelerator(mixed_precision="no" if cfg["precision"] == "fp32" else cfg["precision"],
                                   log_with="dvclive")
    set_seed(cfg["seed"])
    model, disc = TokenDecoder(config, centroids), PatchDiscriminator(config.channels)
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=cfg["weight_decay"])
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], 0.1))
    model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    progress = Progress()
    accelerator.register_for_checkpointing(sched, progress)
    code = [Path(__file__), Path(decoder_module.__file__)]  # never resume from another code's checkpoint
    ckpt_root = Path(args.checkpoints) / f"decoder-{run_fingerprint(cfg, tokens_dir / 'train.parquet', *code)}"
    resumed = resume_latest(accelerator, ckpt_root, Path(args.live), "train_decoder")
    accelerator.init_trackers("train_decoder", init_kwargs={"dvclive": {
        "dir": args.live, "resume": resumed, "save_dvc_exp": False, "dvcyaml": False, "report": None}})

    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = train.num_rows // (cfg["batch_size"] * world)
    epoch, offset = divmod(progress.step, per_epoch)

    def stream(epoch: int, skip: int):
        # Each global batch is split over ranks: the data seen does not depend on the process count.
        batches = train.batches(cfg["batch_size"] * world, cfg["seed"], epoch)
        for i, (tokens, images) in enumerate(batches):
            if i >= skip:
                part = slice(rank * cfg["batch_size"], (rank + 1) * cfg["batch_size"])
                yield torch.from_numpy(tokens[part]), to_unit(images[part])

    batches = stream(epoch, offset)
    bar = tqdm(total=cfg["max_steps"], initial=progress.step, desc="train_decoder", unit="step",
               disable=not accelerator.is_main_process)
    model.train()
    while progress.step < cfg["max_steps"]:
        started = time.perf_counter()
        try:
            tokens, target = next(batches)
        except StopIteration:
            epoch += 1
            batches = stream(epoch, 0)
            tokens, target = next(batches)
        tokens, target = tokens.to(accelerator.device), target.to(accelerator.device)
        adversarial = cfg["adv_weight"] > 0 and progress.step >= cfg["adv_start"]
        with accelerator.autocast():
            recon = model(tokens)
            l1 = F.l1_loss(recon.float(), target)
            loss = l1 - cfg["adv_weight"] * disc(recon).float().mean() if adversarial else l1
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt_g.step()
        metrics = {"train/l1": accelerator.reduce(l1.detach(), "mean").item(), "train/lr": sched.get_last_lr()[0]}
        if adversarial:  # hinge loss for the discriminator on detached reconstructions
            with accelerator.autocast():
                d_loss = (F.relu(1 - disc(target)).mean() + F.relu(1 + disc(recon.detach())).mean()).float()
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
            metrics["train/d_loss"] = accelerator.reduce(d_loss.detach(), "mean").item()
        sched.step()
        progress.step += 1
        metrics["train/img_per_s"] = cfg["batch_size"] * world / (time.perf_counter() - started)
        if progress.step % cfg["eval_every"] == 0 or progress.step == cfg["max_steps"]:
            metrics["val/l1"] = val_l1(accelerator, model, val, cfg["batch_size"], cfg["eval_images"])
        accelerator.log(metrics, step=progress.step)
        bar.set_postfix(l1=f"{metrics['train/l1']:.4f}")
        bar.update(1)
        if progress.step % cfg["checkpoint_every"] == 0 and progress.step < cfg["max_steps"]:
            save_checkpoint(accelerator, ckpt_root, progress.step, Path(args.live))
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        decoder = accelerator.unwrap_model(model).eval()
        report = reconstruction_report(decoder, val, cfg["eval_images"], cfg["batch_size"], args.reference,
                                       params["evaluate"]["inception_weights"], accelerator.device)
        live = accelerator.get_tracker("dvclive").tracker
        live.summary["rec"] = {k: report[k] for k in ("psnr", "ssim", "rfid")}
        save_decoder(decoder, meta, args.out)
        write_json(args.report, {**report, "params": sum(p.numel() for p in decoder.parameters()),
                                 "steps": cfg["max_steps"], "adv_weight": cfg["adv_weight"]})
        shutil.rmtree(ckpt_root, ignore_errors=True)
        print(f"train_decoder: val PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, "
              f"rFID {report['rfid']:.2f} on {report['images']} images -> {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish(accelerator)


@torch.no_grad()
def val_l1(accelerator, model, val: PairedImages, batch_size: int, limit: int) -> float:
    """Mean L1 (in [-1, 1] units) of reconstructions of the first `limit` val images; every rank the same."""
    model.eval()
    total, count = 0.0, 0
    for tokens, images in val.batches(batch_size, 0, 0, shuffle=False, limit=limit):
        recon = model(torch.from_numpy(tokens).to(accelerator.device)).float().clamp(-1, 1)
        total += (recon - to_unit(images).to(recon.device)).abs().mean(dim=(1, 2, 3)).sum().item()
        count += len(tokens)
    model.train()
    return total / max(count, 1)


if __name__ == "__main__":
    run(main)
