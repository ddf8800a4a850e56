"""digit.report: the tables in README.md and docs/*.md are what `make report` generates from reports/*.json.

The first test holds the committed files to the committed reports; the others run the generator on a
toy set of reports in a temporary folder (with the repository's own README/docs, so their markers are
checked too) and show that one changed number makes `--check` fail naming the table. No `dvc repro`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from digit import report
from digit.errors import ConfigError

DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


def test_committed_tables_match_the_committed_reports():
    metrics = ROOT / "reports" / "metrics.json"
    if not metrics.is_file():
        pytest.skip("reports/metrics.json is absent: there is no run to hold the tables to")
    if not isinstance(json.loads(metrics.read_text()).get("render"), dict):
        pytest.skip("reports/metrics.json was written by the previous DAG (no render.*): re-run `dvc repro`, "
                    "then `make report`, and commit both")
    stale = report.update(ROOT, ROOT / "reports", check=True)
    assert not stale, (f"generated tables disagree with the committed reports/*.json: {stale}; "
                       f"run `make report` and commit README.md and docs/")


# ---------------------------------------------------------------- a toy run

def toy_reports(folder: Path, times: bool = True) -> dict:
    """A complete set of current-format reports with round, made-up numbers."""
    metrics = {
        "digit": {"fid": 71.23, "kid": 0.03125, "val_loss": 1.1, "val_token_acc": 0.68, "train_loss": 1.8,
                  "probe_top1": 0.88, "change_rate": 0.47, "cosine": 0.77},
        "vq": {"fid": 99.96, "kid": 0.0561, "val_loss": 2.8, "val_token_acc": 0.3, "train_loss": 2.9,
               "probe_top1": 0.83, "change_rate": 0.36, "cosine": 0.99},
        "render": {
            "direct": {"fid": 71.23, "kid": 0.03125, "ceiling_rfid": 63.6, "ceiling_psnr": 16.3, "ceiling_ssim": 0.63},
            "stage2_ar": {"fid": 74.0, "kid": 0.031, "ceiling_rfid": 71.7, "ceiling_psnr": 14.2, "ceiling_ssim": 0.56},
            "vqgan": {"fid": 99.96, "kid": 0.0561, "ceiling_rfid": 62.2, "ceiling_psnr": 21.4, "ceiling_ssim": 0.84},
        },
        "stability_snr_db": 20.0, "fid_floor": 30.3, "kid_floor": -3.7e-05, "num_samples": 500, "num_reference": 2000,
    }
    files = {
        "metrics.json": metrics,
        "score/direct.json": {"fid": 71.23, "kid_mean": 0.03125, "kid_std": 0.0012, "tokenizer": "discriminative"},
        "score/vqgan.json": {"fid": 99.96, "kid_mean": 0.0561, "kid_std": 0.002, "tokenizer": "vq"},
        "decoder.json": {"rfid": 63.6, "psnr": 16.3, "ssim": 0.63, "params": 579955, "steps": 2000, "images": 500},
        "stage2_ar.json": {"rfid": 71.7, "psnr": 14.2, "ssim": 0.56, "params": 996864, "steps": 800,
                           "vq_token_accuracy": 0.164},
        "vqgan.json": {"rfid": 62.2, "psnr": 21.4, "ssim": 0.84, "params": 1045635, "steps": 1000},
        "tokens.json": {"k": 512, "train": {"usage_pct": 100.0, "perplexity": 471.0}},
        "train/digit/metrics.json": {"val": {"gain_over_unigram": 5.04}},
        "stability.json": {"snr_db": [30, 20], "k": 512, "num_images": 1000, "noise_at": "stored",
                           "clean_repeat_change_rate": 0.0,
                           "rows": [{"snr_db": 30.0, "change_rate": 0.3, "cosine": 0.87},
                                    {"snr_db": 20.0, "change_rate": 0.47, "cosine": 0.77}],
                           "change_rate_snr30": 0.3, "change_rate_snr20": 0.47,
                           "k_sweep": {"k64": {"change_rate_snr30": 0.2, "change_rate_snr20": 0.32}},
                           "vq": {"rows": [{"snr_db": 30.0, "change_rate": 0.13, "cosine": 1.0},
                                           {"snr_db": 20.0, "change_rate": 0.36, "cosine": 0.99}]}},
    }
    if times:
        files["times.json"] = {"prepare": 2.5, "train@digit": 530.0, "total": 3725.0, "measured": "toy"}
    for name, obj in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(obj))
    return metrics


@pytest.fixture
def toy(tmp_path):
    """tmp_path with the repository's README.md and docs/*.md, and toy reports/."""
    for rel in DOCS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    toy_reports(tmp_path / "reports")
    return tmp_path


