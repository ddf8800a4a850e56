"""digit.sweep: the sampling sweep read back from `dvc exp show --json` (make sweep), and its table.

A made-up `dvc exp show --json` (the shape DVC 3 prints) holds the baseline, sampling arms, a sample-seed
arm, an ablation arm that changes another key, a running arm and a queued one: only the finished sampling
arms are rows, each curve varies one key, the spread and the best settings are right, the files are written
and `make report`'s table marks the best. No `dvc exp run`.
"""

from __future__ import annotations

import json
import sys

import pytest

from digit import report, sweep
from digit.errors import ConfigError
from test_report import toy_reports

SAMPLE = {"num_per_class": 50, "batch_size": 100, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0,
          "seed": 0}


def entry(name: str, digit_fid: float, vq_fid: float, *, sample=None, other=None, rev: str = "") -> dict:
    params = {"sample": {**SAMPLE, **(sample or {})}, "gpt": {"n_layer": 6, **(other or {})}}
    metrics = {"digit": {"fid": digit_fid, "kid": digit_fid / 2000}, "vq": {"fid": vq_fid, "kid": vq_fid / 2000},
               "render": {"direct": {"fid": digit_fid}, "stage2_ar": {"fid": digit_fid + 10},
                          "vqgan": {"fid": vq_fid}}, "num_samples": 500}
    return {"rev": rev or name, "name": name, "data": {
        "params": {"params.yaml": {"data": params}}, "metrics": {"reports/metrics.json": {"data": metrics}}}}


def experiment(state: str, *args, **kwargs) -> dict:
    row = entry(*args, **kwargs)
    return {"executor": {"state": state, "name": "dvc-task"} if state else None, "name": row["name"], "revs": [row]}


def shown() -> list:
    baseline = entry("main", 86.0, 100.0, rev="0123abcd")
    baseline["experiments"] = [
        experiment("success", "smp-cfg-2", 80.0, 94.0, sample={"cfg_scale": 2.0}),
        experiment("success", "smp-cfg-4", 84.0, 92.0, sample={"cfg_scale": 4.0}),
        experiment(None, "smp-topk-12", 83.0, 99.0, sample={"top_k": 12}),  # its queue entry already cleared
        experiment("success", "smp-seed-1", 88.0, 98.0, sample={"seed": 1}),
        experiment("success", "smp-cfg-2-k12", 79.0, 95.0, sample={"cfg_scale": 2.0, "top_k": 12}),
        experiment("success", "abl-deeper", 70.0, 90.0, other={"n_layer": 8}),       # not a sampling arm
        experiment("running", "smp-cfg-3", 86.0, 100.0, sample={"cfg_scale": 3.0}),  # baseline's numbers
        experiment("queued", "smp-temp-0.9", 86.0, 100.0, sample={"temperature": 0.9}),
    ]
    return [{"rev": "workspace", "name": None, "data": {}}, baseline]


def test_only_finished_sampling_arms_are_rows_and_each_curve_varies_one_key():
    rows = sweep.sweep_rows(*sweep.parse_exp_show(shown()))
    assert [r["name"] for r in rows] == ["main", "smp-cfg-2", "smp-cfg-4", "smp-topk-12", "smp-seed-1", "smp-cfg-2-k12"]
    assert rows[1]["stage2_ar_fid"] == 90.0 and rows[1]["direct_fid"] == 80.0 and rows[1]["cfg_scale"] == 2.0
    curves = sweep.curves(rows)
    assert [r["cfg_scale"] for r in curves["cfg_scale"]] == [1.0, 2.0, 4.0]
    assert [r["top_k"] for r in curves["top_k"]] == [0, 12]  # the combined arm is in no curve
    assert [r["name"] for r in curves["temperature"]] == ["main"]


def test_spread_and_best_settings():
    summary = sweep.summarize(sweep.sweep_rows(*sweep.parse_exp_show(shown())), "0123abcd")
    spread = summary["seed_spread"]
    assert spread["seeds"] == [0, 1]
    assert spread["digit_fid_mean"] == pytest.approx(87.0) and spread["digit_fid_sd"] == pytest.approx(2 ** 0.5)
    # Each tokenizer's best at the baseline's sample seed: a seed arm is not a setting.
    assert summary["best"]["digit"]["name"] == "smp-cfg-2-k12" and summary["best"]["digit"]["top_k"] == 12
    assert summary["best"]["vq"]["name"] == "smp-cfg-4" and summary["best"]["vq"]["fid"] == 92.0
    assert summary["best"]["both"]["name"] == "smp-cfg-2" and summary["best"]["both"]["fid"] == 87.0


def test_no_committed_run_and_non_finite_numbers_are_clear_errors():
    with pytest.raises(ConfigError, match="no committed run"):
        sweep.parse_exp_show([{"rev": "workspace", "data": {}}], "HEAD")
    data = shown()
    data[1]["experiments"][0]["revs"][0]["data"]["metrics"]["reports/metrics.json"]["data"]["digit"]["fid"] = float("nan")
    with pytest.raises(ConfigError, match="smp-cfg-2: non-finite digit.fid"):
        sweep.sweep_rows(*sweep.parse_exp_show(data))


