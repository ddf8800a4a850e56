"""One schema for params.yaml, checked before any stage starts its work.

Every problem is reported at once, one line per problem, each naming the key:
a typo such as `codebok.k` is an error, never silently ignored. validate() only reads
the parameters and returns messages; digit.params.load_params raises them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from digit.params import MAX_BASE_SEED, SEED_STRIDE


@dataclass(frozen=True)
class Spec:
    type: type | tuple[type, ...]
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    help: str = ""

    def check(self, key: str, value: Any) -> str | None:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        # bool is an int subclass in Python; `k: true` must not pass as k=1.
        if isinstance(value, bool) and bool not in types:
            return f"{key}: expected {_names(types)}, got {value!r}"
        if float in types and isinstance(value, int):
            value = float(value)
        if not isinstance(value, types):
            return f"{key}: expected {_names(types)}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"{key}: {value!r} is not one of {', '.join(map(repr, self.choices))}"
        if self.min is not None and isinstance(value, (int, float)) and value < self.min:
            return f"{key}: {value!r} is below the minimum {self.min}"
        if self.max is not None and isinstance(value, (int, float)) and value > self.max:
            return f"{key}: {value!r} is above the maximum {self.max}"
        return None


def _names(types) -> str:
    return " or ".join(t.__name__ for t in types)


PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")  # "no" (Accelerate's name) == "fp32"; digit/precision.py

SCHEMA: dict[str, Spec] = {
    # every stage with randomness of its own (see seed_for)
    "base.seed": Spec(int, min=0, max=MAX_BASE_SEED,
                      help="run seed; each stage uses its section's seed + %d * base.seed" % SEED_STRIDE),
    "base.launcher": Spec(str, help="command that starts the multi-process stages, e.g. python, "
                          "`torchrun --nproc_per_node 2`, `accelerate launch --multi_gpu --num_processes 8`"),
    # prepare
    "data.source": Spec(str, choices=("fashion-mnist", "imagefolder")),
    "data.root": Spec(str),
    "data.train_size": Spec(int, min=0, help="0 = all"),
    "data.val_size": Spec(int, min=0, help="0 = all"),
    "data.image_size": Spec(int, min=8, max=4096),
    "data.shard_size": Spec(int, min=1),
    "data.on_bad_image": Spec(str, choices=("skip", "fail")),
    "data.image_format": Spec(str, choices=("png", "jpeg"), help="png (lossless) | jpeg (the ImageNet presets)"),
    "data.jpeg_quality": Spec(int, min=1, max=100, help="data.image_format=jpeg only"),
    "data.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # extract
    "encoder.name": Spec(str),
    "encoder.weights": Spec(str, help="package | hub | none | path to a checkpoint"),
    "encoder.cache": Spec(str, choices=("grids", "sample"),
                          help="grids: every feature grid (tokenize reads them) | sample: the K-Means sample only"),
    "encoder.layer": Spec(int, help="unused by encoder.name=pixels"),
    "encoder.patch_size": Spec(int, min=1, help="encoder.name=pixels only: patch side at encoder.img_size"),
    "encoder.img_size": Spec(int, min=16, max=4096),
    "encoder.batch_size": Spec(int, min=1),
    "encoder.precision": Spec(str, choices=PRECISIONS),
    # codebook
    "codebook.k": Spec(int, min=2),
    "codebook.niter": Spec(int, min=1),
    "codebook.max_points": Spec(int, min=2),
    "codebook.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # tokenize
    "tokenize.batch_size": Spec(int, min=1, help="images per assignment batch"),
    "tokenize.row_group_size": Spec(int, min=1, help="Parquet rows per row group"),
    # train
    "gpt.class_conditional": Spec(bool),
    "gpt.n_layer": Spec(int, min=1),
    "gpt.n_head": Spec(int, min=1),
    "gpt.n_embd": Spec(int, min=8),
    "gpt.dropout": Spec(float, min=0.0, max=0.9),
    "gpt.bias": Spec(bool),
    "gpt.label_dropout": Spec(float, min=0.0, max=1.0, help="probability of replacing the label by the null class"),
    "gpt.label_smoothing": Spec(float, min=0.0, max=0.9),
    "gpt.batch_size": Spec(int, min=1, help="sequences per process per micro-batch"),
    "gpt.grad_accum": Spec(int, min=1),
    "gpt.max_steps": Spec(int, min=1, help="optimizer steps"),
    "gpt.lr": Spec(float, min=0.0, max=1.0),
    "gpt.min_lr_ratio": Spec(float, min=0.0, max=1.0, help="cosine floor as a fraction of gpt.lr"),
    "gpt.warmup_steps": Spec(int, min=0),
    "gpt.weight_decay": Spec(float, min=0.0),
    "gpt.beta1": Spec(float, min=0.0, max=1.0),
    "gpt.beta2": Spec(float, min=0.0, max=1.0),
    "gpt.grad_clip": Spec(float, min=0.0, help="0 = off"),
    "gpt.precision": Spec(str, choices=PRECISIONS),
    "gpt.eval_every": Spec(int, min=1),
    "gpt.checkpoint_every": Spec(int, min=1),
    "gpt.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # sample
    "sample.num_per_class": Spec(int, min=1),
    "sample.batch_size": Spec(int, min=1),
    "sample.temperature": Spec(float, min=0.0, help="0 = greedy"),
    "sample.top_k": Spec(int, min=0, help="0 = off"),
    "sample.top_p": Spec(float, min=0.0, max=1.0, help="in (0, 1]; 1 = off"),
    "sample.cfg_scale": Spec(float, min=0.0, help="1 = no classifier-free guidance"),
    "sample.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # probe
    "probe.max_train": Spec(int, min=0, help="train sequences used to fit the probes (0 = all)"),
    "probe.batch_size": Spec(int, min=1),
    "probe.steps": Spec(int, min=1, help="L-BFGS iterations per layer"),
    "probe.weight_decay": Spec(float, min=0.0),
    # train_decoder
    "decoder.width": Spec(int, min=32, help="channels at grid resolution"),
    "decoder.n_attn": Spec(int, min=0, help="transformer blocks at grid resolution"),
    "decoder.n_head": Spec(int, min=1),
    "decoder.n_res": Spec(int, min=0, help="residual blocks per resolution"),
    "decoder.batch_size": Spec(int, min=1, help="images per process per step"),
    "decoder.max_steps": Spec(int, min=1),
    "decoder.lr": Spec(float, min=0.0, max=1.0),
    "decoder.warmup_steps": Spec(int, min=0),
    "decoder.weight_decay": Spec(float, min=0.0),
    "decoder.grad_clip": Spec(float, min=0.0, help="0 = off"),
    "decoder.feature_weight": Spec(float, min=0.0, help="feature distance weight (digit/paint.py), 0 = off"),
    "decoder.adv_weight": Spec(float, min=0.0, help="PatchGAN hinge term weight, 0 = off"),
    "decoder.disc_start": Spec(int, min=0, help="step the discriminator starts learning (<= adv_start)"),
    "decoder.adv_start": Spec(int, min=0, help="step the adversarial term starts"),
    "decoder.token_noise": Spec(float, min=0.0, max=1.0, help="max fraction of training tokens made random"),
    "decoder.precision": Spec(str, choices=PRECISIONS),
    "decoder.eval_every": Spec(int, min=1),
    "decoder.checkpoint_every": Spec(int, min=1),
    "decoder.eval_images": Spec(int, min=2, help="val images reconstructed for PSNR/SSIM/rFID"),
    "decoder.shuffle_shards": Spec(int, min=1, help="image shards mixed per shuffle window"),
    "decoder.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # train_encoder (encoder.weights=trained only; the ViT is checked by digit.ssl.check_vit)
    "train_encoder.depth": Spec(int, min=1, help="ViT blocks (timm keyword of encoder.name)"),
    "train_encoder.embed_dim": Spec(int, min=8),
    "train_encoder.num_heads": Spec(int, min=1),
    "train_encoder.head_hidden_dim": Spec(int, min=1, help="DINO projection head"),
    "train_encoder.head_bottleneck_dim": Spec(int, min=1),
    "train_encoder.head_output_dim": Spec(int, min=2, help="DINO prototypes"),
    "train_encoder.local_views": Spec(int, min=0, help="small crops seen by the student only"),
    "train_encoder.local_crop_size": Spec(int, min=8, help="a multiple of the ViT's patch size"),
    "train_encoder.blur": Spec(bool, help="DINO's Gaussian blur among the augmentations"),
    "train_encoder.noise_prob": Spec(float, min=0.0, max=1.0, help="Gaussian noise per view (0 = off)"),
    "train_encoder.noise_snr_db": Spec(list, help="[low, high]: the noise's SNR range in dB"),
    "train_encoder.batch_size": Spec(int, min=1, help="images per process per step"),
    "train_encoder.max_steps": Spec(int, min=1),
    "train_encoder.lr": Spec(float, min=0.0, max=1.0),
    "train_encoder.warmup_steps": Spec(int, min=0),
    "train_encoder.weight_decay": Spec(float, min=0.0),
    "train_encoder.momentum": Spec(float, min=0.0, max=1.0, help="teacher EMA at the start (cosine to 1)"),
    "train_encoder.teacher_temp": Spec(float, min=1e-4),
    "train_encoder.student_temp": Spec(float, min=1e-4),
    "train_encoder.freeze_last_layer_steps": Spec(int, min=0),
    "train_encoder.grad_clip": Spec(float, min=0.0, help="0 = off"),
    "train_encoder.precision": Spec(str, choices=PRECISIONS),
    "train_encoder.eval_every": Spec(int, min=1),
    "train_encoder.checkpoint_every": Spec(int, min=1),
    "train_encoder.probe_images": Spec(int, min=0, help="train images for the pooled-feature probe (0 = all)"),
    "train_encoder.probe_steps": Spec(int, min=1, help="L-BFGS iterations"),
    "train_encoder.shuffle_shards": Spec(int, min=1),
    "train_encoder.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # train_vqgan + vq_tokenize (checked further by digit.vqgan.VQGANConfig)
    "vqgan.weights": Spec(str, help="none (train it) | path to a pretrained LlamaGen VQ-16 checkpoint"),
    "vqgan.grid": Spec(int, min=1, help="tokens per side, the DiGIT grid"),
    "vqgan.k": Spec(int, min=2),
    "vqgan.dim": Spec(int, min=1),
    "vqgan.width": Spec(int, min=4),
    "vqgan.n_res": Spec(int, min=0),
    "vqgan.beta": Spec(float, min=0.0),
    "vqgan.ema": Spec(bool),
    "vqgan.decay": Spec(float, min=0.0, max=1.0),
    "vqgan.restart_every": Spec(int, min=0, help="0 = never"),
    "vqgan.dead_threshold": Spec(float, min=0.0),
    "vqgan.batch_size": Spec(int, min=1, help="images per process per step"),
    "vqgan.max_steps": Spec(int, min=1),
    "vqgan.lr": Spec(float, min=0.0, max=1.0),
    "vqgan.warmup_steps": Spec(int, min=0),
    "vqgan.grad_clip": Spec(float, min=0.0, help="0 = off"),
    "vqgan.feature_weight": Spec(float, min=0.0, help="feature distance weight (digit/paint.py), 0 = off"),
    "vqgan.adv_weight": Spec(float, min=0.0),
    "vqgan.disc_start": Spec(int, min=0, help="step the discriminator starts learning (<= adv_start)"),
    "vqgan.adv_start": Spec(int, min=0),
    "vqgan.token_noise": Spec(float, min=0.0, max=1.0, help="max fraction of training codes made random"),
    # the pixel decoders' feature loss (digit/paint.py)
    "feature_loss.name": Spec(str, help="timm model with forward_intermediates"),
    "feature_loss.weights": Spec(str, help="package | hub | path"),
    "feature_loss.layers": Spec(list, help="forward_intermediates indices, e.g. [-4, -3, -2]"),
    "feature_loss.img_size": Spec(int, min=1),
    "feature_loss.images": Spec(int, min=0, help="images per step compared (first of the batch), 0 = all"),
    "vqgan.precision": Spec(str, choices=PRECISIONS),
    "vqgan.eval_every": Spec(int, min=1),
    "vqgan.checkpoint_every": Spec(int, min=1),
    "vqgan.eval_images": Spec(int, min=2),
    "vqgan.shuffle_shards": Spec(int, min=1),
    "vqgan.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # train_stage2_ar / train_stage2_nar (checked further by digit.stage2.Stage2Config)
    "stage2.n_layer": Spec(int, min=1),
    "stage2.n_head": Spec(int, min=1),
    "stage2.n_embd": Spec(int, min=1),
    "stage2.dropout": Spec(float, min=0.0, max=0.99),
    "stage2.batch_size": Spec(int, min=1, help="pairs per process per step"),
    "stage2.max_steps": Spec(int, min=1),
    "stage2.lr": Spec(float, min=0.0, max=1.0),
    "stage2.warmup_steps": Spec(int, min=0),
    "stage2.weight_decay": Spec(float, min=0.0),
    "stage2.grad_clip": Spec(float, min=0.0, help="0 = off"),
    "stage2.precision": Spec(str, choices=PRECISIONS),
    "stage2.eval_every": Spec(int, min=1),
    "stage2.checkpoint_every": Spec(int, min=1),
    "stage2.eval_images": Spec(int, min=2, help="val images rendered for PSNR/SSIM/rFID"),
    "stage2.ar_temperature": Spec(float, min=0.0, help="0 = greedy"),
    "stage2.ar_top_p": Spec(float, min=0.0, max=1.0, help="nucleus mass in (0, 1], 1 = off; paper 0.8"),
    "stage2.nar_temperature": Spec(float, min=0.0, help="0 = argmax, no confidence noise"),
    "stage2.nar_steps": Spec(int, min=1, help="MaskGIT decoding passes; paper 8"),
    "stage2.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # decode
    "decode.batch_size": Spec(int, min=1),
    "decode.grid_columns": Spec(int, min=1, max=64, help="samples per class row in reports/samples/<renderer>.png"),
    "decode.roundtrip_images": Spec(int, min=1, help="real val token grids rendered and tokenized again "
                                    "(the token round-trip)"),
    "decode.seed": Spec(int, min=0, max=SEED_STRIDE - 1, help="draws of the stage-2 decoders"),
    # reference + evaluate
    "evaluate.inception_weights": Spec(str, help="offline | hub | path to an inception-v3-compat state dict"),
    "evaluate.reference_size": Spec(int, min=2, help="val images in the FID reference set"),
    "evaluate.floor_pool": Spec(int, min=2, help="train images whose features make the fid_floor set"),
    "evaluate.batch_size": Spec(int, min=1),
    "evaluate.kid_subsets": Spec(int, min=1),
    "evaluate.kid_subset_size": Spec(int, min=2, help="clamped to the smaller set"),
    "evaluate.seed": Spec(int, min=0, max=SEED_STRIDE - 1),
    # stability (the list's items are checked by digit.stability.check_config)
    "stability.snr_db": Spec(list, help="non-empty list of finite SNRs in dB, e.g. [30, 25, 20, 15, 10, 5, 1, 0.01]"),
    "stability.num_images": Spec(int, min=0, help="val images used (0 = all)"),
    "stability.batch_size": Spec(int, min=1, help="images per encoder batch"),
    "stability.seed": Spec(int, min=0, max=SEED_STRIDE - 1, help="seed of the noise"),
    "stability.headline_snr": Spec(float, help="the SNR (one of stability.snr_db) reported in metrics.json"),
    "stability.noise_at": Spec(str, choices=("stored", "encoder_input"),
                               help="protocol: noise at the stored image (default) or at the encoder input"),
    "stability.k_sweep": Spec(list, help="extra codebook sizes measured on the same noisy features, e.g. [64, 128, 256, 1024]"),
}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def validate(tree: dict) -> list[str]:
    """Return one message per problem (empty list = valid)."""
    problems = []
    flat = _flatten(tree)
    for key, value in flat.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(f"{key}: unknown parameter{hint}")
            continue
        msg = SCHEMA[key].check(key, value)
        if msg:
            problems.append(msg + (f" [{SCHEMA[key].help}]" if SCHEMA[key].help else ""))
    for key in SCHEMA:
        if key not in flat:
            problems.append(f"{key}: missing from params.yaml")
    if not problems:
        # Cross-field rules, only meaningful once each field is well-typed.
        if flat["gpt.n_embd"] % flat["gpt.n_head"]:
            problems.append(f"gpt.n_embd: {flat['gpt.n_embd']} is not divisible by gpt.n_head={flat['gpt.n_head']}")
        snr = flat["train_encoder.noise_snr_db"]
        if len(snr) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in snr) \
                or snr[0] > snr[1]:
            problems.append(f"train_encoder.noise_snr_db: {snr!r} is not [low, high] in dB, e.g. [5, 30]")
        if flat["sample.top_p"] <= 0:
            problems.append("sample.top_p: must be in (0, 1]; use 1 to turn nucleus sampling off")
        if flat["stage2.n_embd"] % flat["stage2.n_head"]:
            problems.append(f"stage2.n_embd: {flat['stage2.n_embd']} is not divisible by "
                            f"stage2.n_head={flat['stage2.n_head']}")
        if flat["stage2.ar_top_p"] <= 0:
            problems.append("stage2.ar_top_p: must be in (0, 1]; use 1 to turn nucleus sampling off")
        if not any(float(x) == float(flat["stability.headline_snr"]) for x in flat["stability.snr_db"]
                   if isinstance(x, (int, float))):
            problems.append(f"stability.headline_snr: {flat['stability.headline_snr']} is not one of "
                            f"stability.snr_db {flat['stability.snr_db']}; pick one of them")
        asked = {k: flat[k] for k in ("encoder.precision", "gpt.precision", "decoder.precision", "vqgan.precision",
                                      "stage2.precision", "train_encoder.precision") if flat[k] in ("bf16", "fp16")}
        if asked:  # checked on this machine's device before anything heavy runs
            from digit.precision import unsupported

            problems += [f"{key}: {why}" for key, value in asked.items() if (why := unsupported(value))]
        if flat["codebook.k"] > flat["codebook.max_points"]:
            problems.append(
                f"codebook.k: {flat['codebook.k']} centroids need at least as many sampled "
                f"features, but codebook.max_points is {flat['codebook.max_points']}; "
                "raise codebook.max_points or lower codebook.k"
            )
    return problems
