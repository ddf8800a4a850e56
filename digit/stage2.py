"""DiGIT's stage 2: translate a DiGIT token grid into a VQGAN token grid, which the VQGAN decodes.

Both grids cover the same gh x gw patches (the VQGAN downsamples to the DiGIT
grid), so the translation is position-aligned, N = gh * gw tokens in and out.
Two decoders, as in the paper:

Stage2AR, a causal transformer over one sequence (positions 0..2N-1):

    [d_0 ... d_{N-1}] [SEP] [v_0 ... v_{N-2}]      position N+j predicts v_j

DiGIT and VQ tokens have separate embedding tables (their ids overlap), the
separator is a learned vector of its own, positions are learned. The loss is
cross-entropy on the VQ part only: the DiGIT part is given, never predicted.
Generation prefills the DiGIT part + SEP through the KV cache in one pass, then
decodes one VQ token per step (LlamaGen's split), reusing digit.gpt's blocks.

Stage2NAR (MaskGIT), a bidirectional transformer over [d_0..d_{N-1}][v_0..v_{N-1}]
where some v are a MASK token. Training masks ceil(cos(pi/2 * r) * N) positions,
r ~ U(0, 1), and scores only those. Generation starts all-masked and, over
`steps` passes, commits the most confident samples so that the number still
masked follows cosine_schedule; Gumbel noise on the confidences, annealed by
temperature * (1 - t/steps), keeps early choices from being purely greedy.

Random draws take a torch.Generator on the model's device (as digit.gpt):
the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from digit.artifact import load_weights, read_artifact, save_artifact
from digit.errors import ConfigError
from digit.gpt import GPT, Block, CausalSelfAttention, GPTConfig, KVCache, check_sampling, sample_next

KINDS = ("ar", "nar")


@dataclass
class Stage2Config:
    digit_k: int                     # DiGIT codebook size (input vocabulary)
    vq_k: int                        # VQGAN codebook size (output vocabulary)
    grid: tuple[int, int]            # (gh, gw) shared by both grids; an int means a square grid
    kind: str = "ar"                 # "ar" (causal, token by token) or "nar" (MaskGIT)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0

    def __post_init__(self):
        g = self.grid
        self.grid = (int(g), int(g)) if isinstance(g, int) else tuple(int(x) for x in g)
        checks = [
            (self.digit_k >= 1, f"stage2.digit_k={self.digit_k} must be >= 1 (the DiGIT codebook size)"),
            (self.vq_k >= 1, f"stage2.vq_k={self.vq_k} must be >= 1 (the VQGAN codebook size)"),
            (len(self.grid) == 2 and min(self.grid) >= 1,
             f"stage2.grid={list(self.grid)} must be two positive sides (gh, gw) or one int"),
            (self.kind in KINDS, f"stage2.kind={self.kind!r} must be one of {list(KINDS)}"),
            (self.n_layer >= 1, f"stage2.n_layer={self.n_layer} must be >= 1"),
            (self.n_head >= 1, f"stage2.n_head={self.n_head} must be >= 1"),
            (self.n_embd >= 1 and self.n_embd % max(self.n_head, 1) == 0,
             f"stage2.n_embd={self.n_embd} must be a positive multiple of stage2.n_head={self.n_head}"),
            (0.0 <= self.dropout < 1.0, f"stage2.dropout={self.dropout} must be in [0, 1)"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def blocks(self) -> GPTConfig:
        """The digit.gpt config its Block / KVCache are built from (vocab_size is unused there)."""
        return GPTConfig(vocab_size=self.vq_k, block_size=2 * self.positions, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout)


class FullSelfAttention(CausalSelfAttention):
    """digit.gpt's attention (same projections) without the causal mask: MaskGIT reads the grid both ways."""

    def forward(self, x, cache=None, start=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class _Stage2(nn.Module):
    """Embeddings, blocks, head and input checks shared by both decoders."""

    def __init__(self, config: Stage2Config, vq_rows: int, causal: bool):
        super().__init__()
        self.config = c = config
        bc = c.blocks()
        self.digit_emb = nn.Embedding(c.digit_k, c.n_embd)
        self.vq_emb = nn.Embedding(vq_rows, c.n_embd)
        self.wpe = nn.Embedding(2 * c.positions, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList([Block(bc) for _ in range(c.n_layer)])
        if not causal:
            for block in self.h:
                block.attn = FullSelfAttention(bc)
        self.ln_f = nn.LayerNorm(c.n_embd, bias=False)
        self.head = nn.Linear(c.n_embd, c.vq_k, bias=False)  # outputs real codes only, never SEP / MASK
        self.apply(lambda m: GPT._init_weights(self, m))
        for name, p in self.named_parameters():  # GPT-2's depth-scaled residual projections, as in digit.gpt
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    configure_optimizer = GPT.configure_optimizer  # decay matrices only; uses nothing but self.parameters()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _tokens(self, tokens, vocab: int, name: str) -> torch.Tensor:
        """[B, gh, gw] or [B, N] ids in 0..vocab-1 -> LongTensor [B, N] on the model's device."""
        gh, gw = self.config.grid
        tokens = torch.as_tensor(tokens, device=self.head.weight.device)
        if tokens.dim() == 3 and tuple(tokens.shape[1:]) == (gh, gw):
            tokens = tokens.reshape(len(tokens), gh * gw)
        if tokens.dim() != 2 or tokens.size(1) != gh * gw:
            raise ConfigError(f"{name}: expected [B, {gh}, {gw}] or [B, {gh * gw}] for stage2.grid=({gh}, {gw}), "
                              f"got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ConfigError(f"{name}: token ids must be integers, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ConfigError(f"{name}: ids {int(tokens.min())}..{int(tokens.max())} are outside 0..{vocab - 1}; "
                              f"the tokens do not come from the codebook the model was built for")
        return tokens.long()

    def _run(self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Embedded inputs at positions start.. -> vq logits [B, T, vq_k]."""
        pos = torch.arange(start, start + x.size(1), device=x.device)
        x = self.drop(x + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, caches[i] if caches is not None else None, start)
        return self.head(self.ln_f(x))


class Stage2AR(_Stage2):

    def __init__(self, config: Stage2Config):
        super().__init__(config, vq_rows=config.vq_k, causal=True)
        self.sep = nn.Parameter(torch.randn(config.n_embd) * 0.02)

    def _prefix(self, digit: torch.Tensor) -> torch.Tensor:
        """[B, N+1, C]: the DiGIT tokens then the separator."""
        x = self.digit_emb(digit)
        return torch.cat([x, self.sep.to(x.dtype).expand(len(x), 1, -1)], dim=1)

    def logits(self, digit_tokens, vq_prefix) -> torch.Tensor:
        """Full recompute: logits [B, L+1, vq_k] for the sequence [DiGIT][SEP][vq_prefix (L < N tokens)].

        logits[:, j] predicts v_j; the last row is the token after vq_prefix.
        """
        N = self.config.positions
        digit = self._tokens(digit_tokens, self.config.digit_k, "digit_tokens")
        vq = torch.as_tensor(vq_prefix, device=digit.device).long()
        if (vq.dim() != 2 or len(vq) != len(digit) or vq.size(1) >= N
                or (vq.numel() and (int(vq.min()) < 0 or int(vq.max()) >= self.config.vq_k))):
            raise ConfigError(f"vq_prefix: expected [{len(digit)}, L < {N}] ids in 0..{self.config.vq_k - 1}, "
                              f"got shape {tuple(vq.shape)}")
        x = torch.cat([self._prefix(digit), self.vq_emb(vq)], dim=1)
        return self._run(x)[:, N:]

    def forward(self, digit_tokens, vq_tokens, return_logits: bool = False):
        """Teacher-forced loss: mean cross-entropy over the N VQ tokens only (+ logits [B, N, vq_k])."""
        vq = self._tokens(vq_tokens, self.config.vq_k, "vq_tokens")
        logits = self.logits(digit_tokens, vq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, self.config.vq_k).float(), vq.reshape(-1))
        return (loss, logits) if return_logits else loss

    @torch.no_grad()
    def generate(self, digit_tokens, temperature: float = 1.0, top_p: float | None = 0.8, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """VQ tokens [B, N] for DiGIT grids [B, gh, gw] / [B, N]. temperature 0 = greedy (top_k/top_p unused)."""
        check_sampling(temperature, top_k, top_p)
        c, N = self.config, self.config.positions
        digit = self._tokens(digit_tokens, c.digit_k, "digit_tokens")
        B = len(digit)
        was_training = self.training
        self.eval()
        try:
            caches = [KVCache(B, c.n_head, 2 * N, c.n_embd // c.n_head) for _ in range(c.n_layer)]
            logits = self._run(self._prefix(digit), 0, caches)[:, -1]  # prefill: DiGIT + SEP -> v_0
            out = torch.zeros(B, N, dtype=torch.long, device=digit.device)
            for j in range(N):
                out[:, j] = sample_next(logits.float(), temperature, top_k, top_p, generator)
                if j + 1 < N:  # v_j sits at position N+1+j and predicts v_{j+1}
                    logits = self._run(self.vq_emb(out[:, j:j + 1]), N + 1 + j, caches)[:, -1]
        finally:
            self.train(was_training)
        return out


def cosine_schedule(n: int, steps: int) -> list[int]:
    """Positions still masked after each of `steps` MaskGIT steps over n: floor(n * cos(pi/2 * t/steps)),
    clamped as MaskGIT does so that each step commits >= 1 token and >= 1 stays masked until the last (0)."""
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1 (MaskGIT decoding passes; 8 is typical)")
    left, out = n, []
    for t in range(1, steps + 1):
        left = 0 if t == steps else max(1, min(left - 1, math.floor(n * math.cos(math.pi / 2 * t / steps))))
        out.append(left)
    return out


def random_mask(batch: int, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training masks [batch, n] bool: per row, ceil(cos(pi/2 * r) * n) random positions (>= 1), r ~ U(0, 1)."""
    r = torch.rand(batch, generator=generator, device=device)
    count = torch.ceil(torch.cos(math.pi / 2 * r) * n).clamp(1, n).long()
    rank = torch.rand(batch, n, generator=generator, device=device).argsort(1).argsort(1)
    return rank < count[:, None]


class Stage2NAR(_Stage2):

    def __init__(self, config: Stage2Config):
        super().__init__(config, vq_rows=config.vq_k + 1, causal=False)

    @property
    def mask_id(self) -> int:
        """The MASK input id: one row past the VQ codebook in vq_emb."""
        return self.config.vq_k

    def logits(self, digit_tokens, vq_inputs) -> torch.Tensor:
        """logits [B, N, vq_k] at every VQ position of [DiGIT][vq_inputs] (ids or mask_id)."""
        digit = self._tokens(digit_tokens, self.config.digit_k, "digit_tokens")
        vq = self._tokens(vq_inputs, self.config.vq_k + 1, "vq_inputs")
        return self._run(torch.cat([self.digit_emb(digit), self.vq_emb(vq)], dim=1))[:, self.config.positions:]

    def forward(self, digit_tokens, vq_tokens, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, return_logits: bool = False):
        """Masked-token loss: cross-entropy on the masked VQ positions only (mask [B, N] bool, else random_mask)."""
        vq = self._tokens(vq_tokens, self.config.vq_k, "vq_tokens")
        if mask is None:
            mask = random_mask(len(vq), vq.size(1), generator, vq.device)
        mask = mask.reshape(vq.shape).to(vq.device)
        logits = self.logits(digit_tokens, vq.masked_fill(mask, self.mask_id))
        loss = F.cross_entropy(logits[mask].float(), vq[mask])
        return (loss, logits) if return_logits else loss

    @torch.no_grad()
    def generate(self, digit_tokens, steps: int = 8, temperature: float = 1.0,
                 generator: torch.Generator | None = None, return_history: bool = False):
        """VQ tokens [B, N] by MaskGIT decoding; with return_history also the [B, N] grid after each step
        (mask_id where still masked). temperature 0 = argmax and no confidence noise."""
        check_sampling(temperature, None, None)
        schedule = cosine_schedule(self.config.positions, steps)
        digit = self._tokens(digit_tokens, self.config.digit_k, "digit_tokens")
        B, N = digit.shape
        cur = torch.full((B, N), self.mask_id, dtype=torch.long, device=digit.device)
        history = []
        was_training = self.training
        self.eval()
        try:
            for t, keep_masked in enumerate(schedule, start=1):
                unknown = cur == self.mask_id
                logits = self.logits(digit, cur).float()
                sampled = sample_next(logits.reshape(B * N, -1), temperature, None, None, generator).view(B, N)
                sampled = torch.where(unknown, sampled, cur)  # committed tokens never change
                confidence = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)
                noise = temperature * (1 - t / steps)
                if noise > 0:  # Gumbel: sample which positions to commit, sharper as t grows
                    u = torch.rand(B, N, generator=generator, device=digit.device).clamp_min(1e-20)
                    confidence = confidence - noise * torch.log(-torch.log(u))
                confidence = confidence.masked_fill(~unknown, float("inf"))
                # Re-mask exactly the keep_masked least confident: a sort, not a threshold, so ties keep the count.
                least = confidence.argsort(dim=1)[:, :keep_masked]
                cur = sampled.scatter(1, least, self.mask_id)
                history.append(cur.clone())
        finally:
            self.train(was_training)
        return (cur, history) if return_history else cur


def build_stage2(config: Stage2Config) -> Stage2AR | Stage2NAR:
    return (Stage2AR if config.kind == "ar" else Stage2NAR)(config)


# ---------------------------------------------------------------- persistence
VQGAN_SUBDIR = "vqgan"  # the frozen VQGAN stage 2 paints through, copied in: the folder is a whole renderer


def save_stage2(model: Stage2AR | Stage2NAR, meta: dict, directory: str | Path,
                vqgan_dir: str | Path | None = None) -> None:
    save_artifact(model, meta, directory, include={VQGAN_SUBDIR: vqgan_dir} if vqgan_dir else None)


def load_stage2(directory: str | Path, digit_k: int | None = None, vq_k: int | None = None,
                grid: int | tuple[int, int] | None = None) -> tuple[Stage2AR | Stage2NAR, dict]:
    """(model in eval mode, meta), checked against the DiGIT tokens / VQGAN it will be used with."""
    config, meta = read_artifact(directory, Stage2Config, "train_stage2")
    fix = "re-run the stage that trains it on these tokens"
    if digit_k is not None and digit_k != config.digit_k:
        raise ConfigError(f"{directory} was trained for a DiGIT codebook of {config.digit_k} codes, the tokens "
                          f"have {digit_k}; {fix}")
    if vq_k is not None and vq_k != config.vq_k:
        raise ConfigError(f"{directory} was trained for a VQGAN codebook of {config.vq_k} codes, the VQGAN has "
                          f"{vq_k}; {fix}")
    if grid is not None:
        grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if grid != config.grid:
            raise ConfigError(f"{directory} was trained on a {config.grid[0]}x{config.grid[1]} token grid, the "
                              f"tokens have {grid[0]}x{grid[1]}; {fix}")
    return load_weights(build_stage2(config), directory, "train_stage2"), meta
