"""Config variants end to end: tiny random Hugging Face checkpoints with each RoPE scaling type, the
transformers-5 spelling of config.json, tied and untied heads, head_dim / bias / model_type variants,
invalid configs, and the EOS / BOS sets a converted model ends up with.

Every "matches" below is the converted and loaded model's logits against the float64 numpy
reference (tests/reference.py, written from the definitions, not from mlx_llama/rope.py).
"""

from __future__ import annotations

import dataclasses
import json
import math

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from . import reference as R
    from .tiny import random_weights, read_safetensors_header, tiny_config, write_hf_checkpoint
except ImportError:
    import reference as R
    from tiny import random_weights, read_safetensors_header, tiny_config, write_hf_checkpoint

from mlx_llama import convert, load
from mlx_llama.cli import convert_main
from mlx_llama.config import ConfigError, ModelArgs
from mlx_llama.errors import MlxLlamaError

TOL = 1e-4  # relative L2 error of float32 compute against float64
B = 2


def tokens_for(config: dict, T: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config["vocab_size"], size=(B, T), dtype=np.int32)


def write_config(dir_path, config: dict) -> None:
    """Overwrite config.json with exactly `config` (write_hf_checkpoint always adds torch_dtype)."""
    (dir_path / "config.json").write_text(json.dumps(config, indent=2))


def convert_and_load(tmp_path, config, weights, name="m", exact_config=False):
    hf = write_hf_checkpoint(tmp_path / f"{name}-hf", config, weights)
    if exact_config:
        write_config(hf, config)
    out = convert(str(hf), str(tmp_path / f"{name}-mlx"), progress=False)
    model, tokenizer = load(str(out))
    return model, tokenizer, out


def logits_of(model, tokens, cache=None) -> np.ndarray:
    out = model(mx.array(tokens), cache=cache)
    assert out.dtype == mx.float32
    return np.array(out).astype(np.float64)


def decode_one_by_one(model, tokens) -> np.ndarray:
    cache = model.make_cache()
    return np.concatenate([logits_of(model, tokens[:, t : t + 1], cache) for t in range(tokens.shape[1])], axis=1)


def stored_names(out) -> set:
    names = set()
    for f in out.glob("*.safetensors"):
        names |= {k for k in read_safetensors_header(f) if k != "__metadata__"}
    return names


def without_rope_scaling(config: dict) -> dict:
    c = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")}
    c["rope_theta"] = R.rope_settings(config)[0]
    return c


# ---------------------------------------------------------------------------------------------
# Part A: the reference's own RoPE scaling, checked against the definitions


def test_reference_factor_one_is_plain_rope():
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 16))
    pos = np.arange(20)
    plain = R.rope(x, pos, base=500.0)
    base_cfg = tiny_config(rope_theta=500.0, max_position_embeddings=64)
    for scaling in (
        {"rope_type": "linear", "factor": 1.0},
        {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 16},
        {"rope_type": "yarn", "factor": 1.0},
        # dynamic changes nothing while the sequence fits in max_position_embeddings
        {"rope_type": "dynamic", "factor": 3.0},
        {"rope_type": "default"},
    ):
        cfg = dict(base_cfg, rope_scaling=scaling)
        np.testing.assert_allclose(R.rope_for_config(x, pos, cfg), plain, rtol=0, atol=1e-12)


def test_reference_linear_is_plain_rope_at_divided_positions():
    x = np.random.default_rng(1).standard_normal((1, 2, 9, 16))
    pos = np.arange(9) * 3 + 1
    for f in (2.0, 4.0, 8.0):
        cfg = tiny_config(rope_scaling={"rope_type": "linear", "factor": f})
        np.testing.assert_allclose(R.rope_for_config(x, pos, cfg), R.rope(x, pos / f), rtol=0, atol=1e-12)
        # ...and with factor f, position m*f rotates exactly as plain position m.
        np.testing.assert_allclose(R.rope_for_config(x, pos * f, cfg), R.rope(x, pos), rtol=0, atol=1e-12)


