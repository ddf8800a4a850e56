"""The sampling sweep (`make sweep`): sample FID/KID of both GPTs against temperature, top-k and the CFG scale.

The arms are queued `dvc exp run -S sample.<key>=<value>` experiments on top of the workspace run (the
Makefile's SWEEP_ARMS), each changing sampling keys only, so DVC re-runs `sample@*`, `decode@*`, `score@*`
and `evaluate` and nothing that trains. Arms that change `sample.seed` alone give the spread that sampling
adds at fixed models, the yardstick for every difference in the sweep. This module reads the arms back
from `dvc exp show --json` (the baseline commit and its experiments), keeps the rows whose params differ
from the baseline's in `sample.*` keys only, and writes:

    reports/sampling.json         every row (its settings, FID/KID of each GPT and renderer), the
                                  sample-seed spread, the best setting per tokenizer and for both
                                  (the lowest mean of the two FIDs: one setting, fair to either GPT)
    reports/sampling/<key>.tsv    FID/KID against one key with the others at the baseline's values
                                  (the top-level `plots:` of dvc.yaml draw them: `make plots`)
    reports/sampling.png          the same three curves, drawn offline by vl-convert (docs/results.md)

The settings are chosen on the FID reference set (the val images), as the paper picks its top-k.

With --paint it reads the decoder recipe's arms instead (`make paint`: experiments that change
`decoder.*` keys only, so only train_decoder and the direct renderer re-run) into reports/paint.json:
per arm the direct renderer's ceiling (rFID / SSIM of real val tokens), sample FID / KID and token
round-trip; `make report` puts the table in docs/results.md.

    python -m digit.sweep [--paint] [--rev HEAD] [--reports reports]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
from pathlib import Path

from digit.atomic import atomic_file, write_json
from digit.cli import run
from digit.errors import ConfigError
from digit.params import RECIPE_KEYS
from digit.schema import _flatten

SWEPT = ("cfg_scale", "top_k", "temperature")  # one TSV and one panel each
SAMPLING = SWEPT + ("top_p", "seed")           # the keys an arm may change
TITLES = {"cfg_scale": "classifier-free guidance scale", "top_k": "top-k",
          "temperature": "temperature"}
TOKENIZERS = ("digit", "vq")


def exp_rows(rev: str, root: str | Path = ".") -> tuple[dict, list[dict]]:
    """(baseline, experiments) of commit `rev`, read from `dvc exp show --json` (see parse_exp_show)."""
    out = subprocess.run(["dvc", "exp", "show", "--json", "--rev", rev], cwd=root, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise ConfigError(f"`dvc exp show --json --rev {rev}` failed: {out.stderr.strip()[-500:]}")
    return parse_exp_show(json.loads(out.stdout), rev)


def parse_exp_show(shown: list, rev: str = "HEAD") -> tuple[dict, list[dict]]:
    """`dvc exp show --json` -> (baseline, experiments) as {"name", "params" (params.yaml), "metrics"
    (reports/metrics.json)}; experiments that are queued, running or failed are left out."""

    def row(entry: dict) -> dict | None:
        data = entry.get("data") or {}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        metrics = ((data.get("metrics") or {}).get("reports/metrics.json") or {}).get("data")
        if not params or not metrics:
            return None
        return {"name": entry.get("name") or entry.get("rev"), "params": params, "metrics": metrics}

    commits = [r for r in shown if r.get("rev") != "workspace"]
    if not commits or (baseline := row(commits[0])) is None:
        raise ConfigError(f"{rev}: no committed run with params.yaml and reports/metrics.json; commit dvc.lock "
                          "and reports/ of a `dvc repro` first")
    # A queued or running experiment is listed with the baseline's metrics: only finished ones count.
    finished = [e for e in commits[0].get("experiments") or []
                if (e.get("executor") or {}).get("state", "success") == "success"]
    experiments = [r for e in finished for x in e.get("revs") or [] if (r := row(x)) is not None]
    return baseline, experiments


def arms_changing(baseline: dict, experiments: list[dict], allowed: set[str]) -> list[tuple[dict, dict, dict]]:
    """(run, flat params, {changed key: value}) of the baseline and of each experiment whose params differ from the
    baseline's in `allowed` keys only (other ablation arms on the same baseline are left out)."""
    base = _flatten(baseline["params"])
    arms = []
    for exp in [baseline, *experiments]:
        params = _flatten(exp["params"])
        changed = {k for k in base.keys() | params.keys() if base.get(k) != params.get(k)}
        if changed - allowed:
            continue
        bad = [k for k, v in _flatten(exp["metrics"]).items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ConfigError(f"experiment {exp['name']}: non-finite {', '.join(bad)} in reports/metrics.json")
        arms.append((exp, params, {k: params.get(k) for k in sorted(changed)}))
    return arms


def sweep_rows(baseline: dict, experiments: list[dict]) -> list[dict]:
    """The baseline and each experiment that changes `sample.*` keys only, as flat records."""
    rows = []
    for exp, params, _ in arms_changing(baseline, experiments, {f"sample.{k}" for k in SAMPLING}):
        m = exp["metrics"]
        rows.append({"name": exp["name"], **{k: params[f"sample.{k}"] for k in SAMPLING},
                     **{f"{t}_{s}": m[t][s] for t in TOKENIZERS for s in ("fid", "kid")},
                     **{f"{r}_fid": v["fid"] for r, v in sorted(m.get("render", {}).items())},
                     "num_samples": m.get("num_samples"), "digit_k": params.get("codebook.k"),
                     "vq_k": params.get("vqgan.k")})
    return rows


# The decoder recipe's ablation (`make paint`): arms that change train_decoder's keys only, so only the direct
# renderer moves; each row is its ceiling (real val tokens), its samples and its token round-trip.
PAINT_METRICS = ("ceiling_rfid", "ceiling_ssim", "fid", "kid", "roundtrip_val", "roundtrip_samples")


def paint_rows(baseline: dict, experiments: list[dict], renderer: str = "direct") -> list[dict]:
    """The baseline and each experiment that changes `decoder.*` keys only: the changed keys and the renderer's
    numbers from reports/metrics.json."""
    allowed = {k for k in _flatten(baseline["params"]) if k.startswith("decoder.")}
    return [{"name": exp["name"], "changed": changed, **{k: params[f"decoder.{k}"] for k in RECIPE_KEYS},
             **{k: exp["metrics"]["render"][renderer].get(k) for k in PAINT_METRICS},
             "fid_floor": exp["metrics"].get("fid_floor"), "num_samples": exp["metrics"].get("num_samples")}
            for exp, params, changed in arms_changing(baseline, experiments, allowed)]


def varying(rows: list[dict], key: str) -> list[dict]:
    """The rows whose sampling keys other than `key` are the baseline's (rows[0]), sorted by `key`."""
    base = rows[0]
    return sorted((r for r in rows if all(r[k] == base[k] for k in SAMPLING if k != key)), key=lambda r: r[key])


def summarize(rows: list[dict], rev: str) -> dict:
    base = rows[0]
    seeds = varying(rows, "seed")
    spread = {"seeds": sorted(r["seed"] for r in seeds)}
    for t in TOKENIZERS:
        values = [r[f"{t}_fid"] for r in seeds]
        spread[f"{t}_fid_mean"] = statistics.fmean(values)
        spread[f"{t}_fid_sd"] = statistics.stdev(values) if len(values) > 1 else None
    at_seed = [r for r in rows if r["seed"] == base["seed"]]
    both = lambda r: statistics.fmean(r[f"{t}_fid"] for t in TOKENIZERS)  # noqa: E731
    best = {**{t: min(at_seed, key=lambda r: r[f"{t}_fid"]) for t in TOKENIZERS}, "both": min(at_seed, key=both)}
    return {"baseline": rev, "num_samples": base["num_samples"], "rows": rows, "seed_spread": spread,
            "best": {t: {"name": r["name"], **{k: r[k] for k in SAMPLING},
                         "fid": both(r) if t == "both" else r[f"{t}_fid"]} for t, r in best.items()}}


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """key -> the rows that vary `key` alone (the others, seed included, at the baseline's), sorted by it."""
    return {key: varying(rows, key) for key in SWEPT}


def write_tsv(path: Path, key: str, rows: list[dict]) -> None:
    columns = [key] + [f"{t}_{s}" for s in ("fid", "kid") for t in TOKENIZERS]
    lines = ["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def figure(by_key: dict[str, list[dict]]) -> dict:
    """A Vega-Lite spec: one panel per key, sample FID of each GPT against it."""
    label = {"digit": "DiGIT tokens", "vq": "VQ tokens"}
    panels = []
    for key, rows in by_key.items():
        # top-k off is top-k = K (every code): drawn there, on a log axis, rather than at 0.
        x = lambda r, t: (r[f"{t}_k"] or r[key]) if key == "top_k" and r[key] == 0 else r[key]  # noqa: E731
        values = [{key: x(r, t), "tokens": label[t], "FID": r[f"{t}_fid"]} for r in rows for t in TOKENIZERS]
        title = "top-k (off drawn at K, every code)" if key == "top_k" else TITLES[key]
        panels.append({"title": f"FID vs {TITLES[key]}", "width": 220, "height": 180, "data": {"values": values},
                       "mark": {"type": "line", "point": True},
                       "encoding": {"x": {"field": key, "type": "quantitative", "title": title,
                                          **({"scale": {"type": "log"}} if key == "top_k" else {})},
                                    "y": {"field": "FID", "type": "quantitative", "scale": {"zero": False}},
                                    "color": {"field": "tokens", "type": "nominal", "title": None}}})
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "hconcat": panels}


def write_paint(sha: str, root: str | Path, reports: Path) -> None:
    rows = paint_rows(*exp_rows(sha, root))
    if len(rows) < 2:
        raise ConfigError(f"{sha[:7]}: no decoder experiment on this commit; run `make paint` first")
    write_json(reports / "paint.json", {"baseline": sha, "renderer": "direct", "rows": rows})
    for r in rows:
        print(f"paint: {r['name']}: {r['changed'] or 'baseline'}: ceiling rFID {r['ceiling_rfid']}, sample FID "
              f"{r['fid']:.2f}, round-trip val {r['roundtrip_val']}")
    print(f"paint: {len(rows)} rows -> {reports}/paint.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the baseline commit whose experiments are the sweep")
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--root", default=".")
    parser.add_argument("--paint", action="store_true",
                        help="the decoder recipe's arms (`make paint`) -> reports/paint.json, instead of sampling")
    args = parser.parse_args()
    sha = subprocess.run(["git", "rev-parse", args.rev], cwd=args.root, capture_output=True, text=True,
                         check=True).stdout.strip()
    reports = Path(args.reports)
    if args.paint:
        return write_paint(sha, args.root, reports)
    rows = sweep_rows(*exp_rows(sha, args.root))
    if len(rows) < 2:
        raise ConfigError(f"{args.rev}: no sampling experiment on this commit; run `make sweep` first")
    summary = summarize(rows, sha)
    write_json(reports / "sampling.json", summary)
    by_key = curves(rows)
    for key, key_rows in by_key.items():
        write_tsv(reports / "sampling" / f"{key}.tsv", key, key_rows)
    import vl_convert

    png = vl_convert.vegalite_to_png(figure(by_key), scale=2)
    with atomic_file(reports / "sampling.png") as tmp:
        tmp.write_bytes(png)
    for t, b in summary["best"].items():
        print(f"sweep: best for {t}: {b['name']} ({'mean ' if t == 'both' else ''}FID {b['fid']:.2f}; "
              f"T {b['temperature']}, top-k {b['top_k']}, cfg {b['cfg_scale']})")
    s = summary["seed_spread"]
    print(f"sweep: {len(rows)} rows; sample-seed spread over {len(s['seeds'])} seeds: DiGIT FID "
          f"{s['digit_fid_mean']:.2f} sd {s['digit_fid_sd']}, VQ {s['vq_fid_mean']:.2f} sd {s['vq_fid_sd']} "
          f"-> {reports}/sampling.json, sampling/*.tsv, sampling.png")


if __name__ == "__main__":
    run(main)
