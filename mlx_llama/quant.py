"""Which tensors to quantize, at how many bits, and how the choice is recorded.

The recipe is stored in config.json the way mlx-lm stores it, so either tool rebuilds the model:
``"quantization": {"group_size": g, "bits": b, "<module path>": {"group_size": .., "bits": ..}}``.
The loader then quantizes exactly the modules whose ``.scales`` the weight files carry.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

# Modules whose weight matrix can be quantized (the Linear layers and the embedding).
QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")


def _uniform(path: str, bits: int, group: int) -> Tuple[int, int]:
    return bits, group


def _mixed(path: str, bits: int, group: int) -> Tuple[int, int]:
    # The embedding is also the output head when tied: every logit passes through it. At 4 bits it
    # is the largest single source of error on SmolLM2 (bench/results/quality.md).
    return (max(bits, 8), group) if path.endswith(("embed_tokens", "lm_head")) else (bits, group)


def _default(path: str, bits: int, group: int) -> Tuple[int, int]:
    # Chosen by measurement on SmolLM2 (bench/results/quality.md) under a 5 bits-per-weight budget:
    # the embedding/head gets one more bit, paid for by coarser groups in gate_proj/up_proj, the
    # least sensitive matrices we measured. At 8 bits there is nothing to rebalance.
    if bits >= 8:
        return bits, group
    coarse = min(2 * group, 128)
    if path.endswith(("embed_tokens", "lm_head")):
        return bits + 1, coarse
    if path.endswith(("gate_proj", "up_proj")):
        return bits, coarse
    return bits, group


# A recipe maps (module path, --q-bits, --q-group-size) to the (bits, group size) of that module.
RECIPES: Dict[str, Callable[[str, int, int], Tuple[int, int]]] = {
    "default": _default,
    "mixed": _mixed,
    "uniform": _uniform,
}


def module_path(weight_name: str) -> Optional[str]:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj' if quantizable, else None."""
    if not weight_name.endswith(".weight"):
        return None
    path = weight_name[: -len(".weight")]
    return path if path.rsplit(".", 1)[-1] in QUANTIZABLE else None


def plan(
    shapes: Dict[str, tuple], bits: int, group_size: int, recipe: Union[str, Callable] = "default"
) -> Dict[str, Tuple[int, int]]:
    """module path -> (bits, group_size) for every tensor that will be quantized.

    ``recipe`` is a name from RECIPES or such a function. Where the recipe's group size does not
    divide a matrix's input size, ``group_size`` is used; where that does not either, the matrix stays
    in float: quantizing it would need padding that neither MLX nor mlx-lm understands.
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown quantization recipe {recipe!r} (choose from {', '.join(RECIPES)})")
        recipe = RECIPES[recipe]
    out = {}
    for name, shape in shapes.items():
        path = module_path(name)
        if path is None or len(shape) != 2:
            continue
        b, g = recipe(path, bits, group_size)
        if shape[1] % g:
            g = group_size
        if shape[1] % g == 0:
            out[path] = (b, g)
    return out


def config_entry(qplan: Dict[str, Tuple[int, int]], bits: int, group_size: int) -> dict:
    """The config.json "quantization" object: defaults plus one entry per module that differs."""
    entry = {"group_size": group_size, "bits": bits}
    for path, (b, g) in sorted(qplan.items()):
        if (b, g) != (bits, group_size):
            entry[path] = {"group_size": g, "bits": b}
    return entry


def params_for(config_q: dict, path: str) -> Tuple[int, int]:
    """(bits, group_size) of one module, from a config.json "quantization" object."""
    override = config_q.get(path)
    if isinstance(override, dict):
        return override["bits"], override["group_size"]
    return config_q["bits"], config_q["group_size"]


# ---------------------------------------------------------------------------------------------
# The quantizer. MLX's format: per group of `group_size` consecutive weights along a row,
# w ~= scale * q + bias with q an unsigned `bits`-bit integer, packed little-end first into uint32.
# We compute q, scale and bias ourselves (rather than with mx.quantize) to guarantee two things
# that matter for correctness and that mx.quantize does not (its error reaches a whole step, and
# zeros come back as ~1e-7):
#   - every weight is within half a step of its dequantized value, using the scale and bias as
#     they are *stored* (rounded to the model's dtype), not as they were computed;
#   - in a group that contains exact zeros, they dequantize to exactly 0.

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's kernels take
_MANTISSA_BITS = {"float32": 24, "float16": 11, "bfloat16": 8}  # significant bits, implicit one included


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _round_to_dtype(x: np.ndarray, dtype: str, direction: str) -> np.ndarray:
    """float32 values representable in `dtype`, rounded towards +inf ("up") or -inf ("down")."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        y = x.astype(np.float16)
        wrong = y.astype(np.float32) < x if direction == "up" else y.astype(np.float32) > x
        target = np.float16(np.inf if direction == "up" else -np.inf)
        return np.where(wrong, np.nextafter(y, target), y).astype(np.float32)
    # bfloat16 is the top half of a float32: truncate, then step one bf16 ulp where we went the wrong way.
    y = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    wrong = y < x if direction == "up" else y > x
    away_from_zero = (y >= 0) == (direction == "up")
    step = np.where(away_from_zero, 0x10000, -0x10000).astype(np.int64)
    stepped = (y.view(np.uint32).astype(np.int64) + step).astype(np.uint32).view(np.float32)
    return np.where(wrong, stepped, y)


