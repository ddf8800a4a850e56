"""Unit tests for parameters, atomic outputs, model artifacts, shards and token files."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import ROOT
from digit.artifact import load_weights, read_artifact, save_artifact
from digit.atomic import atomic_dir, atomic_file
from digit.errors import ConfigError
from digit.params import Yaml12Loader, load_params
from digit.schema import validate
from digit.shards import ShardSink, WindowedShards, encode_npy, encode_png, iter_samples
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


def test_precision_auto_resolves_per_device_and_bf16_is_refused_where_emulated(monkeypatch):
    """`auto` is bf16 only where the hardware has it; an explicit bf16 on a CPU that emulates it
    (about 100x slower than fp32 on AVX2) is refused by the params check, naming the key and the fix."""
    import digit.precision as precision

    monkeypatch.setattr(precision, "_native_bf16", lambda device_type: False)
    assert precision.resolve_precision("auto", "cpu") == "no" and precision.resolve_precision("fp32") == "no"
    params = default_params()
    params["gpt"]["precision"] = "bf16"
    if not torch.cuda.is_available():
        (problem,) = validate(params)
        assert problem.startswith("gpt.precision: bf16 is emulated in software") and "use auto" in problem
    monkeypatch.setattr(precision, "_native_bf16", lambda device_type: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16" and validate(params) == []
    params["vqgan"]["precision"] = "fp16"
    if not torch.cuda.is_available():
        assert validate(params) == ["vqgan.precision: fp16 needs a CUDA GPU; use auto or no"]


def test_params_read_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2: `precision: "no"` becomes `precision: no`."""
    text = (ROOT / "params.yaml").read_text()
    # gpt/vqgan/stage2/train_encoder, decoder
    assert text.count("precision: auto ") == 4 and text.count('precision: "no" ') == 1
    # as after `dvc exp run -S gpt.precision=no ...`: auto keys set to no, and the quoted "no" written bare
    text = text.replace("precision: auto ", "precision: no ").replace('precision: "no" ', "precision: no ")
    assert text.count("precision: no ") == 5
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)  # YAML 1.1 would read `no` as False and fail validation
    assert all(params[s]["precision"] == "no" for s in ("gpt", "decoder", "vqgan", "stage2", "train_encoder"))
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
    assert got[0]["image"].shape == (28, 28, 3) and (got[0]["image"][..., 0] == img).all()
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


def test_params_headline_snr_is_one_of_snr_db_and_the_kind_switches_are_gone():
    """One DAG runs every tokenizer and renderer: tokenizer.kind / decoder.kind no longer exist, and the SNR
    evaluate reports (stability.headline_snr) must be one the stability stage measures."""
    params = default_params()
    assert params["stability"]["headline_snr"] in params["stability"]["snr_db"]
    for snr in (0.01, 30, 20.0):
        params["stability"]["headline_snr"] = snr
        assert validate(params) == []
    params["stability"]["headline_snr"] = 7
    assert validate(params) == ["stability.headline_snr: 7 is not one of stability.snr_db "
                                "[30, 25, 20, 15, 10, 5, 1, 0.01]; pick one of them"]
    params["stability"]["headline_snr"] = "20"
    problems = validate(params)
    assert len(problems) == 1 and problems[0].startswith("stability.headline_snr: expected float, got str '20'")
    del params["stability"]["headline_snr"]
    assert validate(params) == ["stability.headline_snr: missing from params.yaml"]

    params = default_params()
    params["tokenizer"] = {"kind": "vq"}
    params["decoder"]["kind"] = "stage2_nar"
    problems = sorted(validate(params))
    assert len(problems) == 2
    assert problems[0].startswith("decoder.kind: unknown parameter")
    assert problems[1].startswith("tokenizer.kind: unknown parameter")


# ---------------------------------------------------------------- digit/artifact.py

@dataclass
class TinyConfig:
    width: int = 4
    depth: int = 1
    grid: tuple = (2, 2)


class TinyNet(torch.nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(config.width, config.width) for _ in range(config.depth)])
        self.register_buffer("step", torch.tensor(0))

    def forward(self, x):
        return self.layers(x)


def tiny_net(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(TinyConfig(**kw))


def as_tuple_grid(raw: dict) -> dict:
    return {**raw, "grid": tuple(raw["grid"])}


def test_artifact_round_trip(tmp_path):
    model = tiny_net(grid=(3, 4))
    model.step.fill_(7)
    meta = {"grid": [3, 4], "vocab_size": 16, "classes": ["a", "b"]}
    save_artifact(model, meta, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"width": 4, "depth": 1, "grid": [3, 4]}
    config, got_meta = read_artifact(tmp_path / "m", TinyConfig, "train", convert=as_tuple_grid)
    assert config == model.config and got_meta == meta
    loaded = load_weights(TinyNet(config), tmp_path / "m", "train")
    assert not loaded.training and int(loaded.step) == 7  # buffers travel too
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    # Replacing a complete output, with another folder copied in: nothing stale, no temporary left.
    other = tiny_net(seed=1)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "f.txt").write_text("x")
    save_artifact(other, {"v": 2}, tmp_path / "m", include={"sub": tmp_path / "extra"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra", "m"]
    assert (tmp_path / "m" / "sub" / "f.txt").read_text() == "x"
    config, got_meta = read_artifact(tmp_path / "m", TinyConfig, "train", convert=as_tuple_grid)
    assert got_meta == {"v": 2} and config == TinyConfig()
    assert torch.equal(load_weights(TinyNet(config), tmp_path / "m", "train")(x), other(x))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "meta.json"])
