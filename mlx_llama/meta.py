"""Meta's original Llama layout -> a Hugging Face config and HF-named, HF-layout weights.

A Meta download is ``params.json``, ``consolidated.00.pth`` ... ``consolidated.NN.pth`` (one file per
model-parallel rank) and ``tokenizer.model``. Going to the Hugging Face layout takes three steps:

- names, through one explicit table;
- the model-parallel shards, concatenated along the axis each tensor was split on: column-parallel
  matrices (wq, wk, wv, w1, w3, output) on their output rows, row-parallel ones (wo, w2) on their
  input columns, the embedding on the hidden axis (Llama 1/2) or the vocabulary (Llama 3, told apart
  by shape), norms replicated;
- the q/k projection rows, moved from Meta's interleaved RoPE pairs (2j, 2j+1) to Hugging Face's
  rotate-half pairs (j, j + d/2): per head, rows viewed as (d/2, 2) become (2, d/2).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from .errors import MlxLlamaError, read_json_object
from .torch_pickle import TorchCheckpoint, torch_file_shapes

PARAMS_FILE = "params.json"
_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")

# The one renaming table: Meta name -> (Hugging Face name, model-parallel split axis).
# Split axis None: replicated on every rank. "embedding": decided by shape (see _split_axis).
GLOBAL_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding"),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
# Llama 1 checkpoints carry the RoPE frequencies as a buffer; they are not weights.
IGNORED = ("rope.freqs",)
# Llama 3.1's RoPE scaling, which params.json only switches on ("use_scaled_rope": true).
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
# Meta's code takes the context length as a run-time argument, so params.json rarely records it. Only
# "dynamic" RoPE scaling reads max_position_embeddings, and Meta checkpoints never use that; these are
# the published context lengths of Llama 2 and of Llama 3.1.
CONTEXT_LENGTH = 4096
CONTEXT_LENGTH_SCALED = 131072


class MetaCheckpointError(MlxLlamaError):
    pass


def is_meta_checkpoint(model_dir) -> bool:
    """A directory in Meta's layout: params.json and consolidated.*.pth, and no Hugging Face config.json."""
    d = Path(model_dir)
    return (d / PARAMS_FILE).is_file() and not (d / "config.json").exists() and any(d.glob("consolidated.*.pth"))


def meta_shards(model_dir) -> List[Path]:
    """consolidated.00.pth ... in rank order, checked to be numbered 0..n-1 without gaps."""
    d = Path(model_dir)
    ranks = {}
    for p in d.glob("consolidated.*.pth"):
        m = _SHARD.match(p.name)
        if m:
            ranks[int(m.group(1))] = p
    if not ranks:
        raise MetaCheckpointError(f"{d}: no consolidated.NN.pth weight files")
    missing = [r for r in range(len(ranks)) if r not in ranks]
    if missing:
        raise MetaCheckpointError(f"{d}: consolidated.{missing[0]:02d}.pth is missing ({len(ranks)} shards found)")
    return [ranks[r] for r in range(len(ranks))]


def meta_to_hf(model_dir) -> Tuple[dict, Dict[str, mx.array]]:
    """Read a Meta-layout Llama directory as (Hugging Face config dict, HF-named weights in the HF
    rotate-half layout, in their stored dtype)."""
    config = meta_config(model_dir)
    return config, meta_weights(model_dir, config)


