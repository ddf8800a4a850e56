"""A GPT over K-Means token grids, in the style of nanoGPT's model.py.

DiGIT (arXiv 2410.12490) flattens an H x W grid of codebook ids in raster
order and models it autoregressively. One extra position comes first:

    position:  0          1     2          ...  H*W
    input:     prefix     t_0   t_1        ...  t_{H*W-1}
    predicts:  t_0        t_1   t_2        ...  (next)

The prefix is a learned BOS vector for unconditional models, or a class
embedding for class-conditional ones. The class table has one extra row, the
"null" class: training swaps labels for it at random (label dropout), so the
same network also learns p(x) and classifier-free guidance can mix the two at
sampling time.

Generation follows LlamaGen: one prefill pass over the prefix, then one token
per step through a preallocated key/value cache, so each step costs O(T)
instead of re-running the whole O(T^2) prefix. `use_cache=False` keeps the
plain recompute-everything loop as the reference the cache is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from digit.errors import ConfigError


# Named model sizes. Only the width/depth keys: vocab_size and block_size come
# from the token files (K and H*W + 1), so use them as
#     GPTConfig(vocab_size=K, block_size=H * W + 1, **PRESETS[name])
PRESETS: dict[str, dict] = {
    # Small enough to train on a laptop CPU in minutes on 7x7 grids.
    "cpu-default": {"n_layer": 6, "n_head": 4, "n_embd": 256},  # = params.yaml gpt.*: ~8 min on 2 CPU cores
    # The paper's base model (~200M parameters with its vocab_size=8192, block_size=257 for 16x16 grids).
    "paper": {"n_layer": 16, "n_head": 16, "n_embd": 1024},
}


@dataclass
class GPTConfig:
    vocab_size: int          # K: codebook ids 0..K-1; the lm head outputs K logits
    block_size: int          # max sequence length incl. the prefix position: H*W + 1
    num_classes: int = 0     # 0 = unconditional (BOS prefix); >0 = class prefix, table has num_classes + 1 rows
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False       # biases in Linear and LayerNorm; False is a little better and faster (nanoGPT)

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 1, f"gpt.vocab_size: {self.vocab_size} must be >= 1 (the codebook size K)"),
            (self.block_size >= 2, f"gpt.block_size: {self.block_size} must be >= 2 (prefix + at least one token)"),
            (self.num_classes >= 0, f"gpt.num_classes: {self.num_classes} must be >= 0 (0 = unconditional)"),
            (self.n_layer >= 1, f"gpt.n_layer: {self.n_layer} must be >= 1"),
            (self.n_head >= 1, f"gpt.n_head: {self.n_head} must be >= 1"),
            (self.n_embd >= 1 and self.n_embd % max(self.n_head, 1) == 0,
             f"gpt.n_embd: {self.n_embd} must be a positive multiple of gpt.n_head={self.n_head}"),
            (0.0 <= self.dropout < 1.0, f"gpt.dropout: {self.dropout} must be in [0, 1)"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ConfigError("; ".join(problems))


class KVCache:
    """Keys and values of one attention layer for positions 0..block_size-1, filled as decoding goes.

    Allocated once ([B, n_head, block_size, head_dim]) on the first write, with
    the dtype/device of the keys written (so autocast runs get a bf16 cache),
    and never resized: each decode step writes one column in place instead of
    torch.cat'ing a new tensor of the whole history.
    """

    def __init__(self, batch_size: int, n_head: int, block_size: int, head_dim: int):
        self.shape = (batch_size, n_head, block_size, head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, nh, t, hd] at positions start..start+t-1; return the filled part 0..start+t-1."""
        if self.k is None:
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]
        if cache is not None:
            k, v = cache.update(start, k, v)  # now all positions 0..start+T-1
        mask, causal = None, False
        if k.size(2) == T:
            causal = True  # the whole sequence from position 0: the usual causal triangle
        elif T > 1:
            # A chunk of queries at start.. after a cached history: query i sees keys 0..start+i.
            key_pos = torch.arange(k.size(2), device=x.device)
            query_pos = torch.arange(start, start + T, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        # else: a single new query may see every cached key, so no mask at all.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream is never normalized, which keeps deep stacks stable."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, start: int = 0):
        x = x + self.attn(self.ln_1(x), cache, start)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),            # codebook id -> vector
            # Prefix table: 1 row (BOS) if unconditional, else num_classes + the null class.
            # A separate table rather than extra rows in wte, so token ids and class ids never collide.
            wce=nn.Embedding(config.num_classes + 1 if config.num_classes else 1, C),
            wpe=nn.Embedding(config.block_size, C),            # learned positions, 0 = the prefix
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(C, bias=config.bias),
        ))
        # No weight tying with wte: the output space is exactly the K codes, and the
        # input side also has the class table; tying buys little at these sizes.
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)

        self.apply(self._init_weights)
        # GPT-2: each block adds two projections into the residual stream, so scale them
        # down by 1/sqrt(2 * n_layer) to keep the stream's variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def null_class(self) -> int:
        """The class id meaning "no class" (label dropout, CFG); 0 and unused for unconditional models."""
        return self.config.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward

    def _check_cond(self, cond: torch.Tensor | None, batch_size: int) -> None:
        if cond is None or not self.config.num_classes:
            return  # unconditional models ignore cond; None means the null class for conditional ones
        if cond.dim() != 1 or cond.size(0) != batch_size:
            raise ConfigError(f"cond: expected class ids of shape [{batch_size}] (one per sequence), "
                              f"got {tuple(cond.shape)}")
        if cond.dtype.is_floating_point or cond.dtype == torch.bool or cond.is_complex():
            raise ConfigError(f"cond: class ids must be an integer tensor, got {cond.dtype}")
        if cond.numel():
            lo, hi = int(cond.min()), int(cond.max())
            if lo < 0 or hi > self.config.num_classes:
                bad = lo if lo < 0 else hi
                raise ConfigError(
                    f"cond: class id {bad} is outside the class embedding table of size "
                    f"{self.config.num_classes + 1} (ids 0..{self.config.num_classes - 1} plus the null class "
                    f"{self.config.num_classes}); the labels do not match the model's gpt.num_classes")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2:
            raise ConfigError(f"tokens: expected shape [batch, length], got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise ConfigError(f"tokens: token ids must be an integer tensor, got {tokens.dtype}")
        length = tokens.size(1) + 1
        if length > self.config.block_size:
            raise ConfigError(
                f"gpt.block_size: sequence length {length} (prefix + {tokens.size(1)} tokens) exceeds "
                f"gpt.block_size={self.config.block_size}; pass at most {self.config.block_size - 1} tokens "
                f"or train a model with a larger block_size")
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ConfigError(
                    f"tokens: token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1} "
                    f"(gpt.vocab_size={self.config.vocab_size}); the tokens must come from the codebook "
                    f"the model was trained on")

    def _prefix(self, cond: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        """[B, 1, C]: the BOS vector, or the class embedding (null class when cond is None)."""
        if not self.config.num_classes:
            ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        elif cond is None:
            ids = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        else:
            ids = cond.to(device=device, dtype=torch.long)
        return self.transformer.wce(ids)[:, None, :]

    def _forward(self, cond, tokens, start: int = 0, caches: list[KVCache] | None = None,
                 return_hidden: bool = False):
        """No input checks. start == 0: the sequence is [prefix(cond)] + tokens (positions 0..T).
        start > 0: tokens sit at positions start..start+T-1 after a history held in `caches`."""
        B, T = tokens.shape
        device = tokens.device
        x = self.transformer.wte(tokens)  # [B, T, C]
        if start == 0:
            x = torch.cat([self._prefix(cond, B, device).to(x.dtype), x], dim=1)
        pos = torch.arange(start, start + x.size(1), device=device)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        hidden = [x] if return_hidden else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches is not None else None, start)
            if return_hidden:
                hidden.append(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return (logits, hidden) if return_hidden else logits

    def forward(self, cond: torch.Tensor | None, tokens: torch.Tensor, return_hidden: bool = False):
        """Logits [B, T+1, K] for the sequence [prefix(cond)] + tokens.

        logits[:, i] predicts tokens[:, i] for i < T, logits[:, T] the token after
        them; training feeds tokens[:, :-1] and scores against tokens. With
        return_hidden, also the n_layer + 1 residual-stream states [B, T+1, C]
        (embeddings, then each block's output; the last is before ln_f).
        """
        self._check_tokens(tokens)
        self._check_cond(cond, tokens.size(0))
        return self._forward(cond, tokens, return_hidden=return_hidden)

    # ---------------------------------------------------------------- optimizer

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
        # Decay only matrices (Linear weights, embedding tables): shrinking biases
        # and LayerNorm gains does not regularize anything, it just fights the fit.
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))

    # --------------------------------------------------------------- generation

    def new_cache(self, batch_size: int) -> list[KVCache]:
        """One empty KVCache per layer for sequences of up to block_size positions."""
        c = self.config
        return [KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head) for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, cond: torch.Tensor | None, steps: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, batch_size: int | None = None) -> torch.Tensor:
        """Sample `steps` tokens after the prefix: LongTensor [B, steps].

        B = len(cond); unconditional models ignore cond's values, and with
        cond=None B is `batch_size` (default 1). For a class-conditional model
        cond=None means the null class. Runs in eval mode (no dropout) and
        restores the previous mode.
        """
        check_sampling(temperature, top_k, top_p)
        if steps < 0:
            raise ConfigError(f"steps: {steps} must be >= 0")
        if steps + 1 > self.config.block_size:
            raise ConfigError(f"gpt.block_size: {steps} tokens + the prefix = {steps + 1} positions exceed "
                              f"gpt.block_size={self.config.block_size}; generate at most "
                              f"{self.config.block_size - 1} tokens")
        guided = cfg_scale != 1.0
        if guided and not self.config.num_classes:
            raise ConfigError(f"sample.cfg_scale: {cfg_scale} needs a class-conditional GPT "
                              f"(gpt.num_classes > 0); set sample.cfg_scale: 1")
        device = self.lm_head.weight.device
        if cond is not None:
            B = cond.size(0) if cond.dim() else 1
            cond = cond.reshape(B).to(device)
        else:
            B = 1 if batch_size is None else batch_size
        self._check_cond(cond, B)
        if guided:
            # One doubled batch: rows 0..B-1 conditional, rows B..2B-1 the null class.
            # One pass per step instead of two, and both halves see the same tokens.
            real = cond.long() if cond is not None else torch.full((B,), self.null_class, device=device)
            cond = torch.cat([real, torch.full_like(real, self.null_class)])
        rows = 2 * B if guided else B

        was_training = self.training
        self.eval()
        try:
            out = torch.zeros(B, steps, dtype=torch.long, device=device)
            seq = torch.zeros(rows, steps, dtype=torch.long, device=device)  # what the model has seen
            caches = self.new_cache(rows) if use_cache else None
            for i in range(steps):
                if not use_cache:
                    logits = self._forward(cond, seq[:, :i])[:, -1]             # recompute everything
                elif i == 0:
                    logits = self._forward(cond, seq[:, :0], 0, caches)[:, -1]  # prefill: the prefix position
                else:
                    logits = self._forward(None, seq[:, i - 1:i], i, caches)[:, -1]  # decode one token at pos i
                logits = logits.float()  # sample in float32 whatever the weights' dtype
                if guided:
                    c, u = logits[:B], logits[B:]
                    logits = u + cfg_scale * (c - u)
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                out[:, i] = nxt
                seq[:, i] = nxt.repeat(2) if guided else nxt
        finally:
            self.train(was_training)
        return out


# ------------------------------------------------------------------- sampling

def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"sample.temperature: {temperature} must be >= 0 (0 = greedy argmax)")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"sample.top_k: {top_k} must be >= 1 (or None / 0 in params.yaml to turn it off)")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ConfigError(f"sample.top_p: {top_p} must be in (0, 1] (1 = nucleus sampling off)")


# Cumulative sums of float32 probabilities are off by a few ulp; a set whose mass
# is within this of top_p counts as reaching it (else [0.5, 0.3] might "miss" 0.8).
_TOP_P_TOLERANCE = 1e-6


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the kept set to -inf: first the top_k largest, then the nucleus of mass top_p."""
    if top_k is not None:
        k = min(int(top_k), logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: keep a token while the set before it has not reached top_p yet.
        # The first token has 0 before it, so at least one is always kept.
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p - _TOP_P_TOLERANCE
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, K] -> LongTensor [B]. temperature 0 = argmax (draws nothing)."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    # Exactly one multinomial per call, on [B, K]: the cached and uncached loops
    # consume the generator identically and so draw the same tokens.
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
