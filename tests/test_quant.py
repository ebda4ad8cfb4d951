"""The quantizer: exact zeros, error within half a step of the stored grid, MLX's packed format,
recipes recorded in config.json and rebuilt by the loader."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

try:
    from . import reference as R
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    import reference as R
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import convert, load
from mlx_llama.quant import config_entry, plan, quantize


def dequant_f32(q, s, b, group_size, bits):
    """Dequantize as the CPU path computes: scales and biases cast to float32 first."""
    return np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits))


def unpack(q: np.ndarray, bits: int) -> np.ndarray:
    """Independent unpacking of MLX's format: each row one little-endian bit stream, lowest bits first."""
    out = []
    for row in q:
        stream = int.from_bytes(row.astype("<u4").tobytes(), "little")
        out.append([(stream >> (bits * j)) & (2**bits - 1) for j in range(row.size * 32 // bits)])
    return np.array(out)


def weights_with_edge_cases(rng, rows=48, cols=256):
    w = (rng.normal(size=(rows, cols)) * 0.05).astype(np.float32)
    w[rng.random(w.shape) < 0.15] = 0.0  # scattered exact zeros
    w[0, :] = 0.0  # all-zero groups
    w[1, :128] = 0.37  # constant groups
    w[2, :] = np.abs(w[2, :]) + 0.2  # all positive, zeros excluded
    w[3, :] = -np.abs(w[3, :]) - 1.5  # all negative, away from zero
    w[4, :] = rng.normal(size=cols).astype(np.float32) * 1e-6  # tiny values
    w[5, :64] = np.linspace(-3, 7, 64)  # wide, asymmetric range
    return w


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_zeros_are_exact_and_error_is_within_half_a_step(dtype, bits, group_size):
    w = weights_with_edge_cases(np.random.default_rng(bits * 1000 + group_size))
    q, s, b = quantize(mx.array(w), group_size, bits, dtype=dtype)
    assert q.dtype == mx.uint32 and s.dtype == dtype and b.dtype == dtype
    d = dequant_f32(q, s, b, group_size, bits)
    assert np.all(d[w == 0] == 0.0)
    step = np.repeat(np.array(s.astype(mx.float32)), group_size, axis=1)
    assert np.all(step > 0)
    # Half a step of the stored grid, up to float32 rounding of the dequantization itself.
    assert np.all(np.abs(d - w) <= 0.5 * step * (1 + 1e-5) + 1e-7 * np.abs(w))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlx_format(bits):
    rng = np.random.default_rng(bits)
    w = (rng.normal(size=(8, 64)) * 0.1).astype(np.float32)
    q, s, b = quantize(mx.array(w), 32, bits, dtype=mx.float32)
    levels = unpack(np.array(q), bits).astype(np.float64)
    manual = levels * np.repeat(np.array(s), 32, axis=1) + np.repeat(np.array(b), 32, axis=1)
    assert np.allclose(dequant_f32(q, s, b, 32, bits), manual, rtol=0, atol=1e-6)
    # Both ends of every group's range are used: the grid is not wider than needed.
    lv = levels.reshape(8, 2, 32)
    assert np.all(lv.min(-1) == 0) and np.all(lv.max(-1) == 2**bits - 1)


def test_values_on_the_grid_round_trip_exactly():
    rng = np.random.default_rng(5)
    levels = rng.integers(0, 16, size=(4, 64)).astype(np.float32)
    levels[:, ::32] = 0
    levels[:, 1::32] = 15
    w = levels * 0.125 - 1.0  # a 4-bit grid with step 1/8 starting at -1 (holds exact zeros too)
    q, s, b = quantize(mx.array(w), 32, 4, dtype=mx.float32)
    assert np.array_equal(dequant_f32(q, s, b, 32, 4), w)


def test_error_shrinks_with_bits():
    w = (np.random.default_rng(9).normal(size=(64, 256)) * 0.05).astype(np.float32)
    errs = []
    for bits in (2, 4, 8):
        q, s, b = quantize(mx.array(w), 64, bits, dtype=mx.float32)
        errs.append(np.sqrt(np.mean((dequant_f32(q, s, b, 64, bits) - w) ** 2)))
    assert errs[0] > errs[1] > errs[2]
    # Uniform error on a grid of step s has RMS s / sqrt(12): 4 bits over ~6 sigma of N(0, 0.05).
    assert errs[1] < 0.05 * 6 / 15 / np.sqrt(12) * 1.5


def test_default_recipe_rebalances_bits_at_4_and_is_uniform_at_8():
    shapes = {
        "model.embed_tokens.weight": (320, 128),
        "model.layers.0.mlp.gate_proj.weight": (256, 128),
        "model.layers.0.mlp.up_proj.weight": (256, 96),  # 64 does not divide 96: back to the base group
        "model.layers.0.mlp.down_proj.weight": (128, 256),
        "model.layers.0.self_attn.v_proj.weight": (64, 128),
    }
    assert plan(shapes, bits=4, group_size=32, recipe="default") == {
        "model.embed_tokens": (5, 64),
        "model.layers.0.mlp.gate_proj": (4, 64),
        "model.layers.0.mlp.up_proj": (4, 32),
        "model.layers.0.mlp.down_proj": (4, 32),
        "model.layers.0.self_attn.v_proj": (4, 32),
    }
    at8 = plan(shapes, bits=8, group_size=64, recipe="default")
    assert set(at8.values()) == {(8, 64)} and "model.layers.0.mlp.up_proj" not in at8  # 64 does not divide 96


def test_group_that_does_not_divide_is_left_in_float():
    shapes = {"model.layers.0.mlp.down_proj.weight": (64, 96), "model.layers.0.mlp.up_proj.weight": (96, 64)}
    p = plan(shapes, bits=4, group_size=64, recipe="uniform")
    assert p == {"model.layers.0.mlp.up_proj": (4, 64)}
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(mx.zeros((4, 96)), 64, 4)


def test_mixed_recipe_keeps_embedding_and_head_at_8_bits():
    shapes = {
        "model.embed_tokens.weight": (320, 64),
        "lm_head.weight": (320, 64),
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.layers.0.input_layernorm.weight": (64,),
    }
    p = plan(shapes, bits=4, group_size=32, recipe="mixed")
    assert p == {"model.embed_tokens": (8, 32), "lm_head": (8, 32), "model.layers.0.self_attn.q_proj": (4, 32)}
    assert config_entry(p, 4, 32) == {
        "group_size": 32,
        "bits": 4,
        "lm_head": {"group_size": 32, "bits": 8},
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }


@pytest.mark.parametrize("recipe", ["mixed", "uniform"])
def test_loader_rebuilds_exactly_what_was_quantized(tmp_path, recipe):
    # intermediate 96 is not a multiple of 64: down_proj stays float, everything else is quantized.
    config = tiny_config(intermediate_size=96)
    weights = random_weights(config, seed=4)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    out = convert(str(hf), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=64, q_recipe=recipe, progress=False)
    qconf = json.loads((out / "config.json").read_text())["quantization"]
    model, _ = load(str(out))
    mods = dict(model.named_modules())
    head_bits = 8 if recipe == "mixed" else 4
    assert isinstance(mods["model.layers.0.mlp.down_proj"], nn.Linear)
    assert not isinstance(mods["model.layers.0.mlp.down_proj"], nn.QuantizedLinear)
    assert isinstance(mods["model.layers.1.self_attn.v_proj"], nn.QuantizedLinear)
    assert mods["model.layers.1.self_attn.v_proj"].bits == 4
    assert mods["model.embed_tokens"].bits == head_bits and mods["lm_head"].bits == head_bits
    assert qconf["bits"] == 4 and qconf["group_size"] == 64
    # The loaded model computes exactly the float model whose weights are the dequantized ones.
    deq = {}
    for name, mod in mods.items():
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(mod.weight, mod.scales, mod.biases, group_size=mod.group_size, bits=mod.bits)
            deq[f"{name}.weight"] = np.array(w.astype(mx.float32))
    assert len(deq) == 2 + 2 * 6  # embedding, head, and 6 of the 7 linears per layer
    tokens = np.array([[1, 17, 99, 5, 250, 31]])
    ref = R.llama_forward({**weights, **deq}, config, tokens)
    got = np.array(model(mx.array(tokens))).astype(np.float64)
    assert R.rel_l2(got, ref) < 1e-4
    # ... and that is not the float model itself: quantization changed something.
    assert R.rel_l2(got, R.llama_forward(weights, config, tokens)) > 1e-3


def test_prompt_path_of_quantized_layers_computes_the_same_function(tmp_path):
    """Long inputs through dequantize + matmul, one token through quantized_matmul: the same logits."""
    from mlx_llama.upcast import PROMPT_TOKENS, UpcastQuantizedEmbedding, UpcastQuantizedLinear, compute_in

    config = tiny_config(tie_word_embeddings=True)
    hf = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config, seed=6))
    model, _ = load(str(convert(str(hf), str(tmp_path / "q"), quantize=True, q_group_size=32, progress=False)))
    compute_in(model, mx.float32, prompt_dequantize=True)  # what load() does on a CPU with a fast BLAS
    mods = dict(model.named_modules())
    assert type(mods["model.layers.0.mlp.up_proj"]) is UpcastQuantizedLinear
    assert type(mods["model.embed_tokens"]) is UpcastQuantizedEmbedding
    assert mods["model.layers.0.mlp.up_proj"].prompt_dequantize
    n = PROMPT_TOKENS + 3
    tokens = mx.array([[(7 * i + 1) % 300 for i in range(n)]])
    full = np.array(model(tokens))
    cache = model.make_cache()
    steps = np.concatenate([np.array(model(tokens[:, i : i + 1], cache=cache)) for i in range(n)], axis=1)
    assert R.rel_l2(full, steps) < 1e-5
