"""How much memory a generation needs: the weights plus the KV cache, estimated before starting,
so that a run that cannot fit is refused with the numbers instead of dying halfway; and
``RunAheadBound``, which keeps what MLX allocates beyond those two small while it runs.

Activations are not counted: with chunked prefill they are small next to these two for any real
context length.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KV_BITS, CacheError, KVCache, resolve_group_size
from .errors import MlxLlamaError


def model_weights_bytes(model) -> int:
    """Bytes of all the model's parameters as loaded (packed weights, scales and biases included)."""
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def kv_storage_dtype(model, kv_bits: Optional[int] = None) -> Optional[mx.Dtype]:
    """The float dtype a loaded model's KV cache stores: keys and values in ``model.kv_dtype`` for a
    float cache, scales and biases in the compute dtype for a quantized one (see cache._Quantized)."""
    return getattr(model, "compute_dtype" if kv_bits else "kv_dtype", None)


def kv_bytes_per_position(
    model_args, kv_bits: Optional[int] = None, kv_group_size: int = 64, kv_dtype: Optional[mx.Dtype] = None
) -> int:
    """Bytes one position takes in the KV cache of all layers: keys and values of every K/V head.

    Float: head_dim elements of ``kv_dtype``. Quantized: head_dim * bits / 8, plus a scale
    and a bias in ``kv_dtype`` per group of ``kv_group_size`` elements."""
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
    as ``cache.make_cache`` builds it). ``kv_dtype`` is the float dtype the cache stores (pass
    ``kv_storage_dtype(model, kv_bits)`` for a loaded model; without it float32 on the CPU, float16
    elsewhere). Storage
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



RUN_AHEAD_BYTES = 2 << 20


class RunAheadBound:
    """Keeps MLX from allocating far ahead of what it is computing, through its memory limit.

    MLX evaluates a graph breadth-first, a few branches wide, and allocates each output when it
    schedules the operation, not when it runs. The widened weight pieces of upcast.py depend on
    nothing but the weights, so without a bound a dozen of them are allocated before the first is
    multiplied: on SmolLM2 bf16 that held some 20 MB beyond the weights and the cache (peak 0.289 GB
    against mlx-lm's 0.279 on a 128-token prompt). With the limit set to what the process held at
    the start + the cache + ``allowance`` (plus room for the cache to grow during a prompt chunk),
    MLX waits for running work instead of allocating past it: peak 0.2785 GB, same speed (measured
    with 3 MB, 2 MB and no bound).
    The limit is a soft one (allocations never fail because of it) and is restored by ``close``."""

    def __init__(self, model, cache: list, allowance: int = RUN_AHEAD_BYTES):
        self.cache = cache
        # What the process holds besides the cache: the weights, and anything else the caller keeps
        # (a second model, say; counting only our weights would leave the limit always exceeded and
        # every allocation waiting: 5.6 instead of 14 tokens/s with two models loaded).
        self.fixed = mx.get_active_memory() - self._held() + allowance
        self.args = model.args
        # Float storage per position: an upper bound for quantized caches too.
        self.per_position = kv_bytes_per_position(model.args, kv_dtype=getattr(model, "kv_dtype", None))
        self.previous = mx.set_memory_limit(self.limit())

    def _held(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def limit(self, new_positions: int = 0) -> int:
        held = self._held()
        if new_positions <= 1:
            return self.fixed + held
        # Room for a prompt chunk: the storage steps the cache will have grown to after it, and the
        # chunk's attention scores (without them a long chunk runs serialized: a 1024-token prompt
        # took 9.5 s instead of 7.0).
        step, offset = KVCache.step, self.cache[0].offset
        after = -(-(offset + new_positions) // step) * step
        return self.fixed + max(held, after * self.per_position) + self._activations(new_positions, offset)

    def _activations(self, t: int, offset: int) -> int:
        """Float32 bytes of the attention scores of a t-token chunk, the activation that grows
        with the prompt (quadratically within a chunk)."""
        return 4 * t * self.args.num_attention_heads * (offset + t)

    def update(self, new_positions: int = 1) -> None:
        """Before running ``new_positions`` more positions through the model."""
        mx.set_memory_limit(self.limit(new_positions))

    def close(self) -> None:
        mx.set_memory_limit(self.previous)
