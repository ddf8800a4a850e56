"""A small convolutional VQGAN: the reconstructive tokenizer DiGIT's stage 2 translates into.

DiGIT's tokens come from K-Means over a frozen discriminative encoder: they say
what a patch *is*, not exactly how it looks. The paper's stage 2 maps a DiGIT
grid to the grid of a reconstructive tokenizer, whose decoder paints pixels.
This is that tokenizer at toy scale:

    image [B,3,H,W] in [0,1] --Encoder--> z [B,dim,g,g] --VectorQuantizer--> q, tokens [B,g,g]
    q --Decoder--> recon [B,3,H,W] in [0,1]

The encoder halves the resolution per stage until the token grid, which must be
the DiGIT grid (image_size = grid * 2**n): DiGIT token (i, j) and VQ token
(i, j) then describe the same patch, so stage 2 is a position-aligned map.

Quantization (van den Oord et al. 2017, with the usual fixes): straight-through
gradients from q to z and a commitment loss beta * ||z - sg(q)||^2; the codebook
is learned either by gradient (||sg(z) - q||^2) or, with ema=True, as a moving
average of the encoder outputs assigned to each code; codes whose moving-average
usage falls below dead_threshold are moved onto random encoder outputs of the
current batch (and the first training batch initialises the whole codebook that
way, so codes start where the data is).

Distributed training (DDP via Accelerate): in training mode the quantizer
all-reduces its per-code counts (and sums, with ema), so the EMA codebook and
the dead-code decisions are identical on every rank; restart vectors are drawn
on rank 0 from a generator seeded by (seed, step) and broadcast. So every rank
must run training-mode forwards in lockstep (DDP does anyway); evaluate in eval
mode, which never communicates. The step counter is a buffer: a resumed run
restarts the same codes with the same draws.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from digit.artifact import CONFIG, load_weights, read_artifact, save_artifact
from digit.errors import ConfigError
from digit.shards import WindowedShards, iter_samples, read_manifest, shard_urls



@dataclass
class VQGANConfig:
    image_size: int = 28
    grid: int = 7                 # tokens per side: must equal the DiGIT grid ([g, g] from token metadata is accepted)
    k: int = 512                  # codebook size
    dim: int = 64                 # code dimension
    width: int = 64               # channels at full resolution; doubled per downsampling, at most 4x
    n_res: int = 1                # residual blocks per resolution
    beta: float = 0.25            # commitment weight
    ema: bool = True              # EMA codebook updates (no codebook gradient) vs a codebook loss
    decay: float = 0.99           # EMA decay of the per-code counts (and sums)
    restart_every: int = 100      # training steps between dead-code restarts; 0 = never
    dead_threshold: float = 1.0   # dead below this moving-average number of assignments per step
    seed: int = 0                 # seeds the restart draws (with the step counter)

    def __post_init__(self):
        if isinstance(self.grid, (tuple, list)):
            if len(self.grid) != 2 or self.grid[0] != self.grid[1]:
                raise ConfigError(f"vqgan.grid: {list(self.grid)} must be square (the VQGAN downsamples both "
                                  f"sides alike); use a square DiGIT grid")
            self.grid = int(self.grid[0])
        checks = [
            (self.k >= 2, f"vqgan.k={self.k} must be >= 2 (one code carries no information); e.g. 512"),
            (self.grid >= 1, f"vqgan.grid={self.grid} must be >= 1 (tokens per side, the DiGIT grid)"),
            (self.image_size >= 1, f"vqgan.image_size={self.image_size} must be >= 1"),
            (self.dim >= 1, f"vqgan.dim={self.dim} must be >= 1"),
            (self.width >= 4, f"vqgan.width={self.width} must be >= 4 (GroupNorm needs a few channels)"),
            (self.n_res >= 0, f"vqgan.n_res={self.n_res} must be >= 0"),
            (self.beta >= 0, f"vqgan.beta={self.beta} must be >= 0 (0.25 in the VQ-VAE paper)"),
            (0.0 <= self.decay < 1.0, f"vqgan.decay={self.decay} must be in [0, 1) (e.g. 0.99)"),
            (self.restart_every >= 0, f"vqgan.restart_every={self.restart_every} must be >= 0 (0 = never)"),
            (self.dead_threshold >= 0, f"vqgan.dead_threshold={self.dead_threshold} must be >= 0"),
            (self.seed >= 0, f"vqgan.seed={self.seed} must be >= 0"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if not problems and self.image_size != self.grid * 2 ** self.n_down:
            sizes = sorted((self.grid * 2 ** n for n in range(8)), key=lambda s: abs(s - self.image_size))[:2]
            grids = [self.image_size // 2 ** n for n in range(8) if self.image_size % 2 ** n == 0]
            problems.append(f"vqgan.image_size={self.image_size} is not vqgan.grid={self.grid} times a power of "
                            f"two (image_size = grid * 2**n, n >= 0); use image_size "
                            f"{' or '.join(map(str, sorted(sizes)))}, or a grid in {grids}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def n_down(self) -> int:
        """x2 downsamplings from image_size to grid (the validity check compares grid * 2**n_down)."""
        return max(0, round(math.log2(self.image_size / self.grid))) if self.grid >= 1 else 0

    def channels(self, level: int) -> int:
        return self.width * 2 ** min(level, 2)


def _norm(ch: int) -> nn.GroupNorm:
    # Groups of >= 4 channels that divide any width (decoder.ResBlock's min(32, ch // 4) needs ch % 4 == 0).
    return nn.GroupNorm(math.gcd(ch, min(32, max(1, ch // 4))), ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class Encoder(nn.Module):
    """[B,3,S,S] in [-1,1] -> z [B,dim,g,g]: stride-2 convs halve exactly, since S = g * 2**n."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        ch, layers = c.width, [nn.Conv2d(3, c.width, 3, padding=1)]
        for level in range(c.n_down):
            layers += [ResBlock(ch) for _ in range(c.n_res)]
            layers.append(nn.Conv2d(ch, c.channels(level + 1), 3, stride=2, padding=1))
            ch = c.channels(level + 1)
        layers += [ResBlock(ch) for _ in range(c.n_res)]
        self.net = nn.Sequential(*layers, _norm(ch), nn.SiLU(), nn.Conv2d(ch, c.dim, 1))

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """The encoder's mirror: q [B,dim,g,g] -> logits [B,3,S,S]; the VQGAN applies the sigmoid."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        ch = c.channels(c.n_down)
        layers = [nn.Conv2d(c.dim, ch, 3, padding=1), *[ResBlock(ch) for _ in range(c.n_res)]]
        for level in reversed(range(c.n_down)):
            # Nearest upsampling + conv rather than a transposed conv: no checkerboard artefacts.
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, c.channels(level), 3, padding=1)]
            ch = c.channels(level)
            layers += [ResBlock(ch) for _ in range(c.n_res)]
        self.net = nn.Sequential(*layers, _norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))

    def forward(self, q):
        return self.net(q)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _usage_perplexity(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = counts / counts.sum().clamp_min(1)
    return (counts > 0).float().mean(), torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def codebook_stats(tokens: torch.Tensor, k: int) -> dict[str, float]:
    """{"usage": fraction of the k codes that occur in tokens, "perplexity": exp(entropy of their frequencies)}."""
    usage, perplexity = _usage_perplexity(torch.bincount(torch.as_tensor(tokens).flatten(), minlength=k).float())
    return {"usage": float(usage), "perplexity": float(perplexity)}


class VectorQuantizer(nn.Module):
    """Nearest-code (L2) quantization with straight-through gradients, EMA or gradient codebook, dead-code restarts."""

    def __init__(self, c: VQGANConfig, eps: float = 1e-5):
        super().__init__()
        self.c, self.eps = c, eps
        init = torch.randn(c.k, c.dim)
        if c.ema:  # a buffer: the optimizer never sees it, the EMA below is its only update
            self.register_buffer("embed", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.embed = nn.Parameter(init)
        # Moving-average assignments per code and step: the EMA denominator, and the dead-code signal in both modes.
        # Starting at 1 (with embed_sum = embed) keeps an unused code where it is instead of dividing by ~0.
        self.register_buffer("cluster_size", torch.ones(c.k))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,dim,h,w] -> nearest code ids [B,h,w] (int64). No state changes."""
        B, D, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # bf16 distances would flip near-ties
            flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
            e = self.embed.float()
            dist2 = e.pow(2).sum(1)[None] - 2 * flat @ e.t()  # ||z||^2 is the same for every code: dropped
        return dist2.argmin(1).view(B, h, w)

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """ids [B,h,w] -> code vectors [B,dim,h,w]."""
        return F.embedding(tokens, self.embed).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor):
        """-> (q straight-through [B,dim,h,w], loss, tokens [B,h,w], stats). Training mode updates the codebook."""
        z = z.float()
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.size(1))
        if self.training and not bool(self.initialized):
            self._restart(flat, torch.ones(self.c.k, dtype=torch.bool, device=z.device))
            self.initialized.fill_(True)
        tokens = self.lookup(z)
        q = self.codes(tokens).float()
        loss = self.c.beta * F.mse_loss(z, q.detach())  # commitment: keep the encoder near its codes
        if not self.c.ema:
            loss = loss + F.mse_loss(q, z.detach())  # codebook loss: move the codes toward the encoder
        counts = torch.bincount(tokens.flatten(), minlength=self.c.k).float()
        restarted = self._update(flat, tokens.flatten(), counts) if self.training else 0
        usage, perplexity = _usage_perplexity(counts)
        stats = {"usage": usage, "perplexity": perplexity, "restarted": restarted,
                 "dead": (self.cluster_size < self.c.dead_threshold).sum()}
        return z + (q - z).detach(), loss, tokens, stats

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> int:
        c = self.c
        if _distributed():  # global statistics: every rank computes the same codebook
            dist.all_reduce(counts)
        self.cluster_size.mul_(c.decay).add_(counts, alpha=1 - c.decay)
        if c.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, flat)
            if _distributed():
                dist.all_reduce(sums)
            self.embed_sum.mul_(c.decay).add_(sums, alpha=1 - c.decay)
            # Laplace smoothing: counts + eps renormalised to the same total, so no code divides by 0.
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + c.k * self.eps) * n
            self.embed.copy_(self.embed_sum / smoothed[:, None])
        self.step += 1
        if c.restart_every and int(self.step) % c.restart_every == 0:
            return self._restart(flat, self.cluster_size < c.dead_threshold)
        return 0

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor, dead: torch.Tensor) -> int:
        """Move the `dead` codes onto random rows of flat (rank 0's rows under DDP); returns how many."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # Seeded by (seed, step), not a stateful generator: identical on every rank and after a resume.
        # SeedSequence mixes both into 32 bits (the CPU generator ignores a seed's higher bits).
        seed = np.random.SeedSequence([self.c.seed, int(self.step)]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))
        n = flat.size(0)
        pick = torch.randperm(n, generator=gen)[:n_dead] if n >= n_dead else torch.randint(n, (n_dead,), generator=gen)
        new = flat[pick.to(flat.device)].clone()
        if _distributed():
            dist.broadcast(new, src=0)  # ranks hold different batches: take rank 0's vectors everywhere
        self.embed.data[dead] = new.to(self.embed.dtype)
        # A fresh code counts as used max(threshold, 1) times, so it has restart_every steps to attract data.
        self.cluster_size[dead] = max(self.c.dead_threshold, 1.0)
        if self.c.ema:
            self.embed_sum[dead] = new * self.cluster_size[dead][:, None]
        return n_dead


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0,1]; a float [B,3,H,W] batch passes unchanged."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 255.0 if images.dtype == torch.uint8 else images


def uint8_images(images: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [0,1] -> uint8 [B,H,W,3], the shards' and FID's format."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 between recon [B,3,H,W] and images (float in [0,1] or uint8 [B,H,W,3])."""
    return F.l1_loss(recon, unit_images(images).to(recon))


