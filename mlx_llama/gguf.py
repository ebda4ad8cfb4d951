"""Read a llama GGUF file and export it as a Hugging Face-format model directory.

The export holds what a user would download from the Hub (config.json, model.safetensors, tokenizer
files), so the rest of the package reads a GGUF-born model exactly as it reads any HF checkpoint.
Weights are dequantized and the q/k rows moved back from GGUF's interleaved RoPE layout.
The reading, checking and renaming here are shared with gguf_import.py, which keeps the quantized
tensors as they are instead.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Collection, NamedTuple, Optional

import mlx.core as mx
import numpy as np

from .errors import MlxLlamaError
from .writer import write_model_dir

GROUP_SIZE = 32  # every GGUF block quantization that mx.load keeps quantized (Q4_0, Q4_1, Q8_0)
_TRIPLE = ("weight", "scales", "biases")  # how mx.load returns a quantized tensor

# The one renaming table. GGUF base name -> HF module path; per-layer GGUF names are "blk.N.<key>".
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values, as in llama.cpp
# Sizes of the fixed-size GGUF metadata value types; 8 is a string, 9 an array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# GGML tensor storage types (ggml.h), by the id a GGUF tensor table records.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}
_BF16 = 30


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPES.get(ggml_type, f"unknown type {ggml_type}")


class GGUFTensor(NamedTuple):
    """One entry of a GGUF tensor table."""

    ggml_type: int
    shape: tuple  # row-major, as mx.load returns it (GGUF lists the dimensions innermost first)
    offset: int  # absolute byte offset of the data in the file


class GGUFHeader(NamedTuple):
    architecture: Optional[str]  # general.architecture, when it is a string
    tensors: dict  # tensor name -> GGUFTensor, in file order


def check_gguf_header(path) -> GGUFHeader:
    """Walk a GGUF header with bounds checks, so that a corrupt file raises instead of reaching mlx.

    mx.load segfaults on corrupt headers ("GGUF" then random bytes); truncated tensor data it reports.
    Returns the architecture and the tensor table (names, storage types, shapes, offsets).
    """
    path = Path(path)
    if not path.is_file():
        raise MlxLlamaError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise MlxLlamaError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk_header(buf, f"{path}: corrupt or truncated GGUF file")


def _walk_header(buf, corrupt: str) -> GGUFHeader:
    size, pos = len(buf), 4

    def skip(n: int) -> int:
        nonlocal pos
        if n > size - pos:
            raise MlxLlamaError(f"{corrupt} (header runs past the end of the file)")
        pos += n
        return pos - n

    def take(fmt: str):
        return struct.unpack_from(fmt, buf, skip(struct.calcsize(fmt)))

    def string() -> bytes:
        return buf[skip(take("<Q")[0]) : pos]

    def skip_value(vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            skip(_SCALAR_SIZES[vtype])
        elif vtype == 8:
            string()
        elif vtype == 9 and depth < 4:
            etype, count = take("<IQ")
            if etype in _SCALAR_SIZES:
                skip(count * _SCALAR_SIZES[etype])
            elif count > size:  # every element takes at least one byte
                raise MlxLlamaError(f"{corrupt} (array of {count} values)")
            else:
                for _ in range(count):
                    skip_value(etype, depth + 1)
        else:
            raise MlxLlamaError(f"{corrupt} (metadata value type {vtype})")

    version, n_tensors, n_kv = take("<IQQ")
    if version not in (2, 3):
        raise MlxLlamaError(f"{corrupt} (GGUF version {version}; expected 2 or 3)")
    if max(n_kv, n_tensors) > size:
        raise MlxLlamaError(f"{corrupt} (counts {n_kv} and {n_tensors} exceed the file size)")
    alignment, architecture = 32, None
    for _ in range(n_kv):
        key, (vtype,) = string(), take("<I")
        if key == b"general.alignment" and vtype == 4:
            alignment = take("<I")[0] or 32
        elif key == b"general.architecture" and vtype == 8:
            architecture = string().decode("utf-8", errors="replace")
        else:
            skip_value(vtype)
    table = []
    for _ in range(n_tensors):
        name = string().decode("utf-8", errors="replace")
        (n_dims,) = take("<I")
        if n_dims > 4:
            raise MlxLlamaError(f"{corrupt} (a tensor with {n_dims} dimensions)")
        dims = take(f"<{n_dims}Q")
        ggml_type, offset = take("<IQ")
        table.append((name, ggml_type, tuple(reversed(dims)), offset))
    data_start = -(-pos // alignment) * alignment
    if table and data_start + max(t[3] for t in table) >= size:
        raise MlxLlamaError(f"{corrupt} (tensor data runs past the end of the file)")
    tensors = {name: GGUFTensor(t, shape, data_start + offset) for name, t, shape, offset in table}
    return GGUFHeader(architecture, tensors)


def check_architecture(architecture, source) -> None:
    """Only llama GGUFs: other architectures name their tensors and hyperparameters differently."""
    if architecture != "llama":
        raise MlxLlamaError(f"{source}: general.architecture is {architecture!r}; only 'llama' is supported")


def check_tensor_types(tensors: dict, allowed: Collection[str], source) -> None:
    """Refuse a tensor table holding any storage type not in `allowed` (names as in GGML_TYPES)."""
    bad = [(name, info.ggml_type) for name, info in tensors.items() if ggml_type_name(info.ggml_type) not in allowed]
    if bad:
        name, t = bad[0]
        more = f" (and {len(bad) - 1} more tensors of unsupported types)" if len(bad) > 1 else ""
        raise MlxLlamaError(
            f"{source}: tensor {name} is stored as {ggml_type_name(t)}, which cannot be imported{more}; "
            f"supported: {', '.join(allowed)}"
        )


def read_gguf(path, tensor_types: Optional[Collection[str]] = None) -> tuple[dict[str, mx.array], dict]:
    """Every tensor and the metadata of a llama GGUF file; quantized tensors stay MLX triples.

    With `tensor_types` (names as in GGML_TYPES), a file holding any other storage type is refused
    before anything is loaded.
    """
    header = check_gguf_header(path)
    check_architecture(header.architecture, path)
    if tensor_types is not None:
        check_tensor_types(header.tensors, tensor_types, path)
    try:
        tensors, metadata = mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        # e.g. "[load_gguf] Tensor 'x' extends past the end of the file. Perhaps an incomplete download..."
        cause = (str(e).replace("[load_gguf] ", "").splitlines() or [type(e).__name__])[0]
        raise MlxLlamaError(f"{path}: unreadable GGUF file: {cause}") from None
    # mx.load turns BF16 into float16, which flushes values below ~6e-8 to zero and overflows above
    # 65504: read those tensors' bytes ourselves.
    for name, info in header.tensors.items():
        if info.ggml_type == _BF16:
            tensors[name] = _read_bf16(path, name, info)
    return tensors, metadata


def _read_bf16(path, name: str, info: GGUFTensor) -> mx.array:
    count = int(np.prod(info.shape))
    raw = np.fromfile(path, dtype="<u2", count=count, offset=info.offset)
    if raw.size != count:
        raise MlxLlamaError(f"{path}: truncated GGUF file (tensor {name} runs past the end)")
    return mx.array(raw.astype(np.uint16)).view(mx.bfloat16).reshape(info.shape)


def _scalar(metadata: dict, key: str, kind=int, default=None):
    if key not in metadata:
        if default is None:
            raise MlxLlamaError(f"GGUF metadata lacks {key}")
        return default
    value = metadata[key]
    if kind is float and isinstance(value, mx.array) and value.dtype == mx.float32:
        # 1e-5 is stored as float32 9.99999974e-06: take the shortest decimal that rounds to it
        return float(str(np.float32(value.item())))
    return kind(value.item() if isinstance(value, mx.array) else value)


def _special_ids(metadata: dict) -> dict:
    keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
    keys = {k: f"tokenizer.ggml.{g}_token_id" for k, g in keys.items()}
    return {k: _scalar(metadata, g) for k, g in keys.items() if g in metadata}


def gguf_config(metadata: dict, tensor_names) -> dict:
    """The HF config.json dict of a llama GGUF; `tensor_names` decide tied embeddings and biases."""
    names = set(tensor_names)
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise MlxLlamaError(f"GGUF RoPE scaling ({scaling}, rope_freqs) is not supported")
    hidden = _scalar(metadata, "llama.embedding_length")
    heads = _scalar(metadata, "llama.attention.head_count")
    n_tokens = len(metadata.get("tokenizer.ggml.tokens", [])) or None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _scalar(metadata, "llama.feed_forward_length"),
        "num_hidden_layers": _scalar(metadata, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(metadata, "llama.attention.head_count_kv", default=heads),
        "head_dim": _scalar(metadata, "llama.rope.dimension_count", default=hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": _scalar(metadata, "llama.attention.layer_norm_rms_epsilon", float),
        "rope_theta": _scalar(metadata, "llama.rope.freq_base", float, default=10000.0),
        "rope_scaling": None,
        "max_position_embeddings": _scalar(metadata, "llama.context_length"),
        "vocab_size": _scalar(metadata, "llama.vocab_size", default=n_tokens),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "bfloat16",
    }
    return config | _special_ids(metadata)


def unpermute_rope_rows(w: mx.array, n_heads: int, head_dim: int) -> mx.array:
    """GGUF q/k rows (interleaved RoPE pairs 2j, 2j+1) -> HF rows (rotate-half pairs j, j+d/2)."""
    if w.shape[0] != n_heads * head_dim or head_dim % 2:
        raise MlxLlamaError(f"q/k projection has {w.shape[0]} rows; expected {n_heads} heads x {head_dim}")
    rest = w.shape[1:]
    w = w.reshape(n_heads, head_dim // 2, 2, *rest)  # per head: (pair j, member of the pair)
    return mx.swapaxes(w, 1, 2).reshape(n_heads * head_dim, *rest)


def quant_bits(name: str, w: mx.array, scales: mx.array) -> int:
    """Bits per weight of an mx.load triple: packed uint32 columns * 32 / (groups * GROUP_SIZE)."""
    bits, rem = divmod(w.shape[-1] * 32, scales.shape[-1] * GROUP_SIZE)
    if rem or bits not in (2, 3, 4, 5, 6, 8) or w.shape[:-1] != scales.shape[:-1]:
        raise MlxLlamaError(f"GGUF tensor {name}: no bit width fits shapes {w.shape} and {scales.shape}")
    return bits


def _dequantize(name: str, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    bits = quant_bits(name, w, scales)
    # float32 scales and biases, so the values are not rounded through float16 on the way
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    return mx.dequantize(w, s, b, group_size=GROUP_SIZE, bits=bits)


def _hf_name(base: str) -> str | None:
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"
    return GLOBAL_NAMES.get(base)


def gguf_modules(tensors: dict[str, mx.array], config: dict) -> dict[str, dict[str, mx.array]]:
    """mx.load's GGUF tensors grouped by HF module path: {"model.layers.0.self_attn.q_proj": {"weight":
    ..., "scales": ..., "biases": ...}, ...}, every tensor kept as loaded except that the q/k rows are
    moved to the HF layout. For quantized q/k the same row permutation is applied to the packed weight,
    the scales and the biases: quantization groups run along a row, so rows move whole and the
    dequantized values are exactly those of the file, permuted. Unknown and missing tensors raise.
    """
    rope_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    modules, unknown = {}, []
    for key in sorted(tensors):
        base, _, suffix = key.rpartition(".")
        hf = _hf_name(base)
        if hf is None or suffix not in ("weight", "bias", "scales", "biases"):
            unknown.append(key)
        elif suffix in ("scales", "biases") and any(f"{base}.{p}" not in tensors for p in _TRIPLE):
            missing = next(f"{base}.{p}" for p in _TRIPLE if f"{base}.{p}" not in tensors)
            raise MlxLlamaError(f"GGUF tensor {key} has no {missing}")
        else:
            modules.setdefault(hf, {})[suffix] = tensors[key]
    if unknown:
        raise MlxLlamaError(f"unknown GGUF tensors: {', '.join(unknown[:8])}{' ...' * (len(unknown) > 8)}")
    expected = {"model.embed_tokens", "model.norm"}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.{name}" for name in LAYER_NAMES.values()}
    missing = sorted(p for p in expected if "weight" not in modules.get(p, {}))
    if missing:
        raise MlxLlamaError(f"GGUF file lacks tensors for: {', '.join(f'{p}.weight' for p in missing[:8])}")
    for path, parts in modules.items():
        kind = path.rpartition(".")[2]
        if kind in rope_heads:
            modules[path] = {k: unpermute_rope_rows(t, rope_heads[kind], config["head_dim"]) for k, t in parts.items()}
    return modules


def gguf_hf_weights(tensors: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """HF-named float32 weights from mx.load's GGUF tensors: dequantized, q/k rows un-permuted."""
    weights = {}
    for path, parts in gguf_modules(tensors, config).items():
        if "scales" in parts:
            weights[f"{path}.weight"] = _dequantize(f"{path}.weight", parts["weight"], parts["scales"], parts["biases"])
        else:
            weights[f"{path}.weight"] = parts["weight"].astype(mx.float32)
        if "bias" in parts:
            weights[f"{path}.bias"] = parts["bias"].astype(mx.float32)
    return weights


