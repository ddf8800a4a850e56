"""Stages `train_stage2_ar` / `train_stage2_nar`: DiGIT token grid -> VQGAN token grid (the paper's stage 2).

Trained on the row-aligned pairs (data/tokens, data/vq_tokens) of the train split:
`--kind ar` a causal transformer over [DiGIT][SEP][VQ] with the loss on the VQ part,
`--kind nar` a MaskGIT transformer (cosine masking schedule, masked positions scored).
The loop is digit.trainer's (Accelerate, resumable checkpoints in
checkpoints/train_stage2_<kind>-<fingerprint>/ keyed on params + both token files' bytes + the
VQGAN + code, DVCLive curves in reports/stage2_<kind>/, a stop at the first non-finite loss).
The published folder is the whole renderer: stage 2 plus a copy of the VQGAN it paints through.

At the end the first stage2.eval_images val images are rendered the way `decode`
renders samples (digit.render: DiGIT tokens -> stage 2 -> VQ tokens -> VQGAN decoder):
PSNR, SSIM, rFID against the cached val reference, VQ-token agreement with the
VQGAN's own tokens of the same images, and seconds per image go to
reports/stage2_<kind>.json, beside reports/decoder.json (direct) and
reports/vqgan.json (the VQGAN's own reconstructions: the ceiling of stage 2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from digit.atomic import write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.decoder import PairedImages
from digit.errors import ConfigError
from digit.params import load_params, seed_for
from digit.render import Renderer, render_report, stage2_sampling
from digit.stage2 import Stage2Config, build_stage2, random_mask, save_stage2
from digit.tokens import read_tokens
from digit.trainer import Trainer, lr_lambda
from digit.vqgan import load_vqgan

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "dropout")


def load_pairs(digit_dir: Path, vq_dir: Path, split: str):
    """(DiGIT tokens, VQ tokens, DiGIT metadata, VQ metadata) of one split, checked to be row-aligned pairs."""
    digit, labels, keys, meta = read_tokens(digit_dir / f"{split}.parquet")
    vq, _, vq_keys, vq_meta = read_tokens(vq_dir / f"{split}.parquet")
    if vq_meta.get("tokenizer") != "vq" or meta.get("tokenizer", "discriminative") != "discriminative":
        raise ConfigError(f"stage 2 maps DiGIT tokens ({digit_dir}) to VQ tokens ({vq_dir}), but they hold "
                          f"{meta.get('tokenizer', 'discriminative')} and {vq_meta.get('tokenizer', 'discriminative')}"
                          " tokens; pass data/tokens and data/vq_tokens")
    if list(vq_meta["grid"]) != list(meta["grid"]):
        raise ConfigError(f"{vq_dir}: the VQ grid is {vq_meta['grid'][0]}x{vq_meta['grid'][1]} but the DiGIT grid "
                          f"is {meta['grid'][0]}x{meta['grid'][1]}; stage 2 maps position to position, so set "
                          f"vqgan.grid: {meta['grid'][0]} (the DiGIT grid) and re-run `dvc repro vq_tokenize`")
    if keys != vq_keys:
        raise ConfigError(f"{digit_dir}/{split}.parquet and {vq_dir}/{split}.parquet do not list the same images "
                          "in the same order; re-run `dvc repro tokenize vq_tokenize` on the same data/images")
    return torch.from_numpy(digit), torch.from_numpy(vq), meta, vq_meta


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--kind", choices=("ar", "nar"), required=True)
    parser.add_argument("--tokens", default="data/tokens", help="DiGIT tokens (stage tokenize)")
    parser.add_argument("--vq-tokens", default="data/vq_tokens", help="VQ tokens (stage vq_tokenize)")
    parser.add_argument("--vqgan", default="models/vqgan")
    parser.add_argument("--images", default="data/images", help="val originals for PSNR / SSIM")
    parser.add_argument("--reference", default="data/reference", help="cached Inception features (stage reference)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--live", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--checkpoints", default="checkpoints")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg = {**params["stage2"], "seed": seed_for(params, "stage2")}  # stage2.seed moved by base.seed
    # Everything is checked before any training: pairs aligned, grids equal, the VQGAN the one that tokenized.
    train_d, train_v, meta, vq_meta = load_pairs(Path(args.tokens), Path(args.vq_tokens), "train")
    val_d, val_v, _, _ = load_pairs(Path(args.tokens), Path(args.vq_tokens), "val")
    vqgan, _ = load_vqgan(args.vqgan, k=vq_meta["vocab_size"], grid=tuple(vq_meta["grid"]))
    config = Stage2Config(digit_k=meta["vocab_size"], vq_k=vq_meta["vocab_size"], grid=tuple(meta["grid"]),
                          kind=args.kind, **{k: cfg[k] for k in MODEL_KEYS})
    if len(train_d) < cfg["batch_size"]:
        raise ConfigError(f"stage2.batch_size: {cfg['batch_size']} is more than the {len(train_d)} train pairs; "
                          "lower it")

    trainer = Trainer(f"train_stage2_{args.kind}", cfg, live=args.live, checkpoints=args.checkpoints,
                      inputs=[args.tokens, args.vq_tokens, args.vqgan], entry=__file__)
    accelerator, rank, world, B = trainer.accelerator, trainer.rank, trainer.world, cfg["batch_size"]
    model = build_stage2(config)
    optimizer = model.configure_optimizer(cfg["weight_decay"], cfg["lr"], (0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], 0.1))
    model, optimizer = trainer.prepare(model, optimizer, state=[sched])
    per_epoch = len(train_d) // (B * world)

    def global_batch(step: int):
        """Rows and (NAR) masks of optimizer step `step`, from (seed, epoch) / (seed, step) draws only:
        the same for any process count and after a resume. Each rank takes its slice."""
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(len(train_d), generator=torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch))
        rows = order[i * B * world:(i + 1) * B * world][rank * B:(rank + 1) * B]
        mask = None
        if args.kind == "nar":
            gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + 7919 * (step + 1))
            mask = random_mask(B * world, config.positions, gen)[rank * B:(rank + 1) * B]
        return rows, mask

    def train_step(step: int) -> dict:
        rows, mask = global_batch(step)
        digit, vq = train_d[rows].to(accelerator.device), train_v[rows].to(accelerator.device)
        with accelerator.autocast():
            loss = model(digit, vq, mask=mask) if mask is not None else model(digit, vq)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        sched.step()
        return {"train/loss": accelerator.reduce(loss.detach().float(), "mean").item(),
                "train/lr": sched.get_last_lr()[0]}

    trainer.fit(train_step, lambda: val_metrics(accelerator.unwrap_model(model), val_d, val_v, cfg, accelerator.device),
                items_per_step=B * world, throughput="train/pairs_per_s", show=("train/loss",))

    def publish(live) -> None:
        stage2 = accelerator.unwrap_model(model).eval()
        kind = f"stage2_{args.kind}"
        renderer = Renderer(kind, config.digit_k, config.grid, accelerator.device, vqgan=vqgan.to(accelerator.device),
                            stage2=stage2, sampling=stage2_sampling(cfg, kind), seed=cfg["seed"])
        val = PairedImages(args.images, Path(args.tokens) / "val.parquet", "val")
        report = render_report(renderer, val, cfg["eval_images"], B, args.reference,
                               params["evaluate"]["inception_weights"], vq_reference=val_v)
        live.summary["rec"] = {k: report[k] for k in ("psnr", "ssim", "rfid", "vq_token_accuracy")}
        # The renderer is one folder: stage 2 with a copy of the VQGAN it paints through.
        save_stage2(stage2, {"digit_grid": meta["grid"], "encoder": meta.get("encoder"), "classes": meta.get("classes"),
                             "vq_k": config.vq_k, "steps": cfg["max_steps"]}, args.out, vqgan_dir=args.vqgan)
        write_json(args.report, {"kind": kind, **report, "params": stage2.num_params(), "steps": cfg["max_steps"],
                                 "sampling": stage2_sampling(cfg, kind)})
        print(f"{trainer.name}: val PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, rFID {report['rfid']:.2f}, "
              f"VQ-token accuracy {report['vq_token_accuracy']:.3f} -> {args.out}")

    trainer.publish(publish)


@torch.no_grad()
def val_metrics(model, val_d: torch.Tensor, val_v: torch.Tensor, cfg: dict, device) -> dict:
    """Teacher-forced val loss and token accuracy on the first stage2.eval_images pairs (NAR: fixed seeded masks)."""
    model.eval()
    n = min(len(val_d), cfg["eval_images"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, n, cfg["batch_size"]):
        d, v = val_d[start:min(n, start + cfg["batch_size"])].to(device), val_v[start:min(n, start + cfg["batch_size"])]
        v = v.to(device)
        if model.config.kind == "nar":
            mask = random_mask(len(d), model.config.positions, gen).to(device)
            loss, logits = model(d, v, mask=mask, return_logits=True)
            hits, scored = (logits.argmax(-1) == v)[mask], int(mask.sum())
        else:
            loss, logits = model(d, v, return_logits=True)
            hits, scored = logits.argmax(-1) == v, v.numel()
        loss_sum += loss.item() * scored
        correct += int(hits.sum())
        count += scored
    model.train()
    return {"val/loss": loss_sum / max(count, 1), "val/token_accuracy": correct / max(count, 1)}


if __name__ == "__main__":
    run(main)
