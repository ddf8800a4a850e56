"""Latent-space stability of the tokenizer (DiGIT, arXiv 2410.12490, Table 1).

Gaussian noise is added to validation images at a series of signal-to-noise
ratios; the noisy images are re-tokenized with exactly the tokenizer that made
the codebook (encoder settings read from models/codebook/codebook.json) and
compared with the clean image, position by position on the token grid.

SNR definition. Per image, x is the image as float in [0, 1] at the dataset's
stored resolution (H x W x 3; e.g. 28 x 28 x 3 for Fashion-MNIST, whose
grayscale is replicated into 3 channels), i.e. the stored uint8 value / 255.
Its signal power is P = mean(x^2) over all pixels and channels. The noise n is
i.i.d. N(0, sigma^2) per pixel and channel with

    sigma^2 = P / 10^(SNR_dB / 10),

and the noisy image is x + n, NOT clipped to [0, 1] (clipping would change the
realised SNR; the encoder's input normalisation is linear, so it accepts any
real values).

Into the encoder. The clean image takes exactly the pipeline's path (that of
`extract`, FeatureEncoder's uint8 path): the stored uint8 image is resized to
the encoder's img_size with torchvision's uint8 bicubic antialiased resize,
then divided by 255 -- call that c. The noisy image enters as c + R(n), where R
is the float bicubic antialiased resize (torch F.interpolate, align_corners=False,
float64, no clamp) from H x W to img_size; no resize happens when H x W is already
img_size. As R is linear, R(x + n) = R(x) + R(n): this is the noisy image resized,
except that the clean part is the pipeline's own resize of the clean image
instead of R(x). So
  * the clean tokens are exactly the tokens the pipeline gives the image
    (`clean_vs_pipeline_change_rate` = 0 checks it), and at infinite SNR the
    change rate is exactly 0 (`clean_repeat_change_rate` re-encodes the clean
    input and checks it);
  * the noise reaches the encoder unclipped (FeatureEncoder's float path would
    clamp to [0, 1] after its resize, so this code resizes itself and hands the
    encoder img_size-sized float tensors, which it does not resize or clamp).
(Resizing x + n with R alone would make the clean reference R(x), whose bicubic
overshoot at Fashion-MNIST's black/white edges is not clamped: 8% of its tokens
differ from the pipeline's tokens, so it would measure inputs the tokenizer never
sees in the pipeline.)

That is the default protocol, `noise_at: stored`: the noise lives at the image's own
resolution, so the encoder sees it resized like the image (spatially smooth at the
encoder's input). `noise_at: encoder_input` is the other protocol: x is the clean
encoder input c itself (img_size x img_size, the pipeline's resize of the image), P is
measured on c and white noise is added to c directly, no resize. Every tokenizer of the
ablation (network encoders and `pixels`, which cuts patches from the same input) sees
the same noisy image under either protocol; docs/results.md reports both.

An image with P = 0 (all black) gets no noise. The noise of image i (its index
in the val stream) at SNR index j is drawn in float64 from a torch.Generator
seeded by SeedSequence([seed, j, i]), so results do not depend on batch_size.

Metrics per SNR, over the N images and the gh x gw grid positions:
  change_rate      fraction of (image, position) whose token differs from the clean token
  cosine           mean cosine similarity between the clean and the noisy patch feature
                   (computed in float64)
  realised_snr_db  mean over images of 10 log10(P / mean(n^2)) for the noise drawn
                   (images with P = 0 left out): a check of the noise level

"""

from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from tqdm import tqdm

from digit.errors import ConfigError

CONFIG_KEYS = ("snr_db", "num_images", "batch_size", "seed", "k_sweep", "noise_at")
NOISE_AT = ("stored", "encoder_input")


# ----------------------------------------------------------------- config
def snr_key(snr_db: float) -> str:
    """SNR as a key fragment without dots: 30 -> "30", 0.01 -> "0p01", -5 -> "m5", 2.5 -> "2p5"."""
    text = f"{float(snr_db):g}"
    if "e" in text:  # 1e-05 and the like: write it out
        text = np.format_float_positional(float(snr_db), trim="-")
    return text.replace("-", "m").replace(".", "p")