def meta_config(model_dir) -> dict:
    """The Hugging Face config.json dict of a Meta-layout directory. Reads params.json and the tensor
    shapes (the small pickles only), so it is cheap: check it before loading any weights."""
    d = Path(model_dir)
    params = _read_params(d / PARAMS_FILE)
    source = str(d / PARAMS_FILE)
    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    if dim % n_heads:
        raise MetaCheckpointError(f"{source}: dim = {dim} is not a multiple of n_heads = {n_heads}")

    shards = meta_shards(d)
    shapes = [torch_file_shapes(p) for p in shards]
    embed = _merged_shape("tok_embeddings.weight", shapes, shards, dim)
    w1 = _merged_shape("layers.0.feed_forward.w1.weight", shapes, shards, dim)

    vocab = params.get("vocab_size", -1)
    if vocab in (-1, None):
        vocab = embed[0]
    elif vocab != embed[0]:
        raise MetaCheckpointError(f"{source}: vocab_size = {vocab}, but tok_embeddings.weight has {embed[0]} rows")
    intermediate = ffn_hidden_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    if intermediate != w1[0]:
        raise MetaCheckpointError(
            f"{source}: dim, multiple_of and ffn_dim_multiplier give an FFN size of {intermediate}, "
            f"but layers.0.feed_forward.w1.weight has {w1[0]} rows"
        )

    scaled = bool(params.get("use_scaled_rope", False))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": dim // n_heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING} if scaled else None,
        "max_position_embeddings": params.get("max_seq_len") or (CONTEXT_LENGTH_SCALED if scaled else CONTEXT_LENGTH),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": _dtype_name(shards[0]),
    }
    return config | _special_token_ids(d / "tokenizer.model")


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_weights(model_dir, config: dict) -> Dict[str, mx.array]:
    """HF-named weights of a Meta-layout directory: shards concatenated, q/k rows permuted to the
    rotate-half layout. ``config`` is ``meta_config``'s."""
    shards = meta_shards(model_dir)
    checkpoints = [TorchCheckpoint(p) for p in shards]
    try:
        names = _check_names(checkpoints, config["num_hidden_layers"])
        dim, head_dim = config["hidden_size"], config["head_dim"]
        rope_heads = {"attention.wq.weight": config["num_attention_heads"],
                      "attention.wk.weight": config["num_key_value_heads"]}
        out = {}
        for name in names:
            hf_name, axis = _hf_name(name)
            parts = [ckpt.load([name])[name] for ckpt in checkpoints]
            if axis == "embedding":
                axis = _split_axis(name, [tuple(p.shape) for p in parts], shards, dim)
            w = _merge(name, parts, axis, shards)
            suffix = name.split(".", 2)[-1]
            if suffix in rope_heads:
                w = interleaved_to_rotate_half(w, rope_heads[suffix], head_dim, name)
            mx.eval(w)  # frees the shard parts before the next tensor is read
            out[hf_name] = w
        return out
    finally:
        for ckpt in checkpoints:
            ckpt.close()


