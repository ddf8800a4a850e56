"""Stage `evaluate`: sample quality with torch-fidelity, and every headline number in reports/metrics.json.

FID and KID of data/samples/images against the cached val reference set;
IS only when the Inception weights have their classifier (the offline
weights do not: `isc_mean` is then null and `isc_unavailable` says why).
`fid_floor` is the FID of real train images (same count and class mix as the
samples, from data/reference/train.npz) against the same reference: what a
perfect generator would score at this sample size. The file is written
through DVCLive, so `dvc exp show` lists fid beside train/val loss, probe top-1,
how the samples were tokenized and rendered (tokenizer_kind, decoder_kind) and the reconstruction PSNR/SSIM/rFID of that path (decoder_*) and of
every path (rec.direct, rec.vqgan, rec.stage2_ar, rec.stage2_nar), copied from
their reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dvclive import Live
from PIL import Image
from tqdm import tqdm

from digit.cli import require_git_commit, run, stage_parser
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


def read_report(path: Path, *keys: str):
    """A nested value from another stage's JSON report, or None when the report is absent."""
    if not path.is_file():
        return None
    value = json.loads(path.read_text())
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--samples", default="data/samples/images")
    parser.add_argument("--reference", default="data/reference")
    parser.add_argument("--reports", default="reports",
                        help="reports of train, probe, train_decoder, train_vqgan, train_stage2_*")
    parser.add_argument("--live", default="reports", help="DVCLive directory: writes <live>/metrics.json")
    args = parser.parse_args()
    require_git_commit()
    cfg = load_params(args.params)["evaluate"]
    extractor = InceptionFeatures(cfg["inception_weights"])  # resolves and checks the weights first
    reference = load_features(Path(args.reference) / "val.npz")
    pool = load_features(Path(args.reference) / "train.npz")
    images, labels, manifest = load_samples(Path(args.samples))
    floor = floor_subset(pool, labels)  # checked before the slow Inception pass
    feats = extractor(images, batch_size=cfg["batch_size"], desc="evaluate samples")
    scores = sample_metrics(feats, reference, cfg["kid_subset_size"], cfg["kid_subsets"], cfg["seed"])
    floor_scores = sample_metrics(floor, reference, cfg["kid_subset_size"], cfg["kid_subsets"], cfg["seed"])

    reports = Path(args.reports)
    metrics = {
        "fid": scores["fid"], "fid_floor": floor_scores["fid"],
        "kid_mean": scores["kid_mean"], "kid_std": scores["kid_std"], "kid_floor": floor_scores["kid_mean"],
        "isc_mean": scores["isc_mean"], "isc_std": scores["isc_std"],
        "num_samples": int(len(images)), "num_reference": int(len(reference["pool"])),
        "train_loss": read_report(reports / "train" / "metrics.json", "train", "loss"),
        "val_loss": read_report(reports / "train" / "metrics.json", "val", "loss"),
        "probe_top1": read_report(reports / "probe.json", "best_val_top1"),
    }
    # How the samples were rendered, and the reconstruction quality of that path (decoder_*) and of every
    # path side by side (rec/<kind>/*: DiGIT tokens of real val images -> pixels; vqgan = VQ tokens -> pixels).
    renderer = manifest.get("renderer", "direct")
    metrics["tokenizer_kind"] = manifest.get("tokenizer", "discriminative")
    metrics["decoder_kind"] = renderer
    rec_reports = {"direct": "decoder.json", "vqgan": "vqgan.json", "stage2_ar": "stage2_ar.json",
                   "stage2_nar": "stage2_nar.json"}
    for name in ("psnr", "ssim", "rfid"):
        metrics[f"decoder_{name}"] = read_report(reports / rec_reports[renderer], name)
    # Only measured quantities that repeat exactly: times per image stay in decode.json / stage2_*.json, so the
    # same inputs always give the same metrics.json (parallel experiments, resumed runs: tested).
    rec = {kind: {name: read_report(reports / file, name) for name in ("psnr", "ssim", "rfid")}
           for kind, file in rec_reports.items()}
    if scores["isc_mean"] is None:
        metrics["isc_unavailable"] = scores["isc_unavailable_reason"]
    with Live(args.live, save_dvc_exp=False, dvcyaml=False, report=None) as live:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                live.log_metric(name, value, plot=False)
            else:  # null (IS unavailable, a report missing) or a reason string: kept as is
                live.summary[name] = value
        live.summary["rec"] = rec  # nested: `dvc exp show` lists rec.stage2_ar.rfid etc.
    isc = "n/a" if metrics["isc_mean"] is None else f"{metrics['isc_mean']:.3f}"
    print(f"evaluate: FID {metrics['fid']:.3f} (floor {metrics['fid_floor']:.3f}), KID {metrics['kid_mean']:.5f}, "
          f"IS {isc}, {len(images)} samples vs {metrics['num_reference']} real -> {args.live}/metrics.json")


if __name__ == "__main__":
    run(main)
