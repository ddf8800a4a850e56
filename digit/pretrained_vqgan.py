"""A public pretrained VQGAN as the stage-2 target: LlamaGen's VQ-16, loaded from its own checkpoint.

At ImageNet scale the paper's stage 2 renders through a *frozen, pretrained* VQGAN; training one in
the DAG is its own multi-day GPU project. `vqgan.weights: path/to/vq_ds16_c2i.pt` makes stage
`train_vqgan` adopt such a checkpoint instead of training: it is checked here key by key and shape
by shape, scored like every renderer, and published as models/vqgan, which `vq_tokenize`, the
stability stage, stage 2 and `decode` then use through the same two calls as our own VQGAN:

    encode(images [B,3,S,S] in [0,1] or uint8 [B,S,S,3]) -> tokens [B,g,g]
    decode_tokens(tokens [B,g,g] or [B,g*g]) -> images [B,3,S,S] in [0,1]

The layout is the one LlamaGen publishes for its VQ-16 tokenizer (Sun et al. 2024, "Autoregressive
Model Beats Diffusion", tokenizer/tokenizer_image/vq_model.py; the taming-transformers VQGAN with
MaskGIT's choices): a convolutional encoder and decoder with 128 base channels, channel multipliers
(1, 1, 2, 2, 4) (four x2 downsamplings: 256 px -> 16x16 tokens), two residual blocks per level (three
in the decoder), self-attention at the lowest resolution and in the middle, GroupNorm(32, eps 1e-6)
and swish; 1x1 convolutions to and from an 8-dimensional code space whose 16,384 codes are compared
by cosine (codes and latents L2-normalised, as trained); images in [-1, 1]. About 72M parameters.
The module names below are the checkpoint's keys, so its state dict loads as it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from digit.errors import ConfigError
from digit.vqgan import check_tokens, unit_images
from digit.weights import read_state_dict

LAYOUT = "llamagen-vq16"
# A training statistic the checkpoint may carry (a ring buffer of recent code ids): no effect on encode/decode.
IGNORED_KEYS = ("quantize.codebook_used",)


@dataclass
class PretrainedVQConfig:
    layout: str = LAYOUT
    image_size: int = 256
    k: int = 16384                 # codes (rows of quantize.embedding.weight)
    dim: int = 8                   # code dimension
    ch: int = 128                  # base channels
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    n_res: int = 2                 # residual blocks per encoder level (decoder: n_res + 1)
    z_channels: int = 256

    def __post_init__(self):
        if self.layout != LAYOUT:
            raise ConfigError(f"pretrained VQGAN layout {self.layout!r} is not known; the supported one is {LAYOUT!r}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ConfigError(f"data.image_size={self.image_size}: the {LAYOUT} VQGAN downsamples by {factor}, so the "
                              f"image size must be a multiple of {factor} (256 px -> 16x16 tokens)")
        if self.ch % 32:
            raise ConfigError(f"pretrained VQGAN: {self.ch} base channels is not a multiple of 32 (GroupNorm groups)")

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (len(self.ch_mult) - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-convolution projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, hw, C]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):  # pad right and bottom only, as the checkpoint was trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, c: PretrainedVQConfig):
        super().__init__()
        levels = len(c.ch_mult)
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        ch = c.ch
        for level, mult in enumerate(c.ch_mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.n_res):
                block.res.append(ResnetBlock(ch, c.ch * mult))
                ch = c.ch * mult
                if level == levels - 1:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(ch))
            if level != levels - 1:
                block.downsample = Downsample(ch)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)])
        self.norm_out, self.conv_out = _norm(ch), nn.Conv2d(ch, c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: PretrainedVQConfig):
        super().__init__()
        levels = len(c.ch_mult)
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(levels)):  # conv_blocks[0] is the lowest resolution
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.n_res + 1):
                block.res.append(ResnetBlock(ch, c.ch * c.ch_mult[level]))
                ch = c.ch * c.ch_mult[level]
                if level == levels - 1:
                    block.attn.append(AttnBlock(ch))
            if level != 0:
                block.upsample = Upsample(ch)
            self.conv_blocks.append(block)
        self.norm_out, self.conv_out = _norm(ch), nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantize(nn.Module):
    """Nearest code by cosine: latents and codes are L2-normalised, as LlamaGen trains them."""

    def __init__(self, c: PretrainedVQConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.k, c.dim)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, dim, g, g] -> tokens [B, g, g]: the largest cosine is the smallest L2 distance of unit vectors."""
        flat = F.normalize(z.float().permute(0, 2, 3, 1), dim=-1)
        return (flat @ self.codebook().float().T).argmax(-1)

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, g, g] -> code vectors [B, dim, g, g]."""
        return self.codebook()[tokens].permute(0, 3, 1, 2)


class PretrainedVQGAN(nn.Module):
    def __init__(self, config: PretrainedVQConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quantize = Quantize(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.dim, 1)
        self.post_quant_conv = nn.Conv2d(config.dim, config.z_channels, 1)

    def _device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    def latents(self, images) -> torch.Tensor:
        """images (float [B,3,S,S] in [0,1] or uint8 [B,S,S,3]) -> pre-quantization latents [B, dim, g, g]."""
        x = unit_images(images)
        S = self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S):
            raise ConfigError(f"images: expected [B, 3, {S}, {S}] or uint8 [B, {S}, {S}, 3], got {tuple(x.shape)}; "
                              f"the pretrained VQGAN was adopted at data.image_size={S}")
        return self.quant_conv(self.encoder(x.float().to(self._device()) * 2 - 1))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize.lookup(z)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        return self.lookup(self.latents(images))

    @torch.no_grad()
    def decode_tokens(self, tokens) -> torch.Tensor:
        tokens = check_tokens(tokens, self.config.grid, self.config.k, self._device())
        x = self.decoder(self.post_quant_conv(self.quantize.codes(tokens)))
        return ((x + 1) / 2).clamp(0, 1)  # the checkpoint paints in [-1, 1]


# ---------------------------------------------------------------- the checkpoint
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a LlamaGen checkpoint (.pt as LlamaGen saves it, {"model": ...}, or a .safetensors
    export), read by digit.weights: tensors only, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"vqgan.weights: {path} does not exist; download LlamaGen's VQ-16 checkpoint "
                          f"(vq_ds16_c2i.pt) there, or set vqgan.weights: none to train a VQGAN in the DAG")
    try:
        state = read_state_dict(path)
    except Exception as e:  # not a torch file, or one that needs arbitrary code to unpickle
        raise ConfigError(f"vqgan.weights: {path} cannot be read as a checkpoint of tensors ({e}); point it at "
                          f"LlamaGen's vq_ds16_c2i.pt or a .safetensors export of it")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"vqgan.weights: {path} holds no state dict (a dict of tensors, or one under 'model')")
    return state


def config_from_state(state: dict[str, torch.Tensor], image_size: int) -> PretrainedVQConfig:
    """The sizes the layout leaves open (codes, code dimension, channels), read off the tensors."""
    try:
        k, dim = state["quantize.embedding.weight"].shape
        ch = state["encoder.conv_in.weight"].shape[0]
        z_channels = state["encoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"vqgan.weights: the checkpoint lacks {e} of the {LAYOUT} layout (keys such as "
                          f"quantize.embedding.weight [K, dim], encoder.conv_in.weight); it is not a LlamaGen VQ model")
    return PretrainedVQConfig(image_size=image_size, k=int(k), dim=int(dim), ch=int(ch), z_channels=int(z_channels))


def first_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first key (in the layout's order) that is missing or has another shape, else the first unexpected key."""
    for key, tensor in expected.items():
        if key not in state:
            return f"missing key {key} (expected shape {list(tensor.shape)})"
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"key {key} has shape {list(state[key].shape)}, the layout expects {list(tensor.shape)}"
    extra = sorted(set(state) - set(expected) - set(IGNORED_KEYS))
    return f"unexpected key {extra[0]} ({len(extra)} keys not in the layout)" if extra else None


def load_pretrained_vqgan(path: str | Path, image_size: int) -> PretrainedVQGAN:
    """LlamaGen's VQ-16 at `image_size` from its checkpoint, every key and shape checked first, in eval mode."""
    state = checkpoint_state(path)
    config = config_from_state(state, image_size)
    with torch.device("meta"):
        expected = PretrainedVQGAN(config).state_dict()
    problem = first_mismatch(state, expected)
    if problem:
        raise ConfigError(f"vqgan.weights: {path} is not a {LAYOUT} checkpoint: {problem}")
    model = PretrainedVQGAN(config)
    model.load_state_dict({key: state[key] for key in expected})
    return model.eval()
