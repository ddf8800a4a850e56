"""Stage `train_vqgan`: the reconstructive VQ tokenizer (the paper's VQGAN side), trained on train images.

A small convolutional VQGAN (digit/vqgan.py) at the dataset resolution whose token
grid is vqgan.grid (the DiGIT grid, so stage-2 maps are position-aligned). Loss:
L1 + the quantizer's commitment (and, without EMA, codebook) loss, plus a hinge
PatchGAN term from vqgan.adv_start when vqgan.adv_weight > 0. No perceptual (LPIPS)
loss: its VGG weights cannot be fetched offline. Accelerate (device, precision,
DDP), atomic resumable checkpoints in checkpoints/vqgan-<fingerprint>/, DVCLive
curves in reports/vqgan/. At the end the first vqgan.eval_images val images go
through encode -> decode: PSNR, SSIM, rFID (vs the cached val reference, as the
decoder's) and codebook usage / perplexity on val go to reports/vqgan.json.
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

import digit.vqgan as vqgan_module
from digit.atomic import write_json
from digit.checkpoint import Progress, resume_latest, save_checkpoint
from digit.cli import require_git_commit, run, stage_parser
from digit.decoder import PatchDiscriminator
from digit.distributed import finish, make_accelerator
from digit.errors import ConfigError
from digit.fid import InceptionFeatures, fid_between, load_features
from digit.params import load_params, seed_for
from digit.reconstruction import image_quality
from digit.training import lr_lambda, run_fingerprint
from digit.vqgan import (VQGAN, ImageBatches, VQGANConfig, codebook_stats, reconstruction_loss, save_vqgan,
                         uint8_images, unit_images)

MODEL_KEYS = ("k", "dim", "width", "n_res", "beta", "ema", "decay", "restart_every", "dead_threshold")


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--reference", default="data/reference", help="cached Inception features (stage reference)")
    parser.add_argument("--out", default="models/vqgan")
    parser.add_argument("--live", default="reports/vqgan")
    parser.add_argument("--report", default="reports/vqgan.json")
    parser.add_argument("--checkpoints", default="checkpoints")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg = {**params["vqgan"], "seed": seed_for(params, "vqgan")}  # vqgan.seed moved by base.seed
    train, val = ImageBatches(args.images, "train", cfg["shuffle_shards"]), ImageBatches(args.images, "val")
    # Checked before any work: the grid must divide the images by a power of two, and match nothing else yet
    # (vq_tokenize and stage 2 check it against the DiGIT grid).
    config = VQGANConfig(image_size=train.image_size, grid=cfg["grid"], seed=cfg["seed"],
                         **{k: cfg[k] for k in MODEL_KEYS})
    if train.num_rows < cfg["batch_size"]:
        raise ConfigError(f"vqgan.batch_size: {cfg['batch_size']} is more than the {train.num_rows} train "
                          "images; lower it")

    accelerator = make_accelerator(mixed_precision="no" if cfg["precision"] == "fp32" else cfg["precision"],
                                   log_with="dvclive")
    set_seed(cfg["seed"])
    model, disc = VQGAN(config), PatchDiscriminator(3)
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], 0.1))
    model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    progress = Progress()
    accelerator.register_for_checkpointing(sched, progress)
    code = [Path(__file__), Path(vqgan_module.__file__)]  # never resume from another code's checkpoint
    fingerprint = run_fingerprint({**cfg, "data": train.manifest}, *code)
    ckpt_root = Path(args.checkpoints) / f"vqgan-{fingerprint}"
    resumed = resume_latest(accelerator, ckpt_root, Path(args.live), "train_vqgan")
    accelerator.init_trackers("train_vqgan", init_kwargs={"dvclive": {
        "dir": args.live, "resume": resumed, "save_dvc_exp": False, "dvcyaml": False, "report": None}})

    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = train.num_rows // (cfg["batch_size"] * world)
    epoch, offset = divmod(progress.step, per_epoch)

    def stream(epoch: int, skip: int):
        # Each global batch is split over ranks: the data seen does not depend on the process count.
        for i, images in enumerate(train.batches(cfg["batch_size"] * world, cfg["seed"], epoch)):
            if i >= skip:
                yield unit_images(torch.from_numpy(images[rank * cfg["batch_size"]:(rank + 1) * cfg["batch_size"]]))

    batches = stream(epoch, offset)
    bar = tqdm(total=cfg["max_steps"], initial=progress.step, desc="train_vqgan", unit="step",
               disable=not accelerator.is_main_process)
    model.train()
    while progress.step < cfg["max_steps"]:
        started = time.perf_counter()
        try:
            target = next(batches)
        except StopIteration:
            epoch += 1
            batches = stream(epoch, 0)
            target = next(batches)
        target = target.to(accelerator.device)
        adversarial = cfg["adv_weight"] > 0 and progress.step >= cfg["adv_start"]
        with accelerator.autocast():
            recon, vq_loss, _, stats = model(target)
            l1 = reconstruction_loss(recon.float(), target)
            loss = l1 + vq_loss.float()
            if adversarial:  # the discriminator sees [-1, 1] images
                loss = loss - cfg["adv_weight"] * disc(recon * 2 - 1).float().mean()
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt_g.step()
        metrics = {"train/l1": accelerator.reduce(l1.detach(), "mean").item(),
                   "train/vq_loss": accelerator.reduce(vq_loss.detach().float(), "mean").item(),
                   "train/usage": float(stats["usage"]), "train/perplexity": float(stats["perplexity"]),
                   "train/dead_codes": float(stats["dead"]), "train/restarted": int(stats["restarted"]),
                   "train/lr": sched.get_last_lr()[0]}
        if adversarial:  # hinge loss for the discriminator on detached reconstructions
            with accelerator.autocast():
                d_loss = (F.relu(1 - disc(target * 2 - 1)).mean()
                          + F.relu(1 + disc(recon.detach() * 2 - 1)).mean()).float()
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
        bar.set_postfix(l1=f"{metrics['train/l1']:.4f}", usage=f"{metrics['train/usage']:.2f}")
        bar.update(1)
        if progress.step % cfg["checkpoint_every"] == 0 and progress.step < cfg["max_steps"]:
            save_checkpoint(accelerator, ckpt_root, progress.step, Path(args.live))
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vq = accelerator.unwrap_model(model).eval()
        report = vqgan_report(vq, val, cfg["eval_images"], cfg["batch_size"], args.reference,
                              params["evaluate"]["inception_weights"], accelerator.device)
        live = accelerator.get_tracker("dvclive").tracker
        live.summary["rec"] = {k: report[k] for k in ("psnr", "ssim", "rfid", "usage", "perplexity")}
        save_vqgan(vq, {"grid": [config.grid, config.grid], "vocab_size": config.k,
                        "image_size": config.image_size, "classes": train.classes}, args.out)
        write_json(args.report, {**report, "params": sum(p.numel() for p in vq.parameters()),
                                 "steps": cfg["max_steps"], "adv_weight": cfg["adv_weight"]})
        shutil.rmtree(ckpt_root, ignore_errors=True)
        print(f"train_vqgan: val PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, rFID {report['rfid']:.2f}, "
              f"codebook usage {report['usage']:.3f} on {report['images']} images -> {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish(accelerator)


@torch.no_grad()
def val_l1(accelerator, model, val: ImageBatches, batch_size: int, limit: int) -> float:
    """Mean L1 (in [0, 1] units) of encode -> decode of the first `limit` val images; every rank the same."""
    model.eval()
    total, count = 0.0, 0
    for images in val.batches(batch_size, 0, 0, shuffle=False, limit=limit):
        x = unit_images(torch.from_numpy(images)).to(accelerator.device)
        recon = model(x)[0].float()
        total += (recon - x).abs().mean(dim=(1, 2, 3)).sum().item()
        count += len(images)
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def vqgan_report(model: VQGAN, val: ImageBatches, n_images: int, batch_size: int, reference, inception_weights,
                 device) -> dict:
    """PSNR / SSIM / rFID of encode -> decode_tokens on the first n val images, and val codebook usage."""
    originals, recons, tokens = [], [], []
    for images in val.batches(batch_size, 0, 0, shuffle=False, limit=n_images):
        ids = model.encode(torch.from_numpy(images).to(device))
        recons.append(uint8_images(model.decode_tokens(ids)).cpu().numpy())
        originals.append(images)
        tokens.append(ids.cpu())
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    psnr, ssim = image_quality(originals, recons)
    ref = load_features(Path(reference) / "val.npz")
    feats = InceptionFeatures(inception_weights, device=device)(recons, batch_size=batch_size, desc="rFID")
    usage = codebook_stats(torch.cat(tokens), model.config.k)
    return {"images": len(recons), "reference_size": len(ref["pool"]),
            "psnr": round(float(np.mean(psnr)), 4), "ssim": round(float(np.mean(ssim)), 5),
            "rfid": round(float(fid_between(feats, ref)), 4),
            "usage": round(usage["usage"], 5), "perplexity": round(usage["perplexity"], 3)}


if __name__ == "__main__":
    run(main)