def _round_up_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """Round positive x up to a number with at most `bits` significant bits."""
    mant, exp = np.frexp(x.astype(np.float64))
    return np.ldexp(np.ceil(np.ldexp(mant, bits)), exp - bits).astype(np.float32)


def quantize(w, group_size: int, bits: int, dtype=None) -> Tuple[mx.array, mx.array, mx.array]:
    """Quantize a (rows, cols) matrix to MLX's affine format: (packed uint32, scales, biases).

    ``dtype`` is the storage dtype of scales and biases (default: w's). Loads with ``mx.dequantize``
    and ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` like anything mx.quantize makes.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    dtype = _dtype_name(dtype or w.dtype)
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of the group size {group_size}")
    # Blocks of rows keep the numpy temporaries small (an embedding is often the largest matrix).
    step = max(1, (1 << 21) // cols)
    parts = [_quantize_rows(w[i : i + step], group_size, bits, dtype) for i in range(0, rows, step)]
    mdtype = getattr(mx, dtype)
    return tuple(mx.concatenate([p[k] for p in parts]).astype(mdtype if k else mx.uint32) for k in range(3))


def _quantize_rows(w, group_size: int, bits: int, dtype: str):
    w = np.array(w.astype(mx.float32) if isinstance(w, mx.array) else w, dtype=np.float32)
    rows, cols = w.shape
    n = 2**bits - 1
    g = w.reshape(rows, cols // group_size, group_size)
    lo, hi = g.min(-1), g.max(-1)

    # Ordinary groups: the grid runs from the bias (min, rounded down) up by n steps (rounded up).
    bias = _round_to_dtype(lo, dtype, "down")
    scale = _round_to_dtype(np.maximum((hi - bias) / n, np.finfo(np.float32).tiny), dtype, "up")

    # Groups holding an exact zero: put zero on the grid at an integer z (bias = -z * scale). For
    # -z * scale to be exact in the storage dtype, the scale keeps only the significant bits that
    # z (at most `bits` of them) leaves free; it is rounded up so the grid still covers [lo, hi].
    has_zero = (g == 0).any(-1)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = np.clip(np.round(-lo / span * n), 0, n)
    z = np.where((z == 0) & (lo < 0), 1, np.where((z == n) & (hi > 0), n - 1, z))
    z_scale = np.maximum(np.where(z > 0, -lo / np.maximum(z, 1), 0), np.where(z < n, hi / np.maximum(n - z, 1), 0))
    z_scale = _round_up_bits(np.where(z_scale > 0, z_scale, 1.0), max(_MANTISSA_BITS[dtype] - bits, 1))
    scale = np.where(has_zero, z_scale, scale)
    bias = np.where(has_zero, -z * z_scale, bias).astype(np.float32)

    q = np.clip(np.round((g - bias[..., None]) / scale[..., None]), 0, n).astype(np.uint64)
    return mx.array(_pack(q.reshape(rows, cols), bits)), mx.array(scale), mx.array(bias)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) levels -> (rows, cols * bits / 32) uint32: one little-endian bit stream per 32
    values, lowest bits first, a value straddling two words when 32 is not a multiple of `bits`."""
    rows, cols = q.shape
    q = q.reshape(rows, cols // 32, 32)
    words = np.zeros((rows, cols // 32, bits), dtype=np.uint64)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        words[..., word] |= (q[..., j] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[..., word + 1] |= q[..., j] >> np.uint64(32 - shift)
    return words.reshape(rows, cols * bits // 32).astype(np.uint32)
