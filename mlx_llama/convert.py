"""Hugging Face checkpoint -> MLX model directory, optionally quantized.

Tensors are read lazily and written shard by shard, so memory holds at most one output shard.
Everything is written into a hidden temporary directory next to the target and renamed into place
at the very end: an interrupted or failed conversion leaves nothing that looks like a model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import quant
from .config import ModelArgs
from .errors import MlxLlamaError, read_json_object
from .gguf_import import import_gguf
from .hub import resolve
from .meta import is_meta_checkpoint, meta_config, meta_weights
from .model import Model
from .tokenizer import TOKENIZER_FILES, load_tokenizer
from .weights import check_weights, open_weights, read_safetensors_header, tensor_nbytes, weight_files
from .writer import check_target, write_model_dir

F16_MAX = 65504.0
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Hugging Face checkpoints sometimes carry these precomputed buffers; they are not weights.
NON_WEIGHT_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionWarning(UserWarning):
    """Something in the checkpoint that converts but is probably wrong (NaN/Inf, float16 overflow)."""


def expected_params(args: ModelArgs) -> dict:
    """Parameter name -> (lazy) array for this config. The random init is never evaluated, so this
    allocates nothing; only shapes and dtypes are read."""
    return dict(tree_flatten(Model(args).parameters()))


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """Drop what the model does not own: RoPE buffers, and a duplicate lm_head when tied."""
    out = {k: v for k, v in weights.items() if not k.endswith(NON_WEIGHT_SUFFIXES)}
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    *,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 32,
    q_recipe: str = "default",
    force: bool = False,
    revision: Optional[str] = None,
    dequantize: bool = False,
    max_shard_bytes: int = 5 << 30,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face Llama checkpoint (local directory or Hub repo id) to an MLX model directory.

    ``dtype`` casts floating weights (default: keep each tensor's stored dtype). ``quantize`` stores
    Linear/embedding matrices at ``q_bits`` with ``q_group_size`` weights per scale, adjusted per
    module by ``q_recipe`` (see ``quant.RECIPES``). An already quantized MLX model is dequantized back to
    float with ``dequantize`` (or re-quantized with ``quantize``). Returns the output path.
    """
    if str(hf_path).lower().endswith(".gguf"):
        if dtype is not None or quantize or revision is not None:
            raise MlxLlamaError(f"{hf_path}: a GGUF file is imported as stored; --dtype, -q and --revision do not apply")
        return import_gguf(hf_path, mlx_path, force=force, progress=progress)
    if dtype is not None and dtype not in DTYPES:
        raise MlxLlamaError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if quantize and (q_bits not in (4, 8) or q_group_size not in (32, 64, 128) or q_recipe not in quant.RECIPES):
        raise MlxLlamaError(
            f"unsupported quantization: bits {q_bits} (4 or 8), group size {q_group_size} (32, 64, 128), "
            f"recipe {q_recipe!r} ({', '.join(quant.RECIPES)})"
        )
    out = Path(mlx_path).expanduser()
    check_target(out, force)
    src = resolve(hf_path, revision)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise MlxLlamaError(f"{out}: the output would overwrite the input checkpoint")

    meta = is_meta_checkpoint(src)  # params.json + consolidated.*.pth, no config.json
    config = meta_config(src) if meta else read_json_object(src / "config.json", "a Hugging Face model directory")
    args = ModelArgs.from_dict(config, source=str(src / ("params.json" if meta else "config.json")))
    tokenizer = load_tokenizer(src, args.eos_token_ids)  # fail now, before any work, if missing or broken
    if tokenizer.vocab_size > args.vocab_size:
        raise MlxLlamaError(
            f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
            f"{args.vocab_size} rows (config.json vocab_size): ids past the table would crash generation"
        )
    weights = sanitize(meta_weights(src, config) if meta else open_weights(src), args)
    if args.quantization:  # an MLX model directory (ours or mlx-lm's) that is already quantized
        if not (dequantize or quantize):
            raise MlxLlamaError(f"{src}: already quantized; pass --dequantize for float weights (or -q to re-quantize)")
        weights = dequantized(weights, args.quantization)
        config.pop("quantization")
        config.pop("quantization_config", None)
    check_weights(expected_params(args), weights, str(src))

    qplan = quant.plan({k: v.shape for k, v in weights.items()}, q_bits, q_group_size, q_recipe) if quantize else {}
    if quantize:
        config["quantization"] = quant.config_entry(qplan, q_bits, q_group_size)
        left = sorted(quant.module_path(k) for k, v in weights.items() if quant.module_path(k) and v.ndim == 2)
        left = [p for p in left if p not in qplan]
        if left:
            warnings.warn(
                f"{len(left)} matrices stay in float: their input size is not a multiple of the group size "
                f"(e.g. {left[0]}, {weights[left[0] + '.weight'].shape[1]} inputs); try a smaller --q-group-size",
                ConversionWarning,
            )
    else:
        config.pop("quantization", None)
    if dtype is not None:
        config["torch_dtype"] = dtype

    files = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
    # pop: once written, a source tensor is dropped, so memory never holds the whole checkpoint.
    groups = (_convert_tensor(name, weights.pop(name), qplan, dtype) for name in sorted(weights))
    return write_model_dir(
        out, config, groups, files=files, total=len(weights), max_shard_bytes=max_shard_bytes, progress=progress
    )


def bits_per_weight(model_dir: Path) -> float:
    """Stored bits (scales and biases included) per parameter of the float model, from the files' headers."""
    n_params = sum(p.size for p in expected_params(ModelArgs.from_file(model_dir / "config.json")).values())
    stored = sum(
        tensor_nbytes(dtype, shape)
        for f in set(weight_files(model_dir).values())
        for dtype, shape in read_safetensors_header(f).values()
    )
    return 8 * stored / n_params


def dequantized(weights: dict, qconfig: dict) -> dict:
    """Quantized (weight, scales, biases) triples -> float matrices in the scales' dtype (lazily)."""
    out = {k: v for k, v in weights.items() if not k.endswith((".scales", ".biases"))}
    for name in list(out):
        path = name[: -len(".weight")]
        if name.endswith(".weight") and f"{path}.scales" in weights:
            bits, group = quant.params_for(qconfig, path)
            scales, biases = weights[f"{path}.scales"], weights[f"{path}.biases"]
            out[name] = mx.dequantize(out[name], scales, biases, group_size=group, bits=bits)
    return out


def _convert_tensor(name: str, w: mx.array, qplan: dict, dtype: Optional[str]) -> dict:
    """One source tensor -> the tensors stored for it (three when quantized)."""
    if mx.issubdtype(w.dtype, mx.floating):
        if not mx.all(mx.isfinite(w)).item():
            warnings.warn(f"{name}: contains NaN or Inf values; the model will produce garbage", ConversionWarning)
        if dtype == "float16" and w.dtype != mx.float16:
            peak = mx.max(mx.abs(w.astype(mx.float32))).item()
            if peak > F16_MAX:
                warnings.warn(f"{name}: |values| up to {peak:.4g} exceed float16's range ({F16_MAX:g})", ConversionWarning)
        if dtype is not None:
            w = w.astype(DTYPES[dtype])
    path = quant.module_path(name)
    if path not in qplan:
        return {name: w}
    bits, group = qplan[path]
    q, scales, biases = quant.quantize(w, group, bits, dtype=w.dtype)
    return {name: q, f"{path}.scales": scales, f"{path}.biases": biases}