class VQGAN(nn.Module):

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder, self.quantizer, self.decoder = Encoder(config), VectorQuantizer(config), Decoder(config)

    def _input(self, images) -> torch.Tensor:
        x = unit_images(images)
        S = self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S):
            raise ConfigError(f"images: expected float [B, 3, {S}, {S}] in [0, 1] or uint8 [B, {S}, {S}, 3], got "
                              f"{torch.as_tensor(images).dtype} {tuple(torch.as_tensor(images).shape)}; "
                              f"vqgan.image_size={S} must match the dataset's image size")
        return x.to(self.quantizer.embed.device) * 2 - 1  # convs see zero-centred inputs

    def forward(self, images: torch.Tensor, corrupt=None):
        """images [B,3,S,S] in [0,1] -> (recon [B,3,S,S] in [0,1], vq_loss, tokens [B,g,g], stats).

        vq_loss = commitment (+ codebook loss without ema); add the reconstruction
        (and adversarial) loss in the loop. stats are 0-dim tensors ("usage",
        "perplexity" of this batch, "dead" codes) and the int "restarted".
        `corrupt` (training only, digit.paint.corrupt_tokens) maps flat token ids [B, g*g] to ids of which some
        are replaced: the decoder paints from those positions' codes (no gradient to the encoder through them),
        as the direct decoder learns from corrupted grids; tokens and the losses stay the clean ones.
        """
        q, vq_loss, tokens, stats = self.quantizer(self.encoder(self._input(images)))
        if corrupt is not None:
            noisy = corrupt(tokens.flatten(1)).view_as(tokens)
            q = torch.where((noisy != tokens)[:, None], self.quantizer.codes(noisy).to(q.dtype).detach(), q)
        # Sigmoid: every path yields a valid image in [0,1] without clamping, the range L1 and the
        # discriminator compare against; it is tanh rescaled, (tanh(x/2) + 1) / 2.
        return torch.sigmoid(self.decoder(q)), vq_loss, tokens, stats

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (float [B,3,S,S] in [0,1] or uint8 [B,S,S,3]) -> tokens [B,g,g] int64; never updates the codebook."""
        return self.quantizer.lookup(self.encoder(self._input(images)))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,g,g] or flat [B,g*g] (stage 2's output) -> images [B,3,S,S] in [0,1]."""
        tokens = check_tokens(tokens, self.config.grid, self.config.k, self.quantizer.embed.device)
        return torch.sigmoid(self.decoder(self.quantizer.codes(tokens)))

    def latents(self, images) -> torch.Tensor:
        """images -> the encoder's output before quantization [B, dim, g, g] (the stability stage's cosine)."""
        return self.encoder(self._input(images))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """latents [B, dim, g, g] -> tokens [B, g, g], as encode() assigns them."""
        return self.quantizer.lookup(z)


