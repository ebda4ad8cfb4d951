"""The bounded and quantized KV caches on tiny random models, against the float cache and against
a numpy forward pass in which each query sees exactly the positions the rotating cache keeps;
and the memory estimate against what the caches really hold."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from . import reference as R
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    import reference as R
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, load
from mlx_llama.cache import (
    CacheError,
    KVCache,
    QuantizedKVCache,
    QuantizedRotatingKVCache,
    RotatingKVCache,
    make_cache,
)
from mlx_llama.config import ModelArgs
from mlx_llama.memory import check_budget, estimate_bytes, model_weights_bytes

TOL = 1e-4  # float32 against float64, as in test_model.py
W, KEEP = 16, 4  # rotating window and sinks
N = 40  # tokens: well past the window
B = 2
# head_dim 64: one quantization group of 64 per head (the tiny default, 16, cannot be quantized).
CONFIG = tiny_config(head_dim=64)


def load_tiny(tmp_path, config, seed):
    weights = random_weights(config, seed=seed)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    model, _ = load(str(convert(str(hf), str(tmp_path / "mlx"), progress=False)))
    return model, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, weights = load_tiny(tmp_path_factory.mktemp("cache"), CONFIG, seed=11)
    tokens = np.random.default_rng(3).integers(0, CONFIG["vocab_size"], size=(B, N), dtype=np.int32)
    return model, weights, tokens


def run(model, tokens, cache, chunks=None) -> np.ndarray:
    """Logits (B, T, V) for tokens fed in chunks of the given sizes (default: one at a time)."""
    chunks = chunks or [1] * tokens.shape[1]
    out, start = [], 0
    for n in chunks:
        out.append(np.array(model(mx.array(tokens[:, start : start + n]), cache=cache)).astype(np.float64))
        start += n
    assert start == tokens.shape[1]
    return np.concatenate(out, axis=1)


def run_with_cache_mask(model, tokens, cache, chunks) -> np.ndarray:
    """As run(), but with the mask the rotating cache builds (RotatingKVCache.make_mask): the
    LlamaModel.__call__ hook proposed with this cache, spelled out over the model's modules."""
    body = model.model
    out, start = [], 0
    for n in chunks:
        h = body.embed_tokens(mx.array(tokens[:, start : start + n]))
        mask = cache[0].make_mask(n, body.sliding_window)
        for layer, c in zip(body.layers, cache):
            h = layer(h, mask, c)
        out.append(np.array(model.lm_head(body.norm(h))).astype(np.float64))
        start += n
    return np.concatenate(out, axis=1)


def windowed_mask(T: int, window: int, keep: int) -> np.ndarray:
    """(T, T): query q sees positions 0 .. keep-1 and the last window - keep up to itself."""
    q = np.arange(T)[:, None]
    p = np.arange(T)[None, :]
    return (p <= q) & ((p < keep) | (p > q - (window - keep)))


