"""Time a whole `dvc repro` stage by stage -> reports/times.json (read by `make report`).

Runs `dvc repro` (extra arguments are passed on), stamps each "Running stage" line as it
streams, and writes {"<stage>": seconds, ..., "total": seconds, "install": seconds (with
--install-seconds), "measured": "date, cores, command"}. A stage's time runs from its
"Running stage" line to the next one (or the end), so it includes DVC's own hashing of
its outputs. Run it in a fresh clone after `make setup` for the README's figure:

    python bench/repro_times.py [--install-seconds N] [-- dvc repro args]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RUNNING = re.compile(r"Running stage '([^']+)'")


def machine() -> str:
    """The CPU and whether it computes bf16 natively: `precision: auto` trains in fp32 where it does not."""
    import torch

    from digit.precision import native_bf16

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return (f"{model}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{'bf16' if native_bf16('cpu') else 'no native bf16: trainers in fp32'}")


def matmul_speed(seconds: float = 1.0) -> str:
    """The host's speed when the run starts: a 1024x1024 matmul in fp32 and bf16, best of the repeats that fit in
    `seconds` each. Shared 2-core hosts differ 2x from one hour to the next, so a wall time says little without it."""
    import torch

    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        best, until = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < until:
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        rates.append(2 * 1024 ** 3 / best / 1e9)
    return f"a 1024^2 matmul at {rates[0]:.0f} GFLOP/s fp32, {rates[1]:.0f} bf16 when the run started"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="reports/times.json")
    parser.add_argument("--install-seconds", type=float, default=None, help="time `make setup` took, recorded too")
    parser.add_argument("dvc_args", nargs="*")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "dvc", "repro", *args.dvc_args]
    speed = matmul_speed()
    started = time.perf_counter()
    times: dict[str, float] = {}
    current, since = None, started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1",  # stage commands call `python`: this one
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    for line in proc.stdout:
        sys.stdout.write(line)
        match = RUNNING.search(line)
        if match:
            now = time.perf_counter()
            if current:
                times[current] = round(now - since, 1)
            current, since = match.group(1), now
    if proc.wait() != 0:
        sys.exit(f"dvc repro failed (exit {proc.returncode}); no times written")
    end = time.perf_counter()
    if current:
        times[current] = round(end - since, 1)
    times["total"] = round(end - started, 1)
    if args.install_seconds is not None:
        times["install"] = round(args.install_seconds, 1)
    times["measured"] = (f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores ({machine()}; {speed}), "
                         f"`{' '.join(['dvc', 'repro', *args.dvc_args])}` in a fresh clone")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(times, indent=2) + "\n")
    print(f"repro_times: {len(times) - 2} stages in {times['total']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
