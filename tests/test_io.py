"""Unit tests for parameters, atomic outputs, shards and token files."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT
from digit.atomic import atomic_dir, atomic_file
from digit.errors import ConfigError
from digit.params import Yaml12Loader, load_params, validate
from digit.shards import ShardSink, encode_npy, encode_png, iter_samples
from digit.tokens import TokenWriter, read_metadata, read_tokens, token_schema, token_stats


def default_params() -> dict:
    return yaml.load((ROOT / "params.yaml").read_text(), Loader=Yaml12Loader)


def test_default_params_are_valid():
    assert validate(default_params()) == []


def test_params_report_every_problem_with_its_key(tmp_path):
    params = default_params()
    params["codebook"]["codebok_k"] = 3          # typo of an existing key
    params["codebook"]["niter"] = "ten"          # wrong type
    params["data"]["on_bad_image"] = "ignore"    # not an allowed value
    params["encoder"]["batch_size"] = 0          # below minimum
    params["tokenize"]["batch_size"] = True      # bool is not an int here
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert "codebook.codebok_k: unknown parameter (did you mean `codebook.k`?)" in msg
    assert "codebook.niter: expected int" in msg
    assert "data.on_bad_image: 'ignore' is not one of 'skip', 'fail'" in msg
    assert "encoder.batch_size: 0 is below the minimum 1" in msg
    assert "tokenize.batch_size: expected int, got True" in msg


def test_params_cross_field_rule_k_vs_max_points(tmp_path):
    params = default_params()
    params["codebook"].update(k=1000, max_points=500)
    problems = validate(params)
    assert len(problems) == 1 and problems[0].startswith("codebook.k: 1000 centroids")


def test_params_read_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2: `precision: "no"` becomes `precision: no`."""
    text = (ROOT / "params.yaml").read_text().replace('precision: "no"', "precision: no")
    assert text.count("precision: no ") == 4  # gpt, decoder, vqgan, stage2
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)  # YAML 1.1 would read `no` as False and fail validation
    assert all(params[s]["precision"] == "no" for s in ("gpt", "decoder", "vqgan", "stage2"))
    assert params["gpt"]["class_conditional"] is True and params["stability"]["snr_db"][-1] == 0.01


def test_params_missing_key_and_file(tmp_path):
    params = default_params()
    del params["codebook"]["seed"]
    assert validate(params) == ["codebook.seed: missing from params.yaml"]
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out) as tmp:  # replacing a complete output
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert not (tmp_path / "f.json").exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


def write_shard(path, samples):
    path.parent.mkdir(parents=True)
    with ShardSink(path.parent, "train", shard_size=100) as sink:
        for s in samples:
            sink.write(s)
    return path.parent / "train-000000.tar"


def test_shards_roundtrip_and_are_byte_deterministic(tmp_path):
    img = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    feat = np.random.default_rng(0).standard_normal((7, 7, 16)).astype(np.float16)
    samples = [{"__key__": f"k{i}", "png": encode_png(img), "npy": encode_npy(feat), "cls": b"3",
                "json": json.dumps({"i": i}).encode()} for i in range(3)]
    a = write_shard(tmp_path / "a" / "x", samples)
    b = write_shard(tmp_path / "b" / "x", samples)
    assert a.read_bytes() == b.read_bytes()
    got = list(iter_samples([str(a)]))
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2"]
    assert got[0]["png"].shape == (28, 28, 3) and (got[0]["png"][..., 0] == img).all()
    assert got[1]["npy"].dtype == np.float16 and (got[1]["npy"] == feat).all()
    assert got[2]["cls"] == 3 and got[2]["json"] == {"i": 2}
    # Object-storage style URLs: webdataset's pipe: opener streams the same samples.
    piped = list(iter_samples([f"pipe:cat {a}"]))
    assert [s["__key__"] for s in piped] == ["k0", "k1", "k2"]


def test_shard_with_pickle_member_is_rejected_not_unpickled(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("s0.cls", b"1"), ("s0.pyd", pickle.dumps(Boom()))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match=r"s0\.pyd has a disallowed type '\.pyd'"):
        list(iter_samples([str(path)]))


def test_token_writer_row_groups_metadata_and_range_check(tmp_path):
    schema = token_schema((2, 3), 40, {"encoder": {"name": "x"}})
    path = tmp_path / "t.parquet"
    writer = TokenWriter(path, schema, row_group_size=4)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, size=(10, 6))
    for lo in range(0, 10, 3):  # batches of 3 must not change row groups of 4
        writer.write([f"k{i}" for i in range(lo, min(lo + 3, 10))], range(lo, min(lo + 3, 10)), tokens[lo:lo + 3])
    writer.close()
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    got, labels, keys, info = read_tokens(path)
    assert (got == tokens).all() and list(labels) == list(range(10)) and keys[3] == "k3"
    assert info["grid"] == [2, 3] and info["vocab_size"] == 40
    assert pq.read_schema(path).field("tokens").type.value_type.bit_width == 16
    with pytest.raises(ConfigError, match=r"token ids span \[0, 39\] but the vocabulary has 16 codes"):
        read_tokens(path, vocab_size=16)


def test_token_file_validation_messages(tmp_path):
    import pyarrow as pa

    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"key": ["a"], "label": [1], "tokens": [[1, 2]]}), bare)
    with pytest.raises(ConfigError, match="missing digit metadata"):
        read_metadata(bare)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        read_metadata(junk)
    with pytest.raises(ConfigError, match="token file not found"):
        read_metadata(tmp_path / "missing.parquet")


def test_token_stats():
    stats = token_stats(np.array([5, 5, 0, 0]))
    assert stats["codes_used"] == 2 and stats["usage_pct"] == 50.0
    assert stats["perplexity"] == pytest.approx(2.0)


def test_params_stage2_on_vq_tokens_is_refused(tmp_path):
    params = default_params()
    params["tokenizer"]["kind"] = "vq"
    assert validate(params) == []  # VQ tokens are rendered by the VQGAN: decoder.kind direct
    params["decoder"]["kind"] = "stage2_nar"
    problems = validate(params)
    assert len(problems) == 1 and problems[0].startswith("decoder.kind: stage2_nar translates DiGIT tokens")
    params["tokenizer"]["kind"] = "clip"
    assert validate(params) == ["tokenizer.kind: 'clip' is not one of 'discriminative', 'vq' "
                                "[discriminative (DiGIT tokens) | vq (VQGAN tokens)]"]
