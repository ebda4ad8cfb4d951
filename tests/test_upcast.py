"""16-bit weights stay 16-bit in memory while the CPU computes in float32 (upcast.py), the KV cache
is stored in the narrower dtype, and generation bounds MLX's run-ahead through its memory limit
(memory.RunAheadBound) and gives the limit back afterwards."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

try:  # tests/ may or may not be a package
    from . import reference as R
    from .tiny import bf16_round, random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    import reference as R
    from tiny import bf16_round, random_weights, tiny_config, write_hf_checkpoint

import mlx_llama.upcast as U
from mlx_llama import convert, load
from mlx_llama.cache import QuantizedKVCache
from mlx_llama.memory import RUN_AHEAD_BYTES, model_weights_bytes

GEN = sys.modules["mlx_llama.generate"]  # the module (the package exports a function of that name)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    cfg = tiny_config(num_key_value_heads=2, tie_word_embeddings=True)
    w = random_weights(cfg, seed=11)
    hf = write_hf_checkpoint(tmp / "hf", cfg, w, dtype="bfloat16")
    model, tok = load(str(convert(str(hf), str(tmp / "mlx"), progress=False)))
    return model, tok, cfg, w


def test_matrices_stay_bf16_and_compute_is_float32(bf16_model):
    model, _, cfg, w = bf16_model
    params = dict(tree_flatten(model.parameters()))
    assert model.stored_dtype == mx.bfloat16 and model.compute_dtype == mx.float32
    # Every matrix as stored; only the vectors (norm weights) widened, being tiny.
    assert {p.dtype for p in params.values() if p.ndim >= 2} == {mx.bfloat16}
    assert {p.dtype for p in params.values() if p.ndim == 1} == {mx.float32}
    matrices = sum(p.size for p in params.values() if p.ndim >= 2)
    vectors = sum(p.size for p in params.values() if p.ndim == 1)
    assert model_weights_bytes(model) == 2 * matrices + 4 * vectors
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    got = model(mx.array(tokens))
    assert got.dtype == mx.float32
    rounded = {k: bf16_round(v) for k, v in w.items()}
    assert R.rel_l2(np.array(got), R.llama_forward(rounded, cfg, tokens)) < 1e-4


def test_kv_cache_is_stored_bf16_and_read_as_float32(bf16_model):
    model, _, cfg, _ = bf16_model
    assert model.kv_dtype == mx.bfloat16
    cache = model.make_cache()
    k = mx.random.normal((1, cfg["num_key_value_heads"], 3, 16))
    got_k, got_v = cache[0].update_and_fetch(k, 2 * k)
    assert cache[0].keys.dtype == mx.bfloat16 and got_k.dtype == mx.float32
    # What comes back is the stored (rounded) value, exactly.
    assert mx.array_equal(got_k, k.astype(mx.bfloat16).astype(mx.float32))
    assert not mx.array_equal(got_k, k)
    # Quantized caches keep float32 scales whatever the storage dtype: bf16 ones would add
    # rounding as large as half an 8-bit step (head_dim 32: the tiny model's 16 cannot be grouped).
    q = QuantizedKVCache(bits=8, group_size=32)
    q.dtype = mx.bfloat16
    k = mx.random.normal((1, 2, 3, 32))
    qk, _ = q.update_and_fetch(k, k)
    assert q.keys[1].dtype == mx.float32 and qk.dtype == mx.float32
    assert mx.array_equal(qk, mx.dequantize(*mx.quantize(k, group_size=32, bits=8), group_size=32, bits=8))


def test_widening_in_pieces_computes_the_same_logits(bf16_model, monkeypatch):
    """The head and the MLP widened a few rows at a time (each piece after the previous product)
    give the logits of the one-piece product."""
    model, _, _, _ = bf16_model
    tokens = mx.array([[7, 3, 2, 9, 4]])
    whole = np.array(model(tokens))
    monkeypatch.setattr(U, "CHUNK_ELEMENTS", 100)  # rows of 64 inputs: one row per piece
    pieces = []
    orig = U._by_rows

    def spy(n_rows, row_elements, product, widens=True):
        pieces.append(-(-n_rows // max(1, U.CHUNK_ELEMENTS // row_elements)) if widens else 1)
        return orig(n_rows, row_elements, product, widens)

    monkeypatch.setattr(U, "_by_rows", spy)
    chunked = np.array(model(tokens))
    assert max(pieces) > 100  # the vocabulary head went row by row
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_quantized_layers_widen_scales_before_dequantizing(tmp_path):
    """A float16-scaled quantized embedding: rows dequantized in float32 are exact, in float16 not."""
    cfg = tiny_config(tie_word_embeddings=True)
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, random_weights(cfg, seed=2), dtype="float16")
    model, _ = load(str(convert(str(hf), str(tmp_path / "q"), quantize=True, q_group_size=32, progress=False)))
    emb = model.model.embed_tokens
    assert type(emb) is U.UpcastQuantizedEmbedding and emb.scales.dtype == mx.float16
    ids = mx.array([[1, 5, 17]])
    want = mx.dequantize(emb.weight, emb.scales.astype(mx.float32), emb.biases.astype(mx.float32),
                         group_size=emb.group_size, bits=emb.bits)[ids]
    got = emb(ids)
    assert got.dtype == mx.float32 and mx.array_equal(got, want)


def test_generation_bounds_the_memory_limit_and_restores_it(bf16_model):
    model, tok, _, _ = bf16_model
    before = mx.get_memory_limit()
    cache = model.make_cache()
    seen = []
    steps = GEN.generate_step(mx.array([1, 2, 3, 4, 5], dtype=mx.uint32), model, max_tokens=6, cache=cache)
    for _ in steps:
        seen.append((mx.get_memory_limit(), sum(c.nbytes for c in cache)))
    weights = model_weights_bytes(model)
    # During generation: what the process held before (the weights and whatever else is alive),
    # plus what the cache holds now, plus the allowance; far below the default limit.
    base = {limit - held for limit, held in seen[:-1]}
    assert len(base) == 1 and base.pop() >= weights + RUN_AHEAD_BYTES
    assert seen[0][0] < before
    # Other arrays the caller holds raise the limit by their size rather than starve generation.
    ballast = mx.zeros((1 << 20,))  # 4 MB
    mx.eval(ballast)
    cache2 = model.make_cache()
    steps = GEN.generate_step(mx.array([1, 2, 3], dtype=mx.uint32), model, max_tokens=3, cache=cache2)
    next(steps)
    assert mx.get_memory_limit() - sum(c.nbytes for c in cache2) >= weights + ballast.nbytes + RUN_AHEAD_BYTES
    steps.close()
    assert mx.get_memory_limit() == before  # given back at the end
    # ... and when the consumer stops early.
    steps = GEN.generate_step(mx.array([1, 2, 3], dtype=mx.uint32), model, max_tokens=50)
    next(steps)
    assert mx.get_memory_limit() < before
    steps.close()
    assert mx.get_memory_limit() == before


def test_bounded_and_unbounded_generation_give_the_same_tokens(bf16_model, monkeypatch):
    model, _, _, _ = bf16_model
    prompt = mx.array([5, 4, 3, 2, 1, 8, 9], dtype=mx.uint32)
    bounded = [t for t, _ in GEN.generate_step(prompt, model, max_tokens=12, prefill_step_size=3)]
    monkeypatch.setattr(GEN, "bounds_run_ahead", lambda m: False)
    free = [t for t, _ in GEN.generate_step(prompt, model, max_tokens=12, prefill_step_size=3)]
    assert bounded == free


def test_float32_models_keep_stock_layers(tmp_path):
    """Nothing to widen: MLX's own layers, untouched; generation still bounds the run-ahead."""
    cfg = tiny_config()
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, random_weights(cfg, seed=4))
    model, _ = load(str(convert(str(hf), str(tmp_path / "mlx"), progress=False)))
    assert model.stored_dtype == model.compute_dtype == mx.float32
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert GEN.bounds_run_ahead(model)


def test_kv_storage_dtype_follows_what_each_cache_stores(bf16_model):
    from mlx_llama.memory import kv_bytes_per_position, kv_storage_dtype

    model, _, _, _ = bf16_model
    assert kv_storage_dtype(model) == mx.bfloat16  # float cache: keys/values as the weights
    assert kv_storage_dtype(model, 8) == mx.float32  # quantized: scales in the compute dtype
    cache = model.make_cache()
    mx.eval(cache[0].update_and_fetch(*(2 * [mx.zeros((1, 2, 256, 16))])))
    for c in cache[1:]:
        mx.eval(c.update_and_fetch(*(2 * [mx.zeros((1, 2, 256, 16))])))
    per_position = kv_bytes_per_position(model.args, kv_dtype=kv_storage_dtype(model))
    assert sum(c.nbytes for c in cache) == 256 * per_position