def check_tokens(tokens, grid: int, k: int, device) -> torch.Tensor:
    """tokens [B,g,g] or flat [B,g*g] -> int64 [B,g,g] on `device`; a clear error for another shape or id range."""
    tokens = torch.as_tensor(tokens, device=device)
    if tokens.dim() == 2 and tokens.size(1) == grid * grid:
        tokens = tokens.view(-1, grid, grid)
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (grid, grid):
        raise ConfigError(f"tokens: expected [B, {grid}, {grid}] or [B, {grid * grid}] for vqgan.grid={grid}, "
                          f"got {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
        raise ConfigError(f"tokens: ids must be in 0..{k - 1} (vqgan.k={k}), got {int(tokens.min())}.."
                          f"{int(tokens.max())}; they are not this VQGAN's tokens")
    return tokens.long()


# ---------------------------------------------------------------- persistence
def save_vqgan(model: VQGAN, meta: dict, directory: str | Path) -> None:
    """weights (incl. EMA buffers and the step counter) + config + meta, renamed into place at once."""
    save_artifact(model, meta, directory)


def load_vqgan(directory: str | Path, k: int | None = None, grid: int | None = None,
               image_size: int | None = None):
    """(model in eval mode, meta) written by save_vqgan, checked against the expected k / grid / image size.

    The folder holds either a VQGAN trained here or an adopted pretrained one (digit.pretrained_vqgan,
    `vqgan.weights`); both answer encode / decode_tokens / latents / lookup alike."""
    from digit.pretrained_vqgan import PretrainedVQConfig, PretrainedVQGAN

    pretrained = json.loads(config_path.read_text()).get("layout") if (config_path := Path(directory) / CONFIG).is_file() else None
    config_cls, model_cls = (PretrainedVQConfig, PretrainedVQGAN) if pretrained else (VQGANConfig, VQGAN)
    config, meta = read_artifact(directory, config_cls, "train_vqgan")
    if grid is not None and isinstance(grid, (tuple, list)):
        grid = grid[0] if len(set(grid)) == 1 else tuple(grid)
    for name, want, have in (("codebook size", k, config.k), ("token grid", grid, config.grid),
                             ("image size", image_size, config.image_size)):
        if want is not None and want != have:
            raise ConfigError(f"{directory}: the VQGAN was trained with {name} {have}, expected {want}; "
                              "re-run the stage that trains it with the current parameters")
    return load_weights(model_cls(config), directory, "train_vqgan"), meta


# ---------------------------------------------------------------- data
class ImageBatches(WindowedShards):
    """uint8 [B, H, W, 3] image batches of one split, streamed shard by shard (never loaded whole).

    Shuffling permutes the shard order per epoch and mixes images within a window of
    `window` shards (memory: window x shard size), a pure function of (seed, epoch) --
    the same scheme as digit.decoder.PairedImages, without the token file.
    """

    def __init__(self, images: str | Path, split: str, window: int = 4):
        self.manifest = manifest = read_manifest(images)  # identifies the data (checkpoint fingerprints)
        self.urls = shard_urls(images, split)
        self.counts = manifest["splits"][split]["counts"]
        self.num_rows = int(sum(self.counts))
        self.image_size, self.classes = manifest["image_size"], manifest["classes"]
        self.window = window

    def shard(self, index: int) -> np.ndarray:
        return np.stack([s["image"] for s in iter_samples([self.urls[index]])])

    def parts(self, index: int) -> tuple[np.ndarray]:
        return (self.shard(index),)

    def batches(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True, limit: int = 0):
        """Yield image batches; with shuffle, full batches only, in an order fixed by (seed, epoch)."""
        for (images,) in self.windowed_batches(batch_size, seed, epoch, shuffle, limit):
            yield images
