"""GGUF -> MLX model directory without re-quantizing (mlx_llama.gguf_import).

A tiny GGUF is written here by a plain numpy GGUF v3 writer (every importable storage type, encoded
and decoded by numpy, never by MLX), imported, and its logits compared with the float64 reference
forward pass. Tests marked real_model import SmolLM2's Q4_1 GGUF (fetched once into
$MLX_LLAMA_CACHE) and check that its quantized tensors arrive bit for bit.
"""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from . import reference as R
    from .tiny import random_weights, tiny_config, tiny_tokenizer_json
except ImportError:
    import reference as R
    from tiny import random_weights, tiny_config, tiny_tokenizer_json

from mlx_llama import load
from mlx_llama.config import ModelArgs
from mlx_llama.errors import MlxLlamaError
from mlx_llama.gguf import GGUFTensor, check_architecture, check_gguf_header, check_tensor_types
from mlx_llama.gguf import gguf_config, gguf_hf_weights, read_gguf
from mlx_llama.gguf_import import IMPORTABLE_TYPES, import_gguf
from mlx_llama.model import Model

# ---------------------------------------------------------------------------------------------
# GGUF blocks, in numpy (ggml's layouts: 32 weights per block, scale first)

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q6_K": 14, "BF16": 30}
BLOCKS = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),  # x = d * q
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),  # x = d * (q - 8)
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),  # x = d * q + m
}


def encode(x: np.ndarray, kind: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind in ("F32", "F16"):
        return x.astype({"F32": "<f4", "F16": "<f2"}[kind]).tobytes()
    if kind == "BF16":  # truncated: whatever the bits, they are the file's values
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    x = x.reshape(-1, 32)
    blocks = np.zeros(len(x), BLOCKS[kind])
    if kind == "Q8_0":
        blocks["d"] = np.abs(x).max(1) / 127
        blocks["qs"] = np.round(x / blocks["d"].astype(np.float32)[:, None]).clip(-127, 127)
        return blocks.tobytes()
    if kind == "Q4_0":
        blocks["d"] = np.abs(x).max(1) / 7
        q = np.round(x / blocks["d"].astype(np.float32)[:, None]).clip(-8, 7) + 8
    else:
        lo = x.min(1)
        blocks["d"], blocks["m"] = (x.max(1) - lo) / 15, lo
        q = np.round((x - blocks["m"].astype(np.float32)[:, None]) / blocks["d"].astype(np.float32)[:, None])
    q = q.clip(0, 15).astype(np.uint8)
    blocks["qs"] = q[:, :16] | (q[:, 16:] << 4)  # byte j: weight j in the low nibble, j + 16 in the high
    return blocks.tobytes()


def decode(raw: bytes, kind: str, shape) -> np.ndarray:
    """The float32 values a GGUF tensor holds, computed as ggml computes them."""
    if kind in ("F32", "F16"):
        return np.frombuffer(raw, {"F32": "<f4", "F16": "<f2"}[kind]).astype(np.float32).reshape(shape)
    if kind == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    b = np.frombuffer(raw, BLOCKS[kind])
    d = b["d"].astype(np.float32)[:, None]
    if kind == "Q8_0":
        return (d * b["qs"].astype(np.float32)).reshape(shape)
    q = np.concatenate([b["qs"] & 15, b["qs"] >> 4], axis=1).astype(np.float32)
    x = d * (q - 8) if kind == "Q4_0" else q * d + b["m"].astype(np.float32)[:, None]
    return x.reshape(shape)


def block_bytes(kind: str, shape) -> int:
    n = int(np.prod(shape))
    if kind in ("F32", "F16", "BF16"):
        return n * {"F32": 4, "F16": 2, "BF16": 2}[kind]
    return n // 32 * BLOCKS[kind].itemsize


# ---------------------------------------------------------------------------------------------
# A GGUF v3 writer

def gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(v) -> tuple[int, bytes]:
    """(value type, bytes): str 8, bool 7, int uint32 (4), float float32 (6), list an array (9)."""
    if isinstance(v, str):
        return 8, gguf_string(v)
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, list):  # strings, or int32 (token types)
        if isinstance(v[0], str):
            return 9, struct.pack("<IQ", 8, len(v)) + b"".join(gguf_string(s) for s in v)
        return 9, struct.pack("<IQ", 5, len(v)) + np.asarray(v, "<i4").tobytes()
    raise TypeError(type(v))