def test_reference_dynamic_base():
    d, base, f, n = 16, 10000.0, 4.0, 8
    assert R.dynamic_ntk_base(base, d, f, n, n) == base
    assert R.dynamic_ntk_base(base, d, f, n, 1) == base
    # Continuous at the threshold, growing beyond it.
    assert R.dynamic_ntk_base(base, d, f, n, n + 1e-9) == pytest.approx(base, rel=1e-9)
    want = base * (f * 14 / n - (f - 1)) ** (d / (d - 2))
    assert R.dynamic_ntk_base(base, d, f, n, 14) == pytest.approx(want, rel=1e-15)
    assert R.dynamic_ntk_base(base, d, f, n, 14) > R.dynamic_ntk_base(base, d, f, n, 10) > base
    # In a config: a full forward over 14 positions uses that base for every position.
    cfg = tiny_config(max_position_embeddings=n, rope_scaling={"rope_type": "dynamic", "factor": f})
    x = np.random.default_rng(2).standard_normal((1, 1, 14, d))
    np.testing.assert_allclose(
        R.rope_for_config(x, np.arange(14), cfg), R.rope(x, np.arange(14), base=want), rtol=0, atol=1e-12
    )


def test_reference_yarn_frequencies_and_scale():
    d, base, orig, f = 16, 10000.0, 2048, 4.0
    # Pair i turns orig * theta_i / (2 pi) times over the original context; low/high are where that
    # equals beta_fast = 32 and beta_slow = 1.
    low_exact = d * math.log(orig / (32 * 2 * math.pi)) / (2 * math.log(base))
    high_exact = d * math.log(orig / (1 * 2 * math.pi)) / (2 * math.log(base))
    theta = R.default_inv_freq(d, base)
    for i, n_rot in ((low_exact, 32), (high_exact, 1)):
        assert orig * base ** (-2 * i / d) / (2 * math.pi) == pytest.approx(n_rot)
    low, high = R.yarn_correction_range(d, base, orig, 32, 1, True)
    assert (low, high) == (math.floor(low_exact), math.ceil(high_exact)) == (2, 6)
    assert R.yarn_correction_range(d, base, orig, 32, 1, False) == (low_exact, high_exact)
    inv = R.yarn_inv_freq(d, base, f, orig)
    np.testing.assert_allclose(inv[: int(low) + 1], theta[: int(low) + 1], rtol=1e-15)  # kept
    np.testing.assert_allclose(inv[int(high) :], theta[int(high) :] / f, rtol=1e-15)  # interpolated
    mid = 4  # halfway up the ramp: the mean of the two
    assert inv[mid] == pytest.approx((theta[mid] + theta[mid] / f) / 2, rel=1e-15)
    assert np.all(theta / f <= inv + 1e-18) and np.all(inv <= theta + 1e-18)
    # Clamping: a context so long that the ramp would end past the last dimension.
    assert R.yarn_correction_range(d, base, 10**12, 32, 1, True)[1] == d - 1
    assert R.yarn_correction_range(d, base, 64, 32, 1, True)[0] == 0
    # Attention factor on q and k.
    assert R.yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert R.yarn_attention_factor(1.0) == 1.0 and R.yarn_attention_factor(0.5) == 1.0
    assert R.yarn_attention_factor(4.0, attention_factor=0.7) == 0.7
    assert R.yarn_attention_factor(4.0, attention_factor=0.7, mscale=1, mscale_all_dim=2) == 0.7
    assert R.yarn_attention_factor(4.0, mscale=1.0, mscale_all_dim=1.0) == 1.0
    want = (0.1 * 2.0 * math.log(4) + 1) / (0.1 * 0.5 * math.log(4) + 1)
    assert R.yarn_attention_factor(4.0, mscale=2.0, mscale_all_dim=0.5) == pytest.approx(want)
    assert R.yarn_attention_factor(4.0, mscale=2.0) == R.yarn_attention_factor(4.0)  # needs both
    # Applied: rotation by the YaRN frequencies, times the factor; norms scale by it.
    cfg = tiny_config(max_position_embeddings=orig, rope_scaling={"rope_type": "yarn", "factor": f})
    x = np.random.default_rng(3).standard_normal((1, 2, 5, d))
    got = R.rope_for_config(x, np.arange(5), cfg)
    np.testing.assert_allclose(got, R.rope(x, np.arange(5), freqs=inv) * R.yarn_attention_factor(f), atol=1e-12)
    np.testing.assert_allclose(
        np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1) * R.yarn_attention_factor(f), rtol=1e-12
    )


