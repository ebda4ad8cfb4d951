"""How much memory a generation needs: the weights plus the KV cache, estimated before starting,
so that a run that cannot fit is refused with the numbers instead of dying halfway.

Activations are not counted: with chunked prefill they are small next to these two for any real
context length.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KV_BITS, CacheError, resolve_group_size
from .errors import MlxLlamaError


def model_weights_bytes(model) -> int:
    """Bytes of all the model's parameters as loaded (packed weights, scales and biases included)."""
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def kv_bytes_per_position(
    model_args, kv_bits: Optional[int] = None, kv_group_size: int = 64, kv_dtype: Optional[mx.Dtype] = None
) -> int:
    """Bytes one position takes in the KV cache of all layers: keys and values of every K/V head.

    Float: head_dim elements of the compute dtype. Quantized: head_dim * bits / 8, plus a scale
    and a bias in the compute dtype per group of ``kv_group_size`` elements."""
    dsize = _kv_dtype(kv_dtype).size
    head_dim = model_args.head_dim
    if kv_bits is None:
        row = head_dim * dsize
    else:
        if kv_bits not in KV_BITS:
            raise CacheError(f"kv_bits must be 4 or 8, got {kv_bits!r}")
        group = resolve_group_size(head_dim, kv_group_size)
        row = head_dim * kv_bits // 8 + (head_dim // group) * 2 * dsize
    return model_args.num_hidden_layers * 2 * model_args.num_key_value_heads * row


def estimate_bytes(
    model_args,
    weights_bytes: int,
    context_tokens: int,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    batch: int = 1,
    kv_dtype: Optional[mx.Dtype] = None,
) -> dict:
    """{"weights", "kv_cache", "total"} in bytes, plus "kv_positions" (positions each layer keeps)
    and "context_tokens", for ``context_tokens`` (prompt + new tokens) per sequence.

    The cache keeps min(context_tokens, max_kv_size) positions (and no more than a sliding window,
    as ``cache.make_cache`` builds it). ``kv_dtype`` is the compute dtype, float32 on the CPU and
    float16 elsewhere by default (pass ``model.compute_dtype`` when a model is loaded). Storage
    grows in steps of 256 positions, so the real cache may hold up to 255 positions more."""
    positions = context_tokens
    if max_kv_size is not None:
        window = getattr(model_args, "sliding_window", None)
        positions = min(positions, max_kv_size if window is None else min(max_kv_size, window))
    kv = batch * positions * kv_bytes_per_position(model_args, kv_bits, kv_group_size, kv_dtype)
    return {
        "weights": weights_bytes,
        "kv_cache": kv,
        "total": weights_bytes + kv,
        "kv_positions": positions,
        "context_tokens": context_tokens,
    }


def check_budget(estimate: dict, budget_bytes: float) -> None:
    """Raise an MlxLlamaError, with the numbers, when the estimate exceeds ``budget_bytes``."""
    if estimate["total"] <= budget_bytes:
        return
    # GB as the command line takes them; MB when that would print tiny models as all zeros.
    scale, unit = (1e9, "GB") if max(estimate["total"], budget_bytes) >= 1e8 else (1e6, "MB")

    def size(n):
        return f"{n / scale:.2f} {unit}"

    raise MlxLlamaError(
        f"needs {size(estimate['total'])} (weights {size(estimate['weights'])} + KV cache "
        f"{size(estimate['kv_cache'])} for {estimate['kv_positions']} tokens) but the budget is "
        f"{size(budget_bytes)}; try --max-kv-size or --kv-bits"
    )


def _kv_dtype(kv_dtype: Optional[mx.Dtype]) -> mx.Dtype:
    if kv_dtype is not None:
        return kv_dtype
    # As loader.default_compute_dtype: float32 on the CPU, elsewhere the stored dtype (taken as 16-bit).
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16