def reference_with_mask(weights: dict, config: dict, tokens, mask) -> np.ndarray:
    """R.llama_forward with an explicit (T, T) attention mask, composed from its pieces."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    positions = np.arange(tokens.shape[1])
    h = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        h = R.block(h, w, f"model.layers.{i}.", config, positions, mask)
    h = R.rms_norm(h, w["model.norm.weight"], config["rms_norm_eps"])
    return h @ w["lm_head.weight"].T


# ---------------------------------------------------------------------------------------------
# Rotating cache


def test_rotating_equals_full_cache_within_the_window(tiny):
    model, weights, tokens = tiny
    tokens = tokens[:, :W]
    full = run(model, tokens, model.make_cache())
    rot = run(model, tokens, make_cache(model, max_kv_size=W, keep=KEEP))
    assert R.rel_l2(rot, full) < 1e-6
    assert R.rel_l2(rot, R.llama_forward(weights, CONFIG, tokens)) < TOL
    # A prefill shorter than the window, then decoding: the T > 1 path of the model (plain causal mask).
    cache = make_cache(model, max_kv_size=W, keep=KEEP)
    assert R.rel_l2(run(model, tokens, cache, chunks=[9] + [1] * (W - 9)), full) < 1e-5
    assert all(c.offset == W for c in cache)


def test_rotating_beyond_the_window_is_bounded_and_sees_sinks_plus_recent(tiny):
    model, weights, tokens = tiny
    cache = make_cache(model, max_kv_size=W, keep=KEEP)
    assert all(type(c) is RotatingKVCache for c in cache)
    steps, shapes, sizes = [], set(), set()
    for t in range(N):
        steps.append(run(model, tokens[:, t : t + 1], cache))
        assert all(c.offset == t + 1 for c in cache)  # absolute positions keep counting
        if t + 1 >= W:
            shapes.add(cache[0].keys.shape)
            sizes.add(sum(c.nbytes for c in cache))
    _, n_kv, head_dim = R.head_dims(CONFIG)
    assert shapes == {(B, n_kv, W, head_dim)}
    assert sizes == {CONFIG["num_hidden_layers"] * 2 * B * n_kv * W * head_dim * 4}
    got = np.concatenate(steps, axis=1)
    want = reference_with_mask(weights, CONFIG, tokens, windowed_mask(N, W, KEEP))
    assert R.rel_l2(got, want) < TOL
    # Not vacuous: attending to everything gives other logits past the window.
    full = R.llama_forward(weights, CONFIG, tokens)
    assert R.rel_l2(full[:, W:], want[:, W:]) > 100 * TOL
    # ...and so does dropping the sinks.
    no_sinks = reference_with_mask(weights, CONFIG, tokens, windowed_mask(N, W, 0))
    assert R.rel_l2(no_sinks[:, W:], want[:, W:]) > 100 * TOL


def test_rotating_prefill_beyond_the_window_with_the_cache_mask(tiny):
    # Chunks that cross the window, interleaved with single tokens: with the mask from
    # make_mask every query sees exactly its own sinks + recent positions.
    model, weights, tokens = tiny
    chunks = [10, 1, 9, 1, 1, 12, 1, 5]
    cache = make_cache(model, max_kv_size=W, keep=KEEP)
    got = run_with_cache_mask(model, tokens, cache, chunks)
    want = reference_with_mask(weights, CONFIG, tokens, windowed_mask(N, W, KEEP))
    assert R.rel_l2(got, want) < TOL
    assert all(c.offset == N and c.keys.shape[2] == W for c in cache)


def test_rotating_prefill_returns_temporal_order_and_restores_the_bound():
    c = RotatingKVCache(8, keep=2)
    c.step = 3

    def kv(start, n):  # each key holds its own absolute position
        k = mx.broadcast_to(mx.arange(start, start + n, dtype=mx.float32)[None, None, :, None], (1, 1, n, 2))
        return k, -k

    for t in range(11):  # wraps the ring
        c.update_and_fetch(*kv(t, 1))
    k, v = c.update_and_fetch(*kv(11, 3))
    # Kept before: 0, 1 and 5..10, oldest first; then the three new ones last.
    assert np.array(k)[0, 0, :, 0].tolist() == [0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert np.array_equal(np.array(v), -np.array(k))
    assert c.offset == 14 and c.keys.shape[2] == 8
    assert np.array(c.state[0])[0, 0, :, 0].tolist() == [0, 1, 8, 9, 10, 11, 12, 13]
    # Next chunk, positions 14 and 15: each sees the sinks and its own last 6, not all that is kept.
    mask = np.array(c.make_mask(2))  # for positions 14, 15 over kept 0, 1, 8..13 and the two new
    assert mask.shape == (2, 10)
    assert mask[0].tolist() == [True, True, False, True, True, True, True, True, True, False]
    assert c.make_mask(1) is None and RotatingKVCache(8).make_mask(5) == "causal"


def test_rotating_trim_state_and_bad_settings(tiny):
    model, _, tokens = tiny
    cache = make_cache(model, max_kv_size=W, keep=KEEP)
    run(model, tokens[:, :10], cache)
    assert cache[0].trim(3) == 3 and cache[0].offset == 7  # nothing evicted yet: as KVCache
    for c in cache[1:]:
        c.trim(3)
    run(model, tokens[:, 7:30], cache)
    assert cache[0].trim(1) == 0 and cache[0].offset == 30  # positions evicted: refused
    # A saved state (kept positions + absolute offset) restores a cache that decodes the same.
    restored = make_cache(model, max_kv_size=W, keep=KEEP)
    for c, r in zip(cache, restored):
        r.state = (*c.state, c.offset)
    a = run(model, tokens[:, 30:], cache)
    b = run(model, tokens[:, 30:], restored)
    assert R.rel_l2(a, b) < 1e-6
    for bad in (dict(max_size=0), dict(max_size=4, keep=4), dict(max_size=8, keep=-1)):
        with pytest.raises(ValueError):
            RotatingKVCache(**bad)
    with pytest.raises(MlxLlamaError, match="max_kv_size"):
        make_cache(model, max_kv_size=KEEP)


def test_sliding_window_model_gets_an_exact_rotating_cache(tmp_path):
    # Mistral v0.1 attends to its last `sliding_window` positions: a rotating cache of that size
    # with no sinks is the same thing, bounded. Needs the model to take the cache's mask.
    config = tiny_config(model_type="mistral", sliding_window=6)
    model, weights = load_tiny(tmp_path, config, seed=21)
    tokens = np.random.default_rng(5).integers(0, config["vocab_size"], size=(1, 20), dtype=np.int32)
    cache = make_cache(model, max_kv_size=100)
    assert (cache[0].max_size, cache[0].keep) == (6, 0)
    got = run_with_cache_mask(model, tokens, cache, [8, 1, 1, 7, 1, 1, 1])
    assert R.rel_l2(got, R.llama_forward(weights, config, tokens)) < TOL
    with pytest.raises(CacheError, match="sliding_window"):
        RotatingKVCache(6, keep=2).make_mask(3, window=6)


# ---------------------------------------------------------------------------------------------
# Quantized caches


def quantized_errors(model, tokens, chunks):
    want = run(model, tokens, model.make_cache(), chunks)
    errors = {}
    for bits in (8, 4):
        cache = make_cache(model, kv_bits=bits)
        assert all(type(c) is QuantizedKVCache for c in cache)
        errors[bits] = R.rel_l2(run(model, tokens, cache, chunks), want)
    return errors


def test_quantized_cache_is_close_and_smaller(tiny):
    model, _, tokens = tiny
    errors = quantized_errors(model, tokens[:, :24], [1] * 24)
    assert errors[8] < 2e-2 and errors[4] < 1e-1
    assert errors[8] < errors[4] / 4 and errors[8] > 0
    # Prefill in chunks goes through the same storage.
    errors = quantized_errors(model, tokens[:, :24], [11, 1, 12])
    assert errors[8] < 2e-2 and errors[4] < 1e-1

    # Returned float32 (the input dtype); stored as packed words plus float32 scales and biases.
    _, n_kv, head_dim = R.head_dims(CONFIG)
    full, q8, q4 = model.make_cache(), make_cache(model, kv_bits=8), make_cache(model, kv_bits=4)
    for cache in (full, q8, q4):
        run(model, tokens[:, :5], cache, [5])
    k, _ = q8[0].update_and_fetch(mx.zeros((B, n_kv, 1, head_dim)), mx.zeros((B, n_kv, 1, head_dim)))
    assert k.dtype == mx.float32 and k.shape == (B, n_kv, 6, head_dim)
    # Per position and head: 64 floats = 256 bytes; 8-bit 64 + 2 * 4 = 72; 4-bit 32 + 8 = 40.
    assert full[1].nbytes * 72 == q8[1].nbytes * 256
    assert full[1].nbytes * 40 == q4[1].nbytes * 256


def test_quantized_group_size_falls_back_or_refuses():
    c = QuantizedKVCache(bits=8, group_size=64)
    x = mx.random.normal((1, 2, 3, 96), key=mx.random.key(0))
    with pytest.warns(UserWarning, match="using 32"):
        k, _ = c.update_and_fetch(x, x)
    assert c.group_size == 32 and c.keys[1].shape == (1, 2, 256, 3)
    assert float(mx.abs(k - x).max()) < 0.02 * float(mx.abs(x).max())
    with pytest.raises(ValueError, match="head_dim 16"):
        QuantizedKVCache().update_and_fetch(x[..., :16], x[..., :16])
    for bad in (dict(bits=3), dict(group_size=48)):
        with pytest.raises(ValueError):
            QuantizedKVCache(**bad)


def test_quantized_rotating_is_bounded_and_close(tiny):
    model, weights, tokens = tiny
    cache = make_cache(model, max_kv_size=W, kv_bits=8, keep=KEEP)
    assert all(type(c) is QuantizedRotatingKVCache for c in cache)
    steps, sizes = [], set()
    for t in range(N):
        steps.append(run(model, tokens[:, t : t + 1], cache))
        if t + 1 >= W:
            sizes.add(sum(c.nbytes for c in cache))
    float_rot = run(model, tokens, make_cache(model, max_kv_size=W, keep=KEEP))
    got = np.concatenate(steps, axis=1)
    assert len(sizes) == 1
    _, n_kv, _ = R.head_dims(CONFIG)
    assert sizes == {CONFIG["num_hidden_layers"] * 2 * B * n_kv * W * 72}
    assert R.rel_l2(got, float_rot) < 2e-2
    assert cache[0].offset == N and cache[0].trim(1) == 0


# ---------------------------------------------------------------------------------------------
# Memory estimate

LLAMA_1B = ModelArgs(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)


def test_estimate_by_hand_and_budget_message():
    weights = 270_000_000
    est = estimate_bytes(LLAMA_1B, weights, 8192, kv_dtype=mx.float32)
    kv = 16 * 2 * 8 * 64 * 8192 * 4  # layers * (K and V) * kv_heads * head_dim * positions * bytes
    assert est == {
        "weights": weights,
        "kv_cache": kv,
        "total": weights + kv,
        "kv_positions": 8192,
        "context_tokens": 8192,
    }
    # Bounded and quantized: 512 positions of 64 * 4 / 8 bytes + a float32 scale and bias per 32.
    est = estimate_bytes(
        LLAMA_1B, weights, 8192, max_kv_size=512, kv_bits=4, kv_group_size=32, kv_dtype=mx.float32, batch=2
    )
    assert est["kv_cache"] == 2 * 16 * 2 * 8 * 512 * (32 + 2 * 2 * 4) and est["kv_positions"] == 512
    # float16 compute: 2-byte elements and 2-byte scales.
    est16 = estimate_bytes(LLAMA_1B, weights, 100, kv_bits=8, kv_dtype=mx.float16)
    assert est16["kv_cache"] == 16 * 2 * 8 * 100 * (64 + 2 * 2)

    est = estimate_bytes(LLAMA_1B, weights, 8192, kv_dtype=mx.float32)
    check_budget(est, 1e9)  # 0.81 GB fits
    with pytest.raises(MlxLlamaError) as e:
        check_budget(est, 0.5e9)
    assert str(e.value) == (
        "needs 0.81 GB (weights 0.27 GB + KV cache 0.54 GB for 8192 tokens) but the budget is 0.50 GB; "
        "try --max-kv-size or --kv-bits"
    )
    # Tiny numbers in MB rather than as zeros.
    with pytest.raises(MlxLlamaError, match=r"needs 0\.27 MB \(weights 0\.15 MB \+ KV cache 0\.12 MB for 47 tokens\)"):
        check_budget({"weights": 150_000, "kv_cache": 120_000, "total": 270_000, "kv_positions": 47}, 10_000)


def test_estimate_equals_what_the_caches_hold(tiny):
    model, _, tokens = tiny
    assert model_weights_bytes(model) == sum(v.size * 4 for v in random_weights(CONFIG).values())
    # 256 positions: exactly one step of storage, so capacity equals what was filled.
    long = np.resize(tokens, (B, 256))
    args = model.args
    for kw in ({}, {"kv_bits": 8}, {"kv_bits": 4}):
        cache = make_cache(model, **kw)
        run(model, long, cache, [256])
        est = estimate_bytes(args, model_weights_bytes(model), 256, batch=B, kv_dtype=mx.float32, **kw)
        assert est["kv_cache"] == sum(c.nbytes for c in cache), kw
    cache = make_cache(model, max_kv_size=W)
    run(model, long[:, :40], cache, [30] + [1] * 10)
    est = estimate_bytes(args, 0, 40, max_kv_size=W, batch=B, kv_dtype=mx.float32)
    assert est["kv_cache"] == sum(c.nbytes for c in cache) and est["kv_positions"] == W


def test_make_cache_kinds_and_refusals(tiny):
    model, _, _ = tiny
    assert all(type(c) is KVCache for c in make_cache(model))
    assert len(make_cache(model)) == CONFIG["num_hidden_layers"]
    with pytest.raises(ValueError, match="kv_bits"):
        make_cache(model, kv_bits=3)
    with pytest.raises(ValueError, match="kv_group_size"):
        make_cache(model, kv_bits=4, kv_group_size=100)
