"""The training loop every training stage shares: `train`, `train_decoder`, `train_vqgan`, `train_stage2`.

A stage keeps its model, its step body, its validation and what it publishes; the
skeleton is here, written once:

- Accelerate (device, precision, DDP) and the seed;
- one fingerprint rule: the run's params + the bytes of its inputs + the code it runs
  (digit.code), naming checkpoints/<stage>-<fingerprint>/, so a run resumes only a
  checkpoint of the same params, data and code;
- atomic checkpoints (`accelerator.save_state` into a temporary folder renamed to
  step_NNNNNNNN when complete, last 2 kept, the DVCLive folder copied in) and resume;
- DVCLive through Accelerate's tracker, tqdm, eval/log/checkpoint cadence;
- a guard: the first non-finite metric stops the run, naming the stage, the step and
  the last good checkpoint, and nothing is published;
- publish on the main process, then the checkpoints are removed and every rank stops.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from accelerate.utils import set_seed
from tqdm import tqdm

from digit.code import code_digest
from digit.distributed import finish, make_accelerator
from digit.errors import ConfigError, TrainingError
from digit.precision import resolve_precision
from digit.shards import read_manifest


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup then cosine decay to min_ratio, as a LambdaLR multiplier of the step."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _hash_path(digest, path: Path) -> None:
    """A file's bytes, or every file's name and bytes under a directory (sorted)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)


def run_fingerprint(cfg: dict, inputs: Sequence[str | Path], entry: str | Path) -> str:
    """Identity of a training run: its params, its input files' bytes, and the code of `entry` with its imports."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for path in inputs:
        if Path(path).exists():
            _hash_path(digest, Path(path))
        else:  # a URL-template shard root (object storage): its manifest names and counts every shard
            digest.update(json.dumps(read_manifest(str(path)), sort_keys=True).encode())
    digest.update(code_digest(entry).encode())
    return digest.hexdigest()[:16]


class Progress:
    """The optimizer-step counter, saved and restored with the checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


