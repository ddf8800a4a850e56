"""One save/load pair for every trained model the stages publish (GPT, decoder, VQGAN, stage 2).

A model folder holds model.safetensors (the state dict), config.json (the model's
@dataclass config) and meta.json (what the next stages must know: the tokens'
grid, vocabulary, classes, ...). It is written under a temporary name and renamed
into place at once, so a folder with these three files is always complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from digit.atomic import atomic_dir, clean_stale_tmp
from digit.errors import ConfigError

WEIGHTS, CONFIG, META = "model.safetensors", "config.json", "meta.json"


def save_artifact(model: torch.nn.Module, meta: dict, directory: str | Path,
                  include: dict[str, str | Path] | None = None) -> None:
    """Publish model (its .config dataclass and state dict) with `meta`, atomically; `include` copies
    other folders in as subfolders (name -> folder)."""
    clean_stale_tmp(Path(directory))
    with atomic_dir(directory) as tmp:
        for name, folder in (include or {}).items():
            shutil.copytree(folder, tmp / name)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_artifact(directory: str | Path, config_cls, producer: str,
                  convert: Callable[[dict], dict] | None = None):
    """(config, meta) of a folder written by save_artifact; `producer` names the stage that re-makes it."""
    directory = Path(directory)
    fix = f"re-run `dvc repro {producer}`"
    for name in (WEIGHTS, CONFIG, META):
        if not (directory / name).is_file():
            raise ConfigError(f"{directory / name}: missing; {directory} is not a complete `{producer}` output, {fix}")
    try:
        raw, meta = json.loads((directory / CONFIG).read_text()), json.loads((directory / META).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{directory}: {e}; the folder is damaged, {fix}")
    unknown = sorted(set(raw) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ConfigError(f"{directory / CONFIG}: unknown keys {unknown}, written by another version of the "
                          f"code; {fix}")
    return config_cls(**(convert(raw) if convert else raw)), meta


def load_weights(model: torch.nn.Module, directory: str | Path, producer: str) -> torch.nn.Module:
    """model with the folder's weights (every key and shape checked), in eval mode."""
    state = load_file(str(Path(directory) / WEIGHTS))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ConfigError(f"{Path(directory) / WEIGHTS} does not match {CONFIG}: {str(e).splitlines()[-1].strip()}; "
                          f"re-run `dvc repro {producer}`")
    if missing or unexpected:
        raise ConfigError(f"{Path(directory) / WEIGHTS} does not match {CONFIG} (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}); re-run `dvc repro {producer}`")
    return model.eval()
