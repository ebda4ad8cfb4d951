"""End to end on tiny random checkpoints: write a Hugging Face directory (without MLX), convert it,
load it, and compare the logits with the plain-numpy float64 reference."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from . import reference as R
    from .tiny import bf16_round, random_weights, read_safetensors_header, tiny_config, write_hf_checkpoint
except ImportError:
    import reference as R
    from tiny import bf16_round, random_weights, read_safetensors_header, tiny_config, write_hf_checkpoint

from mlx_llama import convert, load

TOL = 1e-4  # relative L2 error of float32 compute against float64
B, T = 2, 7


def tokens_for(config: dict, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config["vocab_size"], size=(B, T), dtype=np.int32)


def convert_and_load(tmp_path, config, weights, **write_kw):
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights, **write_kw)
    out = convert(str(hf), str(tmp_path / "mlx"), progress=False)
    model, tokenizer = load(str(out))
    return model, tokenizer, out


def logits_of(model, tokens, cache=None) -> np.ndarray:
    out = model(mx.array(tokens), cache=cache)
    assert out.dtype == mx.float32  # CPU compute is float32 whatever the storage
    return np.array(out).astype(np.float64)


def decode_one_by_one(model, tokens) -> tuple[np.ndarray, list]:
    cache = model.make_cache()
    steps = [logits_of(model, tokens[:, t : t + 1], cache) for t in range(tokens.shape[1])]
    return np.concatenate(steps, axis=1), cache


def cached_keys(c) -> mx.array:
    """The filled part of a layer's key cache, (B, kv_heads, offset, head_dim)."""
    return c.keys[..., : c.offset, :]


# (name, num_key_value_heads, tied, shards): every attention kind tied and untied, and single
# and sharded files, without the full product.
CASES = [
    ("mha-untied-single", 4, False, 1),
    ("mha-tied-sharded", 4, True, 2),
    ("gqa-untied-sharded", 2, False, 3),
    ("gqa-tied-single", 2, True, 1),
    ("mqa-untied-sharded", 1, False, 2),
    ("mqa-tied-single", 1, True, 1),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def converted(request, tmp_path_factory):
    """A converted and loaded tiny model per case (shared by the tests of this case)."""
    name, n_kv, tied, shards = request.param
    cfg = tiny_config(num_key_value_heads=n_kv, tie_word_embeddings=tied)
    w = random_weights(cfg, seed=len(name) + n_kv)
    tmp = tmp_path_factory.mktemp(name)
    # Sharded checkpoints also carry the RoPE buffers some real ones have: not weights.
    extra = None
    if shards > 1:
        extra = {
            f"model.layers.{i}.self_attn.rotary_emb.inv_freq": R.default_inv_freq(16, 10000.0).astype(np.float32)
            for i in range(cfg["num_hidden_layers"])
        }
    model, tokenizer, out = convert_and_load(tmp, cfg, w, shards=shards, extra_tensors=extra)
    return cfg, w, model, out


def test_logits_match_reference(converted):
    cfg, w, model, _ = converted
    tokens = tokens_for(cfg)
    got = logits_of(model, tokens)
    want = R.llama_forward(w, cfg, tokens)
    assert got.shape == (B, T, cfg["vocab_size"])
    assert R.rel_l2(got, want) < TOL
    # Not a vacuous comparison: the logits differ between positions and rows.
    assert np.std(want) > 0.5 and R.rel_l2(want[:, 1:], want[:, :-1]) > 0.5


def test_cached_decoding_matches_full_forward(converted):
    cfg, w, model, _ = converted
    tokens = tokens_for(cfg, seed=1)
    full = logits_of(model, tokens)
    step, cache = decode_one_by_one(model, tokens)
    assert R.rel_l2(step, full) < TOL
    assert R.rel_l2(step, R.llama_forward(w, cfg, tokens)) < TOL

    # Only the K/V heads are cached, never repeated to the query heads.
    n_heads, n_kv, head_dim = R.head_dims(cfg)
    assert len(cache) == cfg["num_hidden_layers"]
    for c in cache:
        assert c.offset == T
        assert cached_keys(c).shape == (B, n_kv, T, head_dim)
        assert c.values[..., : c.offset, :].shape == (B, n_kv, T, head_dim)


def test_chunked_prefill_matches_full_forward(converted):
    # A prompt in two chunks: the second chunk needs a causal mask offset by the cached length.
    cfg, w, model, _ = converted
    tokens = tokens_for(cfg, seed=2)
    cache = model.make_cache()
    first = logits_of(model, tokens[:, :4], cache)
    second = logits_of(model, tokens[:, 4:], cache)
    want = R.llama_forward(w, cfg, tokens)
    assert R.rel_l2(np.concatenate([first, second], axis=1), want) < TOL
    assert all(c.offset == T for c in cache)


def test_converted_directory_has_no_rope_buffers_or_tied_head(converted):
    cfg, w, _, out = converted
    names = set()
    for f in out.glob("*.safetensors"):
        names |= {k for k in read_safetensors_header(f) if k != "__metadata__"}
    assert not any("rotary_emb" in n for n in names)
    assert ("lm_head.weight" in names) == (not cfg["tie_word_embeddings"])
    assert names == set(w)
    index = out / "model.safetensors.index.json"
    if index.exists():
        assert set(json.loads(index.read_text())["weight_map"]) == names


# ---------------------------------------------------------------------------------------------
# Config variants

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short, so that the scaled and blended frequencies already matter over 7 positions.
    "original_max_position_embeddings": 64,
}

