"""Faults: every stage SIGKILLed at a random point, a crashed rank, a full or read-only disk.

1. One fresh tiny project (TINY + TINY_DAG). Every stage of its DAG, as `dvc repro` resolves
   dvc.yaml (`train@digit`, `decode@vqgan`, ...: helpers.dvc_stages, so a new stage joins by
   itself), is killed while running. `dvc repro` runs in its own session; once the next stage still
   to be killed has run for a seeded random delay (uniform in [0, its expected wall time]) the whole
   process group (dvc and the stage: a user killing the job) gets SIGKILL, and the next `dvc repro`
   goes on. A stage's expected wall time ("Running stage" to the next) is observed at run time: what
   this campaign measured when the stage last ran to the end, else the measured TYPICAL time scaled by
   how much slower than TYPICAL the last few stages ran here (a stage TYPICAL does not list yet gets
   its longest entry). Every training stage (one whose command takes `--checkpoints`) is killed a second
   time as soon as its run has published a checkpoint or resumed from one, so a resume is always
   exercised. A stage that finished before its kill landed (or whose process was gone, dvc still
   hashing) is tried again, with half the delay, by `dvc repro -f -s STAGE` when nothing else reruns it.
   After every kill, DVC may take as complete only what equals the
   uninterrupted run (`full_repo`, built meanwhile when this file runs alone):
   a stage `dvc status` calls up to date has the uninterrupted run's output
   hashes, an output of the killed stage is absent or complete, and temporary
   siblings are never at a declared path. (DVCLive logs, metrics and plots with
   cache: false, grow during a run by design: after a kill they hold the steps
   so far, and DVC reruns the stage, since dvc.lock has no entry for this run.)
   A last `dvc repro` must then finish with the uninterrupted run's outputs:
   every cached output equal (weights within 1e-6, the tolerance of the resume
   tests; on CPU they are in fact bitwise equal), token files and samples byte
   for byte, reports/metrics.json key for key, and no temporary leftovers.

   After a SIGKILL, DVC's repo lock (fcntl) is released by the kernel, and
   `.dvc/tmp/rwlock` entries of dead PIDs are dropped by the next dvc command,
   once the killed dvc is reaped (a zombie counts as alive). But DVC 3.x
   rewrites dvc.lock in place after each stage: a kill in that window leaves it
   empty, and every dvc command then fails ("'./dvc.lock' validation failed").
   The fix, done here as a user would (status_after_kill): remove it; `dvc repro`
   then checks finished stages out of the run cache. Each such repair is listed
   in the printed kill table. DIGIT_FAULT_SEED (default 0) picks other delays.
   The reruns use --no-run-cache, so a killed stage really runs again instead
   of being checked out of DVC's run cache; after its checkpoint kill a training
   is rerun at once with `dvc repro -f -s`, and must resume and finish. (Without
   -f, a stage whose older dvc.lock entry still matches is checked out of the
   cache, not run: a killed training's checkpoint folder then stays behind,
   harmless, since a later run with the same fingerprint resumes from it.)

2. A rank of a two-process `extract` / `sample` (torchrun on CPU) is SIGKILLed
   mid-way: the command fails, torchrun's report names rank 1 as the root
   cause, nothing (or only the previous complete output) is at the output path,
   and a rerun matches a clean run.

3. An output that cannot be written (file-size limit, full or read-only file
   system, a regular file where a directory should be) stops the stage with one
   line naming the path and the fix, exit status 1, no traceback, and nothing
   half-written left behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, TINY, TINY_DAG, _merge, dvc, make_project, needs_fmnist, sh, update_params
from helpers import dvc_stages, entry_modules, stage_cmd, torchrun

pytestmark = [needs_fmnist]

SEED = int(os.environ.get("DIGIT_FAULT_SEED", "0"))
# Wall seconds of each stage of the tiny DAG ("Running stage" to the next), uninterrupted, 2 CPU cores with
# OMP_NUM_THREADS=1 (107 s in all). Only a prior for a stage's first kill: the campaign rescales it to how fast
# the machine runs now and replaces it by what it observes (Timing); its report prints the observed times.
TYPICAL = {"prepare": 3.8, "train_encoder": 5.0, "extract": 6.3, "codebook": 2.0, "tokenize": 2.5, "reference": 9.1,
           "train_vqgan": 8.5, "vq_tokenize": 2.5, "train@digit": 4.2, "train@vq": 4.2, "sample@digit": 2.3, "sample@vq": 2.2,
           "probe@digit": 4.1, "probe@vq": 3.8, "train_decoder": 8.5, "train_stage2@ar": 8.1, "decode@direct": 3.3,
           "decode@stage2_ar": 3.4, "decode@vqgan": 3.3, "score@direct": 6.2, "score@stage2_ar": 6.2,
           "score@vqgan": 6.3, "stability": 5.9, "evaluate": 0.5}
WEIGHT_ATOL = 1e-6  # resumed vs uninterrupted weights, as in the resume tests
TMP = re.compile(r"\.tmp(-|$)")
RESUMED = re.compile(r"^(\S+): resumed from \S+/step_\d+\s*$", re.M)  # digit.trainer's line on a resume


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG as `dvc repro` runs it."""

    name: str  # as `dvc repro` takes it: train@digit
    module: str  # the project module its command runs: stages.train
    trains: bool  # a training stage: writes checkpoints (its command takes --checkpoints), resumes from them
    outs: tuple[tuple[str, bool], ...]  # (path, cached) of every outs / metrics / plots entry


