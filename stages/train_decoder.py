"""Stage `train_decoder`: token grids of real images -> pixels, trained on the frozen tokenizer.

Pairs (data/tokens/train.parquet row, data/images train image) are streamed
shard by shard. The loss is digit.paint's recipe, the VQGAN's too: L1, a feature distance
under a frozen ImageNet encoder (the `feature_loss` section) weighted by decoder.feature_weight,
a hinge PatchGAN term whose discriminator trains from decoder.disc_start and whose generator
term switches on at decoder.adv_start, and up to decoder.token_noise of each grid's tokens
replaced by random codes (the target stays the clean image). The loop is digit.trainer's (Accelerate,
resumable checkpoints in checkpoints/train_decoder-<fingerprint>/, DVCLive curves in
reports/decoder/, a stop at the first non-finite loss). At the end the first
decoder.eval_images val images are rendered from their tokens exactly as `decode`
renders samples (digit.render's direct path): PSNR, SSIM and rFID go to reports/decoder.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digit.atomic import write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.decoder import DecoderConfig, PairedImages, TokenDecoder, save_decoder, to_unit
from digit.errors import ConfigError
from digit.gan import PatchDiscriminator
from digit.paint import PaintLoss, corrupt_tokens, feature_loss_from_params
from digit.params import RECIPE_KEYS, load_params, seed_for
from digit.reconstruction import mean_l1, reconstruction_report
from digit.trainer import Trainer, lr_lambda


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

    trainer = Trainer("train_decoder", cfg, live=args.live, checkpoints=args.checkpoints,
                      inputs=[args.images, tokens_dir, args.codebook], entry=__file__)
    accelerator, rank, world, B = trainer.accelerator, trainer.rank, trainer.world, cfg["batch_size"]
    model, disc = TokenDecoder(config, centroids), PatchDiscriminator(config.channels)
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=cfg["weight_decay"])
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], 0.1))
    model, disc, opt_g, opt_d = trainer.prepare(model, disc, opt_g, opt_d, state=[sched])
    paint = PaintLoss(cfg, accelerator, disc, opt_d, feature_loss_from_params(params, cfg["feature_weight"]),
                      params["feature_loss"]["images"])

    def epoch_batches(epoch: int, skip: int):
        # Each global batch is split over ranks: the data seen does not depend on the process count.
        for i, (tokens, images) in enumerate(train.batches(B * world, cfg["seed"], epoch)):
            if i >= skip:
                part = slice(rank * B, (rank + 1) * B)
                yield torch.from_numpy(tokens[part]), to_unit(images[part])

    batches = trainer.stream(epoch_batches, lambda epoch: train.epoch_length(B * world, cfg["seed"], epoch),
                             trainer.step)

    def train_step(step: int) -> dict:
        tokens, target = (t.to(accelerator.device) for t in next(batches))
        tokens = corrupt_tokens(tokens, cfg["token_noise"], config.vocab_size, cfg["seed"], step,
                                rank, world)
        with accelerator.autocast():
            recon = model(tokens)
            loss, metrics = paint.generator(recon, target, step)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt_g.step()
        metrics["train/lr"] = sched.get_last_lr()[0]
        metrics.update(paint.discriminator(target, recon, step))
        sched.step()
        return metrics

    def validate() -> dict:  # mean L1 in [-1, 1] units of the first eval_images val reconstructions
        pairs = ((model(torch.from_numpy(t).to(accelerator.device)).float().clamp(-1, 1), to_unit(x))
                 for t, x in val.batches(B, 0, 0, shuffle=False, limit=cfg["eval_images"]))
        return {"val/l1": mean_l1(model, pairs)}

    trainer.fit(train_step, validate, items_per_step=B * world, throughput="train/img_per_s", show=("train/l1",))

    def publish(live) -> None:
        decoder = accelerator.unwrap_model(model).eval()
        report = reconstruction_report(
            lambda tokens: decoder.decode(torch.from_numpy(tokens).to(accelerator.device)).cpu().numpy(),
            val.batches(B, 0, 0, shuffle=False, limit=cfg["eval_images"]), args.reference,
            params["evaluate"]["inception_weights"], accelerator.device, B)
        live.summary["rec"] = {k: report[k] for k in ("psnr", "ssim", "rfid")}
        save_decoder(decoder, meta, args.out)
        write_json(args.report, {"renderer": "direct", **report, "params": sum(p.numel() for p in decoder.parameters()),
                                 "steps": cfg["max_steps"],
                                 **{k: cfg[k] for k in RECIPE_KEYS}})
        print(f"train_decoder: val PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, "
              f"rFID {report['rfid']:.2f} on {report['images']} images -> {args.out}")

    trainer.publish(publish)


if __name__ == "__main__":
    run(main)
