"""Stage `train_vqgan`: the reconstructive VQ tokenizer (the paper's VQGAN side), trained on train images.

A small convolutional VQGAN (digit/vqgan.py) at the dataset resolution whose token
grid is vqgan.grid (the DiGIT grid, so stage-2 maps are position-aligned). Loss:
the quantizer's commitment (and, without EMA, codebook) loss plus digit.paint's recipe, the
direct decoder's too: L1, the feature distance under the frozen ImageNet encoder of the
`feature_loss` section (LPIPS's VGG weights cannot be fetched offline) weighted by
vqgan.feature_weight, the hinge PatchGAN term (discriminator from vqgan.disc_start, generator
term from vqgan.adv_start), and up to vqgan.token_noise of each grid's codes replaced by random
codes before decoding. The loop is digit.trainer's (Accelerate, resumable checkpoints in
checkpoints/train_vqgan-<fingerprint>/, DVCLive curves in reports/vqgan/, a stop at
the first non-finite loss). At the end the first vqgan.eval_images val images go
through encode -> decode: PSNR, SSIM, rFID (digit.reconstruction, as every renderer)
and codebook usage / perplexity on val go to reports/vqgan.json.

With `vqgan.weights: path/to/checkpoint` nothing is trained: the public pretrained VQGAN there
(LlamaGen's VQ-16 layout, digit/pretrained_vqgan.py) is checked key by key, scored on the same val
images into the same report, and published as models/vqgan (the paper's setting: stage 2 renders
through a frozen pretrained VQGAN). Its sha256 goes into the report and the model's meta.
"""

from __future__ import annotations

import torch
from dvclive import Live

from digit.atomic import write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.distributed import finish, make_accelerator
from digit.errors import ConfigError
from digit.gan import PatchDiscriminator
from digit.paint import PaintLoss, corrupt_tokens, feature_loss_from_params
from digit.params import RECIPE_KEYS, load_params, seed_for
from digit.pretrained_vqgan import file_sha256, load_pretrained_vqgan
from digit.reconstruction import mean_l1, reconstruction_report
from digit.trainer import Trainer, lr_lambda
from digit.vqgan import (VQGAN, ImageBatches, VQGANConfig, codebook_stats, save_vqgan,
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
    if cfg["weights"] != "none":
        return adopt(cfg, params, train, val, args)
    if train.num_rows < cfg["batch_size"]:
        raise ConfigError(f"vqgan.batch_size: {cfg['batch_size']} is more than the {train.num_rows} train "
                          "images; lower it")

    trainer = Trainer("train_vqgan", cfg, live=args.live, checkpoints=args.checkpoints, inputs=[args.images],
                      entry=__file__)
    accelerator, rank, world, B = trainer.accelerator, trainer.rank, trainer.world, cfg["batch_size"]
    model, disc = VQGAN(config), PatchDiscriminator(3)
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], 0.1))
    model, disc, opt_g, opt_d = trainer.prepare(model, disc, opt_g, opt_d, state=[sched])
    paint = PaintLoss(cfg, accelerator, disc, opt_d, feature_loss_from_params(params, cfg["feature_weight"]),
                      params["feature_loss"]["images"])

    def epoch_batches(epoch: int, skip: int):
        # Each global batch is split over ranks: the data seen does not depend on the process count.
        for i, images in enumerate(train.batches(B * world, cfg["seed"], epoch)):
            if i >= skip:
                yield unit_images(torch.from_numpy(images[rank * B:(rank + 1) * B]))

    batches = trainer.stream(epoch_batches, lambda epoch: train.epoch_length(B * world, cfg["seed"], epoch),
                             trainer.step)

    def train_step(step: int) -> dict:
        target = next(batches).to(accelerator.device)
        corrupt = None
        if cfg["token_noise"] > 0:
            def corrupt(tokens):
                return corrupt_tokens(tokens, cfg["token_noise"], config.k, cfg["seed"], step,
                                      rank, world)
        with accelerator.autocast():
            recon, vq_loss, _, stats = model(target, corrupt)
            # digit.paint works in [-1, 1], the direct decoder's space; the VQGAN paints in [0, 1].
            loss, metrics = paint.generator(recon * 2 - 1, target * 2 - 1, step)
            loss = loss + vq_loss.float()
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt_g.step()
        metrics["train/l1"] /= 2  # in [0, 1] units, as before and as val/l1
        metrics.update({"train/vq_loss": accelerator.reduce(vq_loss.detach().float(), "mean").item(),
                        "train/usage": float(stats["usage"]), "train/perplexity": float(stats["perplexity"]),
                        "train/dead_codes": float(stats["dead"]), "train/restarted": int(stats["restarted"]),
                        "train/lr": sched.get_last_lr()[0]})
        metrics.update(paint.discriminator(target * 2 - 1, recon * 2 - 1, step))
        sched.step()
        return metrics

    def validate() -> dict:  # mean L1 in [0, 1] units of encode -> decode of the first eval_images val images
        pairs = ((model(x)[0], x) for x in (unit_images(torch.from_numpy(images)).to(accelerator.device)
                                            for images in val.batches(B, 0, 0, shuffle=False,
                                                                      limit=cfg["eval_images"])))
        return {"val/l1": mean_l1(model, pairs)}

    trainer.fit(train_step, validate, items_per_step=B * world, throughput="train/img_per_s",
                show=("train/l1", "train/usage"))

    def publish(live) -> None:
        vq = accelerator.unwrap_model(model).eval()
        report = publish_vqgan(vq, val, train.classes, params, args, accelerator.device, B)
        live.summary["rec"] = {k: report[k] for k in ("psnr", "ssim", "rfid", "usage", "perplexity")}
        write_json(args.report, {**report, "steps": cfg["max_steps"], **{k: cfg[k] for k in RECIPE_KEYS}})

    trainer.publish(publish)


