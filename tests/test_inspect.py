"""`python -m digit.inspect`: statistics and the token-map drawing on real tokens."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import needs_fmnist, sh
from digit.inspect import file_stats
from digit.tokens import read_tokens


@needs_fmnist
def test_inspect_stats_and_token_map(tiny_repo, tmp_path):
    path = tiny_repo / "data" / "tokens" / "val.parquet"
    tokens, labels, keys, meta = read_tokens(path)
    stats = file_stats(path, top=5)
    counts = np.bincount(tokens.ravel(), minlength=meta["vocab_size"])
    assert stats["rows"] == len(keys) and stats["grid"] == [7, 7] and stats["tokens"] == tokens.size
    assert stats["codes_used"] == int((counts > 0).sum())
    assert [c["code"] for c in stats["top_codes"]] == list(np.argsort(-counts, kind="stable")[:5])
    assert stats["rows_per_label"] == np.bincount(labels).tolist()

    out = tmp_path / "map.png"
    proc = sh([sys.executable, "-m", "digit.inspect", str(path), "--key", keys[3], "--out", str(out),
               "--images", "data/images", "--members", "data/tokens/train.parquet"], tiny_repo)
    assert json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])["rows"] == len(keys)
    assert "image found" in proc.stdout and "codes with example patches" in proc.stdout
    with Image.open(out) as img:
        assert img.size[0] == 2 * 7 * 32 + 30 and img.size[1] > 7 * 32
    bad = sh([sys.executable, "-m", "digit.inspect", str(path), "--key", "nope"], tiny_repo, check=False)
    assert bad.returncode == 2 and "no row with key 'nope'" in bad.stderr
