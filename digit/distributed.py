"""Accelerate set-up shared by the multi-process stages.

On a machine without CUDA, Accelerate only joins a process group when told it
runs on CPU (`cpu=True`); under torchrun-style launchers (`torchrun
--nproc_per_node N`, `accelerate launch --multi_gpu --num_processes N`) we
say so, so N CPU processes split the work over gloo. (`accelerate launch
--cpu --num_processes N` starts N processes only through mpirun.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from digit.atomic import clean_stale_tmp, tmp_sibling, writing


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(**kwargs) -> Accelerator:
    if launched_world_size() > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def finish(accelerator: Accelerator) -> None:
    """Meet every rank, then tear the process group down, so no rank hangs at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def shared_tmp_dir(accelerator: Accelerator, out: Path) -> Path:
    """A fresh temporary sibling of `out`, made by rank 0 and the same path on every rank."""
    holder = [None]
    if accelerator.is_main_process:
        clean_stale_tmp(out)
        tmp = tmp_sibling(out)
        with writing(out):
            tmp.mkdir(parents=True)
        holder = [str(tmp)]
    broadcast_object_list(holder)
    return Path(holder[0])


@contextlib.contextmanager
def shared_tmp_output(accelerator: Accelerator, out: Path):
    """shared_tmp_dir for a block that fills and publishes it.

    A failure to write (disk full, read-only, ...) is an OutputError naming `out`, and any
    failure removes the temporary directory on the failing rank (the other ranks then fail too),
    so nothing half-written stays behind. A SIGKILLed run leaves it for clean_stale_tmp.
    """
    tmp = shared_tmp_dir(accelerator, out)
    try:
        with writing(out, tmp):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