def check_config(cfg: dict) -> dict:
    """Validate the `stability` section (also what the schema cannot: list contents); return it."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"stability: expected a mapping with keys {', '.join(CONFIG_KEYS)}, got {cfg!r}")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"stability: missing {', '.join('stability.' + k for k in missing)}")
    snrs = cfg["snr_db"]
    if not isinstance(snrs, (list, tuple)) or not snrs:
        raise ConfigError(f"stability.snr_db: expected a non-empty list of SNRs in dB, e.g. "
                          f"[30, 25, 20, 15, 10, 5, 1, 0.01]; got {snrs!r}")
    for v in snrs:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ConfigError(f"stability.snr_db: {v!r} is not a finite number of dB "
                              "(infinite SNR is measured anyway as clean_repeat_change_rate)")
    keys = [snr_key(v) for v in snrs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"stability.snr_db: duplicate SNR values {', '.join(dupes)}; list each once")
    ks = cfg["k_sweep"]
    if not isinstance(ks, (list, tuple)) or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in ks):
        raise ConfigError(f"stability.k_sweep: expected a list of codebook sizes >= 2 (may be empty), "
                          f"e.g. [64, 128, 256, 1024]; got {ks!r}")
    if cfg["noise_at"] not in NOISE_AT:
        raise ConfigError(f"stability.noise_at: {cfg['noise_at']!r} is not one of {', '.join(NOISE_AT)}")
    if len(set(ks)) != len(ks):
        raise ConfigError(f"stability.k_sweep: {ks!r} lists a size twice; list each once")
    for key, lo in (("num_images", 0), ("batch_size", 1), ("seed", 0)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"stability.{key}: expected an integer >= {lo}, got {v!r}")
    return cfg


# ----------------------------------------------------------------- noise
def noise_seed(seed: int, snr_index: int, image_index: int) -> int:
    """A 64-bit generator seed for one (seed, SNR, image): independent of batching."""
    return int(np.random.SeedSequence([seed, snr_index, image_index]).generate_state(1, np.uint64)[0])


def signal_power(x: torch.Tensor) -> torch.Tensor:
    """P = mean(x^2) per image over pixels and channels, float64 [B]."""
    return x.double().pow(2).flatten(1).mean(1)


def draw_noise(x: torch.Tensor, snr_db: float, seed: int, snr_index: int,
               image_indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [B, C, H, W] in [0, 1] -> (noise n float64 [B, C, H, W]; realised SNR dB per image).

    sigma^2 = P / 10^(snr_db / 10) per image; the realised SNR is 10 log10(P / mean(n^2))
    (NaN where P = 0, which gets no noise). x + n is the noisy image, never clipped.
    """
    image_indices = list(image_indices)
    if len(image_indices) != len(x):
        raise ValueError(f"{len(image_indices)} image indices for {len(x)} images")
    power = signal_power(x)
    sigma = (power / 10.0 ** (snr_db / 10.0)).sqrt()
    noise = torch.stack([
        torch.randn(x.shape[1:], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(noise_seed(seed, snr_index, i)))
        for i in image_indices
    ]) * sigma.view(-1, *([1] * (x.ndim - 1)))
    noise_power = noise.pow(2).flatten(1).mean(1)
    realised = torch.where(power > 0, 10.0 * torch.log10(power / noise_power),
                           torch.full_like(power, math.nan))
    return noise, realised


def clean_input(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, img_size, img_size]: exactly FeatureEncoder's uint8 path.

    (torchvision uint8 bicubic antialiased resize, then / 255; tests check that the
    encoder gives identical features for this and for the uint8 images.)
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    images = images.permute(0, 3, 1, 2)
    if images.shape[-2:] != (img_size, img_size):
        images = TF.resize(images, [img_size, img_size], interpolation=TF.InterpolationMode.BICUBIC,
                           antialias=True)
    return images.float() / 255.0


def resize_noise(noise: torch.Tensor, img_size: int) -> torch.Tensor:
    """Float [B, C, H, W] -> float64 [B, C, img_size, img_size]: linear bicubic resize, NO clamp."""
    noise = noise.double()
    if noise.shape[-2:] == (img_size, img_size):
        return noise
    return F.interpolate(noise, size=(img_size, img_size), mode="bicubic", antialias=True, align_corners=False)


