"""The tables of README.md and docs/*.md, generated from reports/*.json: no result is typed by hand.

    python -m digit.report            # rewrite every generated block from reports/ (`make report`)
    python -m digit.report --check    # exit 1 naming each block that differs from what reports/ give; writes nothing

A generated block sits between two marker comments, and only its inside is ever rewritten:

    <!-- report:NAME -->
    ...generated...
    <!-- /report:NAME -->

Blocks (any of README.md and docs/*.md may hold any of them; the files named here must):

    headline    README.md         DiGIT tokens vs VQ tokens: sample FID/KID, other renderers' FID, the
                                  renderer's ceiling (rFID of real val tokens), its token round-trip beside
                                  what 30 dB of noise keeps, probe, token change rate at stability_snr_db,
                                  GPT val loss; the real-vs-real floor
    repro-time  README.md         the measured `make repro` (reports/times.json), or that it is not measured
    renderers   docs/results.md   per renderer: sample FID, KID +- sd, ceiling rFID / PSNR / SSIM, token
                                  round-trip of real val tokens and of samples, size
    tokenizers  docs/results.md   per tokenizer: codebook use, GPT losses, token accuracy, probe, stability
    stability   docs/results.md   change rate and feature cosine at every SNR, both tokenizers
    k-sweep     docs/results.md   DiGIT change rate at every SNR for every codebook size K
    times       docs/pipeline.md  wall time per stage (reports/times.json), or that it is not measured
    sampling    docs/results.md   the sampling sweep (reports/sampling.json, `make sweep`): FID/KID of both
                                  GPTs per setting, the sample-seed spread, the best setting per tokenizer
    paint       docs/results.md   the decoder recipe's ablation (reports/paint.json, `make paint`): per arm
                                  the direct renderer's ceiling, sample FID/KID and token round-trip

Inputs: reports/metrics.json (stage `evaluate`; required), reports/score/<renderer>.json,
reports/{decoder,stage2_ar,stage2_nar,vqgan}.json (the ceilings), reports/train/<tokenizer>/metrics.json,
reports/{tokens,vq_tokens}.json, reports/stability.json, reports/sampling.json, reports/paint.json and
reports/times.json
({"<stage>": seconds, ..., "total": seconds, "measured": "date, machine, command"}). A missing optional
input shows as "–" (or a line saying what is missing), so the output is a pure function of the files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

from digit.atomic import atomic_file
from digit.cli import run
from digit.errors import ConfigError
from digit.params import RECIPE_KEYS
from digit.sweep import SAMPLING

# Files scanned for blocks, relative to --root, and the blocks each one must hold.
REQUIRED = {"README.md": ("headline", "repro-time"), "docs/results.md": ("renderers", "tokenizers"),
            "docs/pipeline.md": ("times",)}
FILE_GLOBS = ("README.md", "docs/*.md")

TOKENIZERS = {"digit": "DiGIT tokens", "vq": "VQ tokens (VQGAN)"}
TOKEN_REPORTS = {"digit": "tokens.json", "vq": "vq_tokens.json"}
# renderer -> (tokenizer it renders, label, report of its val reconstruction = its ceiling); as stages/evaluate.py.
RENDERERS = {
    "direct": ("digit", "direct decoder", "decoder.json"),
    "stage2_ar": ("digit", "stage 2 AR → VQGAN decoder", "stage2_ar.json"),
    "stage2_nar": ("digit", "stage 2 MaskGIT → VQGAN decoder", "stage2_nar.json"),
    "vqgan": ("vq", "VQGAN decoder", "vqgan.json"),
}
HEADLINE = {"digit": "direct", "vq": "vqgan"}  # the renderer whose FID stands for each GPT (stages/evaluate.py)
DASH = "–"
BLOCK = re.compile(r"<!-- report:([a-z0-9-]+) -->\n(.*?)<!-- /report:\1 -->", re.S)
OPEN, CLOSE = re.compile(r"<!-- report:([a-z0-9-]+) -->"), re.compile(r"<!-- /report:([a-z0-9-]+) -->")


# ---------------------------------------------------------------- formatting

def num(x, digits: int) -> str:
    """x with `digits` decimals; "–" for a missing or non-finite value; never "-0.000"."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return DASH
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def count(x) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else DASH