def dag(repo: Path) -> dict[str, Stage]:
    """Every stage of the project at `repo` (foreach expanded, as DVC resolves dvc.yaml), in dvc.yaml order."""
    outs = declared_outs(repo)
    root = Path(repo).resolve()
    # train_encoder trains (and checkpoints) only with encoder.weights=trained; otherwise it records the frozen
    # encoder in seconds (its kill-and-resume with a trained ViT: tests/test_train_encoder.py).
    frozen = yaml.safe_load((root / "params.yaml").read_text())["encoder"]["weights"] != "trained"
    stages = {}
    for info in dvc_stages(root):
        entries = entry_modules(info.cmd, root)
        assert len(entries) == 1, f"{info.name}: expected one project module in {info.cmd!r}, got {entries}"
        module = ".".join(entries[0].relative_to(root).with_suffix("").parts)
        trains = "--checkpoints" in info.cmd.split() and not (module == "stages.train_encoder" and frozen)
        stages[info.name] = Stage(info.name, module, trains, tuple(outs[info.name]))
    return stages


def declared_outs(repo: Path) -> dict[str, list[tuple[str, bool]]]:
    """stage -> [(path, cached)] for every outs / metrics / plots entry, foreach expanded (DVC's own resolution)."""
    from dvc.repo import Repo

    root = Path(repo).resolve()
    with Repo(str(root)) as dvc_repo:
        return {stage.name: [(Path(os.path.relpath(Path(stage.wdir) / str(out.def_path), root)).as_posix(),
                              out.use_cache) for out in stage.outs]
                for stage in dvc_repo.index.stages}


def lock_hashes(repo: Path) -> dict[str, dict[str, str]]:
    path = repo / "dvc.lock"
    lock = yaml.safe_load(path.read_text()) if path.is_file() else None
    return {stage: {out["path"]: out.get("md5") for out in entry.get("outs", [])}
            for stage, entry in ((lock or {}).get("stages") or {}).items()}


def dvc_status(repo: Path) -> dict:
    proc = sh([sys.executable, "-m", "dvc", "status", "--json"], repo, env={"PYTHONPATH": str(repo)})
    return json.loads(proc.stdout or "{}")


def differs(a: Path, b: Path) -> str | None:
    """None when a and b hold the same output (safetensors weights within WEIGHT_ATOL), else what differs."""
    if a.is_dir() != b.is_dir():
        return f"{a} is {'a directory' if a.is_dir() else 'a file'}, {b} is not"
    if a.is_dir():
        files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
        files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
        if files_a != files_b:
            return f"files {sorted(set(files_a) ^ set(files_b))} are in one only"
        return next((f"{rel}: {d}" for rel in files_a if (d := differs(a / rel, b / rel))), None)
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix == ".safetensors":
        ta, tb = load_file(str(a)), load_file(str(b))
        if ta.keys() != tb.keys():
            return "different tensors"
        worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)
        return None if worst <= WEIGHT_ATOL else f"weights differ by up to {worst:.3g}"
    return "bytes differ"


def tmp_leftovers(repo: Path) -> list[str]:
    found = []
    for top in ("data", "models", "reports", "checkpoints"):
        if (repo / top).is_dir():
            found += [str(p.relative_to(repo)) for p in (repo / top).rglob("*") if TMP.search(p.name)]
    return sorted(found)


