"""Pieces of GPT training shared by the `train` stage, `sample`, `probe` and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digit.artifact import load_weights, read_artifact, save_artifact
from digit.gpt import GPT, GPTConfig
from digit.tokens import TokenBatches

def gpt_config(cfg: dict, meta: dict) -> GPTConfig:
    """GPTConfig from the gpt.* params and a token file's metadata (grid, vocabulary, classes)."""
    gh, gw = meta["grid"]
    return GPTConfig(vocab_size=meta["vocab_size"], block_size=gh * gw + 1,
                     num_classes=len(meta["classes"]) if cfg["class_conditional"] else 0,
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                     dropout=cfg["dropout"], bias=cfg["bias"])


def drop_labels(labels: torch.Tensor, null_class: int, p: float, seed: int, micro_step: int,
                rank: int, world: int) -> torch.Tensor:
    """Replace labels by the null class with probability p (for classifier-free guidance).

    Drawn for the whole global batch from a generator keyed on (seed, micro step)
    and sliced per rank: the same rows are dropped for any process count and
    after a resume.
    """
    if p <= 0:
        return labels
    gen = torch.Generator().manual_seed(seed * 1_000_003 + micro_step)
    drop = torch.rand(len(labels) * world, generator=gen)[rank * len(labels):(rank + 1) * len(labels)] < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def sequence_loss(logits: torch.Tensor, tokens: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                           label_smoothing=label_smoothing, reduction=reduction)


@torch.no_grad()
def evaluate(model, batches: TokenBatches, device, conditional: bool) -> tuple[float, float, int]:
    """Summed CE (no smoothing), correct next-token predictions and token count over this rank's share."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for labels, tokens in batches.epoch(0):
        labels = torch.from_numpy(labels).to(device)
        tokens = torch.from_numpy(tokens).to(device)
        logits = model(labels if conditional else None, tokens[:, :-1])
        loss_sum += sequence_loss(logits, tokens, reduction="sum").item()
        correct += (logits.argmax(-1) == tokens).sum().item()
        count += tokens.numel()
    model.train(was_training)
    return loss_sum, correct, count


def unigram_cross_entropy(train_path: Path, val_path: Path, vocab_size: int) -> float:
    """CE (nats/token) on val of the train split's token frequencies: the bar a GPT must beat."""
    counts = np.ones(vocab_size)  # add-one smoothing: no val token gets probability 0
    for _, tokens in TokenBatches(train_path, 4096, 0, shuffle=False, drop_last=False).epoch(0):
        counts += np.bincount(tokens.ravel(), minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for _, tokens in TokenBatches(val_path, 4096, 0, shuffle=False, drop_last=False).epoch(0):
        total -= float(logp[tokens].sum())
        n += tokens.size
    return total / n


def save_trained(model: GPT, meta: dict, directory: str | Path) -> None:
    """Publish a trained GPT with the metadata of the tokens it learned (grid, vocabulary, classes)."""
    save_artifact(model, meta, directory)


def load_trained(directory: str | Path) -> tuple[GPT, dict]:
    """The GPT written by `train` and the metadata of its tokens."""
    config, meta = read_artifact(directory, GPTConfig, "train")
    return load_weights(GPT(config), directory, "train"), meta
