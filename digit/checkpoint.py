"""Resumable training shared by `train` and `train_decoder`: atomic Accelerate checkpoints.

`accelerator.save_state` writes into a temporary folder that is renamed to
root/step_NNNNNNNN when complete (the last `keep` are kept), so a kill never
leaves a partial checkpoint; the DVCLive directory is copied in, so a resumed
run also gets back the curves logged before the interruption.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class Progress:
    """The optimizer-step counter, saved and restored with the checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def save_checkpoint(accelerator, root: Path, step: int, live: Path, keep: int = 2) -> None:
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.copytree(live, tmp / "live")
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_latest(accelerator, root: Path, live: Path, name: str) -> bool:
    """Load the newest complete checkpoint under root, if any, and restore its DVCLive folder."""
    saved = sorted(root.glob("step_*"))
    if not saved:
        return False
    accelerator.load_state(str(saved[-1]))
    accelerator.print(f"{name}: resumed from {saved[-1]}")
    if accelerator.is_main_process:
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(saved[-1] / "live", live)
    return True
