"""Benchmark: peak memory of the data stages does not grow with the number of images.

Synthetic data, no encoder: random float16 feature grids [7, 7, D] with labels
over 10 classes are written as feature shards with the manifest `extract`
writes, for each size N (N images in all: 90% train, 10% val). Then, each in a
fresh interpreter so its peak RSS is its own (os.wait4 rusage of that child):

- codebook   `python -m stages.codebook`, K-Means on a fixed codebook.max_points
             sample (memory is bounded by the sample, not by N)
- tokenize   `python -m stages.tokenize`: every patch of both splits -> Parquet
- gpt-data   one full epoch of digit.tokens.TokenBatches over train.parquet
             (the `train` stage's data path: batches -> torch tensors)
- sample     `python -m stages.sample` with a tiny random GPT generating N
             sequences (num_per_class = N/10): the number of samples scales with N

The headline is the ratio peak RSS at the largest N / at the smallest N per
stage; streaming means it stays under 1.2 (exit status 1 otherwise).

    python bench/scale.py [--sizes 20000 200000] [--dim 32] [--k 256] [--max-points 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from digit.params import Yaml12Loader  # noqa: E402
from digit.shards import ShardSink, encode_npy, write_manifest  # noqa: E402

GRID = (7, 7)
CLASSES = [f"class{i}" for i in range(10)]
CEILING = 1.2
STAGES = ("codebook", "tokenize", "gpt-data", "sample")

# The `train` stage's data path: one epoch of shuffled batches, as torch tensors.
LOADER = """
import sys, torch
from digit.tokens import TokenBatches
batches = TokenBatches(sys.argv[1], int(sys.argv[2]), seed=0)
rows = total = 0
for labels, tokens in batches.epoch(0):
    labels, tokens = torch.from_numpy(labels), torch.from_numpy(tokens)
    rows += len(labels)
    total += int(tokens[:, 0].sum())
print(f"gpt-data: {rows} rows in {len(batches)} batches (checksum {total})")
"""


def write_features(root: Path, n_images: int, dim: int, shard_size: int = 5000, seed: int = 0) -> dict:
    """Random feature shards + manifest.json, in the format `extract` writes; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_val = n_images // 10
    splits, key = {}, 0
    for split, n in (("train", n_images - n_val), ("val", n_val)):
        with ShardSink(root, split, shard_size) as sink:
            for start in range(0, n, 1000):
                m = min(1000, n - start)
                grids = rng.standard_normal((m, *GRID, dim), dtype=np.float32).astype(np.float16)
                for grid, label in zip(grids, rng.integers(0, len(CLASSES), m)):
                    sink.write({"__key__": f"{split}_{key:08d}", "npy": encode_npy(grid),
                                "cls": str(int(label)).encode()})
                    key += 1
        splits[split] = {"count": n, "counts": sink.counts, "shards": sink.shards}
    manifest = {"encoder": {"name": "synthetic", "weights": "none", "layer": -1, "img_size": 112,
                            "grid": list(GRID), "dim": dim, "stride": 16},
                "weights": "none", "dtype": "float16", "classes": CLASSES, "splits": splits}
    write_manifest(root, manifest)
    return manifest


def write_params(path: Path, changes: dict) -> Path:
    """The repository's params.yaml with `changes` ({section: {key: value}}) applied."""
    params = yaml.load((ROOT / "params.yaml").read_text(), Loader=Yaml12Loader)
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_tiny_gpt(directory: Path, k: int, dim: int) -> None:
    """A random class-conditional GPT for GRID tokens over k codes, saved as `train` saves it."""
    import torch

    from digit.gpt import GPT, GPTConfig
    from digit.training import save_trained

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=k, block_size=GRID[0] * GRID[1] + 1, num_classes=len(CLASSES),
                       n_layer=1, n_head=1, n_embd=16)
    meta = {"grid": list(GRID), "vocab_size": k, "classes": CLASSES,
            "encoder": {"name": "synthetic", "grid": list(GRID), "dim": dim}}
    save_trained(GPT(config), meta, directory)


# Runs `-m module args...` or `script.py args...` and, at exit, records the process's VmHWM (peak RSS).
# The hook is registered first, so it runs after the stage's own atexit handlers but before interpreter
# teardown: `import torch` alone adds a ~130 MB RSS spike while the interpreter shuts down (C++ static
# destructors), the same at any N, which would otherwise only add noise to the comparison.
RUNNER = """
import atexit, runpy, sys
def _peak(path=sys.argv[1]):
    with open('/proc/self/status') as status:
        kib = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(path, 'w') as out:
        out.write(kib)
atexit.register(_peak)
if sys.argv[2] == '-m':
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name='__main__')
"""


