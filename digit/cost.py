"""Cost model: FLOPs, bytes written and projected wall time of every stage, before renting GPUs.

    python -m digit.cost                          # the default params.yaml
    python -m digit.cost imagenet-digit-base      # a preset (presets/NAME.yaml over params.yaml)
    python -m digit.cost imagenet-digit-base --gpus 8 --peak-tflops 989 --utilisation 0.4 [--json]
    python -m digit.cost imagenet-digit-base -S gpt.max_steps=500453   # any key, as `dvc exp run -S` takes it

FLOPs are counted, not estimated: every network is built at the preset's shapes on the meta device
(no memory, no weights) and one forward (+ backward for the trainers) of one batch runs under
PyTorch's FlopCounterMode, which counts each matmul and convolution (a multiply-add is 2 FLOPs).
Elementwise work (norms, activations, optimizer updates) is not counted: it is why measured
utilisation stays below the matmul peak (the check: `python bench/cost.py`). The stages multiply
per-batch counts by what they run: steps x global batch for the trainers, images for the encoders.
The one number taken from a paper is the Inception-v3 forward: 5.72 G multiply-adds at 299 px
(Szegedy et al. 2016), the FID network of `reference`, `score` and every rFID.

Bytes are each stage's outputs (images as stored, float16 feature grids, uint16-equivalent tokens,
fp32 weights, peak checkpoints = weights + AdamW moments, x2 kept), upper bounds before
compression, from digit.storage, the model the stages' own pre-flight check uses.

Wall time = FLOPs / (GPUs x peak x utilisation); it says nothing of data loading or disks, which is
why `extract`'s and `prepare`'s bytes are listed beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from digit.cli import run
from digit.errors import ConfigError
from digit.params import load_params
from digit.schema import validate
from digit.precision import native_bf16
from digit.report import duration
from digit.storage import feature_bytes, human_bytes, image_bytes, token_bytes

INCEPTION_FLOPS = 2 * 5.72e9           # Inception-v3 forward at 299 px (Szegedy et al. 2016): 5.72 G MACs
INCEPTION_FEATURE_BYTES = 2048 * 4     # one pool3 vector as cached by `reference` (float32)
# Images per split when a size cap is 0 (= all).
FULL_SPLITS = {"fashion-mnist": (60000, 10000), "imagefolder": (1281167, 50000)}  # imagefolder: ImageNet-1k


@dataclass
class StageCost:
    stage: str
    flops: float
    bytes: float
    counted: str    # what the FLOPs are
    precision: str  # what its matmuls run at: "bf16" (autocast) or "fp32"

    def seconds(self, devices: int, peaks: dict[str, float], utilisation: float) -> float:
        return self.flops / (devices * peaks[self.precision] * utilisation)


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n matmul on this machine's CPU (all its threads), timed for about `seconds`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / elapsed


def count_flops(fn) -> float:
    """FLOPs of fn() (matmuls and convolutions, forward and any backward it runs) on meta tensors.

    The models check their inputs' values (`int(tokens.max()) >= vocab`), which meta tensors do not
    have: while counting, such a read of a meta tensor gives 0 (int) or False (bool), i.e. "valid"."""
    to_int, to_bool = torch.Tensor.__int__, torch.Tensor.__bool__
    torch.Tensor.__int__ = lambda t: 0 if t.is_meta else to_int(t)
    torch.Tensor.__bool__ = lambda t: False if t.is_meta else to_bool(t)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.Tensor.__int__, torch.Tensor.__bool__ = to_int, to_bool
    return float(counter.get_total_flops())


def world_size(launcher: str) -> int:
    """Processes a base.launcher starts: --num_processes N / --nproc_per_node N, else 1."""
    match = re.search(r"--(?:num_processes|nproc_per_node)[ =](\d+)", launcher)
    return int(match.group(1)) if match else 1


def split_sizes(p: dict) -> tuple[int, int]:
    full = FULL_SPLITS[p["data"]["source"]]
    caps = (p["data"]["train_size"], p["data"]["val_size"])
    return tuple(min(c, f) if c else f for c, f in zip(caps, full))


# ----------------------------------------------------------------- per-network counts (meta device)
def encoder_geometry_and_flops(p: dict) -> tuple[tuple[int, int], int, float]:
    """(grid, feature dim, forward FLOPs per image) of the extract encoder at encoder.img_size."""
    from digit.encoders import PIXELS, TRAINED, encoder_geometry, meta_model
    from digit.ssl import model_kwargs

    e = p["encoder"]
    kwargs = model_kwargs(p["train_encoder"]) if e["weights"] == TRAINED else {}  # the ViT train_encoder trains
    # The architecture alone ("none"): FLOPs do not depend on the weights, which may not be here.
    geo = encoder_geometry(e["name"], "none", e["layer"], e["img_size"], e["patch_size"], kwargs)
    if e["name"] == PIXELS:
        return tuple(geo["grid"]), geo["dim"], 0.0
    model = meta_model(e["name"], e["img_size"], kwargs)
    x = torch.empty(1, 3, e["img_size"], e["img_size"], device="meta")
    flops = count_flops(lambda: model.forward_intermediates(x, indices=[geo["index"]], intermediates_only=True,
                                                            stop_early=True))
    return tuple(geo["grid"]), geo["dim"], flops


def feature_loss_flops(p: dict, section: str, world: int) -> float:
    """FLOPs of the feature loss of a pixel decoder's section (digit/paint.py) over its whole run: per compared
    image one forward of the real image (no grad) and forward + backward of the rendered one (~4 forwards)."""
    d = p[section]
    if d["feature_weight"] <= 0:
        return 0.0
    from digit.encoders import meta_model

    f = p["feature_loss"]
    model = meta_model(f["name"], f["img_size"])
    n = len(model.feature_info)
    x = torch.empty(1, 3, f["img_size"], f["img_size"], device="meta")
    deepest = max(layer % n for layer in f["layers"])
    forward = count_flops(lambda: model.forward_intermediates(x, indices=[deepest], intermediates_only=True,
                                                              stop_early=True))
    images = min(f["images"] or d["batch_size"], d["batch_size"])
    return d["max_steps"] * images * world * 4 * forward


def gpt_flops(p: dict, vocab: int, positions: int, classes: int) -> tuple[float, float, int]:
    """(train FLOPs per sequence, forward FLOPs per sequence, parameters) of the GPT."""
    from digit.gpt import GPT, GPTConfig
    from digit.training import sequence_loss

    g = p["gpt"]
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=positions + 1,
                              num_classes=classes if g["class_conditional"] else 0, n_layer=g["n_layer"],
                              n_head=g["n_head"], n_embd=g["n_embd"], dropout=0.0, bias=g["bias"]))
        labels = torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, positions, dtype=torch.long)
    forward = count_flops(lambda: model(labels, tokens[:, :-1]))
    train = count_flops(lambda: sequence_loss(model(labels, tokens[:, :-1]), tokens).backward())
    return train, forward, model.num_params()


def decoder_flops(p: dict, vocab: int, code_dim: int, grid: tuple[int, int], size: int) -> tuple[float, float, float, int]:
    """(generator train, discriminator train, forward) FLOPs per image, and parameters, of the pixel decoder."""
    from digit.decoder import DecoderConfig, TokenDecoder
    from digit.gan import PatchDiscriminator

    d = p["decoder"]
    with torch.device("meta"):
        model = TokenDecoder(DecoderConfig(vocab_size=vocab, code_dim=code_dim, grid=grid, image_size=size,
                                           width=d["width"], n_attn=d["n_attn"], n_head=d["n_head"], n_res=d["n_res"]))
        disc = PatchDiscriminator(3)
        tokens = torch.zeros(1, grid[0] * grid[1], dtype=torch.long)
        image = torch.empty(1, 3, size, size)
    forward = count_flops(lambda: model(tokens))
    train = count_flops(lambda: model(tokens).sum().backward())
    d_train = count_flops(lambda: disc(image).sum().backward())
    return train, d_train, forward, sum(x.numel() for x in model.parameters())


def vqgan_flops(p: dict, size: int) -> tuple[float, float, float, float, int]:
    """(train, discriminator train, encode, decode) FLOPs per image, and parameters, of the VQGAN
    (train and discriminator 0 for a pretrained one, `vqgan.weights`, which is adopted, not trained).

    Encoder and decoder run on the meta device; the quantizer's distances (grid^2 x K x dim
    multiply-adds) are added by hand, as its fp32-forcing autocast block has no meta kernel."""
    from digit.gan import PatchDiscriminator
    from digit.vqgan import VQGAN, VQGANConfig

    v = p["vqgan"]
    distances = v["grid"] ** 2 * v["k"] * v["dim"] * 2
    if v["weights"] != "none":  # adopted, not trained: the pretrained layout's encoder and decoder
        from digit.pretrained_vqgan import PretrainedVQConfig, PretrainedVQGAN

        with torch.device("meta"):
            model = PretrainedVQGAN(PretrainedVQConfig(image_size=size, k=v["k"]))
            image = torch.empty(1, 3, size, size)
        distances = model.config.grid ** 2 * v["k"] * model.config.dim * 2
        encode = count_flops(lambda: model.quant_conv(model.encoder(image))) + distances
        z = model.quant_conv(model.encoder(image))
        decode = count_flops(lambda: model.decoder(model.post_quant_conv(z)))
        return 0.0, 0.0, encode, decode, sum(x.numel() for x in model.parameters())
    with torch.device("meta"):
        model = VQGAN(VQGANConfig(image_size=size, grid=v["grid"], k=v["k"], dim=v["dim"], width=v["width"],
                                  n_res=v["n_res"]))
        disc = PatchDiscriminator(3)
        image = torch.empty(1, 3, size, size)
    encode = count_flops(lambda: model.encoder(image)) + distances
    z = model.encoder(image)
    decode = count_flops(lambda: model.decoder(z))
    train = count_flops(lambda: model.decoder(model.encoder(image)).sum().backward()) + distances
    d_train = count_flops(lambda: disc(image).sum().backward())
    return train, d_train, encode, decode, sum(x.numel() for x in model.parameters())


def stage2_flops(p: dict, digit_k: int, vq_k: int, grid: tuple[int, int]) -> tuple[float, float, int]:
    """(train, forward) FLOPs per pair, and parameters, of stage 2 (AR)."""
    from digit.stage2 import Stage2Config, build_stage2

    s = p["stage2"]
    with torch.device("meta"):
        model = build_stage2(Stage2Config(digit_k=digit_k, vq_k=vq_k, grid=grid, kind="ar", n_layer=s["n_layer"],
                                          n_head=s["n_head"], n_embd=s["n_embd"]))
        a = torch.zeros(1, grid[0] * grid[1], dtype=torch.long)
    forward = count_flops(lambda: model(a, a))
    train = count_flops(lambda: model(a, a).backward())
    return train, forward, sum(x.numel() for x in model.parameters())


# ----------------------------------------------------------------- the stages
def stage_costs(p: dict, device: str = "cuda") -> list[StageCost]:
    """Cost of every stage of the default DAG (dvc.yaml) at parameters p, with `precision: auto` resolved
    for `device` (cuda: bf16; cpu: bf16 only where this CPU computes it)."""
    world = world_size(p["base"]["launcher"])
    n_train, n_val = split_sizes(p)
    n_images = n_train + n_val
    size = p["data"]["image_size"]
    grid, dim, enc = encoder_geometry_and_flops(p)
    positions, k = grid[0] * grid[1], p["codebook"]["k"]
    classes = 1000 if p["data"]["source"] == "imagefolder" else 10
    samples = p["sample"]["num_per_class"] * classes
    tokens = token_bytes(n_images, positions)
    out: list[StageCost] = []

    def add(stage, flops, nbytes, counted, section=None):
        precision = p[section]["precision"] if section else "fp32"  # inference stages run fp32
        if precision == "auto":
            precision = "bf16" if device == "cuda" or native_bf16("cpu") else "fp32"
        precision = "bf16" if precision in ("bf16", "fp16") else "fp32"
        out.append(StageCost(stage, float(flops), float(nbytes), counted, precision))

    add("prepare", 0, image_bytes(n_images, size, p["data"]["source"], p["data"]["image_format"]),
        f"decode + resize + {p['data']['image_format'].upper()} (no FLOPs counted)")
    t = p["train_encoder"]
    if p["encoder"]["weights"] == "trained":
        # DINO: the student sees 2 global + local views (local ones ~ (local/img)^2 of a global's tokens,
        # forward + backward = 3 forwards), the teacher the 2 global ones; then the probe's forwards
        # (trained + random init) of probe_images train and every val image.
        local = t["local_views"] * (t["local_crop_size"] / p["encoder"]["img_size"]) ** 2
        per_image = 3 * (2 + local) * enc + 2 * enc
        probe = 2 * ((t["probe_images"] or n_train) + n_val) * enc
        add("train_encoder", t["max_steps"] * t["batch_size"] * world * per_image + probe, 0,
            f"DINO, {t['max_steps']:,} steps x {t['batch_size'] * world} images x {2 + t['local_views']} views",
            "train_encoder")
    else:
        add("train_encoder", 0, 0, "records the frozen encoder (nothing trained)")
    points = min(p["codebook"]["max_points"], n_train * positions)
    assign = n_images * positions * k * dim * 2
    if p["encoder"]["cache"] == "sample":  # extract keeps the codebook's sample; tokenize encodes again
        # images with at least one sampled vector: 1 - P(none of its positions drawn)
        written = n_train * (1 - (1 - points / (n_train * positions)) ** positions)
        add("extract", n_train * enc, feature_bytes(written, points / written, dim),
            f"{n_train:,} encoder forwards, {points:,} vectors kept", "encoder")
        tokenize = (n_images * enc + assign, "encoder forwards + nearest centroid per position", "encoder")
    else:
        add("extract", n_images * enc, feature_bytes(n_images, positions, dim), f"{n_images:,} encoder forwards",
            "encoder")
        tokenize = (assign, "nearest centroid per position", None)
    add("codebook", p["codebook"]["niter"] * points * k * dim * 2, k * dim * 4, "K-Means distances, niter x points x K x D")
    add("tokenize", tokenize[0], tokens, tokenize[1], tokenize[2])
    n_ref = p["evaluate"]["reference_size"] or n_val
    add("reference", (n_ref + p["evaluate"]["floor_pool"]) * INCEPTION_FLOPS,
        (n_ref + p["evaluate"]["floor_pool"]) * INCEPTION_FEATURE_BYTES, "Inception forwards")

    v = p["vqgan"]
    vq_train, vq_disc, vq_encode, vq_decode, vq_params = vqgan_flops(p, size)
    vq_batches = v["max_steps"] * v["batch_size"] * world
    adv = max(0, v["max_steps"] - v["disc_start"]) * v["batch_size"] * world if v["adv_weight"] > 0 else 0
    if v["weights"] != "none":
        add("train_vqgan", v["eval_images"] * (vq_encode + vq_decode + INCEPTION_FLOPS), vq_params * 4,
            f"pretrained {v['weights']}: scored on {v['eval_images']:,} val images, not trained")
    else:
        add("train_vqgan", vq_batches * vq_train + adv * vq_disc + feature_loss_flops(p, "vqgan", world)
            + v["eval_images"] * INCEPTION_FLOPS,
            vq_params * 4 * 3 * 3, f"{v['max_steps']:,} steps x {v['batch_size'] * world} images", "vqgan")
    add("vq_tokenize", n_images * vq_encode, tokens, "VQGAN encoder forwards")

    g = p["gpt"]
    sequences = g["max_steps"] * g["batch_size"] * g["grad_accum"] * world
    for tok, vocab in (("digit", k), ("vq", v["k"])):
        train, forward, params = gpt_flops(p, vocab, positions, classes)
        evals = (g["max_steps"] // g["eval_every"] + 1) * n_val * forward
        add(f"train@{tok}", sequences * train + evals, params * 4 * 3 * 3,
            f"{g['max_steps']:,} steps x {g['batch_size'] * g['grad_accum'] * world} sequences", "gpt")
        guided = 2 if p["sample"]["cfg_scale"] != 1 else 1
        add(f"sample@{tok}", samples * forward * guided, token_bytes(samples, positions),
            f"{samples:,} samples (KV-cached decoding ~ one forward each)")
        add(f"probe@{tok}", n_images * forward, 0, "GPT forwards for the features (L-BFGS not counted)")

    d = p["decoder"]
    dec_train, dec_disc, dec_forward, dec_params = decoder_flops(p, k, dim, grid, size)
    images = d["max_steps"] * d["batch_size"] * world
    adv = max(0, d["max_steps"] - d["disc_start"]) * d["batch_size"] * world if d["adv_weight"] > 0 else 0
    add("train_decoder", images * dec_train + adv * dec_disc + feature_loss_flops(p, "decoder", world)
        + d["eval_images"] * INCEPTION_FLOPS,
        dec_params * 4 * 3 * 3, f"{d['max_steps']:,} steps x {d['batch_size'] * world} images", "decoder")

    s = p["stage2"]
    s2_train, s2_forward, s2_params = stage2_flops(p, k, v["k"], grid)
    add("train_stage2@ar", s["max_steps"] * s["batch_size"] * world * s2_train + s["eval_images"] * INCEPTION_FLOPS,
        s2_params * 4 * 3 * 3, f"{s['max_steps']:,} steps x {s['batch_size'] * world} pairs", "stage2")

    pixels = image_bytes(samples, size, p["data"]["source"])
    add("decode@direct", samples * dec_forward, pixels, f"{samples:,} decoder forwards")
    add("decode@stage2_ar", samples * (s2_forward + vq_decode), pixels, "stage 2 + VQGAN decoder")
    add("decode@vqgan", samples * vq_decode, pixels, "VQGAN decoder")
    for r in ("direct", "stage2_ar", "vqgan"):
        add(f"score@{r}", samples * INCEPTION_FLOPS, 0, f"{samples:,} Inception forwards")
    st = p["stability"]
    add("stability", st["num_images"] * len(st["snr_db"]) * 2 * (enc + positions * k * dim * 2), 0,
        "encoder + assignment per noisy image, both protocols")
    add("evaluate", 0, 0, "collects reports")
    return out


def main() -> None:
    from digit.preset import load_preset, merge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", help="presets/NAME.yaml over params.yaml (default: params.yaml)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--gpus", type=int, help="devices the time is projected on (default: base.launcher's count)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak per device, TFLOP/s (default 989: H100 SXM)")
    parser.add_argument("--fp32-tflops", type=float, default=67.0,
                        help="fp32 peak per device, TFLOP/s, for stages that run fp32 (default 67: H100 SXM, "
                             "TF32 off as PyTorch leaves it)")
    parser.add_argument("--here", action="store_true",
                        help="project onto this machine's CPU instead: its fp32 (and native bf16) matmul peak, "
                             "measured now, one process")
    parser.add_argument("--utilisation", type=float, default=0.4, help="fraction of the peak reached (default 0.4)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, as `dvc exp run -S` does (YAML value), e.g. -S gpt.max_steps=500000")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    if not 0 < args.utilisation <= 1 or args.peak_tflops <= 0 or args.fp32_tflops <= 0:
        raise ConfigError("--utilisation must be in (0, 1], --peak-tflops and --fp32-tflops positive")
    p = load_preset(args.preset, args.params) if args.preset else load_params(args.params)
    for item in args.set:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in p or name not in p[section]:
            raise ConfigError(f"-S {item}: expected an existing SECTION.KEY=VALUE, e.g. -S gpt.max_steps=500000")
        p = merge(p, {section: {name: yaml.safe_load(value)}})
    problems = validate(p)
    if problems:
        raise ConfigError("; ".join(problems))
    if args.here:
        fp32 = matmul_peak(torch.float32)
        peaks = {"fp32": fp32, "bf16": matmul_peak(torch.bfloat16) if native_bf16("cpu") else fp32}
        devices, where = 1, (f"this CPU ({torch.get_num_threads()} threads): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
                             f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s" if native_bf16("cpu") else
                             f"this CPU ({torch.get_num_threads()} threads): {fp32 / 1e9:.0f} GFLOP/s fp32, "
                             "no native bf16")
    else:
        peaks = {"bf16": args.peak_tflops * 1e12, "fp32": args.fp32_tflops * 1e12}
        devices = args.gpus or world_size(p["base"]["launcher"])
        where = f"{devices} GPU(s) x {args.peak_tflops:g} TFLOP/s bf16 / {args.fp32_tflops:g} fp32"
    costs = stage_costs(p, "cpu" if args.here else "cuda")
    seconds = [c.seconds(devices, peaks, args.utilisation) for c in costs]
    name = args.preset or "default"
    if args.json:
        print(json.dumps({"preset": name, "devices": devices, "peaks_flops": peaks, "utilisation": args.utilisation,
                          "stages": [{**asdict(c), "seconds": t} for c, t in zip(costs, seconds)]}, indent=2))
        return
    print(f"{name}: {where}, at {args.utilisation:.0%} of the peak")
    print(f"{'stage':18s} {'FLOPs':>10s} {'written':>10s} {'time':>10s}  {'prec':4s}  counted")
    for c, t in zip(costs, seconds):
        print(f"{c.stage:18s} {c.flops:10.3g} {human_bytes(c.bytes):>10s} {duration(t):>10s}  {c.precision:4s}  "
              f"{c.counted}")
    print(f"{'total':18s} {sum(c.flops for c in costs):10.3g} {human_bytes(sum(c.bytes for c in costs)):>10s} "
          f"{duration(sum(seconds)):>10s}")


if __name__ == "__main__":
    run(main)