def publish_vqgan(vq, val: ImageBatches, classes, params: dict, args, device, batch_size: int,
                  meta: dict | None = None) -> dict:
    """Score `vq` (encode -> decode of the first vqgan.eval_images val images: PSNR, SSIM, rFID, codebook use)
    and publish it as args.out; the report's common part is returned (the caller writes it)."""
    config, tokens = vq.config, []

    def render(images):  # encode -> decode_tokens, keeping the tokens for the usage statistics
        ids = vq.encode(torch.from_numpy(images).to(device))
        tokens.append(ids.cpu())
        return uint8_images(vq.decode_tokens(ids)).cpu().numpy()

    report = reconstruction_report(
        render, ((x, x) for x in val.batches(batch_size, 0, 0, shuffle=False, limit=params["vqgan"]["eval_images"])),
        args.reference, params["evaluate"]["inception_weights"], device, batch_size)
    usage = codebook_stats(torch.cat(tokens), config.k)
    report.update(usage=round(usage["usage"], 5), perplexity=round(usage["perplexity"], 3))
    save_vqgan(vq, {"grid": [config.grid, config.grid], "vocab_size": config.k, "image_size": config.image_size,
                    "classes": classes, **(meta or {})}, args.out)
    print(f"train_vqgan: val PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, rFID {report['rfid']:.2f}, "
          f"codebook usage {report['usage']:.3f} on {report['images']} images -> {args.out}")
    return {"renderer": "vqgan", **report, "params": sum(p.numel() for p in vq.parameters())}


def adopt(cfg: dict, params: dict, train: ImageBatches, val: ImageBatches, args) -> None:
    """vqgan.weights set: check the pretrained checkpoint against the DAG's grid and K, score it, publish it."""
    vq = load_pretrained_vqgan(cfg["weights"], train.image_size)
    for key, have in (("grid", vq.config.grid), ("k", vq.config.k)):
        if cfg[key] != have:
            raise ConfigError(f"vqgan.{key}={cfg[key]} but the pretrained VQGAN at {cfg['weights']} has {key} "
                              f"{have} at data.image_size={train.image_size}; set vqgan.{key}: {have}")
    # Under a multi-process launcher one process scores and publishes; the others only wait for it.
    accelerator = make_accelerator()
    if accelerator.is_main_process:
        sha = file_sha256(cfg["weights"])
        report = publish_vqgan(vq.to(accelerator.device), val, train.classes, params, args, accelerator.device,
                               cfg["batch_size"], {"pretrained": cfg["weights"], "sha256": sha})
        write_json(args.report, {**report, "pretrained": cfg["weights"], "sha256": sha, "steps": 0})
        # The same DVCLive outputs as a training run: the scores as step 0 (plots) and the summary.
        rec = {k: report[k] for k in ("psnr", "ssim", "rfid", "usage", "perplexity")}
        with Live(args.live, save_dvc_exp=False, dvcyaml=False, report=None) as live:
            for name, value in rec.items():
                live.log_metric(f"rec/{name}", value)  # also the summary's "rec", as after training
    finish(accelerator)


if __name__ == "__main__":
    run(main)