class Trainer:
    """One training run of stage `name` with the section params `cfg` (seed already resolved).

    cfg must hold precision, seed, max_steps, eval_every, checkpoint_every. Use:

        trainer = Trainer("train_decoder", cfg, live=..., checkpoints=..., inputs=[...], entry=__file__)
        model, opt = trainer.prepare(model, opt, state=[scheduler])
        last_val = trainer.fit(step_fn, validate, items_per_step=B * world, throughput="train/img_per_s")
        trainer.publish(write)   # write(live) on the main process only
    """

    def __init__(self, name: str, cfg: dict, *, live: str | Path, checkpoints: str | Path,
                 inputs: Sequence[str | Path], entry: str | Path, grad_accum: int = 1):
        self.name, self.cfg, self.live = name, cfg, Path(live)
        self.precision = resolve_precision(cfg["precision"])  # auto -> bf16 where native, else no
        self.accelerator = make_accelerator(mixed_precision=self.precision,
                                            gradient_accumulation_steps=grad_accum, log_with="dvclive")
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        set_seed(cfg["seed"])
        # The resolved precision, not `auto`: a checkpoint is never resumed at another precision.
        fingerprint = run_fingerprint({**cfg, "precision": self.precision}, inputs, entry)
        self.ckpt_root = Path(checkpoints) / f"{name}-{fingerprint}"
        self.progress = Progress()
        self.resumed = False

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, *objects, state: Sequence = ()):
        """accelerator.prepare(objects); checkpoint `state` (schedulers, ...) with the step; resume; start DVCLive."""
        prepared = self.accelerator.prepare(*objects)
        self.accelerator.register_for_checkpointing(*state, self.progress)
        self.resumed = self._resume()
        self.accelerator.init_trackers(self.name, init_kwargs={"dvclive": {
            "dir": str(self.live), "resume": self.resumed, "save_dvc_exp": False, "dvcyaml": False,
            "report": None}})
        return prepared

    def stream(self, epoch_batches: Callable[[int, int], Iterator], epoch_length: Callable[[int], int],
               start: int) -> Iterator:
        """Batches forever from global batch `start`: epoch_batches(epoch, skip) yields one epoch's batches
        after `skip`, epoch_length(epoch) is how many it yields (so a resumed run lands on the same batch)."""
        if epoch_length(0) == 0:
            raise ConfigError(f"{self.name}: an epoch of the training data holds no full batch of batch_size x "
                              f"{self.world} process(es); lower the stage's batch_size (or raise its shuffle_shards)")
        epoch, skip = 0, start
        while skip >= (length := epoch_length(epoch)):  # each length costs a shuffle: compute it once
            skip -= length
            epoch += 1
        while True:
            yield from epoch_batches(epoch, skip)
            epoch, skip = epoch + 1, 0

    def fit(self, train_step: Callable[[int], dict], validate: Callable[[], dict], *, items_per_step: float,
            throughput: str, show: Sequence[str] = ()) -> dict:
        """Optimizer steps from the resumed one to cfg.max_steps. train_step(step) runs one step and returns its
        metrics (already reduced over ranks); validate() runs every cfg.eval_every steps and at the last.
        Returns the last validation metrics."""
        cfg, last_val = self.cfg, {}
        bar = tqdm(total=cfg["max_steps"], initial=self.step, desc=self.name, unit="step", disable=not self.is_main)
        while self.step < cfg["max_steps"]:
            started = time.perf_counter()
            metrics = train_step(self.step)
            self._check_finite(metrics, self.step + 1)
            self.progress.step += 1
            metrics[throughput] = items_per_step / (time.perf_counter() - started)
            if self.step % cfg["eval_every"] == 0 or self.step == cfg["max_steps"]:
                last_val = validate()
                self._check_finite(last_val, self.step)
                metrics.update(last_val)
            self.accelerator.log(metrics, step=self.step)  # one call per step: DVCLive writes one row per metric
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4f}" for k in show if k in metrics})
            bar.update(1)
            if self.step % cfg["checkpoint_every"] == 0 and self.step < cfg["max_steps"]:
                self._save_checkpoint()
        bar.close()
        return last_val

    def publish(self, write: Callable) -> None:
        """write(live) on the main process (outputs and summary), then drop the checkpoints and stop every rank."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            live = self.accelerator.get_tracker("dvclive").tracker
            live.summary["precision"] = self.precision  # how it was made: `auto` resolved on this machine
            write(live)
            shutil.rmtree(self.ckpt_root, ignore_errors=True)  # finished: nothing to resume
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # writes the DVCLive summary; also tears down the process group
        finish(self.accelerator)

    # ------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_root.glob("step_*"))

    def _save_checkpoint(self, keep: int = 2) -> None:
        acc, step = self.accelerator, self.step
        final, tmp = self.ckpt_root / f"step_{step:08d}", self.ckpt_root / f".step_{step:08d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.copytree(self.live, tmp / "live")
            os.replace(tmp, final)
            for old in self._checkpoints()[:-keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def _resume(self) -> bool:
        """Load the newest complete checkpoint, if any, and restore its DVCLive folder."""
        saved = self._checkpoints()
        if not saved:
            return False
        self.accelerator.load_state(str(saved[-1]))
        self.accelerator.print(f"{self.name}: resumed from {saved[-1]}")
        if self.is_main:
            shutil.rmtree(self.live, ignore_errors=True)
            shutil.copytree(saved[-1] / "live", self.live)
        return True

    def _check_finite(self, metrics: dict, step: int) -> None:
        bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        if not bad:
            return
        saved = self._checkpoints()
        last = (f"the last good checkpoint is {saved[-1]} (step {int(saved[-1].name[5:])}); lower the learning "
                "rate or fix the input and re-run, and the stage resumes from it only if params, data and code "
                "are unchanged" if saved else "no checkpoint was written before it")
        raise TrainingError(f"{self.name}: non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())} at step "
                            f"{step}; stopped, nothing published; {last}")