def test_reference_reads_rope_parameters_spelling():
    old = tiny_config(rope_theta=300.0, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    new = tiny_config(
        rope_theta=None, rope_scaling=None, rope_parameters={"rope_theta": 300.0, "rope_type": "yarn", "factor": 2.0}
    )
    x = np.random.default_rng(4).standard_normal((1, 1, 6, 16))
    np.testing.assert_array_equal(R.rope_for_config(x, np.arange(6), old), R.rope_for_config(x, np.arange(6), new))


# ---------------------------------------------------------------------------------------------
# 1. rope_scaling types, converted and loaded, against the reference

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# YaRN with a small base and context, so that the ramp covers the middle pairs of head_dim 16, and
# max_position_embeddings / original_max_position_embeddings == factor where both are given.
YARN = dict(rope_theta=100.0, max_position_embeddings=256)

# name -> (rope type, scaling parameters without the type, other config overrides, sequence length)
ROPE_CASES = {
    "linear": ("linear", {"factor": 4.0}, {}, 7),
    "llama3": ("llama3", LLAMA3, {}, 7),
    "yarn-default-attention-factor": ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64}, YARN, 7),
    "yarn-explicit-attention-factor": (
        "yarn",
        {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.0},
        YARN,
        7,
    ),
    "yarn-mscale": ("yarn", {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}, YARN, 7),
    "yarn-betas-untruncated": (
        "yarn",
        {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 8.0, "beta_slow": 2.0, "truncate": False},
        YARN,
        7,
    ),
    # Sequence longer than max_position_embeddings: the NTK-aware branch is taken.
    "dynamic": ("dynamic", {"factor": 4.0}, {"max_position_embeddings": 8}, 14),
}
SPELLINGS = ("rope_type", "type")


def rope_config(case: str, spelling: str) -> dict:
    kind, params, overrides, _ = ROPE_CASES[case]
    return tiny_config(rope_scaling={spelling: kind, **params}, **overrides)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_matches_reference(case, spelling, tmp_path):
    cfg = rope_config(case, spelling)
    w = random_weights(cfg, seed=11)
    model, _, _ = convert_and_load(tmp_path, cfg, w)
    assert model.args.rope_scaling == cfg["rope_scaling"]
    tokens = tokens_for(cfg, T=ROPE_CASES[case][3], seed=1)
    want = R.llama_forward(w, cfg, tokens)
    got = logits_of(model, tokens)
    assert R.rel_l2(got, want) < TOL
    if case != "dynamic":  # (dynamic: see test_dynamic_decoding_with_cache)
        assert R.rel_l2(decode_one_by_one(model, tokens), want) < TOL


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_cases_are_discriminating(case):
    # Guard for the test above: ignoring the scaling (or only the attention factor, or only the
    # frequencies) would move the logits far beyond TOL.
    cfg = rope_config(case, "rope_type")
    w = random_weights(cfg, seed=11)
    tokens = tokens_for(cfg, T=ROPE_CASES[case][3], seed=1)
    want = R.llama_forward(w, cfg, tokens)
    assert R.rel_l2(R.llama_forward(w, without_rope_scaling(cfg), tokens), want) > 100 * TOL
    plan = R.rope_plan(cfg, ROPE_CASES[case][3])
    if plan["qk_scale"] != 1.0:
        unscaled = dict(cfg, rope_scaling=dict(cfg["rope_scaling"], attention_factor=1.0))
        assert R.rel_l2(R.llama_forward(w, unscaled, tokens), want) > 100 * TOL
    if case.startswith("yarn"):
        plain = R.default_inv_freq(16, cfg["rope_theta"])
        assert not np.allclose(plan["inv_freq"], plain) and not np.allclose(plan["inv_freq"], plain / 4)


def test_dynamic_decoding_with_cache(tmp_path):
    cfg = rope_config("dynamic", "rope_type")
    n = cfg["max_position_embeddings"]
    T = ROPE_CASES["dynamic"][3]
    w = random_weights(cfg, seed=11)
    model, _, _ = convert_and_load(tmp_path, cfg, w)
    tokens = tokens_for(cfg, T=T, seed=2)

    first = decode_one_by_one(model, tokens)
    second = decode_one_by_one(model, tokens)
    assert np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, second)  # deterministic
    # Up to max_position_embeddings nothing is scaled: plain RoPE, equal to the full forward.
    assert R.rel_l2(first[:, :n], R.llama_forward(w, without_rope_scaling(cfg), tokens[:, :n])) < TOL
    # Beyond it, each new token is rotated with the base of its own length and cached keys keep
    # theirs (Hugging Face's behaviour): not the full forward's single base.
    full = R.llama_forward(w, cfg, tokens)
    incremental = R.llama_forward(w, cfg, tokens, rope_per_position=True)
    assert R.rel_l2(incremental[:, n:], full[:, n:]) > 100 * TOL
    assert R.rel_l2(first, incremental) < TOL


