"""Token grids -> pixels, one interface for every way the pipeline renders them.

    vqgan       VQ tokens (train@vq samples)          -> VQGAN decoder
    direct      DiGIT tokens                          -> digit.decoder.TokenDecoder
    stage2_ar   DiGIT tokens -> Stage2AR  -> VQ tokens -> VQGAN decoder   (paper: "DiGIT + VQGAN")
    stage2_nar  DiGIT tokens -> Stage2NAR -> VQ tokens -> VQGAN decoder   (paper: "DiGIT + MaskGIT")

`decode` renders the GPT's samples with it and `train_stage2` its val reconstructions,
so both measure exactly the same path. Stage-2 draws use a generator seeded with
(seed, batch index): the same seed and batch size give the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digit.decoder import load_decoder
from digit.errors import ConfigError
from digit.reconstruction import reconstruction_report
from digit.stage2 import VQGAN_SUBDIR, load_stage2
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


def load_renderer(token_meta: dict, kind: str, model_dir: str | Path, device, *, sampling: dict | None = None,
                  seed: int = 0) -> Renderer:
    """The renderer `kind` in folder `model_dir` for tokens described by `token_meta` (grid, vocab_size,
    tokenizer), every model checked against them. A stage-2 folder holds its VQGAN (digit.stage2)."""
    grid, vocab = tuple(token_meta["grid"]), token_meta["vocab_size"]
    tokenizer = token_meta.get("tokenizer", "discriminative")
    if kind not in KINDS:
        raise ConfigError(f"renderer {kind!r} must be one of {list(KINDS)}")
    if (tokenizer == "vq") != (kind == "vqgan"):
        raise ConfigError(f"{model_dir}: the {kind} renderer cannot render {tokenizer} tokens; VQ tokens go to "
                          "the VQGAN (models/vqgan), DiGIT tokens to the decoder or a stage-2 model")
    if kind == "vqgan":
        vqgan, _ = load_vqgan(model_dir, k=vocab, grid=grid)
        return Renderer("vqgan", vocab, grid, device, vqgan=vqgan.to(device))
    if kind == "direct":
        decoder, _ = load_decoder(model_dir, vocab_size=vocab, grid=grid)
        return Renderer("direct", vocab, grid, device, decoder=decoder.to(device))
    stage2, meta = load_stage2(model_dir, digit_k=vocab, grid=grid)
    want = kind.split("_")[1]
    if stage2.config.kind != want:
        raise ConfigError(f"{model_dir}: holds a stage-2 {stage2.config.kind} model, the renderer is {kind}; "
                          f"pass the folder of train_stage2@{want}")
    vqgan, _ = load_vqgan(Path(model_dir) / VQGAN_SUBDIR, k=stage2.config.vq_k, grid=grid)
    if meta.get("encoder") and token_meta.get("encoder") and meta["encoder"] != token_meta["encoder"]:
        raise ConfigError(f"{model_dir} was trained on DiGIT tokens of encoder {meta['encoder']}, these tokens "
                          f"come from {token_meta['encoder']}; re-run `dvc repro train_stage2@{want}`")
    return Renderer(kind, vocab, grid, device, vqgan=vqgan.to(device), stage2=stage2.to(device),
                    sampling=sampling, seed=seed)


def render_report(renderer: Renderer, val, n_images: int, batch_size: int, reference, inception_weights,
                  vq_reference: torch.Tensor | None = None) -> dict:
    """digit.reconstruction's report of the first n val images rendered from their tokens by `renderer`.

    `val` is a digit.decoder.PairedImages (token grids with their original images, in file order). With
    `vq_reference` (the VQGAN's own tokens of the same images) a stage-2 renderer also reports how many VQ
    tokens it reproduced exactly.
    """
    made = []

    def render(tokens):
        images = renderer.render(tokens)
        if renderer.vq_tokens is not None:
            made.append(renderer.vq_tokens.cpu())
        return images

    report = {"renderer": renderer.kind, **reconstruction_report(
        render, val.batches(batch_size, 0, 0, shuffle=False, limit=n_images), reference, inception_weights,
        renderer.device, batch_size)}
    if made and vq_reference is not None:
        made = torch.cat(made)
        report["vq_token_accuracy"] = round(float((made == vq_reference[:len(made)].to(made)).float().mean()), 5)
    return report
