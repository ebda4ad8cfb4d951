"""The library's building blocks against the plain-numpy float64 reference and against the
mathematical properties they must have (FACTS.md section 1)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from . import reference as R
    from .tiny import random_weights, tiny_config
except ImportError:
    import reference as R
    from tiny import random_weights, tiny_config

from mlx_llama.config import ModelArgs
from mlx_llama.model import MLP, Attention, TransformerBlock, causal_mask
from mlx_llama.rope import RoPE, llama3_inv_freq

RTOL32 = 2e-5  # relative L2 error allowed for float32 compute against float64


def f32(a) -> mx.array:
    return mx.array(np.asarray(a, dtype=np.float32))


def npy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def load_into(module, weights: dict, prefix: str = "") -> None:
    """Load the reference weights named prefix + X into module parameter X, strictly."""
    items = [(k[len(prefix) :], f32(v)) for k, v in weights.items() if k.startswith(prefix)]
    module.load_weights(items, strict=True)


# ---------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_fast_and_module_match_reference(scale, eps):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 64)) * scale + 0.5 * scale  # nonzero mean: no mean subtraction
    g = 1.0 + 0.1 * rng.standard_normal(64)
    want = R.rms_norm(x, g, eps)

    got_fast = npy(mx.fast.rms_norm(f32(x), f32(g), eps))
    assert R.rel_l2(got_fast, want) < RTOL32

    block = TransformerBlock(ModelArgs.from_dict(tiny_config(rms_norm_eps=eps)))
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.load_weights([("weight", f32(g))], strict=True)
        assert R.rel_l2(npy(norm(f32(x))), want) < RTOL32


def test_rms_norm_reference_is_not_layer_norm():
    # Guard the reference itself: a mean-subtracting norm would give a different answer here.
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    y = R.rms_norm(x, np.ones(4), 0.0)
    np.testing.assert_allclose(y, x / math.sqrt(7.5))


# ---------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 13, 200])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_matches_reference(traditional, offset, base):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 16))  # (B, H, T, D)
    got = npy(RoPE(16, traditional=traditional, base=base)(f32(x), offset=offset))
    want = R.rope(x, offset + np.arange(6), base=base, traditional=traditional)
    # Angles up to ~200 rad in float32: allow a little more than elementwise float32 error.
    assert R.rel_l2(got, want) < (1e-5 if offset < 100 else 1e-4)


def test_rope_layouts_differ_by_a_fixed_permutation():
    # traditional pairs (2j, 2j+1), rotate-half pairs (j, j + D/2): moving even dims to the
    # first half turns one into the other. Checked on the library's RoPE.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 5, 8))
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
    trad = npy(RoPE(8, traditional=True)(f32(x), offset=4))
    half = npy(RoPE(8, traditional=False)(f32(x[..., perm]), offset=4))
    np.testing.assert_allclose(trad[..., perm], half, atol=1e-5)
    # And the two layouts really are different rotations of the same input.
    assert np.abs(npy(RoPE(8, traditional=False)(f32(x), offset=4)) - trad).max() > 0.1


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_properties(traditional):
    rng = np.random.default_rng(4)
    D = 16
    rope = RoPE(D, traditional=traditional, base=10000.0)
    x = rng.standard_normal((1, 2, 1, D))

    # Position 0 is the identity.
    np.testing.assert_allclose(npy(rope(f32(x), offset=0)), x, atol=1e-6)

    # Rotations preserve norms (of the whole vector and of every pair).
    xs = rng.standard_normal((1, 2, 9, D))
    y = npy(rope(f32(xs), offset=5))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(xs, axis=-1), rtol=1e-5)
    if traditional:
        pair_norm = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])  # noqa: E731
    else:
        pair_norm = lambda a: np.hypot(a[..., : D // 2], a[..., D // 2 :])  # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(xs), rtol=1e-4, atol=1e-6)

    # <R(m) q, R(n) k> depends only on m - n.
    q = rng.standard_normal((1, 1, 1, D))
    k = rng.standard_normal((1, 1, 1, D))

    def dot(m, n):
        return float(np.sum(npy(rope(f32(q), offset=m)) * npy(rope(f32(k), offset=n))))

    for delta in (0, 1, 3, -2):
        values = [dot(n + delta, n) for n in (2, 7, 20, 41)]
        np.testing.assert_allclose(values, values[0], atol=1e-4)
    assert abs(dot(3, 0) - dot(0, 0)) > 1e-3  # and it does depend on the distance


LLAMA3_CASES = [
    # (head_dim, base, factor, low, high, original): each case has kept, blended and scaled pairs.
    (16, 500000.0, 8.0, 1.0, 4.0, 64),
    (32, 10000.0, 4.0, 1.0, 4.0, 32),
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2's own values at its head size
]


@pytest.mark.parametrize("case", LLAMA3_CASES)
def test_llama3_inv_freq_matches_reference(case):
    head_dim, base, factor, low, high, orig = case
    want = R.llama3_inv_freq(head_dim, base, factor, low, high, orig)
    got = npy(mx.array(llama3_inv_freq(head_dim, base, factor, low, high, orig)))
    assert got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, want, rtol=1e-5)

    # The case exercises all three regimes (otherwise it proves less than it seems).
    theta = R.default_inv_freq(head_dim, base)
    wavelen = 2 * math.pi / theta
    assert (wavelen < orig / high).any() and (wavelen > orig / low).any()
    assert ((wavelen >= orig / high) & (wavelen <= orig / low)).any()


@pytest.mark.parametrize("case", LLAMA3_CASES)
@pytest.mark.parametrize("offset", [0, 9])
def test_llama3_rope_matches_numpy_rope_with_scaled_freqs(case, offset):
    head_dim, base, factor, low, high, orig = case
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 7, head_dim))
    got = npy(RoPE(head_dim, traditional=False, base=base, scaling=scaling)(f32(x), offset=offset))
    theta = R.llama3_inv_freq(head_dim, base, factor, low, high, orig)
    want = R.rope(x, offset + np.arange(7), traditional=False, freqs=theta)
    assert R.rel_l2(got, want) < 1e-5
    # The scaling matters: the unscaled rotation is clearly different (positions > 0 only).
    if offset:
        unscaled = R.rope(x, offset + np.arange(7), base=base, traditional=False)
        assert R.rel_l2(unscaled, want) > 1e-3


def test_llama3_with_factor_one_is_plain_rope():
    # factor 1 makes all three regimes theta_i itself.
    scaling = {
        "rope_type": "llama3",
        "factor": 1.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    x = np.random.default_rng(6).standard_normal((1, 1, 5, 16))
    got = npy(RoPE(16, base=10000.0, scaling=scaling)(f32(x), offset=3))
    want = R.rope(x, 3 + np.arange(5), base=10000.0)
    assert R.rel_l2(got, want) < 1e-5


def test_mx_fast_rope_freqs_are_inverse_theta():
    # Documents the trap from FACTS.md that the library has to get right: mx.fast.rope's freqs
    # argument takes 1/theta_i; passing theta_i gives a different (wrong) rotation.
    x = np.random.default_rng(7).standard_normal((1, 1, 4, 16))
    theta = R.default_inv_freq(16, 10000.0)
    want = R.rope(x, np.arange(4) + 2)
    right = npy(mx.fast.rope(f32(x), 16, traditional=False, base=None, scale=1.0, offset=2, freqs=f32(1 / theta)))
    wrong = npy(mx.fast.rope(f32(x), 16, traditional=False, base=None, scale=1.0, offset=2, freqs=f32(theta)))
    assert R.rel_l2(right, want) < 1e-5
    assert R.rel_l2(wrong, want) > 1e-2


# ---------------------------------------------------------------------------------------------
# Causal mask


@pytest.mark.parametrize("T,offset", [(1, 0), (5, 0), (1, 7), (3, 4), (6, 10)])
def test_causal_mask_matches_reference(T, offset):
    got = causal_mask(T, offset)
    assert got.dtype == mx.bool_
    assert got.shape == (T, offset + T)
    np.testing.assert_array_equal(np.array(got), R.causal_mask(T, offset))


@pytest.mark.parametrize("T,offset", [(4, 0), (3, 5)])
def test_sdpa_causal_string_equals_explicit_mask(T, offset):
    # The model passes mask="causal" for several new tokens after `offset` cached ones; that
    # must mean the same as the explicit bottom-right-aligned mask (and as the reference).
    rng = np.random.default_rng(8)
    S = offset + T
    q = rng.standard_normal((1, 4, T, 8))
    k = rng.standard_normal((1, 2, S, 8))
    v = rng.standard_normal((1, 2, S, 8))
    scale = 8**-0.5
    by_string = npy(mx.fast.scaled_dot_product_attention(f32(q), f32(k), f32(v), scale=scale, mask="causal"))
    explicit = npy(
        mx.fast.scaled_dot_product_attention(f32(q), f32(k), f32(v), scale=scale, mask=causal_mask(T, offset))
    )
    want = R.attention(q, k, v, R.causal_mask(T, offset))
    assert R.rel_l2(explicit, want) < RTOL32
    assert R.rel_l2(by_string, want) < RTOL32


# ---------------------------------------------------------------------------------------------
# Attention, MLP, block


LLAMA3_SHORT = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _attn_config(n_heads, n_kv, **kw):
    return tiny_config(num_attention_heads=n_heads, num_key_value_heads=n_kv, num_hidden_layers=1, **kw)


def _layer_weights(cfg, seed):
    w = random_weights(cfg, seed)
    return {k[len("model.layers.0.") :]: v for k, v in w.items() if k.startswith("model.layers.0.")}


@pytest.mark.parametrize(
    "n_heads,n_kv,extra",
    [
        (4, 4, {}),  # MHA
        (4, 2, {}),  # GQA
        (4, 1, {}),  # MQA
        (4, 2, {"head_dim": 24, "attention_bias": True}),  # head_dim != hidden / heads
        (4, 2, {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SHORT}),
    ],
)
def test_attention_matches_reference(n_heads, n_kv, extra):
    cfg = _attn_config(n_heads, n_kv, **extra)
    w = _layer_weights(cfg, seed=10)
    attn = Attention(ModelArgs.from_dict(cfg))
    load_into(attn, w, "self_attn.")
    x = np.random.default_rng(11).standard_normal((2, 7, cfg["hidden_size"]))
    got = npy(attn(f32(x), mask=causal_mask(7, 0)))
    want = R.self_attention(x, w, "self_attn.", cfg, np.arange(7), R.causal_mask(7, 0))
    assert got.shape == (2, 7, cfg["hidden_size"])
    assert R.rel_l2(got, want) < RTOL32


@pytest.mark.parametrize("n_kv", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv):
    n_heads = 4
    cfg = _attn_config(n_heads, n_kv)
    w = _layer_weights(cfg, seed=12)
    _, _, head_dim = R.head_dims(cfg)
    hidden = cfg["hidden_size"]

    gqa = Attention(ModelArgs.from_dict(cfg))
    load_into(gqa, w, "self_attn.")

    # Query head h uses K/V head h // (n_heads / n_kv): repeat each K/V head's rows that often.
    rep = dict(w)
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        heads = w[name].reshape(n_kv, head_dim, hidden)
        rep[name] = np.repeat(heads, n_heads // n_kv, axis=0).reshape(n_heads * head_dim, hidden)
    mha_cfg = _attn_config(n_heads, n_heads)
    mha = Attention(ModelArgs.from_dict(mha_cfg))
    load_into(mha, rep, "self_attn.")

    x = np.random.default_rng(13).standard_normal((2, 6, hidden))
    mask = causal_mask(6, 0)
    got_gqa = npy(gqa(f32(x), mask=mask))
    got_mha = npy(mha(f32(x), mask=mask))
    assert R.rel_l2(got_gqa, got_mha) < RTOL32
    want = R.self_attention(x, rep, "self_attn.", mha_cfg, np.arange(6), R.causal_mask(6, 0))
    assert R.rel_l2(got_mha, want) < RTOL32


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_mlp_matches_reference(mlp_bias):
    cfg = _attn_config(4, 2, mlp_bias=mlp_bias)
    w = _layer_weights(cfg, seed=14)
    m = MLP(ModelArgs.from_dict(cfg))
    load_into(m, w, "mlp.")
    x = np.random.default_rng(15).standard_normal((2, 3, cfg["hidden_size"]))
    assert R.rel_l2(npy(m(f32(x))), R.mlp(x, w, "mlp.")) < RTOL32


def test_transformer_block_matches_reference():
    cfg = _attn_config(4, 2, attention_bias=True, mlp_bias=True)
    w = _layer_weights(cfg, seed=16)
    blk = TransformerBlock(ModelArgs.from_dict(cfg))
    load_into(blk, w)
    x = np.random.default_rng(17).standard_normal((2, 5, cfg["hidden_size"]))
    got = npy(blk(f32(x), mask=causal_mask(5, 0)))
    want = R.block(x, w, "", cfg, np.arange(5), R.causal_mask(5, 0))
    assert R.rel_l2(got, want) < RTOL32