def peak_rss(args: list[str], cwd: Path, log: Path, threads: int = 1) -> tuple[float, float, float]:
    """Run `python RUNNER args` in a fresh process: (peak RSS of its work, peak incl. teardown, seconds).

    Both in MiB: VmHWM read by the process at exit, and the os.wait4 rusage
    ru_maxrss of this one child (which also covers interpreter teardown).
    Raises with the log's tail if the command fails.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    hwm = log.with_suffix(".hwm")
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(hwm), *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return int(hwm.read_text()) / 1024, usage.ru_maxrss / 1024, seconds  # both in KiB on Linux


def measure(n_images: int, work: Path, dim: int, k: int, max_points: int, sample_batch: int,
            stages=STAGES, threads: int = 1, log=print) -> dict[str, tuple[float, float]]:
    """Peak RSS (MiB) and seconds of each stage on N synthetic images under `work`."""
    started = time.time()
    features = work / "features"
    if {"codebook", "tokenize"} & set(stages):
        write_features(features, n_images, dim)
        log(f"N={n_images}: wrote features ({time.time() - started:.1f} s, "
            f"{sum(f.stat().st_size for f in features.iterdir()) / 2**20:.0f} MiB)")
    params = write_params(work / "params.yaml", {
        "codebook": {"k": k, "niter": 10, "max_points": max_points, "seed": 0},
        "tokenize": {"batch_size": 256, "row_group_size": 2048},
        "gpt": {"batch_size": 64},
        "sample": {"num_per_class": n_images // len(CLASSES), "batch_size": sample_batch, "temperature": 1.0,
                   "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0, "seed": 0},
    })
    p = ["--params", str(params)]
    loader = work / "loader.py"
    loader.write_text(LOADER)
    commands = {
        "codebook": ["-m", "stages.codebook", *p, "--features", str(features), "--out", str(work / "codebook"),
                     "--report", str(work / "reports" / "codebook.json")],
        "tokenize": ["-m", "stages.tokenize", *p, "--features", str(features), "--codebook",
                     str(work / "codebook"), "--out", str(work / "tokens"),
                     "--report", str(work / "reports" / "tokens.json")],
        "gpt-data": [str(loader), str(work / "tokens" / "train.parquet"), "64"],
        "sample": ["-m", "stages.sample", *p, "--model", str(work / "gpt"), "--out", str(work / "samples.parquet")],
    }
    if "sample" in stages:
        write_tiny_gpt(work / "gpt", k, dim)
    results = {}
    for name in stages:
        rss, with_teardown, seconds = peak_rss(commands[name], work, work / f"{name}.log", threads)
        results[name] = (rss, seconds)
        log(f"N={n_images}: {name:9s} peak RSS {rss:7.1f} MiB ({with_teardown:7.1f} incl. interpreter "
            f"teardown)  {seconds:6.1f} s")
    if "tokenize" in stages:
        import pyarrow.parquet as pq
        rows = pq.ParquetFile(work / "tokens" / "train.parquet").metadata.num_rows
        assert rows == n_images - n_images // 10, (rows, n_images)
    if "sample" in stages:
        import pyarrow.parquet as pq
        rows = pq.ParquetFile(work / "samples.parquet").metadata.num_rows
        assert rows == n_images // len(CLASSES) * len(CLASSES), (rows, n_images)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000], help="numbers of images")
    parser.add_argument("--dim", type=int, default=32, help="feature dimension D")
    parser.add_argument("--k", type=int, default=256, help="codebook size")
    parser.add_argument("--max-points", type=int, default=100_000, help="codebook.max_points")
    parser.add_argument("--sample-batch", type=int, default=2000, help="sample.batch_size")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per stage")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory (default: system temp)")
    args = parser.parse_args()
    for later, earlier in (("tokenize", "codebook"), ("gpt-data", "tokenize")):
        if later in args.stages and earlier not in args.stages:
            parser.error(f"--stages: {later} needs {earlier} (it reads its output)")
    args.stages = [name for name in STAGES if name in args.stages]

    started = time.time()
    table: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in args.stages}
    with tempfile.TemporaryDirectory(prefix="digit-scale-", dir=args.tmp) as tmp:
        for n in args.sizes:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            for name, value in measure(n, work, args.dim, args.k, args.max_points, args.sample_batch,
                                       args.stages, args.threads).items():
                table[name][n] = value
            shutil.rmtree(work)  # keep the disk footprint to one size at a time
    lo, hi = min(args.sizes), max(args.sizes)
    print(f"\npeak RSS (MiB) at {lo} and {hi} images (D={args.dim}, K={args.k}, "
          f"codebook.max_points={args.max_points}; sample: N sequences):")
    print(f"{'stage':10s} {'RSS@' + str(lo):>12s} {'RSS@' + str(hi):>12s} {'ratio':>7s} {'s@' + str(hi):>9s}")
    worst = 0.0
    for name in args.stages:
        a, b = table[name][lo][0], table[name][hi][0]
        worst = max(worst, b / a)
        print(f"{name:10s} {a:12.1f} {b:12.1f} {b / a:7.3f} {table[name][hi][1]:9.1f}")
    print(f"worst ratio {worst:.3f} (ceiling {CEILING}); total {time.time() - started:.0f} s")
    return 0 if worst < CEILING else 1


if __name__ == "__main__":
    sys.exit(main())
