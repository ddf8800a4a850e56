"""Both GPTs and every renderer on the tiny DAG: what one repro makes, what a change re-runs, stage 2's bad
input, and its checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import expect_error, needs_fmnist, sh
from digit.stage2 import Stage2Config, build_stage2, save_stage2
from digit.tokens import TokenWriter, read_metadata, read_tokens, token_schema
from helpers import kill_after_checkpoint, stage_cmd
from test_full_dag import RENDERERS, params_file, refusal, repro_after_param_change, stage

pytestmark = [needs_fmnist, pytest.mark.slow]


def copy_repo(full_repo, tmp_path):
    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    return repo


def read_json(path):
    return json.loads(path.read_text())


def test_one_repro_reports_stage2_and_every_path_in_the_metrics(full_repo):
    report = read_json(full_repo / "reports" / "stage2_ar.json")
    assert report["kind"] == "stage2_ar" and report["images"] == 20 and report["steps"] == 6
    assert 0 < report["psnr"] < 100 and 0 < report["ssim"] < 1 and report["rfid"] > 0
    assert 0 <= report["vq_token_accuracy"] <= 1 and report["seconds_per_image"] > 0
    assert report["sampling"] == {"temperature": 1.0, "top_p": 0.8}
    live = read_json(full_repo / "reports" / "stage2_ar" / "metrics.json")
    assert live["step"] == 6 and np.isfinite(live["val"]["loss"]) and 0 <= live["val"]["token_accuracy"] <= 1
    assert (full_repo / "models" / "stage2_ar" / "vqgan" / "model.safetensors").is_file()  # a whole renderer

    metrics = read_json(full_repo / "reports" / "metrics.json")
    for tok in ("digit", "vq"):  # both GPTs, from the same repro
        assert set(metrics[tok]) == {"fid", "kid", "val_loss", "val_token_acc", "train_loss", "probe_top1",
                                     "change_rate", "cosine", "kept_snr30"}
        train = read_json(full_repo / "reports" / "train" / tok / "metrics.json")
        assert metrics[tok]["val_loss"] == train["val"]["loss"] and metrics[tok]["train_loss"] == train["train"]["loss"]
        assert metrics[tok]["probe_top1"] == read_json(full_repo / "reports" / "probe" / f"{tok}.json")["best_val_top1"]
    ceilings = {"direct": "decoder.json", "stage2_ar": "stage2_ar.json", "vqgan": "vqgan.json"}
    assert set(metrics["render"]) == set(ceilings)
    for renderer, name in ceilings.items():
        rec, score = read_json(full_repo / "reports" / name), read_json(full_repo / "reports" / "score" / f"{renderer}.json")
        # no timings: metrics.json repeats exactly
        assert set(metrics["render"][renderer]) == {"fid", "kid", "ceiling_rfid", "ceiling_psnr", "ceiling_ssim",
                                                    "roundtrip_val", "roundtrip_samples"}
        assert metrics["render"][renderer]["ceiling_rfid"] == rec["rfid"]
        assert metrics["render"][renderer]["ceiling_psnr"] == rec["psnr"]
        assert metrics["render"][renderer]["fid"] == score["fid"] and metrics["render"][renderer]["kid"] == score["kid_mean"]
        assert score["renderer"] == renderer and score["num_samples"] == 20
        decode = read_json(full_repo / "reports" / "decode" / f"{renderer}.json")
        assert decode["renderer"] == renderer and decode["images"] == 20 and decode["seconds_per_image"] > 0
    stability = read_json(full_repo / "reports" / "stability.json")
    at = {"digit": next(r for r in stability["rows"] if r["snr_db"] == 20),
          "vq": next(r for r in stability["vq"]["rows"] if r["snr_db"] == 20)}
    for tok, row in at.items():
        assert metrics[tok]["change_rate"] == row["change_rate"] and metrics[tok]["cosine"] == row["cosine"]


def test_every_renderer_renders_deterministically(full_repo, tmp_path):
    """The same seed renders the same pixels: a second decode into another folder is byte-identical."""
    for renderer, gpt in RENDERERS.items():
        model = {"direct": "models/decoder", "stage2_ar": "models/stage2_ar", "vqgan": "models/vqgan"}[renderer]
        tokens, tokenizer = {"digit": ("data/tokens", "models/codebook"), "vq": ("data/vq_tokens", "models/vqgan")}[gpt]
        proc = stage(full_repo, "decode", "--tokens", f"data/samples/{gpt}/tokens.parquet", "--renderer", renderer,
                     "--model", model, "--out", str(tmp_path / renderer), "--grid", str(tmp_path / f"{renderer}.png"),
                     "--live", str(tmp_path / "live"), "--report", str(tmp_path / "decode.json"),
                     "--val-tokens", f"{tokens}/val.parquet", "--tokenizer", tokenizer,
                     "--roundtrip", str(tmp_path / f"{renderer}-roundtrip.json"))
        assert proc.returncode == 0, proc.stderr
        # The round-trip too: the same val grids, the same draws, the same fractions.
        assert read_json(tmp_path / f"{renderer}-roundtrip.json") == \
            read_json(full_repo / "reports" / "roundtrip" / f"{renderer}.json")
        original = full_repo / "data" / "renders" / renderer
        manifest = read_json(original / "manifest.json")
        assert manifest["renderer"] == renderer and manifest["count"] == 20
        assert sorted(p.name for p in (tmp_path / renderer).iterdir()) == sorted(p.name for p in original.iterdir())
        for path in original.iterdir():
            assert (tmp_path / renderer / path.name).read_bytes() == path.read_bytes(), (renderer, path.name)
        assert (tmp_path / f"{renderer}.png").read_bytes() == \
            (full_repo / "reports" / "samples" / f"{renderer}.png").read_bytes()


def test_the_gpt_on_vq_tokens_trains_samples_and_renders_through_the_vqgan(full_repo):
    gpt_meta = read_json(full_repo / "models" / "gpt" / "vq" / "meta.json")
    assert gpt_meta["tokenizer"] == "vq" and gpt_meta["vocab_size"] == 16
    assert read_json(full_repo / "models" / "gpt" / "digit" / "meta.json")["vocab_size"] == 32
    tokens, labels, _, meta = read_tokens(full_repo / "data" / "samples" / "vq" / "tokens.parquet")
    assert meta["tokenizer"] == "vq" and meta["vocab_size"] == 16 and tokens.shape == (20, 49) and tokens.max() < 16
    manifest = read_json(full_repo / "data" / "renders" / "vqgan" / "manifest.json")
    assert manifest["renderer"] == "vqgan" and manifest["tokenizer"] == "vq"
    metrics = read_json(full_repo / "reports" / "metrics.json")
    assert metrics["vq"]["fid"] == metrics["render"]["vqgan"]["fid"]
    assert metrics["render"]["vqgan"]["ceiling_rfid"] == read_json(full_repo / "reports" / "vqgan.json")["rfid"]
    assert 0 <= read_json(full_repo / "reports" / "probe" / "vq.json")["best_val_top1"] <= 1


def test_a_new_vqgan_reruns_the_vq_side_and_leaves_the_discriminative_gpt_alone(full_repo, tmp_path):
    repo = copy_repo(full_repo, tmp_path)
    before = read_json(repo / "reports" / "metrics.json")
    ran, restored, must, reachable = repro_after_param_change(repo, {"vqgan": {"lr": 0.001}})
    assert reachable == {"train_vqgan", "vq_tokenize", "train@vq", "sample@vq", "probe@vq", "train_stage2@ar",
                         "decode@stage2_ar", "decode@vqgan", "score@stage2_ar", "score@vqgan", "stability",
                         "evaluate"}
    # score@vqgan reads the VQGAN's report (its ceiling); evaluate reads only the score reports.
    assert must == {"train_vqgan", "vq_tokenize", "train_stage2@ar", "decode@vqgan", "score@vqgan", "stability"}
    assert must <= ran <= reachable and not restored, ran
    assert not ran & {"train@digit", "sample@digit", "probe@digit", "train_decoder", "decode@direct",
                      "score@direct", "prepare", "extract", "codebook", "tokenize", "reference"}, ran
    after = read_json(repo / "reports" / "metrics.json")
    assert after["render"]["direct"] == before["render"]["direct"]
    for key in ("fid", "kid", "val_loss", "train_loss", "probe_top1"):
        assert after["digit"][key] == before["digit"][key], key
    assert after["render"]["vqgan"]["ceiling_rfid"] != before["render"]["vqgan"]["ceiling_rfid"]


def test_the_sampling_temperature_reruns_sampling_and_what_renders_it(full_repo, tmp_path):
    repo = copy_repo(full_repo, tmp_path)
    ran, restored, must, reachable = repro_after_param_change(repo, {"sample": {"temperature": 0.5}})
    assert reachable == {"sample@digit", "sample@vq", "decode@direct", "decode@stage2_ar", "decode@vqgan",
                         "score@direct", "score@stage2_ar", "score@vqgan", "evaluate"}
    assert must == {"sample@digit", "sample@vq", "decode@direct", "decode@stage2_ar", "decode@vqgan"}
    assert must <= ran <= reachable and not restored, ran
    for renderer in RENDERERS:
        assert read_json(repo / "data" / "renders" / renderer / "manifest.json")["sampling"]["temperature"] == 0.5


def test_bad_stage2_inputs_fail_early_and_clearly(full_repo, tmp_path):
    outs = ["--kind", "ar", "--out", str(tmp_path / "s2"), "--live", str(tmp_path / "live"),
            "--report", str(tmp_path / "s2.json"), "--checkpoints", str(tmp_path / "ck")]

    def write_vq(folder, grid, reverse=False):
        folder.mkdir()
        for split in ("train", "val"):
            _, labels, keys, _ = read_tokens(full_repo / "data" / "tokens" / f"{split}.parquet")
            order = slice(None, None, -1) if reverse else slice(None)
            writer = TokenWriter(folder / f"{split}.parquet",
                                 token_schema(grid, 16, {"tokenizer": "vq"}), 64)
            writer.write(keys[order], labels[order], np.zeros((len(keys), grid[0] * grid[1]), np.int16))
            writer.close()

    write_vq(tmp_path / "vq14", (14, 14))
    expect_error(refusal(full_repo, "train_stage2", *outs, "--vq-tokens", str(tmp_path / "vq14")),
                 "the VQ grid is 14x14 but the DiGIT grid is 7x7", "vqgan.grid: 7")
    write_vq(tmp_path / "shuffled", (7, 7), reverse=True)
    expect_error(refusal(full_repo, "train_stage2", *outs, "--vq-tokens", str(tmp_path / "shuffled")),
                 "do not list the same images in the same order")
    expect_error(refusal(full_repo, "train_stage2", *outs, params={"stage2": {"batch_size": 500}}),
                 "stage2.batch_size: 500 is more than the 200 train pairs")
    expect_error(refusal(full_repo, "train_stage2", *outs, "--tokens", "data/vq_tokens"),
                 "stage 2 maps DiGIT tokens", "they hold vq and vq tokens")
    # The two token folders swapped.
    expect_error(refusal(full_repo, "train_stage2", *outs, "--tokens", "data/vq_tokens", "--vq-tokens", "data/tokens"),
                 "stage 2 maps DiGIT tokens", "they hold vq and discriminative tokens",
                 "pass data/tokens and data/vq_tokens")
    assert not any((tmp_path / name).exists() for name in ("s2", "live", "s2.json", "ck"))

    # A stage-2 model trained for another DiGIT codebook (64 codes; the tokens have 32), or of the other kind.
    other = build_stage2(Stage2Config(digit_k=64, vq_k=16, grid=(7, 7), kind="ar", n_layer=1, n_head=2, n_embd=32))
    save_stage2(other, {}, tmp_path / "other")
    decode_outs = ["--out", str(tmp_path / "png"), "--grid", str(tmp_path / "grid.png"),
                   "--live", str(tmp_path / "dlive"), "--report", str(tmp_path / "d.json")]
    digit_samples = ["--tokens", "data/samples/digit/tokens.parquet"]
    vq_samples = ["--tokens", "data/samples/vq/tokens.parquet"]
    expect_error(refusal(full_repo, "decode", *digit_samples, "--renderer", "stage2_ar", "--model", str(tmp_path / "other"),
                       *decode_outs),
                 "trained for a DiGIT codebook of 64 codes, the tokens have 32")
    expect_error(refusal(full_repo, "decode", *digit_samples, "--renderer", "stage2_nar", "--model", "models/stage2_ar",
                       *decode_outs),
                 "holds a stage-2 ar model, the renderer is stage2_nar", "train_stage2@nar")

    # Each renderer takes its tokenizer's tokens: VQ samples are the VQGAN's, DiGIT samples the others'.
    for renderer, model in (("direct", "models/decoder"), ("stage2_ar", "models/stage2_ar"),
                            ("stage2_nar", "models/stage2_ar")):
        expect_error(refusal(full_repo, "decode", *vq_samples, "--renderer", renderer, "--model", model, *decode_outs),
                     f"the {renderer} renderer cannot render vq tokens", "VQ tokens go to the VQGAN")
    expect_error(refusal(full_repo, "decode", *digit_samples, "--renderer", "vqgan", "--model", "models/vqgan",
                       *decode_outs),
                 "the vqgan renderer cannot render discriminative tokens")
    assert not any((tmp_path / name).exists() for name in ("png", "grid.png", "dlive", "d.json"))


STAGE2_LONG = {"stage2": {"max_steps": 240, "checkpoint_every": 80, "eval_every": 80}}


def test_killed_stage2_nar_training_resumes_to_the_same_weights_and_renders(full_repo, tmp_path):
    """NAR is out of the default DAG but supported: it trains; SIGKILL after a checkpoint and a re-run give the
    same weights (the masks are keyed by step, not by stream state); its folder renders DiGIT samples."""
    args = ("--kind", "nar", "--out", "s2", "--report", "s2.json", "--live", "live", "--checkpoints", "ck")
    repo = copy_repo(full_repo, tmp_path)
    cmd = stage_cmd("train_stage2", *args, *params_file(repo, STAGE2_LONG))
    env = {"PYTHONPATH": str(repo)}
    sh(cmd, repo, env=env)
    reference = load_file(str(repo / "s2" / "model.safetensors"))
    (repo / "s2.json").unlink()
    sh("rm -rf s2", repo)

    kill_after_checkpoint(cmd, repo, repo / "ck", 160, env=env)
    assert not (repo / "s2").exists()
    out = sh(cmd, repo, env=env)
    assert "resumed from" in out.stdout + out.stderr
    resumed = load_file(str(repo / "s2" / "model.safetensors"))
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    assert not list((repo / "ck").iterdir())  # checkpoints removed once the model is published
    report = read_json(repo / "s2.json")
    assert report["kind"] == "stage2_nar" and report["steps"] == 240 and report["images"] == 20
    assert report["sampling"] == {"temperature": 1.0, "steps": 8} and 0 <= report["vq_token_accuracy"] <= 1

    proc = stage(repo, "decode", "--tokens", "data/samples/digit/tokens.parquet", "--renderer", "stage2_nar",
                 "--model", "s2", "--out", "nar", "--grid", "nar.png", "--live", "nar-live", "--report", "nar.json")
    assert proc.returncode == 0, proc.stderr
    manifest = read_json(repo / "nar" / "manifest.json")
    assert manifest["renderer"] == "stage2_nar" and manifest["count"] == 20
    assert manifest["stage2_sampling"] == {"temperature": 1.0, "steps": 8}
    assert len(list((repo / "nar").glob("*.png"))) == 20 and (repo / "nar.png").is_file()


def change_one_token(path) -> None:
    """Rewrite a token file with one token moved to another code: same rows, schema and digit metadata."""
    table = pq.read_table(path)
    tokens = table.column("tokens").to_pylist()
    vocab = read_metadata(path)["vocab_size"]
    tokens[0][0] = (tokens[0][0] + 1) % vocab
    column = table.schema.get_field_index("tokens")
    changed = table.set_column(column, table.schema.field("tokens"),
                               pa.array(tokens, type=table.schema.field("tokens").type))
    rows_per_group = pq.ParquetFile(path).metadata.row_group(0).num_rows
    pq.write_table(changed, path, row_group_size=rows_per_group, compression="zstd")


def test_stage2_checkpoint_is_resumed_only_on_the_same_token_bytes(full_repo, tmp_path):
    """The checkpoint fingerprint covers the token files' bytes: after a change that keeps shape and metadata the
    run starts over in a new checkpoint folder; with the original bytes back it resumes the first run."""
    repo = copy_repo(full_repo, tmp_path)
    args = ("--kind", "ar", "--out", "s2", "--report", "s2.json", "--live", "live", "--checkpoints", "ck")
    cmd = stage_cmd("train_stage2", *args, *params_file(repo, STAGE2_LONG))
    env = {"PYTHONPATH": str(repo)}

    def logged(log):  # the same command, its output kept in `log` (exec: the kill reaches the stage itself)
        return ["bash", "-c", 'exec "$@" >"$0" 2>&1', str(log), *cmd]

    kill_after_checkpoint(logged(tmp_path / "first.log"), repo, repo / "ck", 80, env=env)
    (first,) = [p.name for p in (repo / "ck").iterdir()]
    assert first.startswith("train_stage2_ar-") and (repo / "ck" / first / "step_00000080").is_dir()

    path = repo / "data" / "tokens" / "train.parquet"
    original = path.read_bytes()
    old_tokens, old_labels, old_keys, old_meta = read_tokens(path)
    change_one_token(path)
    new_tokens, new_labels, new_keys, new_meta = read_tokens(path)
    assert new_meta == old_meta and new_keys == old_keys and np.array_equal(new_labels, old_labels)
    assert new_tokens.shape == old_tokens.shape and (new_tokens != old_tokens).sum() == 1
    assert pq.read_schema(path).metadata == pq.ParquetFile(pa.BufferReader(original)).schema_arrow.metadata

    kill_after_checkpoint(logged(tmp_path / "changed.log"), repo, repo / "ck", 160, env=env)
    log = (tmp_path / "changed.log").read_text()
    assert "resumed from" not in log, log
    assert "Traceback" not in log, log
    folders = sorted(p.name for p in (repo / "ck").iterdir())
    (second,) = set(folders) - {first}
    assert len(folders) == 2 and second.startswith("train_stage2_ar-"), folders  # another fingerprint
    assert (repo / "ck" / second / "step_00000160").is_dir()
    assert sorted(p.name for p in (repo / "ck" / first).iterdir()) == ["step_00000080"]  # untouched

    path.write_bytes(original)  # the unchanged inputs: the first run's checkpoint is resumed
    out = sh(cmd, repo, env=env)
    assert f"resumed from ck/{first}/step_00000080" in out.stdout + out.stderr, out.stderr
    assert sorted(p.name for p in (repo / "ck").iterdir()) == [second]  # the finished run's checkpoints removed
    assert (repo / "s2" / "model.safetensors").is_file()