def checkpoint_dirs(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo / "checkpoints")) for p in (repo / "checkpoints").glob("*/step_*"))


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of process `root` (from /proc)."""
    parent, cmdline = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child in (c for c, p in parent.items() if p == pid):
            found[child] = cmdline.get(child, "")
            todo.append(child)
    return found


def runs_module(root: int, module: str) -> bool:
    """Whether a live descendant of `root` runs `python -m module` (the stage process, or the shell starting it)."""
    pattern = re.compile(rf"-m {re.escape(module)}(\s|$)")
    return any(pattern.search(cmd) for cmd in descendants(root).values())


class Repro:
    """`dvc repro` in its own session (process group); a thread notes when each stage starts, and resumes."""

    RUNNING = re.compile(r"Running stage '([^']+)'")

    def __init__(self, repo: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", *args], cwd=repo, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.order: list[str] = []
        self.started: dict[str, float] = {}
        self.resumed: set[str] = set()  # stages whose training resumed from a checkpoint in this run
        self.ended: float | None = None  # when dvc closed its output
        self.returncode: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            now = time.monotonic()
            self.lines.append(line)
            if match := self.RUNNING.match(line):
                self.started[match[1]] = now
                self.order.append(match[1])
            elif self.order and RESUMED.match(line):
                self.resumed.add(self.order[-1])
        self.ended = time.monotonic()

    @property
    def current(self) -> str | None:
        return self.order[-1] if self.order else None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def durations(self) -> dict[str, float]:
        """Wall seconds of each stage this run saw to the end: "Running stage" to the next, or to dvc's exit."""
        ends = [self.started[name] for name in self.order[1:]]
        if self.returncode == 0 and self.ended is not None:
            ends.append(self.ended)
        return {name: end - self.started[name] for name, end in zip(self.order, ends)}

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.returncode = self.proc.wait()  # reaped: the next dvc sees the PID in its rwlock as dead
        self.thread.join(30)

    def wait(self, timeout: float = 900) -> int:
        self.returncode = self.proc.wait(timeout)
        self.thread.join(30)
        return self.returncode


class Timing:
    """A stage's expected wall time: what it last took to the end in this campaign, else its TYPICAL time
    (the longest TYPICAL time for a stage it does not list) times how much slower than TYPICAL this machine
    ran the last few stages (the median ratio: the load changes, e.g. once the reference run is built)."""

    RECENT = 5

    def __init__(self):
        self.observed: dict[str, float] = {}
        self.ratios: list[float] = []  # observed / TYPICAL, in the order seen

    def note(self, run: Repro) -> None:
        for name, seconds in run.durations().items():
            if name in run.resumed:  # a training that resumed did only part of its run
                continue
            self.observed[name] = seconds
            if name in TYPICAL:
                self.ratios.append(seconds / TYPICAL[name])

    def expected(self, stage: str) -> float:
        if stage in self.observed:
            return self.observed[stage]
        speed = statistics.median(self.ratios[-self.RECENT:]) if self.ratios else 1.0
        return TYPICAL.get(stage, max(TYPICAL.values())) * speed


@dataclass
class Kill:
    stage: str
    mode: str = "random"  # or "checkpoint": once the run has published a checkpoint or resumed from one
    scale: float = 1.0  # of the stage's expected time; halved after each miss


# ----------------------------------------------------------------------------- 1. SIGKILL every stage


def inspect_after_kill(repo: Path, outs: dict, stage: str, record: dict, keep: Path) -> set[str]:
    """Note what a kill left and what DVC takes as complete; return the stages `dvc status` says must run.

    Checked against the uninterrupted run later (verify_kill): the reference may still be building.
    """
    record["on_disk"] = {path: (repo / path).exists() for path, _ in outs[stage]}
    record["tmp"] = tmp_leftovers(repo)
    record["checkpoints"] = checkpoint_dirs(repo)
    status, record["dvc_repair"] = status_after_kill(repo)
    changed = set(status)
    record["stale_per_dvc"] = stage in changed
    ours = lock_hashes(repo)
    record["complete_per_dvc"] = {name: {path: ours[name][path] for path, cached in entries if cached}
                                  for name, entries in outs.items() if name not in changed}
    record["kept"] = {}
    for path, cached in outs[stage]:
        if cached and (repo / path).exists():  # only when killed between publishing and dvc.lock
            copy = keep / path
            copy.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (repo / path).is_dir() else shutil.copy2)(repo / path, copy)
            record["kept"][path] = str(copy)
    return changed