def test_artifact_missing_file_names_the_producer(tmp_path, name):
    save_artifact(tiny_net(), {}, tmp_path / "m")
    (tmp_path / "m" / name).unlink()
    folder = tmp_path / "m"
    with pytest.raises(ConfigError) as err:
        read_artifact(folder, TinyConfig, "train_vqgan")
    assert str(err.value) == (f"{folder / name}: missing; {folder} is not a complete `train_vqgan` output, "
                              "re-run `dvc repro train_vqgan`")
    with pytest.raises(ConfigError, match=r"nowhere/model.safetensors: missing; .*`train_decoder` output, "
                                          r"re-run `dvc repro train_decoder`"):
        read_artifact(tmp_path / "nowhere", TinyConfig, "train_decoder")


def test_artifact_unknown_config_keys_and_damaged_json(tmp_path):
    save_artifact(tiny_net(), {}, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "heads": 2, "act": "gelu"}))
    with pytest.raises(ConfigError, match=r"config.json: unknown keys \['act', 'heads'\], written by another "
                                          r"version of the code; re-run `dvc repro train`"):
        read_artifact(tmp_path / "m", TinyConfig, "train")
    config_path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"the folder is damaged, re-run `dvc repro train`"):
        read_artifact(tmp_path / "m", TinyConfig, "train")


def test_artifact_weights_that_do_not_fit_the_config_are_a_config_error(tmp_path):
    save_artifact(tiny_net(width=4, depth=2), {}, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    raw = json.loads(config_path.read_text())
    for change, fragment in (({"width": 8}, r"model.safetensors does not match config.json: .*size mismatch"),
                             ({"depth": 3}, r"model.safetensors does not match config.json \(missing \['layers.2"),
                             ({"depth": 1}, r"model.safetensors does not match config.json \(missing \[\], "
                                            r"unexpected \['layers.1")):
        config_path.write_text(json.dumps({**raw, **change}))
        config, _ = read_artifact(tmp_path / "m", TinyConfig, "train_stage2")
        with pytest.raises(ConfigError, match=fragment + r".*re-run `dvc repro train_stage2`") as err:
            load_weights(TinyNet(config), tmp_path / "m", "train_stage2")
        assert type(err.value) is ConfigError and not isinstance(err.value, RuntimeError)
    # The same through a real loader: a GPT whose config.json was edited.
    from digit.gpt import GPT, GPTConfig
    from digit.training import load_trained, save_trained

    save_trained(GPT(GPTConfig(vocab_size=16, block_size=5, n_layer=1, n_head=2, n_embd=32)), {}, tmp_path / "gpt")
    config_path = tmp_path / "gpt" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "n_embd": 64}))
    with pytest.raises(ConfigError, match=r"gpt/model.safetensors does not match config.json: .*re-run `dvc repro "
                                          r"train`"):
        load_trained(tmp_path / "gpt")


# ---------------------------------------------------------------- digit/shards.WindowedShards

class MemoryShards(WindowedShards):
    """Shards held in memory: shard i holds `counts[i]` consecutive ids, and the ids x 10 as a second array."""

    def __init__(self, counts, window):
        self.counts, self.window = list(counts), window
        starts = np.cumsum([0, *counts])
        self.data = [np.arange(starts[i], starts[i + 1]) for i in range(len(counts))]
        self.reads = 0

    def parts(self, index):
        self.reads += 1
        return self.data[index], self.data[index] * 10


@pytest.mark.parametrize("counts", [[5, 3, 7, 1, 4], [10], [2, 9, 4, 4, 6, 1, 8, 3], [1, 1, 1, 13, 0, 2]])
@pytest.mark.parametrize("window", [1, 2, 3])
def test_windowed_shards_epoch_length_is_what_the_batches_yield(counts, window):
    shards = MemoryShards(counts, window)
    total = sum(counts)
    for batch_size in (1, 2, 3, 4, 5, 7, total, total + 1):
        for seed in range(3):
            for epoch in range(3):
                shards.reads = 0
                expected = shards.epoch_length(batch_size, seed, epoch)
                assert shards.reads == 0  # counted from shard sizes, no shard read
                batches = list(shards.windowed_batches(batch_size, seed, epoch))
                assert expected == len(batches), (counts, window, batch_size, seed, epoch)
                assert all(len(ids) == batch_size and np.array_equal(tens, ids * 10) for ids, tens in batches)
                ids = np.concatenate([b[0] for b in batches]) if batches else np.array([], int)
                assert len(set(ids.tolist())) == len(ids)  # no row twice
                again = list(shards.windowed_batches(batch_size, seed, epoch))  # a pure function of (seed, epoch)
                assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again)) and len(again) == len(batches)
        # Unshuffled: every row once, in shard order, the last batch of each window may be short.
        plain = np.concatenate([ids for ids, _ in shards.windowed_batches(batch_size, 0, 0, shuffle=False)])
        assert np.array_equal(plain, np.arange(total))
        limited = sum(len(ids) for ids, _ in shards.windowed_batches(batch_size, 0, 0, shuffle=False, limit=5))
        assert limited == min(5, total)
    orders = {tuple(np.concatenate([b[0] for b in shards.windowed_batches(1, 0, epoch)])) for epoch in range(4)}
    assert len(orders) > 1 or len(counts) == 1 and counts[0] <= 1  # epochs reshuffle