VARIANTS = {
    "head_dim-not-hidden-over-heads": dict(head_dim=24),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "llama3-rope-scaling": dict(rope_scaling=LLAMA3_SCALING, num_hidden_layers=3),
    # transformers >= 5 puts rope_theta (and the scaling) inside rope_parameters.
    "rope-parameters": dict(
        rope_theta=None, rope_scaling=None, rope_parameters={"rope_theta": 50000.0, **LLAMA3_SCALING}
    ),
    "rope-parameters-default": dict(
        rope_theta=None, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_reference(variant, tmp_path):
    cfg = tiny_config(**VARIANTS[variant])
    w = random_weights(cfg, seed=5)
    model, _, _ = convert_and_load(tmp_path, cfg, w)
    tokens = tokens_for(cfg, seed=3)
    want = R.llama_forward(w, cfg, tokens)
    assert R.rel_l2(logits_of(model, tokens), want) < TOL
    step, cache = decode_one_by_one(model, tokens)
    assert R.rel_l2(step, want) < TOL
    _, n_kv, head_dim = R.head_dims(cfg)
    assert cached_keys(cache[0]).shape == (B, n_kv, T, head_dim)


@pytest.mark.parametrize("variant", ["llama3-rope-scaling", "rope-parameters", "rope-parameters-default"])
def test_rope_variants_are_discriminating(variant):
    # Guard for the test above: ignoring the scaling or the nested rope_theta would be caught,
    # because the reference logits differ far beyond TOL.
    cfg = tiny_config(**VARIANTS[variant])
    w = random_weights(cfg, seed=5)
    tokens = tokens_for(cfg, seed=3)
    plain = tiny_config(num_hidden_layers=cfg["num_hidden_layers"])
    assert R.rel_l2(R.llama_forward(w, plain, tokens), R.llama_forward(w, cfg, tokens)) > 100 * TOL


def test_bf16_checkpoint_converts_and_matches_rounded_reference(tmp_path):
    cfg = tiny_config(num_key_value_heads=2)
    w = random_weights(cfg, seed=7)
    model, _, out = convert_and_load(tmp_path, cfg, w, dtype="bfloat16", shards=2)
    # Converted without a dtype: the bf16 storage is kept...
    dtypes = {
        info["dtype"]
        for f in out.glob("*.safetensors")
        for name, info in read_safetensors_header(f).items()
        if name != "__metadata__"
    }
    assert dtypes == {"BF16"}
    # ...and the model computes in float32 on the bf16-rounded weights.
    tokens = tokens_for(cfg, seed=4)
    rounded = {k: bf16_round(v) for k, v in w.items()}
    got = logits_of(model, tokens)
    assert R.rel_l2(got, R.llama_forward(rounded, cfg, tokens)) < TOL
    # bf16 rounding itself moves the logits far more than TOL: the comparison above is sharp.
    assert R.rel_l2(got, R.llama_forward(w, cfg, tokens)) > 10 * TOL