def write_gguf(path, metadata: dict, tensors: dict[str, tuple[str, tuple, bytes]]) -> None:
    """Header (magic, version 3, counts), key/value metadata, the tensor table (dimensions innermost
    first, type, offset from the data start), padding to 32 bytes, then each tensor padded to 32."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        vtype, data = gguf_value(value)
        out += gguf_string(key) + struct.pack("<I", vtype) + data
    data, offset = b"", 0
    for name, (kind, shape, raw) in tensors.items():
        dims = b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += gguf_string(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", TYPE_IDS[kind], offset)
        data += raw + b"\0" * (-len(raw) % 32)
        offset = len(data)
    path.write_bytes(out + b"\0" * (-len(out) % 32) + data)


def tokenizer_metadata(vocab_size: int) -> dict:
    """GGUF tokenizer keys for the tiny byte-level BPE of tests/tiny.py (<unk>, <s>, </s> = 0, 1, 2)."""
    tok = json.loads(tiny_tokenizer_json(vocab_size))
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if i < 3 else 1 for i in range(len(tokens))],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False}


# Storage type of each tiny tensor: every importable type, on q and k too, and 4- and 8-bit modules
# mixed so the config needs per-module overrides. Norms not listed are F32.
TINY_TYPES = {
    "token_embd": "Q8_0", "output": "Q4_0", "blk.1.attn_norm": "BF16",
    "blk.0.attn_q": "F32", "blk.0.attn_k": "F16", "blk.0.attn_v": "BF16", "blk.0.attn_output": "Q8_0",
    "blk.0.ffn_gate": "Q4_1", "blk.0.ffn_up": "Q4_0", "blk.0.ffn_down": "BF16",
    "blk.1.attn_q": "Q4_1", "blk.1.attn_k": "Q8_0", "blk.1.attn_v": "Q4_0", "blk.1.attn_output": "F32",
    "blk.1.ffn_gate": "Q8_0", "blk.1.ffn_up": "Q4_1", "blk.1.ffn_down": "Q4_1",
}
TINY_8BIT = ["model.embed_tokens", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj",
             "model.layers.1.self_attn.k_proj"]
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    path = hf.removesuffix(".weight")
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if path in top:
        return top[path]
    _, _, layer, module = path.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[module]}"


def gguf_to_hf_rows(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Written from the definition, independently of the library: within each head, GGUF pairs rows
    (2j, 2j+1), HF pairs (j, j + d/2); so HF row j is GGUF row 2j and HF row j + d/2 is GGUF row 2j+1."""
    half, out = head_dim // 2, np.empty_like(w)
    for h in range(n_heads):
        for j in range(half):
            out[h * head_dim + j] = w[h * head_dim + 2 * j]
            out[h * head_dim + half + j] = w[h * head_dim + 2 * j + 1]
    return out


