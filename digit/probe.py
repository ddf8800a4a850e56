"""Linear probe of a frozen GPT (the paper's measure of what the model understands)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from digit.tokens import TokenBatches


@torch.no_grad()
def pooled_hidden_states(model, batches: TokenBatches, device, limit: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, the sequence-mean hidden state of each image (at most `limit`, 0 = all), class token set to null.

    Returns ([n_layer + 1] tensors [N, C], labels [N]).
    """
    model.eval()
    feats, labels, seen = None, [], 0
    for y, tokens in batches.epoch(0):
        if limit and seen >= limit:
            break
        y, tokens = (y[: limit - seen], tokens[: limit - seen]) if limit else (y, tokens)
        seen += len(y)
        tokens = torch.from_numpy(tokens).to(device)
        cond = torch.full((len(tokens),), model.null_class, device=device) if model.config.num_classes else None
        _, hidden = model(cond, tokens, return_hidden=True)
        pooled = [h.float().mean(dim=1).cpu() for h in hidden]
        feats = [[p] for p in pooled] if feats is None else [f + [p] for f, p in zip(feats, pooled)]
        labels.append(torch.from_numpy(y))
    return [torch.cat(f) for f in feats], torch.cat(labels)


def fit_linear_probe(x_train, y_train, x_val, y_val, n_classes: int, steps: int, weight_decay: float,
                     seed: int = 0) -> dict:
    """Multinomial logistic regression (L-BFGS on standardized features); top-1 accuracies."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[1], n_classes).double()
    xt, xv = x_train.double(), x_val.double()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xt), y_train) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {"train_top1": (linear(xt).argmax(1) == y_train).double().mean().item(),
                "val_top1": (linear(xv).argmax(1) == y_val).double().mean().item()}