def interleaved_to_rotate_half(w: mx.array, n_heads: int, head_dim: int, name: str = "q/k projection") -> mx.array:
    """q/k rows in Meta's interleaved RoPE layout (pairs 2j, 2j+1) -> Hugging Face's rotate-half layout
    (pairs j, j + head_dim/2)."""
    if w.ndim != 2 or w.shape[0] != n_heads * head_dim or head_dim % 2:
        raise MetaCheckpointError(f"{name}: shape {list(w.shape)}; expected {n_heads} heads x {head_dim} rows")
    cols = w.shape[1]
    w = w.reshape(n_heads, head_dim // 2, 2, cols)  # per head: (pair j, member of the pair)
    return mx.swapaxes(w, 1, 2).reshape(n_heads * head_dim, cols)


# ---------------------------------------------------------------------------------------------


def _read_params(path: Path) -> dict:
    params = read_json_object(path, "a Meta Llama checkpoint", MetaCheckpointError)

    def positive_int(key, required=True):
        v = params.get(key)
        if v is None and not required:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise MetaCheckpointError(f"{path}: {key} = {v!r} must be a positive integer")

    for key in ("dim", "n_layers", "n_heads"):
        positive_int(key)
    for key in ("n_kv_heads", "multiple_of", "max_seq_len"):
        positive_int(key, required=False)
    for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
        v = params.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise MetaCheckpointError(f"{path}: {key} = {v!r} must be a positive number")
    v = params.get("vocab_size", -1)
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
        raise MetaCheckpointError(f"{path}: vocab_size = {v!r} must be a positive integer or -1")
    if not isinstance(params.get("use_scaled_rope", False), bool):
        raise MetaCheckpointError(f"{path}: use_scaled_rope must be true or false")
    return params


def _hf_name(name: str) -> Tuple[str, object]:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        hf, axis = LAYER_NAMES[parts[2]]
        return f"model.layers.{int(parts[1])}.{hf}", axis
    raise KeyError(name)


def _check_names(checkpoints: List[TorchCheckpoint], n_layers: int) -> List[str]:
    """The Meta tensor names to convert: the same in every shard, all known, none missing."""
    first = checkpoints[0]
    names = sorted(n for n in first.tensors if n not in IGNORED)
    unknown = []
    for n in names:
        try:
            _hf_name(n)
        except KeyError:
            unknown.append(n)
    if unknown:
        more = " ..." if len(unknown) > 8 else ""
        raise MetaCheckpointError(f"{first.path}: unknown tensors: {', '.join(unknown[:8])}{more}")
    expected = set(GLOBAL_NAMES) | {f"layers.{i}.{k}" for i in range(n_layers) for k in LAYER_NAMES}
    missing = sorted(expected - set(names))
    if missing:
        raise MetaCheckpointError(f"{first.path}: missing tensor {missing[0]!r}")
    extra = sorted(set(names) - expected)
    if extra:  # a layer past n_layers
        raise MetaCheckpointError(f"{first.path}: tensor {extra[0]!r} does not fit n_layers = {n_layers}")
    for ckpt in checkpoints[1:]:
        other = {n for n in ckpt.tensors if n not in IGNORED}
        diff = sorted(other.symmetric_difference(names))
        if diff:
            where = ckpt.path if diff[0] not in other else first.path
            raise MetaCheckpointError(f"{where}: tensor {diff[0]!r} is missing (the shards disagree)")
    return names


def _split_axis(name: str, shard_shapes: List[tuple], shards: List[Path], dim: int):
    """The axis the shards of `name` were split on: from the table, and for the embedding from its shape
    (Llama 1/2 split the hidden axis, Llama 3 the vocabulary)."""
    axis = _hf_name(name)[1]
    if axis != "embedding":
        return axis
    n = len(shard_shapes)
    if n == 1:
        return 0
    cols = shard_shapes[0][1] if len(shard_shapes[0]) == 2 else None
    if cols == dim:
        return 0
    if cols is not None and cols * n == dim:
        return 1
    raise MetaCheckpointError(
        f"{shards[0]}: {name} has shape {list(shard_shapes[0])}, which fits no split of dim = {dim}"
    )


def _merged_shape(name: str, shapes: List[dict], shards: List[Path], dim: int) -> tuple:
    for s, p in zip(shapes, shards):
        if name not in s:
            raise MetaCheckpointError(f"{p}: missing tensor {name!r}")
    shard_shapes = [tuple(s[name]) for s in shapes]
    axis = _split_axis(name, shard_shapes, shards, dim)
    full = list(shard_shapes[0])
    if axis is not None and len(shard_shapes) > 1:
        full[axis] = sum(s[axis] for s in shard_shapes)
    return tuple(full)


def _merge(name: str, parts: List[mx.array], axis, shards: List[Path]) -> mx.array:
    if len(parts) == 1:
        return parts[0]
    if axis is None:  # replicated: every rank must hold the same values
        for p, path in zip(parts[1:], shards[1:]):
            if p.shape != parts[0].shape or not mx.array_equal(p, parts[0]).item():
                raise MetaCheckpointError(f"{path}: {name} differs from {shards[0].name}'s (it should be replicated)")
        return parts[0]
    for p, path in zip(parts[1:], shards[1:]):
        same = [d for i, d in enumerate(p.shape) if i != axis] == [d for i, d in enumerate(parts[0].shape) if i != axis]
        if p.ndim != parts[0].ndim or not same:
            raise MetaCheckpointError(
                f"{path}: {name} has shape {list(p.shape)}, "
                f"which does not stack with {list(parts[0].shape)} on axis {axis}"
            )
    return mx.concatenate(parts, axis=axis)


def _dtype_name(shard: Path) -> str:
    with TorchCheckpoint(shard) as ckpt:
        info = ckpt.tensors.get("tok_embeddings.weight")
        code = info.dtype if info is not None else "bf16"
    return {"f4": "float32", "f2": "float16", "bf16": "bfloat16"}.get(code, "float32")


def _special_token_ids(path: Path) -> dict:
    """bos/eos ids from a SentencePiece tokenizer.model (Llama 1/2). Llama 3's tokenizer.model is a
    tiktoken file instead, which names no special tokens: then nothing is added here."""
    if not path.is_file():
        return {}
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception:  # not a SentencePiece model (RuntimeError / OSError by version); the tokenizer loader reports it
        return {}
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}
    return {k: v for k, v in ids.items() if v >= 0}
