"""Stage `evaluate`: the paper's table at small scale, every headline number in reports/metrics.json.

Collects, without recomputing anything, what the other stages measured:

    <tokenizer>.*        per GPT (digit = DiGIT tokens, vq = the VQGAN's tokens): sample FID/KID through
                         its headline renderer, train/val loss, val token accuracy, probe top-1, and the
                         tokenizer's stability (token change rate, feature cosine) at stability_snr_db
                         (stability.headline_snr)
    render.<renderer>.*  per renderer: sample FID/KID of the GPT samples it rendered, the ceiling on
                         real val tokens of the same path (rFID, PSNR, SSIM), and the token round-trip
                         (`decode`): the fraction of tokens that come back unchanged when the rendered
                         real val tokens (roundtrip_val) and samples (roundtrip_samples) are tokenized
                         again; <tokenizer>.kept_snr30, what a 30 dB noisy real image keeps, is its yardstick
    fid_floor, kid_floor two real sets of the samples' size: what a perfect generator would score

`dvc exp show` lists them all, so experiments compare on the same table.
"""

from __future__ import annotations

import json
from pathlib import Path

from digit.atomic import write_json
from digit.cli import run, stage_parser
from digit.errors import ConfigError
from digit.params import load_params

HEADLINE = {"digit": "direct", "vq": "vqgan"}  # the renderer whose FID stands for each GPT
# The round-trip's yardstick: the fraction of a real image's tokens that a 30 dB noisy copy keeps (stability).
ROUNDTRIP_YARDSTICK_SNR = 30.0


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: missing; run `dvc repro` (evaluate collects the other stages' reports)")
    return json.loads(path.read_text())


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--tokenizers", nargs="+", default=["digit", "vq"])
    parser.add_argument("--renderers", nargs="+", default=["direct", "stage2_ar", "vqgan"])
    parser.add_argument("--out", default="reports/metrics.json")
    args = parser.parse_args()
    snr = float(load_params(args.params)["stability"]["headline_snr"])
    reports = Path(args.reports)

    render, scores = {}, {}
    for name in args.renderers:
        score = scores[name] = read_report(reports / "score" / f"{name}.json")
        if "ceiling" not in score:
            raise ConfigError(f"{reports / 'score' / (name + '.json')}: no ceiling; re-run `dvc repro score@{name}`")
        roundtrip = read_report(reports / "roundtrip" / f"{name}.json")
        render[name] = {"fid": score["fid"], "kid": score["kid_mean"],
                        **{f"ceiling_{k}": v for k, v in score["ceiling"].items()},
                        "roundtrip_val": roundtrip["val"], "roundtrip_samples": roundtrip["samples"]}
    stability = read_report(reports / "stability.json")
    metrics: dict = {}
    for tok in args.tokenizers:
        train = read_report(reports / "train" / tok / "metrics.json")
        probe = read_report(reports / "probe" / f"{tok}.json")
        rows = (stability if tok == "digit" else stability.get(tok, {})).get("rows", [])
        at = next((r for r in rows if float(r["snr_db"]) == snr), {})
        at30 = next((r for r in rows if float(r["snr_db"]) == ROUNDTRIP_YARDSTICK_SNR), {})
        row = {"val_loss": train["val"]["loss"], "val_token_acc": train["val"]["token_acc"],
               "train_loss": train["train"]["loss"], "probe_top1": probe["best_val_top1"],
               "change_rate": at.get("change_rate"), "cosine": at.get("cosine"),
               "kept_snr30": 1.0 - at30["change_rate"] if at30 else None}
        if HEADLINE[tok] in render:
            row = {"fid": render[HEADLINE[tok]]["fid"], "kid": render[HEADLINE[tok]]["kid"], **row}
        metrics[tok] = row
    first = scores[args.renderers[0]]
    metrics.update({"render": render, "stability_snr_db": snr, "fid_floor": first["fid_floor"], "kid_floor": first["kid_floor"],
                    "num_samples": first["num_samples"], "num_reference": first["num_reference"]})
    if first.get("isc_unavailable"):
        metrics["isc_unavailable"] = first["isc_unavailable"]
    write_json(args.out, metrics)
    table = "  ".join(f"{t}: FID {metrics[t].get('fid', float('nan')):.2f} probe {metrics[t]['probe_top1']:.3f}"
                      for t in args.tokenizers)
    print(f"evaluate: {table}, floor {metrics['fid_floor']:.2f} -> {args.out}")


if __name__ == "__main__":
    run(main)