def pct(x, digits: int = 1) -> str:
    return DASH if num(x, digits) == DASH else f"{num(100 * x, digits)} %"


def duration(seconds) -> str:
    if num(seconds, 0) == DASH:
        return DASH
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    s = round(s)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def snr_label(x: float) -> str:
    return f"{float(x):g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs

class Reports:
    """The JSON files under a reports folder, read once each; metrics.json is required and checked."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[str, dict | None] = {}
        path = self.root / "metrics.json"
        if not path.is_file():
            raise ConfigError(f"{path}: missing; run `dvc repro` (stage evaluate writes it), then `make report`")
        metrics = self.get("metrics.json")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("render"), dict):
            raise ConfigError(f"{path}: no `render` section: it was written by the previous DAG's evaluate "
                              f"(fid, rec.*); run `dvc repro` to get the current one, then `make report`")
        self.metrics = metrics
        self.renderers = list(metrics["render"])
        self.tokenizers = [k for k, v in metrics.items() if k != "render" and isinstance(v, dict)]

    def get(self, name: str) -> dict | None:
        """reports/<name> as a dict, or None when the file is absent."""
        if name not in self._cache:
            path = self.root / name
            try:
                self._cache[name] = json.loads(path.read_text()) if path.is_file() else None
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from None
        return self._cache[name]

    def tokenizer_of(self, renderer: str) -> str | None:
        if renderer in RENDERERS:
            return RENDERERS[renderer][0]
        score = self.get(f"score/{renderer}.json") or {}
        return {"discriminative": "digit"}.get(score.get("tokenizer"), score.get("tokenizer"))

    def headline_renderer(self, tokenizer: str) -> str | None:
        if HEADLINE.get(tokenizer) in self.renderers:
            return HEADLINE[tokenizer]
        return next((r for r in self.renderers if self.tokenizer_of(r) == tokenizer), None)

    def ceiling(self, renderer: str) -> dict:
        name = RENDERERS.get(renderer, (None, None, f"{renderer}.json"))[2]
        return self.get(name) or {}

    def snr(self) -> float | None:
        return self.metrics.get("stability_snr_db")


def tokenizer_label(tok: str) -> str:
    return TOKENIZERS.get(tok, f"{tok} tokens")


def renderer_label(renderer: str) -> str:
    return RENDERERS.get(renderer, (None, renderer))[1]


# ---------------------------------------------------------------- blocks

def floor_line(r: Reports) -> str:
    m = r.metrics
    return (f"Floor, what a perfect generator scores ({count(m.get('num_samples'))} real train images against "
            f"the {count(m.get('num_reference'))}-image val reference, the samples' sizes): "
            f"FID {num(m.get('fid_floor'), 1)}, KID {num(m.get('kid_floor'), 4)}. "
            f"Each GPT is scored on {count(m.get('num_samples'))} samples.")


def headline(r: Reports) -> str:
    toks, m, snr = r.tokenizers, r.metrics, r.snr()
    head = {t: r.headline_renderer(t) for t in toks}

    def row(label: str, value: Callable[[str], str]) -> list[str]:
        return [label] + [value(t) for t in toks]

    rows = [row("sample FID ↓",
                lambda t: f"{num(m[t].get('fid'), 1)} ({renderer_label(head[t])})" if head[t] else DASH),
            row("sample KID ↓", lambda t: num(m[t].get("kid"), 4))]
    for rend in r.renderers:
        tok = r.tokenizer_of(rend)
        if rend not in head.values():
            rows.append(row(f"sample FID through {renderer_label(rend)} ↓",
                            lambda t: num(m["render"][rend].get("fid"), 1) if t == tok else DASH))
    rows += [
        row("renderer ceiling: rFID of real val tokens ↓",
            lambda t: num(m["render"][head[t]].get("ceiling_rfid"), 1) if head[t] else DASH),
        row("token round-trip of rendered real val tokens ↑ (a 30 dB noisy real image: in brackets)",
            lambda t: f"{pct(m['render'][head[t]].get('roundtrip_val'))} ({pct(m[t].get('kept_snr30'))})"
            if head[t] else DASH),
        row("linear probe top-1 on the GPT ↑", lambda t: num(m[t].get("probe_top1"), 3)),
        row(f"token change rate at {snr_label(snr) if snr is not None else '?'} dB SNR ↓",
            lambda t: num(m[t].get("change_rate"), 3)),
        row("GPT val loss (nats/token) ↓", lambda t: num(m[t].get("val_loss"), 3)),
    ]
    return table([""] + [tokenizer_label(t) for t in toks], rows) + "\n\n" + floor_line(r)


def renderers(r: Reports) -> str:
    m, rows = r.metrics, []
    for rend in r.renderers:
        got, score, ceil = m["render"][rend], r.get(f"score/{rend}.json") or {}, r.ceiling(rend)
        kid = num(got.get("kid"), 4)
        if kid != DASH and num(score.get("kid_std"), 4) != DASH:
            kid += f" ± {num(score['kid_std'], 4)}"
        tok = r.tokenizer_of(rend)
        rows.append([f"`{rend}`: {renderer_label(rend)}", tokenizer_label(tok) if tok else DASH,
                     num(got.get("fid"), 1), kid, num(got.get("ceiling_rfid"), 1), num(got.get("ceiling_psnr"), 2),
                     num(got.get("ceiling_ssim"), 3), pct(got.get("roundtrip_val")), pct(got.get("roundtrip_samples")),
                     pct(ceil.get("vq_token_accuracy")), count(ceil.get("params")), count(ceil.get("steps"))])
    rows.append(["real train images (floor)", DASH, num(m.get("fid_floor"), 1), num(m.get("kid_floor"), 4)]
                + [DASH] * 8)
    header = ["renderer", "renders", "sample FID ↓", "KID ↓ (± sd over subsets)", "ceiling rFID ↓",
              "ceiling PSNR (dB) ↑", "ceiling SSIM ↑", "round-trip: real val tokens ↑", "round-trip: samples ↑",
              "VQ tokens equal to the VQGAN's", "params", "train steps"]
    kept = ", ".join(f"{tokenizer_label(t)} {pct(m[t].get('kept_snr30'))}" for t in r.tokenizers)
    note = (f"{count(m.get('num_samples'))} samples per renderer against {count(m.get('num_reference'))} real val "
            f"images. Ceiling: the same renderer on the real val images' tokens "
            f"({count((r.ceiling(r.renderers[0]) if r.renderers else {}).get('images'))} images). Round-trip: the "
            f"fraction of tokens that come back unchanged when the rendered images are tokenized again by the "
            f"tokenizer that made them; a real image with 30 dB of noise keeps {kept}.")
    return table(header, rows) + "\n\n" + note


def tokenizers(r: Reports) -> str:
    m, snr = r.metrics, r.snr()
    at = f"{snr_label(snr)} dB" if snr is not None else "? dB"
    rows = []
    for tok in r.tokenizers:
        got, codes = m[tok], (r.get(TOKEN_REPORTS.get(tok, f"{tok}_tokens.json")) or {})
        train = r.get(f"train/{tok}/metrics.json") or {}
        use = (codes.get("train") or {})
        k = f"{count(codes.get('k'))} ({num(use.get('usage_pct'), 1)} % used)" if codes else DASH
        gain = (train.get("val") or {}).get("gain_over_unigram")
        rows.append([tokenizer_label(tok), k, num(use.get("perplexity"), 0), num(got.get("train_loss"), 3),
                     num(got.get("val_loss"), 3), num(gain, 2), num(got.get("val_token_acc"), 3),
                     num(got.get("probe_top1"), 3), num(got.get("change_rate"), 3), num(got.get("cosine"), 3)])
    header = ["tokens", "codes K (train use)", "train token perplexity", "GPT train loss", "GPT val loss ↓",
              "gain over unigram (nats)", "val token acc ↑", "probe top-1 ↑", f"change rate at {at} ↓",
              f"feature cosine at {at}"]
    return table(header, rows)


def stability(r: Reports) -> str:
    data = r.get("stability.json")
    if not data:
        return "_reports/stability.json is missing: run `dvc repro stability`, then `make report`._"
    sets = [("DiGIT", data.get("rows", []))] + ([("VQ", data["vq"].get("rows", []))] if data.get("vq") else [])
    snrs = [float(s) for s in data.get("snr_db", [row["snr_db"] for row in data.get("rows", [])])]
    rows = []
    for what, key, digits in (("change rate", "change_rate", 3), ("feature cosine", "cosine", 3)):
        for name, got in sets:
            by = {float(row["snr_db"]): row for row in got}
            rows.append([f"{name} {what}"] + [num(by.get(s, {}).get(key), digits) for s in snrs])
    note = (f"{count(data.get('num_images'))} val images, K = {count(data.get('k'))}, noise added at "
            f"`{data.get('noise_at', '?')}`; change rate of a clean re-encode: "
            f"{num(data.get('clean_repeat_change_rate'), 3)}.")
    return table(["SNR (dB)"] + [snr_label(s) for s in snrs], rows) + "\n\n" + note


def k_sweep(r: Reports) -> str:
    data = r.get("stability.json")
    if not data:
        return "_reports/stability.json is missing: run `dvc repro stability`, then `make report`._"
    snrs = [float(s) for s in data.get("snr_db", [])]
    by_k = {int(name[1:]): got for name, got in (data.get("k_sweep") or {}).items()}
    if isinstance(data.get("k"), int):
        by_k[data["k"]] = {k: v for k, v in data.items() if k.startswith("change_rate_snr")}

    def key(s: float) -> str:
        return "change_rate_snr" + snr_label(s).replace(".", "p")

    rows = [[f"{k:,}" + (" (the codebook)" if k == data.get("k") else "")] + [num(by_k[k].get(key(s)), 3) for s in snrs]
            for k in sorted(by_k)]
    return table(["K \\ SNR (dB)"] + [snr_label(s) for s in snrs], rows)


def sampling(r: Reports) -> str:
    data = r.get("sampling.json")
    if not data:
        return "_reports/sampling.json is missing: run `make sweep` (digit/sweep.py), then `make report`._"
    rows_in = data.get("rows") or []
    if not rows_in:
        return "_reports/sampling.json holds no rows: run `make sweep` again._"
    base = rows_in[0]
    keys = SAMPLING  # the sampling keys an arm of the sweep may change
    renderers = sorted({k[:-4] for row in rows_in for k in row if k.endswith("_fid")} - {"digit", "vq"}
                       - {HEADLINE["digit"], HEADLINE["vq"]})

    def setting(row: dict) -> str:
        changed = [f"{k} {row[k]:g}" for k in keys if row.get(k) != base.get(k)]
        return ", ".join(changed) if changed else "baseline (" + ", ".join(f"{k} {base[k]:g}" for k in keys) + ")"

    def order(row: dict):
        changed = [k for k in keys if row.get(k) != base.get(k)]
        return (len(changed), [keys.index(k) for k in changed], [row[k] for k in changed])

    best = {t: (data.get("best") or {}).get(t, {}).get("name") for t in ("digit", "vq", "both")}
    rows = []
    for row in sorted(rows_in, key=order):
        mark = lambda t, v: f"**{v}**" if row["name"] == best[t] else v  # noqa: E731
        name = f"{setting(row)} ◀ both" if row["name"] == best["both"] else setting(row)
        rows.append([name, mark("digit", num(row.get("digit_fid"), 1)), num(row.get("digit_kid"), 4),
                     mark("vq", num(row.get("vq_fid"), 1)), num(row.get("vq_kid"), 4)]
                    + [num(row.get(f"{x}_fid"), 1) for x in renderers])
    header = (["sampling (what differs from the baseline run)", "DiGIT FID", "DiGIT KID", "VQ FID", "VQ KID"]
              + [f"{renderer_label(x)} FID" for x in renderers])
    spread = data.get("seed_spread") or {}
    note = (f"Experiments on commit {str(data.get('baseline', '?'))[:7]}; {count(data.get('num_samples'))} samples "
            f"per GPT against the val reference (the FID reference set, on which the setting is chosen). Spread that sampling alone adds at fixed models, over sample.seed "
            f"{', '.join(str(s) for s in spread.get('seeds', []))}: DiGIT FID {num(spread.get('digit_fid_mean'), 1)} "
            f"+- {num(spread.get('digit_fid_sd'), 1)}, VQ {num(spread.get('vq_fid_mean'), 1)} "
            f"+- {num(spread.get('vq_fid_sd'), 1)} (sd). Best (bold): DiGIT {best['digit']}, VQ {best['vq']}; "
            f"◀ both: {best['both']}, the lowest mean of the two FIDs, one setting fair to either GPT.")
    return table(header, rows) + "\n\n" + note


def paint(r: Reports) -> str:
    data = r.get("paint.json")
    if not data or len(data.get("rows") or []) < 2:
        return ("_reports/paint.json is missing or holds no arm: run `make paint`, then "
                "`python -m digit.sweep --paint` and `make report`._")
    rows_in = data["rows"]
    floor = rows_in[0].get("fid_floor")
    ratio = lambda v: f" ({v / floor:.2f}x)" if isinstance(v, (int, float)) and floor else ""  # noqa: E731

    def setting(row: dict) -> str:
        if not row["changed"]:
            base = rows_in[0]
            return "default (" + ", ".join(f"{k} {base[k]:g}" for k in RECIPE_KEYS) + ")"
        return ", ".join(f"{k.split('.', 1)[1]} {v:g}" for k, v in row["changed"].items())

    rows = [[setting(row), num(row.get("ceiling_rfid"), 1) + ratio(row.get("ceiling_rfid")),
             num(row.get("ceiling_ssim"), 3), num(row.get("fid"), 1) + ratio(row.get("fid")), num(row.get("kid"), 4),
             pct(row.get("roundtrip_val")), pct(row.get("roundtrip_samples"))] for row in rows_in]
    header = ["decoder recipe (what differs from the default)", "ceiling rFID (x floor)", "ceiling SSIM",
              "sample FID (x floor)", "sample KID", "round-trip, val tokens", "round-trip, samples"]
    note = (f"Experiments on commit {str(data.get('baseline', '?'))[:7]}, the direct renderer (`make paint`): each arm "
            f"re-trains `train_decoder` only, on the same tokens and the same GPT samples. Ceiling: the first 500 val "
            f"images rendered from their real tokens; {count(rows_in[0].get('num_samples'))} samples; "
            f"fid_floor {num(floor, 1)}.")
    return table(header, rows) + "\n\n" + note


def read_times(r: Reports) -> dict | None:
    times = r.get("times.json")
    if times is not None and not isinstance(times, dict):
        raise ConfigError(f"{r.root / 'times.json'}: expected an object "
                          f"{{\"<stage>\": seconds, ..., \"total\": seconds, \"measured\": \"date, machine, command\"}}")
    return times


def times(r: Reports) -> str:
    data = read_times(r)
    if not data:
        return "_Not measured on the current DAG yet: reports/times.json is missing._"
    rows = [[f"`{k}`", duration(v)] for k, v in data.items() if k not in ("total", "measured", "install")]
    if "total" in data:
        rows.append(["**total**", f"**{duration(data['total'])}**"])
    return table(["stage", "wall time"], rows) + f"\n\nMeasured: {data.get('measured', 'unknown')}."


def repro_time(r: Reports) -> str:
    data = read_times(r)
    if not data or "total" not in data:
        return ("`make repro` has not been timed on the current DAG yet (reports/times.json); "
                "see [docs/pipeline.md](docs/pipeline.md#wall-times).")
    install = f" after {duration(data['install'])} of install" if "install" in data else " after the install"
    return (f"Measured: the `dvc repro` of `make repro` **{duration(data['total'])}**{install} "
            f"({data.get('measured', 'unknown')}); per stage in [docs/pipeline.md](docs/pipeline.md#wall-times).")


BLOCKS: dict[str, Callable[[Reports], str]] = {
    "headline": headline, "repro-time": repro_time, "renderers": renderers, "tokenizers": tokenizers,
    "stability": stability, "k-sweep": k_sweep, "times": times, "sampling": sampling, "paint": paint,
}


# ---------------------------------------------------------------- files

def blocks_in(text: str, where: str) -> list[str]:
    """Names of the well-formed blocks in `text`; ConfigError on unbalanced, duplicate or unknown markers."""
    opened, closed = OPEN.findall(text), CLOSE.findall(text)
    names = [name for name, _ in BLOCK.findall(text)]
    if sorted(opened) != sorted(names) or sorted(closed) != sorted(names):
        raise ConfigError(f"{where}: unbalanced report markers (opened {opened}, closed {closed}); "
                          f"each block is `<!-- report:NAME -->` ... `<!-- /report:NAME -->` on lines of their own")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: block(s) {dup} appear more than once")
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown:
        raise ConfigError(f"{where}: unknown block(s) {unknown}; known: {sorted(BLOCKS)}")
    return names


def fill(text: str, generate: Callable[[str], str]) -> str:
    """`text` with the inside of every block replaced by generate(name)."""
    return BLOCK.sub(lambda m: f"<!-- report:{m[1]} -->\n\n{generate(m[1])}\n\n<!-- /report:{m[1]} -->", text)


def managed_files(root: Path) -> list[Path]:
    files = {p for pattern in FILE_GLOBS for p in root.glob(pattern) if p.is_file()}
    return sorted(files)


def update(root: str | Path = ".", reports: str | Path = "reports", check: bool = False) -> list[str]:
    """Regenerate (or with check=True only compare) every block; returns "file: block" for each that differs."""
    root = Path(root)
    for rel in REQUIRED:
        if not (root / rel).is_file():
            raise ConfigError(f"{root / rel}: missing; it must hold the block(s) {list(REQUIRED[rel])}")
    rep = Reports(reports)
    generated: dict[str, str] = {}

    def generate(name: str) -> str:
        if name not in generated:
            generated[name] = BLOCKS[name](rep).rstrip("\n")
        return generated[name]

    stale, writes = [], []
    for path in managed_files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        names = blocks_in(text, rel)
        missing = [n for n in REQUIRED.get(rel, ()) if n not in names]
        if missing:
            raise ConfigError(f"{rel}: block(s) {missing} missing; put `<!-- report:NAME -->` and "
                              f"`<!-- /report:NAME -->` on two lines where the table goes")
        new = fill(text, generate)
        if new != text:
            old = dict((n, body) for n, body in BLOCK.findall(text))
            now = dict((n, body) for n, body in BLOCK.findall(new))
            stale += [f"{rel}: {n}" for n in names if old[n] != now[n]]
            writes.append((path, new))
    if not check:
        for path, new in writes:
            with atomic_file(path) as tmp:
                tmp.write_text(new)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated block differs from what the reports give")
    parser.add_argument("--root", default=".", help="folder holding README.md and docs/ (default: .)")
    parser.add_argument("--reports", default=None, help="reports folder (default: ROOT/reports)")
    args = parser.parse_args()
    reports = args.reports if args.reports is not None else Path(args.root) / "reports"
    stale = update(args.root, reports, check=args.check)
    if args.check:
        if stale:
            print(f"error: generated table(s) out of date with {reports}/*.json: " + ", ".join(stale)
                  + "; run `make report` (python -m digit.report) and commit the result", file=sys.stderr)
            sys.exit(1)
        print(f"report: every generated table matches {reports}/*.json")
    else:
        print("report: rewrote " + (", ".join(stale) if stale else "nothing (already up to date)"))


if __name__ == "__main__":
    run(main)