@pytest.mark.parametrize("kind", ["longrope", "su", "wobbly"])
def test_unknown_rope_type_is_refused(kind, tmp_path, capsys):
    for spelling in SPELLINGS:
        cfg = tiny_config(rope_scaling={spelling: kind, "factor": 2.0})
        with pytest.raises(ConfigError, match=repr(kind)):
            ModelArgs.from_dict(cfg)
    # Also in the transformers-5 spelling.
    cfg5 = tiny_config(rope_theta=None, rope_parameters={"rope_theta": 1e4, "rope_type": kind, "factor": 2.0})
    with pytest.raises(ConfigError, match=repr(kind)):
        ModelArgs.from_dict(cfg5)

    hf = write_hf_checkpoint(tmp_path / "hf", cfg, random_weights(cfg))
    with pytest.raises(ConfigError, match=repr(kind)) as e:
        convert(str(hf), str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    # The command line: one line on stderr, non-zero exit.
    assert convert_main(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and kind in err


# ---------------------------------------------------------------------------------------------
# 2. transformers 5 (rope_parameters, dtype) and the old spelling give the same model

TF5_ROPE = {
    "default": {},
    "linear": {"factor": 2.0},
    "llama3": LLAMA3,
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.2},
}


@pytest.mark.parametrize("kind", list(TF5_ROPE))
def test_transformers5_config_equals_old_spelling(kind, tmp_path):
    theta = 500.0
    scaling = None if kind == "default" else {"rope_type": kind, **TF5_ROPE[kind]}
    old = tiny_config(rope_theta=theta, rope_scaling=scaling)
    new = tiny_config(rope_theta=None, rope_scaling=None, torch_dtype=None, dtype="float32")
    new["rope_parameters"] = {"rope_theta": theta, "rope_type": kind, **TF5_ROPE[kind]}
    assert "torch_dtype" not in new and "rope_theta" not in new and "rope_scaling" not in new

    w = random_weights(old, seed=3)
    model_old, _, out_old = convert_and_load(tmp_path, old, w, name="old", exact_config=True)
    model_new, _, out_new = convert_and_load(tmp_path, new, w, name="new", exact_config=True)
    args_old = ModelArgs.from_file(tmp_path / "old-hf" / "config.json")
    args_new = ModelArgs.from_file(tmp_path / "new-hf" / "config.json")
    assert dataclasses.asdict(args_new) == dataclasses.asdict(args_old)
    assert args_new == args_old == model_old.args == model_new.args
    assert args_new.rope_theta == theta

    tokens = tokens_for(old, seed=5)
    got_old, got_new = logits_of(model_old, tokens), logits_of(model_new, tokens)
    np.testing.assert_array_equal(got_new, got_old)
    assert R.rel_l2(got_new, R.llama_forward(w, new, tokens)) < TOL


# ---------------------------------------------------------------------------------------------
# 3. tie_word_embeddings


def test_tie_key_absent_means_untied(tmp_path):
    cfg = tiny_config(tie_word_embeddings=None)
    assert "tie_word_embeddings" not in cfg
    w = random_weights(cfg, seed=4)
    assert "lm_head.weight" in w
    model, _, out = convert_and_load(tmp_path, cfg, w)
    assert model.args.tie_word_embeddings is False
    assert "lm_head" in model and "lm_head.weight" in stored_names(out)
    tokens = tokens_for(cfg, seed=6)
    assert R.rel_l2(logits_of(model, tokens), R.llama_forward(w, cfg, tokens)) < TOL


@pytest.mark.parametrize("with_duplicate_head", [False, True], ids=["no-lm_head", "duplicate-lm_head"])
def test_tied_head_is_the_embedding(with_duplicate_head, tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    w = random_weights(cfg, seed=8)
    assert "lm_head.weight" not in w
    if with_duplicate_head:  # some checkpoints store the tied head anyway
        w["lm_head.weight"] = w["model.embed_tokens.weight"].copy()
    model, _, out = convert_and_load(tmp_path, cfg, w)
    assert "lm_head" not in model
    assert "lm_head.weight" not in stored_names(out)
    tokens = tokens_for(cfg, seed=7)
    # The reference as an untied model whose lm_head is the embedding matrix.
    untied = dict(cfg, tie_word_embeddings=False)
    head_is_embed = {**w, "lm_head.weight": w["model.embed_tokens.weight"]}
    assert R.rel_l2(logits_of(model, tokens), R.llama_forward(head_is_embed, untied, tokens)) < TOL


@pytest.mark.parametrize("tie", [False, None], ids=["tie-false", "tie-absent"])
def test_untied_without_lm_head_is_refused(tie, tmp_path):
    cfg = tiny_config(tie_word_embeddings=tie)
    w = random_weights(cfg, seed=9)
    del w["lm_head.weight"]
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, w)
    with pytest.raises(MlxLlamaError, match="lm_head.weight") as e:
        convert(str(hf), str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 4. Architecture variants and model types

ARCH_VARIANTS = {
    "head_dim-24-hidden-64-heads-4": dict(head_dim=24),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None),
}


@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_architecture_variants_match_reference(variant, tmp_path):
    cfg = tiny_config(**ARCH_VARIANTS[variant])
    w = random_weights(cfg, seed=10)
    model, _, _ = convert_and_load(tmp_path, cfg, w)
    tokens = tokens_for(cfg, seed=8)
    want = R.llama_forward(w, cfg, tokens)
    assert R.rel_l2(logits_of(model, tokens), want) < TOL
    assert R.rel_l2(decode_one_by_one(model, tokens), want) < TOL
    if variant.startswith("head_dim"):
        assert model.args.head_dim == 24 != cfg["hidden_size"] // cfg["num_attention_heads"]
        assert w["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 64)
    if variant == "attention-and-mlp-bias":
        # Not vacuous: without the biases the logits are far off.
        no_bias = {k: v for k, v in w.items() if not k.endswith(".bias")}
        assert R.rel_l2(R.llama_forward(no_bias, cfg, tokens), want) > 100 * TOL


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
def test_unsupported_model_type_is_refused(model_type, tmp_path):
    cfg = tiny_config(model_type=model_type)
    with pytest.raises(ConfigError, match=repr(model_type)):
        ModelArgs.from_dict(cfg)
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, random_weights(tiny_config()))
    with pytest.raises(ConfigError, match=repr(model_type)) as e:
        convert(str(hf), str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# 5. Config validation: each mistake a ConfigError naming the field

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
BAD_SIZES = {"zero": 0, "negative": -4, "float": 64.0, "string": "64", "bool": True}

INVALID = {f"{key}-{why}": ({key: value}, key) for key in SIZE_KEYS for why, value in BAD_SIZES.items()}
INVALID.update({f"{key}-missing": ({key: None}, key) for key in SIZE_KEYS})
INVALID.update(
    {
        "kv-heads-not-dividing-heads": ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        "kv-heads-zero": ({"num_key_value_heads": 0}, "num_key_value_heads"),
        "head_dim-odd-explicit": ({"head_dim": 15}, "head_dim"),
        "head_dim-odd-derived": ({"hidden_size": 60, "num_attention_heads": 4, "num_key_value_heads": 4}, "head_dim"),
        "rms_norm_eps-zero": ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        "rms_norm_eps-negative": ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
        "rms_norm_eps-string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    }
)


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_config_names_the_field(case, tmp_path):
    overrides, field = INVALID[case]
    # Through JSON, so the values are what a config.json can hold.
    cfg = json.loads(json.dumps(tiny_config(**overrides)))
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(cfg)
    msg = str(e.value)
    assert field in msg and "\n" not in msg
    if field in SIZE_KEYS and not case.endswith("-missing"):
        assert f"{field} = {overrides[field]!r}" in msg  # this field, not one that follows from it
    # convert reads the config before anything else: the same error.
    hf = tmp_path / "hf"
    hf.mkdir()
    write_config(hf, cfg)
    with pytest.raises(ConfigError) as e2:
        convert(str(hf), str(tmp_path / "out"), progress=False)
    assert field in str(e2.value) and "\n" not in str(e2.value)


def test_config_that_is_a_json_list_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        ModelArgs.from_dict([tiny_config()])
    path = tmp_path / "config.json"
    path.write_text(json.dumps([tiny_config()]))
    with pytest.raises(ConfigError, match="JSON object") as e:
        ModelArgs.from_file(path)
    assert str(path) in str(e.value)
    with pytest.raises(MlxLlamaError, match="JSON object"):
        convert(str(tmp_path), str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------------------------------------
# 6. EOS and BOS

EOS_CASES = {
    # name: (config.json eos_token_id, generation_config.json eos_token_id or "absent", stop set)
    "config-int": (2, "absent", {2}),
    "config-int-other": (5, "absent", {2, 5}),
    "config-list-gen-int": ([2, 5], 7, {2, 5, 7}),
    "config-int-gen-list": (9, [10, 11], {2, 9, 10, 11}),
    "config-list-gen-list": ([3, 4], [4, 12], {2, 3, 4, 12}),
    "config-absent-gen-list": (None, [12, 13], {2, 12, 13}),
}


@pytest.mark.parametrize("case", list(EOS_CASES))
def test_eos_set_is_the_union(case, tmp_path):
    config_eos, gen_eos, want = EOS_CASES[case]
    cfg = tiny_config(eos_token_id=config_eos)
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, random_weights(cfg, seed=12))
    if gen_eos != "absent":
        gen = {"bos_token_id": 1, "eos_token_id": gen_eos, "do_sample": False}
        (hf / "generation_config.json").write_text(json.dumps(gen, indent=2))
    out = convert(str(hf), str(tmp_path / "out"), progress=False)
    if gen_eos != "absent":
        assert (out / "generation_config.json").read_bytes() == (hf / "generation_config.json").read_bytes()
    else:
        assert not (out / "generation_config.json").exists()
    _, tokenizer = load(str(out))
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.eos_token_ids == want


BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_BOS_TEMPLATE = BOS_TEMPLATE.replace("{{ bos_token }}", "")


@pytest.mark.parametrize(
    "template, add_bos_token",
    [(BOS_TEMPLATE, True), (BOS_TEMPLATE, False), (NO_BOS_TEMPLATE, True)],
    ids=["template-bos+add_bos", "template-bos", "add_bos-only"],
)
def test_chat_prompt_has_exactly_one_bos(template, add_bos_token, tmp_path):
    cfg = tiny_config()
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, random_weights(cfg, seed=13))
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    tc.update(add_bos_token=add_bos_token, chat_template=template)
    (hf / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    out = convert(str(hf), str(tmp_path / "out"), progress=False)
    _, tokenizer = load(str(out))
    assert tokenizer.chat_template == template and tokenizer.bos_token_id == 1
    ids = tokenizer.encode_chat("Hello world!", system_prompt="Be brief.")
    assert ids[0] == 1 and ids.count(1) == 1
    text = tokenizer.decode(ids)
    assert text.startswith("<s><|system|>Be brief.\n<|user|>Hello world!\n") and text.endswith("<|assistant|>")


def test_mistral_sliding_window_hides_old_positions(tmp_path):
    """Mistral v0.1's sliding window: full forward and cached decoding both see only the last W keys."""
    config = tiny_config(model_type="mistral", sliding_window=4)
    weights = random_weights(config, seed=21)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    model, _ = load(str(convert(str(hf), str(tmp_path / "mlx"), progress=False)))
    tokens = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    ref = R.llama_forward(weights, config, tokens)
    full = np.array(model(mx.array(tokens))).astype(np.float64)
    assert R.rel_l2(full, ref) < 1e-4
    cache = model.make_cache()
    steps = np.concatenate([np.array(model(mx.array(tokens[:, i : i + 1]), cache=cache)) for i in range(9)], axis=1)
    assert R.rel_l2(steps.astype(np.float64), ref) < 1e-4
    # The window matters: without it the later positions differ.
    no_window = R.llama_forward(weights, {**config, "sliding_window": None}, tokens)
    assert R.rel_l2(no_window[:, 4:], ref[:, 4:]) > 1e-3


@pytest.mark.parametrize("bad", ["12", 2.0, [2, None], True])
def test_malformed_eos_ids_are_refused(tmp_path, bad):
    config = tiny_config()
    hf = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
    with pytest.raises(MlxLlamaError, match="generation_config.json: eos_token_id"):
        convert(str(hf), str(tmp_path / "out"), progress=False)
    with pytest.raises(ConfigError, match="eos_token_id"):
        ModelArgs.from_dict({**config, "eos_token_id": bad})
