"""Tiny random Llama checkpoints in Hugging Face format, written without MLX.

The safetensors writer is pure Python + numpy on purpose: a checkpoint written by MLX and read
back by MLX would hide a shared misunderstanding of the format.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np


def tiny_config(**overrides) -> dict:
    """A Hugging Face config.json dict for a very small Llama; keyword arguments override keys
    (a value of None removes the key)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def config_dims(config: dict) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) with HF's defaults."""
    h = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or h
    hd = config.get("head_dim") or config["hidden_size"] // h
    return h, kv, hd


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights with Hugging Face names, scaled so activations and logits stay O(1) and
    the logits are far from degenerate (distinct tokens get clearly different logits)."""
    rng = np.random.default_rng(seed)
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    n_heads, n_kv, head_dim = config_dims(config)

    def mat(out_dim, in_dim):
        # Std 1/sqrt(in_dim): each projection roughly preserves the scale of its input.
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def vec(n, scale=0.1):
        return (rng.standard_normal(n) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = mat(n_heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(n_kv * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(n_kv * head_dim, hidden)
        # Residual branches scaled down so the residual stream does not blow up with depth.
        w[p + "self_attn.o_proj.weight"] = mat(hidden, n_heads * head_dim) * 0.5
        if config.get("attention_bias"):
            w[p + "self_attn.q_proj.bias"] = vec(n_heads * head_dim)
            w[p + "self_attn.k_proj.bias"] = vec(n_kv * head_dim)
            w[p + "self_attn.v_proj.bias"] = vec(n_kv * head_dim)
            w[p + "self_attn.o_proj.bias"] = vec(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, inter) * 0.5
        if config.get("mlp_bias"):
            w[p + "mlp.gate_proj.bias"] = vec(inter)
            w[p + "mlp.up_proj.bias"] = vec(inter)
            w[p + "mlp.down_proj.bias"] = vec(hidden)
    w["model.norm.weight"] = norm(hidden)
    if not config.get("tie_word_embeddings", False):
        # Logits of std ~ 1.5: peaked enough to be informative, not saturated.
        w["lm_head.weight"] = (mat(vocab, hidden) * 1.5).astype(np.float32)
    else:
        # Tied: the head is the embedding; keep logits O(1) by using a modest embedding scale.
        w["model.embed_tokens.weight"] *= np.float32(0.2)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


# ---------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of float32 x, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bfloat16, returned as float32."""
    return bf16_bits_to_float32(float32_to_bf16_bits(x))


def _encode(arr: np.ndarray, dtype: Optional[str]) -> tuple[str, bytes]:
    """(safetensors dtype tag, little-endian bytes). dtype converts floating tensors:
    "float32" / "float16" / "bfloat16"; None keeps the array's own dtype."""
    arr = np.asarray(arr)
    if dtype is not None and np.issubdtype(arr.dtype, np.floating):
        if dtype in ("bfloat16", "bf16", "BF16"):
            return "BF16", float32_to_bf16_bits(arr.astype(np.float32)).astype("<u2").tobytes()
        arr = arr.astype({"float32": np.float32, "float16": np.float16, "F32": np.float32, "F16": np.float16}[dtype])
    tag = _ST_DTYPES[arr.dtype]
    return tag, np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def write_safetensors(
    path,
    tensors: dict[str, np.ndarray],
    metadata: Optional[dict] = None,
    dtype: Optional[str] = None,
    keep_dtype: frozenset = frozenset(),
) -> Path:
    """Write a .safetensors file: 8-byte little-endian header length, JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
    spaces to a multiple of 8, then the raw little-endian tensor bytes in header order.

    dtype ("float32", "float16", "bfloat16"; None keeps each array's dtype) converts the floating
    tensors, except those named in keep_dtype. bfloat16 rounds to nearest even."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        tag, data = _encode(arr, None if name in keep_dtype else dtype)
        header[name] = {"dtype": tag, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for data in blobs:
            f.write(data)
    return path


def read_safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


# ---------------------------------------------------------------------------------------------
# tokenizer

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello, tiny Llama. How are you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Rotary position embeddings rotate pairs of dimensions by an angle.",
    "Grouped-query attention shares each key and value head among several query heads.",
    "1234567890 numbers, punctuation; and    spaces.",
    "def main():\n    print('hello')\n",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json (ids 0, 1, 2 = <unk>, <s>, </s>) with at most vocab_size
    tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    assert tok.get_vocab_size() <= vocab_size
    return tok.to_str()


def write_tokenizer(dir_path, vocab_size: int) -> None:
    d = Path(dir_path)
    (d / "tokenizer.json").write_text(tiny_tokenizer_json(vocab_size))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "model_max_length": 256,
            },
            indent=2,
        )
    )


# ---------------------------------------------------------------------------------------------
# checkpoint


def write_hf_checkpoint(
    dir_path,
    config: dict,
    weights: dict[str, np.ndarray],
    shards: int = 1,
    dtype: str = "float32",
    tokenizer: bool = True,
    extra_tensors: Optional[dict[str, np.ndarray]] = None,
) -> Path:
    """Write a Hugging Face model directory: config.json, model.safetensors (or `shards` files
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json), and a tiny tokenizer.
    dtype ("float32", "float16", "bfloat16") is the storage dtype of the weights. extra_tensors
    (e.g. rotary_emb.inv_freq buffers) keep their own dtype, as torch float32 buffers would."""
    d = Path(dir_path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg["torch_dtype"] = dtype
    (d / "config.json").write_text(json.dumps(cfg, indent=2))

    extra = dict(extra_tensors or {})
    arrays = {**weights, **extra}
    keep = frozenset(extra)
    meta = {"format": "pt"}
    if tokenizer:
        write_tokenizer(d, config["vocab_size"])
    if shards <= 1:
        write_safetensors(d / "model.safetensors", arrays, metadata=meta, dtype=dtype, keep_dtype=keep)
        return d

    names = list(arrays)
    bounds = np.linspace(0, len(names), shards + 1).round().astype(int)
    weight_map = {}
    total = 0
    for i in range(shards):
        group = names[bounds[i] : bounds[i + 1]]
        assert group, "more shards than tensors"
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(d / fname, {k: arrays[k] for k in group}, metadata=meta, dtype=dtype, keep_dtype=keep)
        for name in group:
            weight_map[name] = fname
            total += len(_encode(arrays[name], None if name in keep else dtype)[1])
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return d