def status_after_kill(repo: Path) -> tuple[dict, list[str]]:
    """`dvc status`, after doing what a user must when the kill hit DVC rewriting its own files.

    DVC 3.x rewrites dvc.lock and .dvc/tmp/rwlock in place (open "w+", then dump), so a SIGKILL in that
    window leaves them empty or cut, and every dvc command then fails ("'dvc.lock' validation failed",
    "Unable to read RWLock-file"). Removing the file is the fix: without dvc.lock every stage is
    stale, and `dvc repro` checks the finished ones out of the run cache instead of running them.
    """
    done = []
    for _ in range(3):
        proc = sh([sys.executable, "-m", "dvc", "status", "--json"], repo, check=False,
                  env={"PYTHONPATH": str(repo)})
        if proc.returncode == 0:
            return json.loads(proc.stdout or "{}"), done
        broken = ("dvc.lock" if "dvc.lock" in proc.stderr else
                  ".dvc/tmp/rwlock" if "RWLock-file" in proc.stderr else None)
        assert broken, f"dvc status failed after a kill:\n{proc.stderr}"
        size = (repo / broken).stat().st_size
        (repo / broken).unlink()
        done.append(f"{broken} ({size} bytes) removed: {proc.stderr.strip().splitlines()[0]}")
    raise AssertionError(f"dvc status still fails: {done}")


def verify_kill(record: dict, outs: dict, reference: Path) -> None:
    """What DVC would take as complete after the kill is the uninterrupted run's; nothing partial is in place."""
    stage, theirs = record["stage"], lock_hashes(reference)
    for name, hashes in record["complete_per_dvc"].items():
        for path, md5 in hashes.items():  # bitwise: a CPU run repeats exactly, resumed or not
            assert md5 == theirs[name][path], (
                f"after killing {stage}: DVC takes {name}'s {path} as complete, but it is not the uninterrupted "
                f"run's ({md5} vs {theirs[name][path]})")
    for path, copy in record["kept"].items():
        problem = differs(Path(copy), reference / path)
        assert not problem, f"after killing {stage}: a partial {path} is at the output path: {problem}"
    declared = [p for spec in outs.values() for p, _ in spec]
    for path in record["tmp"]:  # temporary siblings are never where DVC or a stage looks
        assert all(path != p and not path.startswith(p + "/") for p in declared), path