def tokenizer_files_from_gguf(metadata: dict) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json and generation_config.json from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise MlxLlamaError(f"GGUF tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) works")
    if pre not in ("smollm", "gpt-2", "default"):
        raise MlxLlamaError(f"GGUF tokenizer.ggml.pre is {pre!r}; supported: 'smollm', 'gpt-2', 'default'")
    for key in ("tokens", "token_type", "merges"):
        if f"tokenizer.ggml.{key}" not in metadata:
            raise MlxLlamaError(f"GGUF metadata lacks tokenizer.ggml.{key}")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = metadata["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    if any(len(m) != 2 for m in merges):  # byte-level tokens never hold a space (it is "Ġ")
        raise MlxLlamaError("GGUF tokenizer.ggml.merges holds an entry that is not two tokens")

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one first, as SmolLM2's own tokenizer.json does
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)  # adds no BOS
    added = list(zip(tokens, types))
    # add_special_tokens marks control tokens special, so decode(skip_special_tokens=True) drops them
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, y in added if y == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, y in added if y == USER_DEFINED])

    def token(name: str) -> str | None:
        key = f"tokenizer.ggml.{name}_token_id"
        return tokens[_scalar(metadata, key)] if key in metadata else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": _scalar(metadata, "tokenizer.ggml.add_bos_token", bool, default=False),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _scalar(metadata, "llama.context_length"),
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return {
        "tokenizer.json": json.loads(tok.to_str()),
        "tokenizer_config.json": tokenizer_config,
        "generation_config.json": _special_ids(metadata),
    }


def export_hf(gguf_path, out_dir, dtype: str = "bfloat16") -> Path:
    """Write a Hugging Face-format model directory made from a llama GGUF file; returns `out_dir`.

    Files go to a temporary sibling directory that is renamed at the end, so an interrupted export
    leaves nothing that looks like a model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MlxLlamaError(f"{out_dir}: already exists; remove it or choose another output directory")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise MlxLlamaError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    tensors, metadata = read_gguf(gguf_path)
    config = gguf_config(metadata, tensors.keys()) | {"torch_dtype": dtype}
    weights = gguf_hf_weights(tensors, config)
    texts = {
        name: json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        for name, content in tokenizer_files_from_gguf(metadata).items()
    }
    groups = ({name: weights.pop(name).astype(getattr(mx, dtype))} for name in sorted(weights))
    return write_model_dir(out_dir, config, groups, texts=texts, total=len(weights), fmt="pt", progress=False)
