"""Stage `score`: sample quality of one rendered sample set with torch-fidelity -> reports/score/<renderer>.json.

Run once per renderer (`score@direct`, `score@stage2_ar`, `score@vqgan`): FID and KID of
data/renders/<renderer>/ against the cached val reference set; IS only when the Inception
weights have their classifier (the offline weights do not: `isc_mean` is then null and
`isc_unavailable` says why). `fid_floor` is the FID of real train images (same count and
class mix as the samples, from data/reference/train.npz) against the same reference: what
a perfect generator would score at this sample size. `--ceiling` names the renderer's own
training report (dvc.yaml `vars.renderers.<r>.ceiling`): its rFID/PSNR/SSIM on real val tokens are
copied beside the sample scores, so `evaluate` needs no renderer list of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from digit.atomic import write_json
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.fid import InceptionFeatures, load_features, sample_metrics
from digit.params import load_params


def load_samples(directory: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path}: missing; run `dvc repro decode`")
    manifest = json.loads(manifest_path.read_text())
    images = []
    for entry in tqdm(manifest["images"], desc="load samples", unit="img", leave=False):
        with Image.open(directory / entry["file"]) as img:
            images.append(np.asarray(img.convert("RGB")))
    return np.stack(images), np.array([e["label"] for e in manifest["images"]]), manifest


def floor_subset(pool: dict, labels: np.ndarray) -> dict:
    """Real train features with the samples' class counts (the first of each class in the pool)."""
    need = np.bincount(labels, minlength=int(pool["labels"].max()) + 1)
    picked = []
    for c, n in enumerate(need):
        have = np.flatnonzero(pool["labels"] == c)
        if len(have) < n:
            raise ConfigError(f"evaluate.floor_pool: the cached train pool has {len(have)} images of class {c} "
                              f"but the samples have {n}; raise evaluate.floor_pool to at least the number of "
                              f"samples ({len(labels)}), or sample fewer")
        picked.append(have[:n])
    index = np.concatenate(picked)
    return {k: (v[index] if v is not None else None) for k, v in pool.items()}


def read_ceiling(path: Path) -> dict:
    """The renderer's reconstruction of real val tokens (its ceiling): rfid, psnr, ssim."""
    if not path.is_file():
        raise ConfigError(f"--ceiling {path}: missing; run `dvc repro` for the stage that trains this renderer")
    report = json.loads(path.read_text())
    missing = [k for k in ("rfid", "psnr", "ssim") if k not in report]
    if missing:
        raise ConfigError(f"--ceiling {path}: has no {', '.join(missing)}; it must be a renderer's training report "
                          "(reports/decoder.json, reports/stage2_<kind>.json or reports/vqgan.json)")
    return {k: report[k] for k in ("rfid", "psnr", "ssim")}


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--samples", default="data/renders/direct")
    parser.add_argument("--reference", default="data/reference")
    parser.add_argument("--report", default="reports/score/direct.json")
    parser.add_argument("--ceiling", default="reports/decoder.json",
                        help="the renderer's training report (rFID/PSNR/SSIM of real val tokens rendered)")
    args = parser.parse_args()
    cfg = load_params(args.params)["evaluate"]
    ceiling = read_ceiling(Path(args.ceiling))
    extractor = InceptionFeatures(cfg["inception_weights"])  # resolves and checks the weights first
    reference = load_features(Path(args.reference) / "val.npz")
    pool = load_features(Path(args.reference) / "train.npz")
    images, labels, manifest = load_samples(Path(args.samples))
    floor = floor_subset(pool, labels)  # checked before the slow Inception pass
    feats = extractor(images, batch_size=cfg["batch_size"], desc=f"score {manifest.get('renderer')}")
    scores = sample_metrics(feats, reference, cfg["kid_subset_size"], cfg["kid_subsets"], cfg["seed"])
    floor_scores = sample_metrics(floor, reference, cfg["kid_subset_size"], cfg["kid_subsets"], cfg["seed"])
    report = {
        "renderer": manifest.get("renderer"), "tokenizer": manifest.get("tokenizer", "discriminative"),
        "fid": scores["fid"], "kid_mean": scores["kid_mean"], "kid_std": scores["kid_std"],
        "fid_floor": floor_scores["fid"], "kid_floor": floor_scores["kid_mean"],
        "isc_mean": scores["isc_mean"], "isc_std": scores["isc_std"],
        "num_samples": int(len(images)), "num_reference": int(len(reference["pool"])),
        "ceiling": ceiling,
    }
    if scores["isc_mean"] is None:
        report["isc_unavailable"] = scores["isc_unavailable_reason"]
    write_json(args.report, report)
    print(f"score ({report['renderer']}): FID {report['fid']:.3f} (floor {report['fid_floor']:.3f}), "
          f"KID {report['kid_mean']:.5f}, {len(images)} samples vs {report['num_reference']} real -> {args.report}")


if __name__ == "__main__":
    run(main)