def kill_campaign(repo: Path, stages: dict[str, Stage], rng: random.Random, keep: Path,
                  stop: threading.Event) -> tuple:
    """Kill every stage (and each training after a checkpoint) once, then repro to the end: (records, logs)."""
    outs = {name: list(stage.outs) for name, stage in stages.items()}
    pending = []
    for name, stage in stages.items():
        pending += [Kill(name)] + ([Kill(name, "checkpoint")] if stage.trains else [])
    timing = Timing()
    records: list[dict] = []
    logs: list[str] = []
    changed, repaired = set(stages), False
    for attempt in range(8 + 3 * len(pending)):
        if not pending or stop.is_set():
            break
        first = pending[0].stage
        # --no-run-cache: a stale stage really runs (a killed training resumes to the end) rather than
        # being checked out of the run cache, except right after dvc.lock had to go (see status_after_kill).
        args = () if repaired else ("--no-run-cache",)
        run = Repro(repo, *args, *(() if first in changed else ("-f", "-s", first)))
        armed, delay, expected, seen, killed, before = None, 0.0, 0.0, set(), None, set()
        while run.proc.poll() is None:
            stage = run.current
            if stop.is_set():
                run.kill()
                return records, logs
            if armed is not None and stage != armed.stage:
                records.append({"stage": armed.stage, "mode": armed.mode, "delay": delay, "expected": expected,
                                "result": "finished first"})
                armed.scale /= 2
                armed = None
            if armed is None and stage is not None and stage not in seen:
                seen.add(stage)
                armed = next((k for k in pending if k.stage == stage), None)
                expected = timing.expected(stage)
                delay = rng.uniform(0, expected * armed.scale) if armed and armed.mode == "random" else 0.0
                before = set(checkpoint_dirs(repo))
            if armed is not None:
                # "checkpoint": once this run has published a checkpoint, or resumed from one.
                ready = (bool(set(checkpoint_dirs(repo)) - before) or stage in run.resumed
                         if armed.mode == "checkpoint" else time.monotonic() - run.started[stage] >= delay)
                if ready:
                    alive = runs_module(run.proc.pid, stages[stage].module)
                    at = time.monotonic() - run.started[stage]
                    run.kill()
                    killed = armed
                    break
            time.sleep(0.005)
        logs.append(run.output)
        if killed is None:
            assert run.wait() == 0, f"dvc repro failed:\n{run.output[-5000:]}"
            timing.note(run)
            if armed is not None:  # the run's last stage finished before its kill
                records.append({"stage": armed.stage, "mode": armed.mode, "delay": delay, "expected": expected,
                                "result": "finished first"})
                armed.scale /= 2
            changed, repaired = set(dvc_status(repo)), False
            continue
        timing.note(run)  # the stages before the killed one ran to the end
        record = {"stage": killed.stage, "mode": killed.mode, "delay": delay, "expected": expected, "at": at,
                  "stage_process_alive": alive}
        changed = inspect_after_kill(repo, outs, killed.stage, record, keep / str(attempt))
        repaired = bool(record["dvc_repair"])
        if alive:  # (DVC may still call it done: if its outputs were complete and as in dvc.lock, see verify_kill)
            record["result"] = "killed"
            pending.remove(killed)
            if killed.mode == "checkpoint":
                # Rerun it now, forced: with an older dvc.lock entry, a plain repro would check the old
                # outputs out of the cache instead of resuming.
                resume = Repro(repo, "-f", "-s", killed.stage)
                assert resume.wait() == 0, resume.output[-5000:]
                logs.append(resume.output)
                assert killed.stage in resume.resumed and resumed_to_the_end(resume.output), resume.output[-5000:]
                record["resumed"] = True
                changed = set(dvc_status(repo))
        else:  # the stage had finished; dvc was still hashing, caching or writing dvc.lock
            record["result"] = "after stage"
            killed.scale /= 2
        records.append(record)
    assert not pending, f"never killed: {pending}\n{format_kills(records)}"
    final = Repro(repo)
    assert final.wait() == 0, final.output[-5000:]
    logs.append(final.output)
    timing.note(final)
    records.append({"observed": timing.observed})
    return records, logs


def test_the_campaign_covers_every_stage_of_the_dag():
    """Quick: the stage list, the process each kill looks for and the training stages all come from dvc.yaml."""
    stages = dag(ROOT)
    assert set(stages) == {s.name for s in dvc_stages(ROOT)}
    assert {"prepare", "train@digit", "train@vq", "decode@vqgan", "score@direct", "evaluate"} <= set(stages)
    assert stages["train@vq"].module == "stages.train" and stages["decode@stage2_ar"].module == "stages.decode"
    assert {"train_vqgan", "train@digit", "train@vq", "train_decoder", "train_stage2@ar"} <= {
        name for name, stage in stages.items() if stage.trains}
    assert not stages["sample@digit"].trains and not stages["score@vqgan"].trains
    assert not stages["train_encoder"].trains  # the default encoder is frozen: nothing to checkpoint
    assert ("models/gpt/vq", True) in stages["train@vq"].outs
    assert ("reports/score/vqgan.json", False) in stages["score@vqgan"].outs
    # The prior names no stage that is gone (a renamed stage would silently fall back to the default).
    assert set(TYPICAL) <= set(stages), set(TYPICAL) - set(stages)


