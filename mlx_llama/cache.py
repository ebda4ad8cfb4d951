"""Per-layer key/value caches for incremental decoding.

All of them store only the K/V heads (grouped-query attention shares each among several query
heads, so repeating them here would multiply memory for nothing), and all have the same face:
``update_and_fetch(keys, values)``, ``offset`` (absolute positions seen), ``state``, ``trim`` and
``nbytes``.

- ``KVCache``: everything, in storage grown in steps of ``step`` positions; new keys are written
  into slices instead of concatenating a fresh array for every token.
- ``RotatingKVCache``: at most ``max_size`` positions, the first ``keep`` (attention sinks) and
  the most recent ones, in a ring buffer: memory stays bounded however long the generation.
- ``QuantizedKVCache`` and ``QuantizedRotatingKVCache``: the same, stored as 4- or 8-bit affine
  groups along head_dim (``mx.quantize``) and handed back dequantized.

``make_cache`` builds one per layer from a model and the command-line choices.
"""

from __future__ import annotations

import warnings
from typing import Optional

import mlx.core as mx

from .errors import MlxLlamaError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts


class CacheError(MlxLlamaError, ValueError):
    """An impossible cache setting (also a ValueError, for library callers)."""


# Stored keys/values are either an array (B, kv_heads, positions, head_dim) or, quantized, the
# triple (packed, scales, biases) from mx.quantize, each with positions on axis 2. These helpers
# treat both alike.


def _map(fn, x):
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def _length(x) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[2]


def _take(x, start: int, stop: int):
    return _map(lambda a: a[..., start:stop, :], x)


def _cat(*parts):
    parts = [p for p in parts if _length(p) > 0] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(group, axis=2) for group in zip(*parts))
    return mx.concatenate(parts, axis=2)


def _zeros(like, n: int):
    return _map(lambda a: mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype), like)


def _write(buf, start: int, x) -> None:
    """buf[..., start : start + len(x), :] = x, in place (for each array of a triple)."""
    n = _length(x)
    if isinstance(buf, tuple):
        for b, a in zip(buf, x):
            b[..., start : start + n, :] = a
    else:
        buf[..., start : start + n, :] = x


def _nbytes(x) -> int:
    return sum(a.nbytes for a in x) if isinstance(x, tuple) else x.nbytes