def make_tiny_gguf(path, types=TINY_TYPES, architecture="llama"):
    """Write the tiny GGUF; returns (HF config, file values by GGUF name in the file's layout, raw bytes)."""
    meta = tokenizer_metadata(300)
    config = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]), num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=500000.0)
    metadata = {"general.architecture": architecture, "general.name": "tiny", "llama.block_count": 2,
                "llama.context_length": 256, "llama.embedding_length": 64, "llama.feed_forward_length": 96,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.freq_base": 500000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5} | meta
    tensors, values = {}, {}
    for hf, w in random_weights(config, seed=3).items():  # random, so q/k can just be read as GGUF layout
        name = gguf_name(hf)
        kind = types.get(name, "F32")
        if kind == "BF16":
            w = w.copy()
            w.flat[::7] *= 1e-6  # below float16's normal range: a float16 round trip would change them
        raw = encode(w, kind)
        tensors[f"{name}.weight"] = (kind, w.shape, raw)
        values[name] = decode(raw, kind, w.shape)
    write_gguf(path, metadata, tensors)
    return config, values, tensors


def hf_reference_weights(values: dict, config: dict) -> dict:
    """The file's values under HF names, q/k rows moved to the HF layout by gguf_to_hf_rows."""
    out = {}
    for hf in random_weights(config, seed=3):
        w = values[gguf_name(hf)]
        if "q_proj" in hf or "k_proj" in hf:
            heads = config["num_attention_heads"] if "q_proj" in hf else config["num_key_value_heads"]
            w = gguf_to_hf_rows(w, heads, config["hidden_size"] // config["num_attention_heads"])
        out[hf] = w
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gguf")
    config, values, tensors = make_tiny_gguf(root / "tiny.gguf")
    out = import_gguf(root / "tiny.gguf", root / "mlx", progress=False)
    return config, values, tensors, out


def test_tiny_config_records_each_modules_bits(tiny):
    _, _, _, out = tiny
    config = json.loads((out / "config.json").read_text())
    overrides = {path: {"group_size": 32, "bits": 8} for path in TINY_8BIT}
    assert config["quantization"] == {"group_size": 32, "bits": 4} | overrides
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 500000.0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names


def test_tiny_tensors_are_stored_as_in_the_file(tiny):
    _, values, tensors, out = tiny
    stored = mx.load(str(out / "model.safetensors"))
    # float tensors keep their dtype; BF16 bits survive (mx.load alone would pass them through float16)
    assert stored["model.layers.0.self_attn.k_proj.weight"].dtype == mx.float16
    down = stored["model.layers.0.mlp.down_proj.weight"]
    assert down.dtype == mx.bfloat16
    assert np.array(down.view(mx.uint16)).tobytes() == tensors["blk.0.ffn_down.weight"][2]
    # quantized ones are triples whose dequantized values are the file's, q/k rows moved
    for hf, name, bits in [("lm_head", "output", 4), ("model.layers.1.self_attn.k_proj", "blk.1.attn_k", 8),
                           ("model.layers.1.self_attn.q_proj", "blk.1.attn_q", 4)]:
        w, s, b = (stored[f"{hf}.{k}"] for k in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and s.dtype == b.dtype == mx.float16
        got = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits))
        want = values[name]
        if "attn" in name:
            want = gguf_to_hf_rows(want, 4 if "attn_q" in name else 2, 16)
        np.testing.assert_array_equal(got, want)


def test_tiny_logits_match_the_numpy_reference(tiny, monkeypatch):
    config, values, _, out = tiny
    model, tokenizer = load(str(out))
    ids = tokenizer.encode("Hello world! The quick brown fox.")
    assert tokenizer.decode(ids) == "Hello world! The quick brown fox." and len(ids) > 4
    got = np.array(model(mx.array([ids]))).astype(np.float64)
    want = R.llama_forward(hf_reference_weights(values, config), config, [ids])
    assert R.rel_l2(got, want) < 1e-4
    # Independently of any permutation: the file's own layout with interleaved RoPE, as llama.cpp runs it.
    rope = R.rope
    monkeypatch.setattr(R, "rope", lambda *a, **kw: rope(*a, **(kw | {"traditional": True})))
    gguf_layout = {hf: values[gguf_name(hf)] for hf in random_weights(config, seed=3)}
    assert R.rel_l2(got, R.llama_forward(gguf_layout, config, [ids])) < 1e-4


def test_refuses_non_llama_architectures(tmp_path):
    for arch in ("gemma", "qwen2", None):
        with pytest.raises(MlxLlamaError, match=f"general.architecture is {arch!r}; only 'llama'"):
            check_architecture(arch, "x.gguf")
    check_architecture("llama", "x.gguf")
    make_tiny_gguf(tmp_path / "gemma.gguf", architecture="gemma")
    with pytest.raises(MlxLlamaError, match="'gemma'"):
        import_gguf(tmp_path / "gemma.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_unsupported_tensor_types(tmp_path):
    table = {"token_embd.weight": GGUFTensor(8, (40, 64), 0), "blk.0.attn_q.weight": GGUFTensor(14, (64, 256), 0),
             "blk.0.attn_k.weight": GGUFTensor(99, (64, 256), 0)}
    with pytest.raises(MlxLlamaError, match=r"tensor blk\.0\.attn_q\.weight is stored as Q6_K.*1 more"):
        check_tensor_types(table, IMPORTABLE_TYPES, "x.gguf")
    with pytest.raises(MlxLlamaError, match=r"blk\.0\.attn_k\.weight is stored as unknown type 99"):
        check_tensor_types({k: table[k] for k in ("blk.0.attn_k.weight",)}, IMPORTABLE_TYPES, "x.gguf")
    check_tensor_types({"token_embd.weight": table["token_embd.weight"]}, IMPORTABLE_TYPES, "x.gguf")
    # End to end: mx.load would dequantize Q6_K to float16 without a word; the import refuses first.
    write_gguf(tmp_path / "k.gguf", {"general.architecture": "llama"},
               {"blk.0.ffn_down.weight": ("Q6_K", (2, 256), b"\0" * 2 * 210)})
    with pytest.raises(MlxLlamaError, match=r"ffn_down\.weight is stored as Q6_K"):
        import_gguf(tmp_path / "k.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite(tmp_path):
    make_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(MlxLlamaError, match="already exists"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "taken", progress=False)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    with pytest.raises(MlxLlamaError, match="overwrite the input|not a model directory"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path, force=True, progress=False)
    with pytest.raises(MlxLlamaError, match="not a model directory"):  # --force replaces models only
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "taken", force=True, progress=False)
    (tmp_path / "taken" / "config.json").write_text("{}")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "taken", force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "tiny.gguf"]  # no temporary left


def test_header_table_matches_the_writer(tmp_path):
    _, _, tensors = make_tiny_gguf(tmp_path / "tiny.gguf")
    header = check_gguf_header(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    assert header.architecture == "llama" and list(header.tensors) == list(tensors)
    for name, (kind, shape, raw) in tensors.items():
        info = header.tensors[name]
        assert (info.ggml_type, info.shape) == (TYPE_IDS[kind], shape)
        assert data[info.offset : info.offset + block_bytes(kind, shape)] == raw


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 blocks, Q8_0 embedding)

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from mlx_llama.smollm2 import smollm2_gguf_path

    path = smollm2_gguf_path()
    out = import_gguf(path, tmp_path_factory.mktemp("smollm2") / "mlx", progress=False)
    return path, out


@pytest.mark.real_model
def test_real_config_and_strict_load(smollm2):
    _, out = smollm2
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    model, _ = load(str(out))  # strict: every tensor present, nothing extra, every shape as quantized
    assert model.args.quantization == q and model.compute_dtype == mx.float32
    assert (out / "model.safetensors").stat().st_size < 100e6


@pytest.mark.real_model
def test_real_tensors_are_bit_identical_to_the_file(smollm2):
    path, out = smollm2
    header, data = check_gguf_header(path), path.read_bytes()
    tensors, file_triples = mx.load(str(out / "model.safetensors")), read_gguf(path)[0]
    cases = [("token_embd", "model.embed_tokens", "Q8_0", 8, None), ("blk.7.attn_q", "model.layers.7.self_attn.q_proj",
             "Q4_1", 4, 9), ("blk.7.attn_k", "model.layers.7.self_attn.k_proj", "Q4_1", 4, 3),
             ("blk.7.attn_v", "model.layers.7.self_attn.v_proj", "Q4_1", 4, None),
             ("blk.29.ffn_down", "model.layers.29.mlp.down_proj", "Q4_1", 4, None)]
    for name, hf, kind, bits, heads in cases:
        info = header.tensors[f"{name}.weight"]
        assert info.ggml_type == TYPE_IDS[kind]
        want = decode(data[info.offset : info.offset + block_bytes(kind, info.shape)], kind, info.shape)
        file_f16 = np.array(mx.dequantize(*(file_triples[f"{name}.{k}"] for k in ("weight", "scales", "biases")),
                                          group_size=32, bits=bits))
        if heads:
            want, file_f16 = gguf_to_hf_rows(want, heads, 64), gguf_to_hf_rows(file_f16, heads, 64)
        w, s, b = (tensors[f"{hf}.{k}"] for k in ("weight", "scales", "biases"))
        assert s.dtype == b.dtype == mx.float16
        # as the loader computes on the CPU (scales cast to float32): exactly ggml's float32 values
        got = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
        assert mx.array_equal(got, mx.array(want)), name
        # and as stored, against mx.load's own triple of the file
        assert mx.array_equal(mx.dequantize(w, s, b, group_size=32, bits=bits), mx.array(file_f16)), name


@pytest.mark.real_model
def test_real_logits_equal_the_dequantized_float32_model(smollm2):
    path, out = smollm2
    model, tokenizer = load(str(out))
    tensors, metadata = read_gguf(path)
    config = gguf_config(metadata, tensors.keys())
    dense = Model(ModelArgs.from_dict(config))
    dense.load_weights(list(gguf_hf_weights(tensors, config).items()), strict=True)  # float32, HF layout
    ids = mx.array([tokenizer.encode("The capital of France is")])
    got, want = np.array(model(ids)), np.array(dense(ids))
    assert R.rel_l2(got, want) < 1e-5
    assert (got[0, -1].argmax() == want[0, -1].argmax())


@pytest.mark.real_model
def test_real_answers_paris(smollm2):
    from mlx_llama import generate

    model, tokenizer = load(str(smollm2[1]))
    ids = tokenizer.encode_chat("What is the capital of France? Answer in one sentence.")
    assert "Paris" in generate(model, tokenizer, ids, max_tokens=16)