@pytest.mark.slow
def test_sigkill_at_random_points_of_every_stage_then_repro_matches_uninterrupted(request, tmp_path):
    started = time.monotonic()
    repo = make_project(tmp_path / "repo", _merge(TINY, TINY_DAG))
    stages = dag(repo)
    outs = {name: list(stage.outs) for name, stage in stages.items()}
    result: dict = {}
    stop = threading.Event()

    def campaign():
        try:
            result["records"], result["logs"] = kill_campaign(repo, stages, random.Random(SEED), tmp_path / "kept",
                                                              stop)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=campaign, daemon=True)
    thread.start()
    try:  # the uninterrupted run, built meanwhile when no other test has needed it yet
        full_repo = request.getfixturevalue("full_repo")
    except BaseException:
        stop.set()
        thread.join()
        raise
    thread.join()
    if "error" in result:
        raise result["error"]
    records = result["records"]
    report = format_kills(records, time.monotonic() - started)
    print(report)
    (tmp_path / "kills.txt").write_text(report + "\n")
    if os.environ.get("DIGIT_FAULT_REPORT"):
        Path(os.environ["DIGIT_FAULT_REPORT"]).write_text(report + "\n")
    records = [r for r in records if "stage" in r]

    # Every stage of the DAG was killed while running; every training resumed from its checkpoint.
    assert {r["stage"] for r in records if r["result"] == "killed"} == set(stages)
    for name, stage in stages.items():
        if stage.trains:
            assert any(r["stage"] == name and r.get("resumed") for r in records), name
    for record in records:
        if "on_disk" in record:
            verify_kill(record, outs, full_repo)

    # The final outputs are the uninterrupted run's.
    assert dvc_status(repo) == {}
    cached = [path for entries in outs.values() for path, is_cached in entries if is_cached]
    for stage, entries in outs.items():
        for path, is_cached in entries:
            if is_cached:
                assert not (problem := differs(repo / path, full_repo / path)), f"{stage} {path}: {problem}"
    files = sorted(str(f.relative_to(full_repo)) for path in cached
                   for f in ([full_repo / path] if (full_repo / path).is_file() else (full_repo / path).rglob("*")))
    tokens = [name for name in files if name.endswith(".parquet")]  # token files and samples, byte for byte
    assert {"data/tokens/train.parquet", "data/tokens/val.parquet", "data/vq_tokens/train.parquet",
            "data/samples/digit/tokens.parquet", "data/samples/vq/tokens.parquet"} <= set(tokens), tokens
    for name in tokens:
        assert (repo / name).read_bytes() == (full_repo / name).read_bytes(), name
    weights = [name for name in files if name.endswith(".safetensors")]  # every model, the trainings' included
    assert {f"models/{m}/model.safetensors" for m in ("gpt/digit", "gpt/vq", "decoder", "vqgan", "stage2_ar")} \
        <= set(weights), weights
    for name in weights:
        ours, theirs = load_file(str(repo / name)), load_file(str(full_repo / name))
        assert ours.keys() == theirs.keys(), name
        for key, tensor in theirs.items():
            torch.testing.assert_close(ours[key], tensor, rtol=0, atol=WEIGHT_ATOL)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics == json.loads((full_repo / "reports/metrics.json").read_text())  # every key, exactly
    # A killed run's temporary sibling is removed by the stage's next run. When DVC instead restores the
    # stage from its run cache (same deps and params as an earlier complete run), the stage does not
    # run and a hidden `.name.tmp-*` sibling can stay: never at a declared output path, and the stage's
    # next run removes it.
    owners = {}
    for leftover in tmp_leftovers(repo):
        parent, name = Path(leftover).parent, Path(leftover).name
        owner = [stage for stage, entries in outs.items() for path, _ in entries
                 if Path(path).parent == parent and name.startswith(f".{Path(path).name}.tmp-")]
        assert name.startswith(".") and owner, f"{leftover}: not a temporary sibling of a declared output"
        owners[owner[0]] = leftover
    for stage in owners:
        dvc(f"repro -f -s {stage}", repo)
    assert tmp_leftovers(repo) == [], owners
    assert checkpoint_dirs(repo) == []  # the resumed trainings finished and removed their checkpoints


def resumed_to_the_end(log: str) -> bool:
    """A training resumed from a checkpoint in this `dvc repro` output, and finished."""
    match = RESUMED.search(log)
    return match is not None and re.search(r"^(Running stage '|Updating lock file|Stage '|Use `dvc push`)",
                                           log[match.end():], re.M) is not None