class _Storage:
    """Float storage: what goes in is what is stored. The quantized caches override the two hooks."""

    step = 256
    dtype: Optional[mx.Dtype] = None  # what keys/values are stored as; None: as they come
    _compute: Optional[mx.Dtype] = None  # what they came as (and are handed back as)

    def _store(self, keys: mx.array, values: mx.array):
        """The incoming keys/values in storage form; remembers their dtype for _decode."""
        self._compute = keys.dtype
        return self._encode(keys), self._encode(values)

    def _encode(self, x: mx.array):
        return x if self.dtype is None else x.astype(self.dtype)

    def _decode(self, x) -> mx.array:
        return x if self._compute is None else x.astype(self._compute)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored keys and values (their whole capacity, not only the filled part)."""
        return 0 if self.keys is None else _nbytes(self.keys) + _nbytes(self.values)


class KVCache(_Storage):
    """Every position, in float storage grown in steps of ``step`` positions."""

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append keys/values of shape (B, kv_heads, T, head_dim); return everything cached so far."""
        t = keys.shape[2]
        keys, values = self._store(keys, values)
        if self.keys is None or self.offset + t > _length(self.keys):
            self._grow(keys, values, t)
        _write(self.keys, self.offset, keys)
        _write(self.values, self.offset, values)
        self.offset += t
        return self._decode(_take(self.keys, 0, self.offset)), self._decode(_take(self.values, 0, self.offset))

    def _grow(self, keys, values, t):
        # New capacity: the next whole number of steps that fits offset + t positions.
        capacity = -(-(self.offset + t) // self.step) * self.step
        extra = capacity - self.offset
        new_k, new_v = _zeros(keys, extra), _zeros(values, extra)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            # Keep only the filled part, then extend.
            self.keys = _cat(_take(self.keys, 0, self.offset), new_k)
            self.values = _cat(_take(self.values, 0, self.offset), new_v)

    @property
    def state(self):
        """The filled part of the storage: (keys, values), each an array or, quantized, a triple."""
        if self.keys is None:
            return None
        return _take(self.keys, 0, self.offset), _take(self.values, 0, self.offset)

    @state.setter
    def state(self, kv):
        keys, values = kv
        # Float arrays given to a quantized cache are quantized; stored triples are taken as they are.
        self.keys = keys if isinstance(keys, tuple) else self._encode(keys)
        self.values = values if isinstance(values, tuple) else self._encode(values)
        self.offset = _length(self.keys)

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions (rejected draft tokens, an edited chat turn); returns how many."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n


class RotatingKVCache(_Storage):
    """Keeps the first ``keep`` positions (attention sinks) and the most recent ``max_size - keep``.

    Keys arrive already rotated by RoPE at their absolute positions, so evicting some changes
    nothing for the others: ``offset`` keeps counting absolute positions. What each query sees,
    once past ``max_size``: positions 0 .. keep-1 and the last ``max_size - keep`` up to itself.

    One new token (T = 1) is written into a ring buffer in place; the keys come back in ring
    order, which is fine without a mask. Several (T > 1, prefill) come back in temporal order with
    the T new ones last, for a bottom-right-aligned causal mask; the bound is restored afterwards.
    With the plain "causal" mask, queries of such a chunk see everything kept before the chunk
    (up to ``max_size + T`` keys); ``make_mask`` gives the mask that shows each exactly its own
    window, as when decoding one token at a time.
    """

    def __init__(self, max_size: int, keep: int = 4):
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise CacheError(f"max_kv_size must be a positive integer, got {max_size!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < max_size:
            raise CacheError(f"keep must be an integer from 0 to max_kv_size - 1 = {max_size - 1}, got {keep!r}")
        self.max_size = max_size
        self.keep = keep
        self.keys = None
        self.values = None
        self.offset = 0  # absolute positions seen (RoPE offset of the next token)
        self._size = 0  # positions stored (at most max_size)
        self._idx = 0  # next slot to write; below _size once the ring has wrapped

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Add keys/values of shape (B, kv_heads, T, head_dim); return the kept ones plus these."""
        t = keys.shape[2]
        keys, values = self._store(keys, values)
        if t == 1:
            k, v = self._update_in_place(keys, values)
        else:
            k, v = self._update_concat(keys, values)
        return self._decode(k), self._decode(v)

    def _update_in_place(self, k, v):
        capacity = 0 if self.keys is None else _length(self.keys)
        if self._idx == capacity and capacity < self.max_size:
            # Full but still below the bound: one more step of storage, never past max_size.
            extra = min(self.step, self.max_size - capacity)
            if self.keys is None:
                self.keys, self.values = _zeros(k, extra), _zeros(v, extra)
            else:
                self.keys, self.values = _cat(self.keys, _zeros(k, extra)), _cat(self.values, _zeros(v, extra))
        elif self._idx == self.max_size:
            # Wrap around past the sinks: overwrite the oldest of the recent positions.
            self._idx = self.keep
        _write(self.keys, self._idx, k)
        _write(self.values, self._idx, v)
        self._idx += 1
        self._size = max(self._size, self._idx)
        self.offset += 1
        return _take(self.keys, 0, self._size), _take(self.values, 0, self._size)

    def _update_concat(self, k, v):
        if self.keys is None:
            keys, values = k, v
        else:
            keys, values = _cat(self._temporal(self.keys), k), _cat(self._temporal(self.values), v)
        self.offset += _length(k)
        n = _length(keys)
        if n > self.max_size:
            # Back to the bound: the sinks, then the most recent positions.
            drop = n - self.max_size
            self.keys = _cat(_take(keys, 0, self.keep), _take(keys, self.keep + drop, n))
            self.values = _cat(_take(values, 0, self.keep), _take(values, self.keep + drop, n))
        else:
            self.keys, self.values = keys, values
        self._size = self._idx = _length(self.keys)
        return keys, values

    def _temporal(self, x):
        """The stored positions oldest first (the ring unrolled)."""
        if self._idx == self._size:
            return _take(x, 0, self._size)
        # Wrapped: sinks, then the oldest recent positions from _idx on, then the newer ones.
        return _cat(_take(x, 0, self.keep), _take(x, self._idx, self._size), _take(x, self.keep, self._idx))

    def _positions(self) -> mx.array:
        """Absolute positions of the stored keys, oldest first (as _temporal orders them)."""
        if self.offset == self._size:  # nothing evicted yet
            return mx.arange(self._size)
        recent = self._size - self.keep
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - recent, self.offset)])

    def make_mask(self, t: int, window: Optional[int] = None):
        """The attention mask for the next ``update_and_fetch`` of ``t`` positions: None (one token
        sees all that is kept), "causal", or a boolean (t, kept + t) array where each query sees
        the sinks and the last ``max_size - keep`` positions up to itself.

        ``window`` is a model's sliding window (Mistral v0.1); it is implied only when the cache
        keeps no sinks and at most ``window`` positions (what ``make_cache`` builds), so anything
        else is refused rather than masked wrongly."""
        if window is not None and (self.keep > 0 or self.max_size > window):
            raise CacheError(
                f"a rotating cache on a model with sliding_window = {window} needs keep = 0 and "
                f"max_kv_size <= {window}, got keep = {self.keep}, max_kv_size = {self.max_size}"
            )
        if t == 1:
            return None
        if self.offset + t <= self.max_size:
            return "causal"  # nothing evicted, even by the end of this chunk
        k_pos = mx.concatenate([self._positions(), mx.arange(self.offset, self.offset + t)])[None, :]
        q_pos = mx.arange(self.offset, self.offset + t)[:, None]
        recent = self.max_size - self.keep
        return (k_pos <= q_pos) & ((k_pos < self.keep) | (k_pos > q_pos - recent))

    @property
    def state(self):
        """(keys, values) kept, oldest first; restore a cache that has evicted positions with
        ``cache.state = (keys, values, offset)``."""
        if self.keys is None:
            return None
        return self._temporal(self.keys), self._temporal(self.values)

    @state.setter
    def state(self, kv):
        """(keys, values): positions 0 .. S-1, cut to the bound; or (keys, values, offset): the kept
        positions of a sequence of ``offset``, as ``state`` returned them."""
        keys, values, *rest = kv
        keys = keys if isinstance(keys, tuple) else self._encode(keys)
        values = values if isinstance(values, tuple) else self._encode(values)
        n = _length(keys)
        offset = rest[0] if rest else n
        if n > self.max_size:
            drop = n - self.max_size
            keys = _cat(_take(keys, 0, self.keep), _take(keys, self.keep + drop, n))
            values = _cat(_take(values, 0, self.keep), _take(values, self.keep + drop, n))
        self.keys, self.values = keys, values
        self._size = self._idx = _length(keys)
        self.offset = offset

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions; returns how many. Once positions have been evicted,
        nothing can be trimmed (the window would have to reach back to them): returns 0."""
        if self.offset != self._size:
            return 0
        n = min(self.offset, n)
        self.offset -= n
        self._size = self._idx = self.offset
        return n


def resolve_group_size(head_dim: int, group_size: int) -> int:
    """The quantization group size to use for ``head_dim``: ``group_size`` when it divides it,
    else the largest of 64 and 32 that does (with a warning); a CacheError when none does."""
    if group_size not in KV_GROUP_SIZES:
        raise CacheError(f"kv_group_size must be one of 32, 64, 128, got {group_size!r}")
    if head_dim % group_size == 0:
        return group_size
    for g in (64, 32):
        if g < group_size and head_dim % g == 0:
            warnings.warn(f"kv_group_size {group_size} does not divide head_dim {head_dim}; using {g}")
            return g
    raise CacheError(f"head_dim {head_dim} is not a multiple of 32: the KV cache cannot be quantized")


class _Quantized:
    """Storage hooks for the quantized caches: affine groups along head_dim, stored as the
    (packed uint32, scales, biases) triple of mx.quantize; scales and biases in the input dtype."""

    def _init_quantized(self, bits: int, group_size: int):
        if bits not in KV_BITS:
            raise CacheError(f"kv_bits must be 4 or 8, got {bits!r}")
        if group_size not in KV_GROUP_SIZES:
            raise CacheError(f"kv_group_size must be one of 32, 64, 128, got {group_size!r}")
        self.bits = bits
        self.group_size = group_size
        self._resolved = False

    def _encode(self, x: mx.array):
        if not self._resolved:
            # Decided once, at the first keys seen (the head_dim is not known before).
            self.group_size = resolve_group_size(x.shape[-1], self.group_size)
            self._resolved = True
        # Quantized from what comes in, ignoring ``dtype``: bf16 scales and biases (8 significant
        # bits) round about as much as half an 8-bit step; float32 ones made an 8-bit cache's KL on
        # SmolLM2 4x smaller (5e-4 vs 2e-3, bench/results/kv_quality.md) for 6% more bytes.
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _decode(self, q) -> mx.array:
        out = mx.dequantize(*q, group_size=self.group_size, bits=self.bits)
        return out if self._compute is None else out.astype(self._compute)


class QuantizedKVCache(_Quantized, KVCache):
    """A ``KVCache`` stored at ``bits`` (4 or 8) per element plus a scale and a bias per
    ``group_size`` elements; ``update_and_fetch`` returns float arrays of the input dtype."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        KVCache.__init__(self)
        self._init_quantized(bits, group_size)


class QuantizedRotatingKVCache(_Quantized, RotatingKVCache):
    """A ``RotatingKVCache`` with quantized storage: bounded and smaller."""

    def __init__(self, max_size: int, keep: int = 4, bits: int = 8, group_size: int = 64):
        RotatingKVCache.__init__(self, max_size, keep)
        self._init_quantized(bits, group_size)


def make_cache(
    model,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    keep: int = 4,
    dtype: Optional[mx.Dtype] = None,
) -> list:
    """One cache per layer of ``model``: unbounded (``KVCache``) unless ``max_kv_size`` is given,
    float unless ``kv_bits`` (4 or 8) is. Stored as ``dtype`` (default: the model's ``kv_dtype``,
    which the loader sets to the narrower of the stored and the compute dtype), handed back in the
    dtype the keys came in.

    A model with a sliding window (Mistral v0.1) gets, when bounded, a window of
    min(max_kv_size, sliding_window) positions and no sinks: that is its own attention pattern
    (exactly, when max_kv_size >= sliding_window)."""
    args = model.args
    if kv_bits is not None:
        if kv_bits not in KV_BITS:
            raise CacheError(f"kv_bits must be 4 or 8, got {kv_bits!r}")
        kv_group_size = resolve_group_size(args.head_dim, kv_group_size)
    if max_kv_size is not None:
        if isinstance(max_kv_size, bool) or not isinstance(max_kv_size, int) or max_kv_size < 1:
            raise CacheError(f"max_kv_size must be a positive integer, got {max_kv_size!r}")
        if args.sliding_window is not None:
            max_kv_size, keep = min(max_kv_size, args.sliding_window), 0
        elif keep >= max_kv_size:
            raise CacheError(f"max_kv_size must exceed keep = {keep} (the sink positions kept), got {max_kv_size}")

    def one():
        if max_kv_size is None:
            return KVCache() if kv_bits is None else QuantizedKVCache(kv_bits, kv_group_size)
        if kv_bits is None:
            return RotatingKVCache(max_kv_size, keep)
        return QuantizedRotatingKVCache(max_kv_size, keep, kv_bits, kv_group_size)

    dtype = dtype if dtype is not None else getattr(model, "kv_dtype", None)
    caches = [one() for _ in model.layers]
    for c in caches:
        c.dtype = dtype
    return caches
