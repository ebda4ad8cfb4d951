"""The model-directory writer: tensors streamed into safetensors shards, read back exactly."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import convert, load


@pytest.mark.parametrize("kw", [{}, dict(quantize=True), dict(dtype="bfloat16")])
def test_sharded_output_equals_single_file_output(tmp_path, kw):
    config = tiny_config()
    hf = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config, seed=2))
    single = convert(str(hf), str(tmp_path / "single"), progress=False, **kw)
    sharded = convert(str(hf), str(tmp_path / "sharded"), progress=False, max_shard_bytes=10_000, **kw)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in sharded.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum((sharded / f).stat().st_size for f in files)
    one = mx.load(str(single / "model.safetensors"))
    many = {k: v for f in files for k, v in mx.load(str(sharded / f)).items()}
    assert set(one) == set(many) == set(index["weight_map"])
    for name, t in one.items():
        assert t.dtype == many[name].dtype and mx.array_equal(t, many[name]).item(), name
    assert not list(sharded.glob("*.spill"))
    x = mx.array([[1, 5, 9, 2]])
    a, b = load(str(single))[0](x), load(str(sharded))[0](x)
    assert np.array_equal(np.array(a), np.array(b))