def format_kills(records: list[dict], seconds: float | None = None) -> str:
    lines = [f"fault injection, seed {SEED}" + (f", {seconds:.0f} s:" if seconds else ":")]
    width = max([len(r["stage"]) for r in records if "stage" in r] + [14])
    for r in records:
        if "observed" in r:  # a fresh TYPICAL table, if the DAG or the machine changed
            lines.append("  observed wall s: " + ", ".join(f"{k!r}: {v:.1f}" for k, v in r["observed"].items()))
            continue
        where = f"delay {r['delay']:5.2f} s of {r['expected']:5.2f}"
        if "at" in r:
            where += f", killed at {r['at']:5.2f} s, stage process {'alive' if r['stage_process_alive'] else 'gone'}"
        disk = ""
        if "on_disk" in r:
            present = [p for p, there in r["on_disk"].items() if there]
            disk = (f"; outputs present: {present or 'none'}; tmp: {r['tmp'] or 'none'}; "
                    f"checkpoints: {r['checkpoints'] or 'none'}")
            disk += "".join(f"; {note}" for note in r["dvc_repair"])
        if "stale_per_dvc" in r:
            disk += "; dvc status: " + ("stale" if r["stale_per_dvc"] else "up to date")
        if r.get("resumed"):
            disk += "; then `dvc repro -f -s`: resumed and finished"
        lines.append(f"  {r['stage']:<{width}} {r['mode']:<10} {r['result']:<15} {where}{disk}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. a rank crashes


def rank_pid(launcher: int, rank: int) -> int | None:
    """The worker process of `rank` started by torchrun (each worker has a session of its own)."""
    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


def kill_rank_when(cmd: list[str], cwd: Path, ready, rank: int = 1, timeout: float = 180) -> tuple[int, str]:
    """Run a torchrun command; SIGKILL worker `rank` once ready() is true; return (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        if ready() and (pid := rank_pid(proc.pid, rank)) is not None:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    try:
        rc = proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        pytest.fail(f"{cmd} hung after rank {rank} was killed:\n{''.join(lines)[-3000:]}")
    reader.join(30)
    output = "".join(lines)
    assert killed, f"rank {rank} was never killed (the run ended first):\n{output[-3000:]}"
    return rc, output


def names_failed_rank(output: str, rank: int) -> bool:
    """torchrun's ChildFailedError report gives the killed rank as the root cause (the others get SIGTERM)."""
    return re.search(rf"Root Cause \(first observed failure\):\s*\[0\]:(?:\n.*){{0,3}}\n\s*rank\s*:\s*{rank} "
                     r"\(local_rank: \d+\)\n\s*exitcode\s*:\s*-9", output) is not None


@pytest.mark.slow
def test_a_killed_rank_fails_extract_and_publishes_no_partial_shard_set(full_repo, tmp_path):
    out = tmp_path / "features"
    args = ("--params", str(full_repo / "params.yaml"), "--images", str(full_repo / "data/images"),
            "--out", str(out), "--report", str(tmp_path / "extract.json"))
    # Rank 1 takes train shards 1 and 3: kill it while it writes the first.
    rc, output = kill_rank_when(stage_cmd("extract", *args, launcher=torchrun()), tmp_path,
                                lambda: any(tmp_path.glob(".features.tmp-*/train-000001.tar")))
    assert rc != 0, output
    assert names_failed_rank(output, 1), output[-3000:]
    assert not out.exists() and not (tmp_path / "extract.json").exists()

    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sh(stage_cmd("extract", *args, launcher=torchrun()), tmp_path, env=env)
    assert not list(tmp_path.glob(".features.tmp-*"))  # the killed run's temporary folder is gone
    # A clean run the same way (the thread count moves fp16 features by an ulp, so not full_repo's).
    clean = tmp_path / "clean"
    sh(stage_cmd("extract", *args[:-4], "--out", str(clean), "--report", str(tmp_path / "clean.json"),
                 launcher=torchrun()), tmp_path, env=env)
    assert not (problem := differs(out, clean)), problem


@pytest.mark.slow
def test_a_killed_rank_fails_sample_and_keeps_the_previous_output(full_repo, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((full_repo / "params.yaml").read_text())
    update_params(params, {"sample": {"num_per_class": 10, "batch_size": 2}})  # 50 batches: time to kill rank 1
    out = tmp_path / "samples.parquet"
    args = ("--params", str(params), "--model", str(full_repo / "models/gpt/digit"), "--out", str(out))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # (a busy CPU makes idle OpenMP threads spin)
    sh(stage_cmd("sample", *args), tmp_path, env=env)
    clean = out.read_bytes()
    rc, output = kill_rank_when(stage_cmd("sample", *args, launcher=torchrun()), tmp_path,
                                lambda: any(tmp_path.glob(".samples.parquet.tmp-*/part-00001.parquet")))
    assert rc != 0, output
    assert names_failed_rank(output, 1), output[-3000:]
    assert out.read_bytes() == clean  # the previous complete output, untouched

    out.unlink()
    sh(stage_cmd("sample", *args, launcher=torchrun()), tmp_path, env=env)
    assert out.read_bytes() == clean
    assert not list(tmp_path.glob(".samples.parquet.tmp-*"))


# ----------------------------------------------------------------------------- 3. disk full, read-only


def stage_proc(stage: str, cwd: Path, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """Run a stage of this checkout, optionally under RLIMIT_FSIZE (writes past it fail with EFBIG:
    Python ignores SIGXFSZ)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(stage_cmd(stage, *args), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=limit if fsize else None,
                          timeout=300)


def expect_write_error(proc, path: Path | str, reason: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"error: cannot write {path}: {reason};" in proc.stderr, proc.stderr


def nothing_left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_file_size_limit_stops_prepare_with_the_path_and_leaves_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params(tmp_path / "params.yaml", TINY)
    out = tmp_path / "data" / "images"
    proc = stage_proc("prepare", tmp_path, "--out", str(out), "--report", str(tmp_path / "r" / "prepare.json"),
                      fsize=64 << 10)
    expect_write_error(proc, out, "File too large")
    assert "ulimit -f" in proc.stderr
    assert nothing_left(out.parent) == [] and not (tmp_path / "r" / "prepare.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extract", "tokenize", "sample"])
def test_file_size_limit_stops_extract_tokenize_and_sample(full_repo, tmp_path, stage):
    out = tmp_path / "out" / ("samples.parquet" if stage == "sample" else stage)
    report = ("--report", str(tmp_path / "report.json"))
    args = {"extract": ("--images", str(full_repo / "data/images"), *report),
            "tokenize": ("--features", str(full_repo / "data/features"), "--codebook",
                         str(full_repo / "models/codebook"), *report),
            "sample": ("--model", str(full_repo / "models/gpt/digit"))}[stage]
    proc = stage_proc(stage, tmp_path, "--params", str(full_repo / "params.yaml"), *args, "--out", str(out),
                      fsize=512 if stage == "sample" else 4 << 10)  # 20 samples fit in 4 KiB
    expect_write_error(proc, out, "File too large")
    assert nothing_left(out.parent) == [] and not (tmp_path / "report.json").exists()


def test_an_output_under_a_regular_file_is_refused_with_its_path(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params(tmp_path / "params.yaml", TINY)
    (tmp_path / "data").write_text("not a directory")
    for out, reason in ((tmp_path / "data" / "images", "File exists"),
                        (tmp_path / "data" / "sub" / "images", "Not a directory")):
        proc = stage_proc("prepare", tmp_path, "--out", str(out), "--report", str(tmp_path / "prepare.json"))
        expect_write_error(proc, out, reason)
        assert "regular file, not a directory" in proc.stderr
    assert (tmp_path / "data").read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def userns_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not userns_available(), reason="needs `unshare -Urm` (user + mount namespaces)")
@pytest.mark.parametrize("fs, reason", [("full", "No space left on device"), ("read-only", "Read-only file system")])
def test_full_or_read_only_file_system(tmp_path, fs, reason):
    """In a private mount namespace (works as root and as a user): a 96 KiB tmpfs, or a read-only bind mount.

    The full disk is refused by the pre-flight check before a byte is written (both numbers named); a write
    that fails part-way (EFBIG under RLIMIT_FSIZE, above) takes the cleanup path a disk filling up would."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params(tmp_path / "params.yaml", TINY)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "data" / "images"
    mount = (f"mount -t tmpfs -o size=96k tmpfs {mnt}" if fs == "full"
             else f"mount --bind {mnt} {mnt} && mount -o remount,bind,ro {mnt}")
    stage = shlex.join(stage_cmd("prepare", "--out", str(out), "--report", f"{mnt}/prepare.json"))
    # The listing is taken inside the namespace, before its file system goes away.
    script = f"{mount} && {{ {stage}; rc=$?; ls -AR {mnt} > {tmp_path}/listing; exit $rc; }}"
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    if fs == "full":
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert re.search(rf"prepare: 250 images need about [\d.]+ KB at {out}, but its file system has [\d.]+ KB free",
                         proc.stderr), proc.stderr
    else:
        expect_write_error(proc, out, reason)
    listing = (tmp_path / "listing").read_text().split()
    assert all(not TMP.search(name) and not name.endswith(".tar") for name in listing), listing


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (see the read-only test)")
def test_unwritable_directory(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params(tmp_path / "params.yaml", TINY)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = stage_proc("prepare", tmp_path, "--out", str(locked / "images"), "--report", str(locked / "p.json"))
        expect_write_error(proc, locked / "images", "Permission denied")
        assert nothing_left(locked) == []
    finally:
        locked.chmod(0o755)