def report_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digit.report", "--root", str(root), *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_a_changed_number_makes_check_fail_naming_the_table(toy):
    assert report_cli(toy).returncode == 0
    readme = (toy / "README.md").read_text()
    assert "| sample FID ↓ | 71.2 (direct decoder) | 100.0 (VQGAN decoder) |" in readme
    assert "| sample KID ↓ | 0.0312 | 0.0561 |" in readme
    assert "FID 30.3, KID 0.0000" in readme  # no "-0.0000"
    assert "0.0312 ± 0.0012" in (toy / "docs/results.md").read_text()
    assert "| **total** | **1 h 02 min** |" in (toy / "docs/pipeline.md").read_text()
    ok = report_cli(toy, "--check")
    assert ok.returncode == 0, ok.stderr

    metrics = json.loads((toy / "reports/metrics.json").read_text())
    metrics["digit"]["fid"] = metrics["render"]["direct"]["fid"] = 72.0
    (toy / "reports/metrics.json").write_text(json.dumps(metrics))
    before = {rel: (toy / rel).read_text() for rel in DOCS}
    bad = report_cli(toy, "--check")
    assert bad.returncode == 1
    assert "README.md: headline" in bad.stderr and "docs/results.md: renderers" in bad.stderr
    assert "make report" in bad.stderr
    assert "tokenizers" not in bad.stderr  # the per-tokenizer table has no FID: unchanged
    assert {rel: (toy / rel).read_text() for rel in DOCS} == before  # --check writes nothing

    assert report_cli(toy).returncode == 0
    assert "| sample FID ↓ | 72.0 (direct decoder)" in (toy / "README.md").read_text()
    assert report_cli(toy, "--check").returncode == 0


def test_the_generator_is_idempotent_and_leaves_text_outside_markers_alone(toy):
    report.update(toy, toy / "reports")
    once = {rel: (toy / rel).read_text() for rel in DOCS}
    assert report.update(toy, toy / "reports") == []
    assert {rel: (toy / rel).read_text() for rel in DOCS} == once
    outside = report.BLOCK.sub("", once["README.md"])
    assert outside == report.BLOCK.sub("", (ROOT / "README.md").read_text())


def test_times_absent_says_so(toy):
    (toy / "reports/times.json").unlink()
    report.update(toy, toy / "reports")
    assert "not been timed on the current DAG" in (toy / "README.md").read_text()
    assert "Not measured on the current DAG yet" in (toy / "docs/pipeline.md").read_text()


def test_previous_dag_metrics_and_broken_markers_are_clear_errors(toy):
    (toy / "reports/metrics.json").write_text(json.dumps({"fid": 75.8, "rec": {}}))
    with pytest.raises(ConfigError, match="previous DAG"):
        report.update(toy, toy / "reports", check=True)
    bad = report_cli(toy, "--check")
    assert bad.returncode == 2 and "previous DAG" in bad.stderr

    toy_reports(toy / "reports")
    readme = (toy / "README.md").read_text()
    (toy / "README.md").write_text(readme.replace("<!-- /report:headline -->", ""))
    with pytest.raises(ConfigError, match="unbalanced"):
        report.update(toy, toy / "reports", check=True)
    (toy / "README.md").write_text(report.BLOCK.sub("", readme))
    with pytest.raises(ConfigError, match=r"README.md: block\(s\) \['headline', 'repro-time'\] missing"):
        report.update(toy, toy / "reports", check=True)


def test_number_formats():
    assert report.num(75.8272, 1) == "75.8" and report.num(-3.7e-05, 4) == "0.0000"
    assert report.num(None, 3) == report.num(float("nan"), 3) == report.num(True, 3) == "–"
    assert report.duration(2.5) == "2.5 s" and report.duration(530) == "8 min 50 s"
    assert report.duration(3725) == "1 h 02 min" and report.pct(0.16384) == "16.4 %"
