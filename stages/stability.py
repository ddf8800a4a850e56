"""Stage `stability`: token change rate and feature cosine under Gaussian noise -> reports/stability.json.

The paper's Table 1 (latent-space stability): val images get Gaussian noise at
each SNR in stability.snr_db, are re-tokenized with the codebook's own encoder
settings, and are compared with the clean tokens/features position by position.
The SNR definition is in digit/stability.py. DVCLive plots change rate and
cosine vs SNR in reports/stability/plots/custom/.
"""

from __future__ import annotations

import torch

from digit.atomic import write_json
from digit.cli import require_git_commit, run, stage_parser
from digit.params import load_params, seed_for
from digit.stability import check_config, log_plots, run_stability, snr_key


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