def noisy_input(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """clean float32 encoder input + resized noise -> float32, unclipped (noise 0 gives clean exactly)."""
    return (clean.double() + noise.to(clean.device)).float()


# ----------------------------------------------------------------- tokenizer
def load_tokenizer(codebook_dir: str | Path, device: str | torch.device = "cpu"):
    """(encoder, assigner, info) from a `codebook` stage output; ConfigError if it is missing or inconsistent."""
    from digit.encoders import build_encoder
    from digit.kmeans import Assigner

    codebook_dir = Path(codebook_dir)
    centroids_path, meta_path = codebook_dir / "centroids.npy", codebook_dir / "codebook.json"
    missing = [p.name for p in (centroids_path, meta_path) if not p.is_file()]
    if missing:
        raise ConfigError(f"{codebook_dir}: {', '.join(missing)} missing; not a complete codebook, "
                          "run `dvc repro codebook` or pass --codebook")
    meta = json.loads(meta_path.read_text())
    enc = meta.get("encoder") if isinstance(meta, dict) else None
    need = ("name", "weights", "layer", "img_size")
    if not isinstance(enc, dict) or any(k not in enc for k in need):
        raise ConfigError(f"{meta_path}: no 'encoder' record with {', '.join(need)}; "
                          "re-run `dvc repro codebook` to rewrite it")
    centroids = np.load(centroids_path, allow_pickle=False)
    if centroids.ndim != 2:
        raise ConfigError(f"{centroids_path}: expected a [k, dim] array, got shape {centroids.shape}")
    # Records written before the pixels/random controls existed have neither key.
    encoder = build_encoder(enc["name"], enc["weights"], enc["layer"], enc["img_size"],
                            enc.get("patch_size", 16), enc.get("seed", 0), enc.get("model_kwargs")).to(device)
    if centroids.shape[1] != encoder.dim:
        raise ConfigError(f"{centroids_path}: centroids have dim {centroids.shape[1]} but encoder "
                          f"{enc['name']} layer {enc['layer']} gives {encoder.dim}; re-run `dvc repro codebook`")
    return encoder, Assigner(centroids), {**meta, "encoder": enc, "k": int(centroids.shape[0])}


def image_tokenizer(token_meta: dict, tokenizer_dir: str | Path, device: str | torch.device = "cpu"):
    """uint8 images [B, H, W, 3] -> token ids [B, H*W] (numpy int64) by the pipeline's own tokenizer of the tokens
    `token_meta` describes: DiGIT tokens by the frozen encoder + codebook (`tokenizer_dir` = the codebook folder),
    VQ tokens by the VQGAN's encoder (`tokenizer_dir` = its folder). Both read the uint8 image as the pipeline
    does (`extract` / `vq_tokenize`), so a real image gives back exactly its stored tokens."""
    grid, vocab = tuple(token_meta["grid"]), int(token_meta["vocab_size"])
    if token_meta.get("tokenizer", "discriminative") == "vq":
        from digit.vqgan import load_vqgan

        vq, _ = load_vqgan(tokenizer_dir, k=vocab, grid=grid)
        vq = vq.to(device).eval()

        def tokenize(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return vq.encode(torch.from_numpy(images).to(device)).reshape(len(images), -1).cpu().numpy()
        return tokenize
    encoder, assign, info = load_tokenizer(tokenizer_dir, device)
    if info["k"] != vocab or tuple(encoder.grid) != grid:
        raise ConfigError(f"{tokenizer_dir}: a {info['k']}-code codebook on a {tuple(encoder.grid)} grid, but the "
                          f"tokens have {vocab} codes on {grid}; re-run `dvc repro codebook tokenize`")
    return lambda images: _tokens(assign, encoder(torch.from_numpy(images).to(device))).reshape(len(images), -1)


def kept_fraction(tokenize, images: np.ndarray, tokens: np.ndarray, batch_size: int) -> float:
    """Fraction of (image, position) whose token comes back unchanged when `images` are tokenized again."""
    if len(images) != len(tokens) or not len(images):
        raise ConfigError(f"round-trip: {len(images)} images for {len(tokens)} token grids")
    kept = sum(int((tokenize(images[i:i + batch_size]) == tokens[i:i + batch_size]).sum())
               for i in range(0, len(images), batch_size))
    return kept / tokens.size


# ----------------------------------------------------------------- measuring
def _tokens(assign, feats: torch.Tensor) -> np.ndarray:
    return assign(feats.float().cpu().numpy())


def measure(encoder, assign, batches: Iterable[torch.Tensor], snr_db: list[float], seed: int,
            total: int | None = None, progress: bool = True, sweep: dict | None = None,
            noise_at: str = "stored") -> dict:
    """Stream uint8 [B, H, W, 3] image batches; return the metrics (see the module docstring).

    `sweep` ({K: assigner}) measures other codebook sizes on the very same clean and
    noisy features (same images, same noise): change rate across K, nothing else varies.
    Only one batch of images and features is held at a time.
    """
    n_snr = len(snr_db)
    sweep = dict(sorted((sweep or {}).items()))
    changed = np.zeros(n_snr, dtype=np.int64)
    sweep_changed = {k: np.zeros(n_snr, dtype=np.int64) for k in sweep}
    cos_sum = np.zeros(n_snr, dtype=np.float64)
    real_sum = np.zeros(n_snr, dtype=np.float64)
    real_n = np.zeros(n_snr, dtype=np.int64)
    repeat_changed = pipeline_changed = positions = images = zero_power = 0
    size = encoder.img_size
    with torch.inference_mode(), tqdm(total=total, desc="stability", unit="img", disable=not progress) as bar:
        for batch in batches:
            b = len(batch)
            index = range(images, images + b)
            clean_in = clean_input(batch, size)
            # The image the noise is scaled to and added to (module docstring): the stored image, or
            # the encoder's input itself.
            x = batch.permute(0, 3, 1, 2).double() / 255.0 if noise_at == "stored" else clean_in.double()
            clean_feats = encoder(clean_in)
            clean = _tokens(assign, clean_feats)
            sweep_clean = {k: _tokens(a, clean_feats) for k, a in sweep.items()}
            repeat_changed += int((_tokens(assign, encoder(clean_in.clone())) != clean).sum())
            pipeline_changed += int((_tokens(assign, encoder(batch)) != clean).sum())
            positions += clean.size
            zero_power += int((signal_power(x) == 0).sum())
            clean64 = clean_feats.double()
            for j, snr in enumerate(snr_db):
                noise, realised = draw_noise(x, snr, seed, j, index)
                feats = encoder(noisy_input(clean_in, resize_noise(noise, size)))  # (no resize: encoder_input)
                changed[j] += int((_tokens(assign, feats) != clean).sum())
                for k, a in sweep.items():
                    sweep_changed[k][j] += int((_tokens(a, feats) != sweep_clean[k]).sum())
                cos_sum[j] += float(F.cosine_similarity(clean64, feats.double(), dim=-1).sum())
                ok = ~torch.isnan(realised)
                real_sum[j] += float(realised[ok].sum())
                real_n[j] += int(ok.sum())
            images += b
            bar.update(b)
    if images == 0:
        raise ConfigError("stability: no images to measure (the val split is empty)")
    rows = [{
        "snr_db": float(snr),
        "change_rate": float(changed[j] / positions),
        "cosine": float(cos_sum[j] / positions),
        "realised_snr_db": float(real_sum[j] / real_n[j]) if real_n[j] else None,
    } for j, snr in enumerate(snr_db)]
    out = {
        "num_images": images, "positions": positions, "grid": list(encoder.grid),
        "snr_db": [float(s) for s in snr_db], "seed": seed, "noise_at": noise_at,
        "clean_repeat_change_rate": repeat_changed / positions,
        "clean_vs_pipeline_change_rate": pipeline_changed / positions,
        "zero_power_images": zero_power,
        "rows": rows,
    }
    for row in rows:
        key = snr_key(row["snr_db"])
        out[f"change_rate_snr{key}"] = row["change_rate"]
        out[f"cosine_snr{key}"] = row["cosine"]
    # Nested, so `dvc exp show --drop 'k_sweep'` hides it in one go.
    out["k_sweep"] = {f"k{k}": {f"change_rate_snr{snr_key(s)}": float(sweep_changed[k][j] / positions)
                                for j, s in enumerate(snr_db)} for k in sweep}
    return out


def sweep_assigners(features_dir: str | Path, codebook_meta: dict, ks: list[int], progress: bool = True) -> dict:
    """{K: Assigner} for codebooks of other sizes fitted exactly as the `codebook` stage fitted its own.

    Same train features, same sampled points (codebook.json's seed and point count), same
    niter: only K differs. A K equal to the codebook's own reuses nothing and is refitted the same way.
    """
    from digit.kmeans import Assigner, codebook_sample, fit_kmeans
    from digit.shards import read_manifest

    manifest = read_manifest(features_dir)
    if manifest.get("encoder") != codebook_meta.get("encoder"):
        raise ConfigError(f"{features_dir}: features of encoder {manifest.get('encoder')} but the codebook was "
                          f"fitted on {codebook_meta.get('encoder')}; re-run `dvc repro codebook`")
    points = int(codebook_meta["points"])
    too_big = [k for k in ks if k > points]
    if too_big:
        raise ConfigError(f"stability.k_sweep: {too_big} exceed the {points} sampled train features the "
                          "codebook was fitted on; drop them or raise codebook.max_points")
    if not ks:
        return {}
    x = codebook_sample(features_dir, points, int(codebook_meta["seed"]), progress=progress)
    out = {}
    for k in tqdm(ks, desc="k sweep codebooks", unit="codebook", disable=not progress):
        centroids, _ = fit_kmeans(x, k, int(codebook_meta["niter"]), int(codebook_meta["seed"]))
        out[k] = Assigner(centroids)
    return out


@torch.no_grad()
def measure_vq(model, batches: Iterable[torch.Tensor], snr_db: list[float], seed: int, total: int | None = None,
               progress: bool = True) -> dict:
    """The reconstructive VQ tokenizer (stage train_vqgan) under exactly the same noise as `measure`.

    The VQGAN reads images at their stored resolution, so the noisy image is x + n with
    the very n `measure` draws for the stored protocol (same seed, SNR index and image
    index), unclipped; under either protocol it is the noise at the VQGAN's input.
    Clean tokens are the pipeline's (`vq_tokenize` encodes the uint8 images); cosine
    compares the encoder outputs before quantization.
    """
    model = model.eval()
    device = next(model.parameters()).device
    n_snr = len(snr_db)
    changed, cos_sum = np.zeros(n_snr, dtype=np.int64), np.zeros(n_snr, dtype=np.float64)
    positions = images = pipeline_changed = 0

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model.latents(x.float().to(device))
        return model.lookup(z), z.permute(0, 2, 3, 1).double()

    with tqdm(total=total, desc="stability vq", unit="img", disable=not progress) as bar:
        for batch in batches:
            b = len(batch)
            index = range(images, images + b)
            x = batch.permute(0, 3, 1, 2).double() / 255.0
            clean = model.encode(batch.to(device))
            clean_x, clean_z = encode(x)
            pipeline_changed += int((clean_x != clean).sum())
            positions += clean.numel()
            for j, snr in enumerate(snr_db):
                noise, _ = draw_noise(x, snr, seed, j, index)
                ids, z = encode(x + noise)
                changed[j] += int((ids != clean).sum())
                cos_sum[j] += float(F.cosine_similarity(clean_z, z, dim=-1).sum())
            images += b
            bar.update(b)
    out = {"k": model.config.k, "grid": [model.config.grid] * 2, "num_images": images,
           "clean_vs_pipeline_change_rate": pipeline_changed / max(positions, 1),
           "rows": [{"snr_db": float(s), "change_rate": float(changed[j] / positions),
                     "cosine": float(cos_sum[j] / positions)} for j, s in enumerate(snr_db)]}
    for row in out["rows"]:
        out[f"change_rate_snr{snr_key(row['snr_db'])}"] = row["change_rate"]
        out[f"cosine_snr{snr_key(row['snr_db'])}"] = row["cosine"]
    return out


def image_batches(images_dir: str | Path, split: str, num_images: int, batch_size: int,
                  labels: bool = False) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """uint8 [B, H, W, 3] batches of the first num_images (0 = all) images of a split, in shard order;
    with labels, (images, class indices [B]) pairs."""
    from digit.shards import batched, iter_samples, shard_urls

    samples = iter_samples(shard_urls(images_dir, split))
    if num_images:
        samples = (s for i, s in zip(range(num_images), samples))
    for batch in batched(samples, batch_size):
        shapes = {s["image"].shape for s in batch}
        if len(shapes) != 1:
            raise ConfigError(f"{images_dir}: {split} images of different shapes {sorted(shapes)}; "
                              "re-run `dvc repro prepare` (it stores one size)")
        images = torch.from_numpy(np.stack([s["image"] for s in batch]))
        yield (images, torch.as_tensor([int(s["cls"]) for s in batch])) if labels else images
