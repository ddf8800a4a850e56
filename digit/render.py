"""Token grids -> pixels, one interface for every way the pipeline renders them.

    vqgan       VQ tokens (tokenizer.kind: vq)        -> VQGAN decoder
    direct      DiGIT tokens                          -> digit.decoder.TokenDecoder
    stage2_ar   DiGIT tokens -> Stage2AR  -> VQ tokens -> VQGAN decoder   (paper: "DiGIT + VQGAN")
    stage2_nar  DiGIT tokens -> Stage2NAR -> VQ tokens -> VQGAN decoder   (paper: "DiGIT + MaskGIT")

`decode` renders the GPT's samples with it and `train_stage2` its val reconstructions,
so both measure exactly the same path. Stage-2 draws use a generator seeded with
(seed, batch index): the same seed and batch size give the same images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from digit.decoder import load_decoder
from digit.errors import ConfigError
from digit.stage2 import load_stage2
from digit.vqgan import load_vqgan, uint8_images

KINDS = ("vqgan", "direct", "stage2_ar", "stage2_nar")


class Renderer:
    """render(tokens [B, gh*gw] int) -> uint8 images [B, S, S, 3] (numpy); `vq_tokens` keeps stage 2's output."""

    def __init__(self, kind: str, vocab_size: int, grid, device, decoder=None, vqgan=None, stage2=None,
                 sampling: dict | None = None, seed: int = 0):
        if kind not in KINDS:
            raise ConfigError(f"render kind {kind!r} must be one of {list(KINDS)}")
        self.kind, self.vocab_size, self.grid, self.device = kind, vocab_size, tuple(grid), torch.device(device)
        self.decoder, self.vqgan, self.stage2 = decoder, vqgan, stage2
        self.sampling, self.seed, self.batches = dict(sampling or {}), seed, 0
        self.vq_tokens: torch.Tensor | None = None

    @torch.no_grad()
    def render(self, tokens) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(tokens), device=self.device).long()
        if self.kind == "direct":
            return self.decoder.decode(tokens).cpu().numpy()
        if self.kind == "vqgan":
            return uint8_images(self.vqgan.decode_tokens(tokens)).cpu().numpy()
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.batches)
        self.batches += 1
        if self.kind == "stage2_ar":
            vq = self.stage2.generate(tokens, temperature=self.sampling["temperature"],
                                      top_p=self.sampling["top_p"] if self.sampling["top_p"] < 1 else None,
                                      generator=generator)
        else:
            vq = self.stage2.generate(tokens, steps=self.sampling["steps"], temperature=self.sampling["temperature"],
                                      generator=generator)
        self.vq_tokens = vq
        return uint8_images(self.vqgan.decode_tokens(vq)).cpu().numpy()


def stage2_sampling(stage2_params: dict, kind: str) -> dict:
    """The decoding settings of stage2_ar / stage2_nar from the stage2.* params."""
    if kind == "stage2_ar":
        return {"temperature": stage2_params["ar_temperature"], "top_p": stage2_params["ar_top_p"]}
    return {"temperature": stage2_params["nar_temperature"], "steps": stage2_params["nar_steps"]}


def load_renderer(token_meta: dict, decoder_kind: str, device, *, decoder_dir=None, vqgan_dir=None,
                  stage2_dir=None, sampling: dict | None = None, seed: int = 0) -> Renderer:
    """The renderer for tokens described by `token_meta` (grid, vocab_size, tokenizer), every model checked.

    VQ tokens always go to the VQGAN; DiGIT tokens go where decoder_kind says.
    """
    grid, vocab = tuple(token_meta["grid"]), token_meta["vocab_size"]
    tokenizer = token_meta.get("tokenizer", "discriminative")
    if tokenizer == "vq":
        if decoder_kind != "direct":
            raise ConfigError(f"decoder.kind: {decoder_kind} translates DiGIT tokens, but these are VQ tokens "
                              "(tokenizer.kind: vq), which the VQGAN renders directly; set decoder.kind: direct")
        vqgan, _ = load_vqgan(vqgan_dir, k=vocab, grid=grid)
        return Renderer("vqgan", vocab, grid, device, vqgan=vqgan.to(device))
    if decoder_kind == "direct":
        decoder, _ = load_decoder(decoder_dir, vocab_size=vocab, grid=grid)
        return Renderer("direct", vocab, grid, device, decoder=decoder.to(device))
    if decoder_kind not in ("stage2_ar", "stage2_nar"):
        raise ConfigError(f"decoder.kind: {decoder_kind!r} must be direct, stage2_ar or stage2_nar")
    stage2, meta = load_stage2(stage2_dir, digit_k=vocab, grid=grid)
    want = decoder_kind.split("_")[1]
    if stage2.config.kind != want:
        raise ConfigError(f"{stage2_dir}: holds a stage-2 {stage2.config.kind} model, decoder.kind is "
                          f"{decoder_kind}; pass the folder of train_stage2_{want}")
    vqgan, _ = load_vqgan(vqgan_dir, k=stage2.config.vq_k, grid=grid)
    if meta.get("encoder") and token_meta.get("encoder") and meta["encoder"] != token_meta["encoder"]:
        raise ConfigError(f"{stage2_dir} was trained on DiGIT tokens of encoder {meta['encoder']}, these tokens "
                          f"come from {token_meta['encoder']}; re-run `dvc repro train_stage2_{want}`")
    return Renderer(decoder_kind, vocab, grid, device, vqgan=vqgan.to(device), stage2=stage2.to(device),
                    sampling=sampling, seed=seed)


def stage2_dir_for(kind: str, ar_dir: str | Path, nar_dir: str | Path) -> Path | None:
    return Path(ar_dir) if kind == "stage2_ar" else Path(nar_dir) if kind == "stage2_nar" else None


@torch.no_grad()
def render_report(renderer: Renderer, val, n_images: int, batch_size: int, reference, inception_weights,
                  vq_reference: torch.Tensor | None = None) -> dict:
    """PSNR / SSIM / rFID of the first n val images rendered from their tokens, and seconds per image.

    `val` is a digit.decoder.PairedImages (token grids with their original images, in file order); rFID is
    against the cached val reference (as decoder.json / vqgan.json). With `vq_reference` (the VQGAN's own
    tokens of the same images) a stage-2 renderer also reports how many VQ tokens it reproduced exactly.
    """
    from digit.fid import InceptionFeatures, fid_between, load_features
    from digit.reconstruction import image_quality

    originals, recons, vq, seconds = [], [], [], 0.0
    for tokens, images in val.batches(batch_size, 0, 0, shuffle=False, limit=n_images):
        started = time.perf_counter()
        recons.append(renderer.render(tokens))
        seconds += time.perf_counter() - started
        originals.append(images)
        if renderer.vq_tokens is not None:
            vq.append(renderer.vq_tokens.cpu())
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    psnr, ssim = image_quality(originals, recons)
    ref = load_features(Path(reference) / "val.npz")
    feats = InceptionFeatures(inception_weights, device=renderer.device)(recons, batch_size=batch_size, desc="rFID")
    report = {"renderer": renderer.kind, "images": len(recons), "reference_size": len(ref["pool"]),
              "psnr": round(float(np.mean(psnr)), 4), "ssim": round(float(np.mean(ssim)), 5),
              "rfid": round(float(fid_between(feats, ref)), 4),
              "seconds_per_image": round(seconds / len(recons), 6), "device": str(renderer.device)}
    if vq and vq_reference is not None:
        made = torch.cat(vq)
        report["vq_token_accuracy"] = round(float((made == vq_reference[:len(made)].to(made)).float().mean()), 5)
    return report
