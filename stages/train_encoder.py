"""Stage `train_encoder`: the frozen encoder the tokenizer uses, trained here without labels when asked.

With encoder.weights=trained, a small ViT (encoder.name with the train_encoder section's
depth/width) is trained on the train images by self-distillation in the DINO manner
(digit.ssl, lightly's loss/heads/momentum/transforms): EMA teacher, multi-crop views,
centring and sharpening. The loop is digit.trainer's (Accelerate, resumable checkpoints in
checkpoints/train_encoder-<fingerprint>/, DVCLive curves in reports/encoder/, a stop at
the first non-finite loss). Its patch grid must be the DAG's token grid (vqgan.grid), so
extract, codebook, tokenize and everything after run unchanged on it. The teacher's
backbone is published to models/encoder/ with the timm keywords that rebuild it; the
linear probe of its pooled features, beside the same architecture at random init, goes
to reports/encoder.json (has it learned anything?).

With any other encoder.weights (package, hub, none, a file) nothing is trained: the
folder records which frozen encoder the DAG uses, and the stages that encode images
check it against their params (digit.encoders.resolve_encoder).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from digit.atomic import atomic_dir, clean_stale_tmp, write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.encoders import RECORD, TRAINED, TRAINED_WEIGHTS, build_encoder, encoder_geometry, frozen_record
from digit.errors import ConfigError
from digit.params import load_params, seed_for
from digit.probe import fit_linear_probe
from digit.ssl import (add_noise, at_encoder_size, check_vit, make_views, model_kwargs, normalized, pooled_features, seed_step,
                       student_and_teacher, view_transform)
from digit.stability import image_batches
from digit.trainer import Trainer, lr_lambda
from digit.vqgan import ImageBatches


def probes(encoders: dict, images: str, cfg: dict, n_classes: int, seed: int) -> dict:
    """Top-1 of a linear probe on each encoder's grid-mean features: first probe_images train images, all val
    (the images are read once for all encoders)."""
    x_train, y_train = pooled_features(encoders, image_batches(images, "train", cfg["probe_images"], 256, labels=True))
    x_val, y_val = pooled_features(encoders, image_batches(images, "val", 0, 256, labels=True))
    return {name: fit_linear_probe(x_train[name], y_train, x_val[name], y_val, n_classes, cfg["probe_steps"],
                                   1e-4, seed) for name in encoders}


def publish_frozen(encoder_cfg: dict, out: Path, report: str, live: Path) -> None:
    """Nothing to train: record the frozen encoder the DAG uses. The curves folder (an output of the stage)
    holds only that record: a trained run's old curves do not outlive it."""
    record = frozen_record(encoder_cfg)
    clean_stale_tmp(out)
    with atomic_dir(out) as tmp:
        write_json(tmp / RECORD, record)
    clean_stale_tmp(live)
    with atomic_dir(live) as tmp:
        write_json(tmp / "metrics.json", record)
    write_json(report, record)
    print(f"train_encoder: encoder.weights={encoder_cfg['weights']}, nothing to train -> {out}")


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--out", default="models/encoder")
    parser.add_argument("--live", default="reports/encoder")
    parser.add_argument("--report", default="reports/encoder.json")
    parser.add_argument("--checkpoints", default="checkpoints")
    args = parser.parse_args()
    params = load_params(args.params)
    enc, out = params["encoder"], Path(args.out)
    if enc["weights"] != TRAINED:
        publish_frozen(enc, out, args.report, Path(args.live))
        return

    # before any heavy work: the architecture and the grid the DAG expects
    cfg = {**params["train_encoder"], "seed": seed_for(params, "train_encoder"),  # moved by base.seed
           # in the checkpoints' fingerprint too: a run of another ViT never resumes this one's checkpoint
           "encoder": {k: enc[k] for k in ("name", "img_size")}}
    kwargs = model_kwargs(cfg)
    patch = check_vit(enc["name"], enc["img_size"], kwargs, cfg["local_crop_size"])
    grid = tuple(encoder_geometry(enc["name"], "none", enc["layer"], enc["img_size"], 16, kwargs)["grid"])
    want = params["vqgan"]["grid"]
    if grid != (want, want):
        raise ConfigError(f"encoder.img_size={enc['img_size']} gives {enc['name']} (patch {patch}) a "
                          f"{grid[0]}x{grid[1]} grid, but the DAG's token grid is vqgan.grid={want}: set "
                          f"encoder.img_size={want * patch}")
    require_git_commit()
    train = ImageBatches(args.images, "train", cfg["shuffle_shards"])  # (too few images: Trainer.stream says so)

    from lightly.loss import DINOLoss
    from lightly.utils.scheduler import cosine_schedule
    from lightly.models.utils import update_momentum
    import timm

    trainer = Trainer("train_encoder", cfg, live=args.live, checkpoints=args.checkpoints, inputs=[args.images],
                      entry=__file__)
    accelerator, rank, world, B = trainer.accelerator, trainer.rank, trainer.world, cfg["batch_size"]
    student, teacher = student_and_teacher(enc["name"], enc["img_size"], cfg)
    data_cfg = timm.data.resolve_data_config({}, model=student.backbone)
    criterion = DINOLoss(cfg["head_output_dim"], warmup_teacher_temp=cfg["teacher_temp"],
                         teacher_temp=cfg["teacher_temp"], student_temp=cfg["student_temp"])
    decay = [p for p in student.parameters() if p.ndim >= 2]  # matrices only, as the GPT
    rest = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup_steps"], cfg["max_steps"], 0.01))
    teacher.to(trainer.device)
    criterion.to(trainer.device)
    student, opt = trainer.prepare(student, opt, state=[sched, teacher, criterion])
    transform = view_transform(cfg, train.image_size, enc["img_size"])
    factor = enc["img_size"] / train.image_size
    noise = (float(cfg["noise_snr_db"][0]), float(cfg["noise_snr_db"][1]))

    def views_of(images: np.ndarray, step: int, part: int) -> list[torch.Tensor]:
        seed_step(cfg["seed"], step, part)
        views = at_encoder_size(add_noise(make_views(transform, images), cfg["noise_prob"], noise), factor)
        return [v.to(trainer.device) for v in normalized(views, data_cfg["mean"], data_cfg["std"])]

    def epoch_batches(epoch: int, skip: int):
        # Each global batch is split over ranks: the data seen does not depend on the process count.
        for i, images in enumerate(train.batches(B * world, cfg["seed"], epoch)):
            if i >= skip:
                yield images[rank * B:(rank + 1) * B]

    batches = trainer.stream(epoch_batches, lambda epoch: train.epoch_length(B * world, cfg["seed"], epoch),
                             trainer.step)

    def dino_loss(views: list[torch.Tensor]) -> torch.Tensor:
        with accelerator.autocast():
            with torch.no_grad():
                t_out = [teacher(v).float() for v in views[:2]]  # the teacher sees the global crops only
            s_out = [student(v).float() for v in views]
        return criterion(t_out, s_out)

    def train_step(step: int) -> dict:
        views = views_of(next(batches), step, rank)
        loss = dino_loss(views)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        model = accelerator.unwrap_model(student)
        model.head.cancel_last_layer_gradients(step)  # the prototypes stay fixed for the first steps (DINO)
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(student.parameters(), cfg["grad_clip"])
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        momentum = cosine_schedule(step, cfg["max_steps"], cfg["momentum"], 1.0)
        update_momentum(model, teacher, momentum)
        # every rank keeps the same centre (lightly updates it from the local batch)
        criterion.center.data = accelerator.reduce(criterion.center.data, "mean")
        return {"train/loss": accelerator.reduce(loss.detach(), "mean").item(), "train/lr": lr,
                "train/momentum": momentum}

    val_images = next(iter(image_batches(args.images, "val", 256, 256))).numpy()

    @torch.no_grad()
    def validate() -> dict:
        """The DINO loss on fixed views of the first 256 val images (centre left as it is), and the spread of
        the teacher's normalised class-token features across images (0 = collapsed)."""
        views = views_of(val_images, 2**31, 0)
        center = criterion.center.detach().clone()
        loss = dino_loss(views).item()
        criterion.center.data = center
        feats = torch.nn.functional.normalize(teacher.backbone(views[0]).float(), dim=-1)
        return {"val/loss": loss, "val/teacher_std": feats.std(dim=0).mean().item()}

    started = time.time()
    trainer.fit(train_step, validate, items_per_step=B * world, throughput="train/img_per_s",
                show=("train/loss",))
    seconds = time.time() - started

    def publish(live) -> None:
        from safetensors.torch import save_file

        record = {"trained": True, "name": enc["name"], "weights": TRAINED, "img_size": enc["img_size"],
                  "model_kwargs": kwargs, "patch_size": patch, "grid": list(grid), "method": "dino",
                  "steps": cfg["max_steps"], "augment": {"blur": cfg["blur"], "noise_prob": cfg["noise_prob"],
                                                         "noise_snr_db": list(noise)}}
        clean_stale_tmp(out)
        with atomic_dir(out) as tmp:
            state = teacher.backbone.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / TRAINED_WEIGHTS))
            write_json(tmp / RECORD, record)
            n_classes = len(train.classes)
            device = trainer.device
            trained = build_encoder(enc["name"], str(tmp / TRAINED_WEIGHTS), enc["layer"], enc["img_size"], 16,
                                    cfg["seed"], kwargs).to(device)
            random_init = build_encoder(enc["name"], "none", enc["layer"], enc["img_size"], 16, cfg["seed"],
                                        kwargs).to(device)
            probed = probes({"probe": trained, "random_init_probe": random_init}, args.images, cfg, n_classes,
                            cfg["seed"])
        live.summary.update({k: v["val_top1"] for k, v in probed.items()})
        write_json(args.report, {**record, **probed, "layer": enc["layer"], "train_seconds": round(seconds, 1),
                                 "images_seen": cfg["max_steps"] * B * world})
        print(f"train_encoder: DINO {cfg['max_steps']} steps, pooled-feature probe top-1 "
              f"{probed['probe']['val_top1']:.4f} (random init {probed['random_init_probe']['val_top1']:.4f}) "
              f"-> {out}")

    trainer.publish(publish)


if __name__ == "__main__":
    run(main)
