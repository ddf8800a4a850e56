"""Stage `stability`: token change rate and feature cosine under Gaussian noise -> reports/stability.json.

The paper's Table 1 (latent-space stability): val images get Gaussian noise at
each SNR in stability.snr_db, are re-tokenized with the codebook's own encoder
settings, and are compared with the clean tokens/features position by position.
The SNR definition and the measurement are in digit/stability.py; this stage
loads the inputs, runs it and writes the report. DVCLive plots change rate and
cosine vs SNR in reports/stability/plots/custom/.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from digit.atomic import write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.errors import ConfigError
from digit.params import load_params, seed_for
from digit.shards import read_manifest
from digit.stability import (
    check_config, image_batches, load_tokenizer, measure, measure_vq, snr_key, sweep_assigners,
)


def run_stability(cfg: dict, images_dir: str | Path, codebook_dir: str | Path, device: str = "cpu",
                  progress: bool = True, features_dir: str | Path | None = None,
                  vqgan_dir: str | Path | None = None) -> dict:
    """The whole measurement of the `stability` stage for a config dict; returns the report."""
    cfg = check_config(cfg)
    manifest = read_manifest(images_dir)  # fail on a missing input before loading the encoder
    available = int(manifest.get("splits", {}).get("val", {}).get("count", 0))
    encoder, assign, info = load_tokenizer(codebook_dir, device)
    vq = None
    if vqgan_dir is not None:  # loaded (and checked) before any measuring
        from digit.vqgan import load_vqgan

        vq, _ = load_vqgan(vqgan_dir, image_size=manifest.get("image_size"))
    if cfg["k_sweep"] and features_dir is None:
        raise ConfigError("stability.k_sweep needs the train features (--features data/features); "
                          "pass them or set stability.k_sweep: []")
    started = time.time()
    sweep = sweep_assigners(features_dir, info, list(cfg["k_sweep"]), progress) if cfg["k_sweep"] else {}
    total = min(cfg["num_images"], available) if cfg["num_images"] else available
    result = measure(encoder, assign, image_batches(images_dir, "val", cfg["num_images"], cfg["batch_size"]),
                     list(cfg["snr_db"]), cfg["seed"], total=total, progress=progress, sweep=sweep,
                     noise_at=cfg["noise_at"])
    seconds = time.time() - started
    if vq is not None:  # the reconstructive tokenizer, same images, same noise (paper Table 1)
        result["vq"] = measure_vq(vq.to(device), image_batches(images_dir, "val", cfg["num_images"],
                                                                cfg["batch_size"]),
                                  list(cfg["snr_db"]), cfg["seed"], total=total, progress=progress)
    return {"encoder": info["encoder"], "k": info["k"], **result, "seconds": round(seconds, 2)}


def log_plots(rows: list[dict], live_dir: str | Path) -> list[Path]:
    """DVCLive custom plots of change rate and cosine vs SNR; returns the two JSON paths.

    Files: {live_dir}/plots/custom/{change_rate,cosine}.json, lists of
    {"snr_db", "change_rate", "cosine", "realised_snr_db"} rows (x: snr_db).
    """
    from dvclive import Live

    points = [{k: r[k] for k in ("snr_db", "change_rate", "cosine", "realised_snr_db")} for r in rows]
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        live.log_plot("change_rate", points, x="snr_db", y="change_rate", template="simple",
                      title="Token change rate vs SNR", x_label="SNR (dB)", y_label="token change rate")
        live.log_plot("cosine", points, x="snr_db", y="cosine", template="simple",
                      title="Feature cosine similarity vs SNR", x_label="SNR (dB)", y_label="cosine(clean, noisy)")
    return [Path(live_dir) / "plots" / "custom" / f"{name}.json" for name in ("change_rate", "cosine")]


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--codebook", default="models/codebook")
    parser.add_argument("--features", default="data/features", help="train features, for stability.k_sweep")
    parser.add_argument("--vqgan", default="models/vqgan", help="the VQ tokenizer measured beside ('' = skip)")
    parser.add_argument("--report", default="reports/stability.json")
    parser.add_argument("--live", default="reports/stability")
    args = parser.parse_args()
    require_git_commit()
    params = load_params(args.params)
    cfg = check_config({**params["stability"], "seed": seed_for(params, "stability")})  # moved by base.seed
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # the clean tokens must repeat exactly
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    report = run_stability(cfg, args.images, args.codebook, device, features_dir=args.features,
                           vqgan_dir=args.vqgan or None)
    log_plots(report["rows"], args.live)
    write_json(args.report, report)
    key = "20" if 20 in cfg["snr_db"] else snr_key(cfg["snr_db"][len(cfg["snr_db"]) // 2])
    print(f"stability: {report['num_images']} images, change rate {report[f'change_rate_snr{key}']:.4f} "
          f"cosine {report[f'cosine_snr{key}']:.4f} at {key} dB -> {args.report}")


if __name__ == "__main__":
    run(main)