def test_main_writes_the_files_and_the_report_table_marks_the_best(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "exp_rows", lambda rev, root: sweep.parse_exp_show(shown(), rev))
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "0123abcd\n"})())
    toy_reports(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sweep", "--reports", str(tmp_path)])
    sweep.main()
    data = json.loads((tmp_path / "sampling.json").read_text())
    assert data["baseline"] == "0123abcd" and len(data["rows"]) == 6
    tsv = (tmp_path / "sampling" / "cfg_scale.tsv").read_text().splitlines()
    assert tsv[0] == "cfg_scale\tdigit_fid\tvq_fid\tdigit_kid\tvq_kid" and tsv[2].startswith("2.0\t80.0\t94.0")
    assert (tmp_path / "sampling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.tmp*"))

    text = report.sampling(report.Reports(tmp_path))
    lines = text.splitlines()
    assert lines[0].startswith("| sampling (what differs from the baseline run) | DiGIT FID |")
    assert "stage 2 AR → VQGAN decoder FID" in lines[0]
    assert lines[2].startswith("| baseline (cfg_scale 1, top_k 0, temperature 1, top_p 1, seed 0) | 86.0 |")
    assert "Experiments on commit 0123abc; 500 samples" in text
    assert "| cfg_scale 4 | 84.0 | 0.0420 | **92.0** |" in text
    assert "| cfg_scale 2, top_k 12 | **79.0** |" in text and "| cfg_scale 2 ◀ both | 80.0 |" in text
    assert "DiGIT FID 87.0 +- 1.4" in text and "Best (bold): DiGIT smp-cfg-2-k12, VQ smp-cfg-4; ◀ both: smp-cfg-2" in text


def test_the_table_says_when_there_is_no_sweep(tmp_path):
    toy_reports(tmp_path)
    assert "make sweep" in report.sampling(report.Reports(tmp_path))


DECODER = {"feature_weight": 1.0, "adv_weight": 0.1, "disc_start": 250, "adv_start": 1000, "token_noise": 0.1,
           "width": 96}


def paint_entry(name: str, rfid: float, fid: float, decoder=None, sample=None) -> dict:
    row = entry(name, fid, 90.0, sample=sample)
    data = row["data"]
    data["params"]["params.yaml"]["data"]["decoder"] = {**DECODER, **(decoder or {})}
    metrics = data["metrics"]["reports/metrics.json"]["data"]
    metrics["fid_floor"] = 30.0
    metrics["render"]["direct"].update(ceiling_rfid=rfid, ceiling_ssim=0.6, kid=fid / 2000, roundtrip_val=0.6,
                                       roundtrip_samples=0.55)
    return row


def test_paint_rows_keep_decoder_arms_only_and_the_table_shows_each_against_the_floor(tmp_path, monkeypatch):
    baseline = paint_entry("main", 41.5, 60.0)
    baseline["rev"] = "0123abcd"
    wrap = lambda row: {"executor": {"state": "success"}, "name": row["name"], "revs": [row]}  # noqa: E731
    baseline["experiments"] = [wrap(paint_entry("dec-no-feature", 69.0, 75.0, {"feature_weight": 0.0})),
                               wrap(paint_entry("dec-no-noise", 40.0, 63.0, {"token_noise": 0.0})),
                               wrap(paint_entry("smp-cfg-2", 41.5, 58.0, sample={"cfg_scale": 2.0}))]
    shown_ = [{"rev": "workspace", "name": None, "data": {}}, baseline]
    rows = sweep.paint_rows(*sweep.parse_exp_show(shown_))
    assert [r["name"] for r in rows] == ["main", "dec-no-feature", "dec-no-noise"]  # a sampling arm is not one
    assert rows[1]["changed"] == {"decoder.feature_weight": 0.0} and rows[1]["ceiling_rfid"] == 69.0

    monkeypatch.setattr(sweep, "exp_rows", lambda rev, root: sweep.parse_exp_show(shown_, rev))
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "0123abcd\n"})())
    toy_reports(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sweep", "--paint", "--reports", str(tmp_path)])
    sweep.main()
    assert json.loads((tmp_path / "paint.json").read_text())["baseline"] == "0123abcd"
    text = report.paint(report.Reports(tmp_path))
    assert text.splitlines()[0].startswith("| decoder recipe (what differs from the default) | ceiling rFID (x floor) |")
    assert ("| default (feature_weight 1, adv_weight 0.1, disc_start 250, adv_start 1000, token_noise 0.1) | "
            "41.5 (1.38x) | 0.600 | 60.0 (2.00x) |") in text
    assert "| feature_weight 0 | 69.0 (2.30x) |" in text and "Experiments on commit 0123abc" in text
    (tmp_path / "paint.json").unlink()
    assert "make paint" in report.paint(report.Reports(tmp_path))
