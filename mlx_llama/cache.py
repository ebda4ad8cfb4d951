"""Per-layer key/value cache for incremental decoding.

Stores only the K/V heads (grouped-query attention shares each among several query heads, so
repeating them here would multiply memory for nothing). Storage grows in steps of ``step``
positions and new keys are written into slices, instead of concatenating a fresh array for
every token.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append keys/values of shape (B, kv_heads, T, head_dim); return everything cached so far."""
        t = keys.shape[2]
        if self.keys is None or self.offset + t > self.keys.shape[2]:
            self._grow(keys, values, t)
        self.keys[..., self.offset : self.offset + t, :] = keys
        self.values[..., self.offset : self.offset + t, :] = values
        self.offset += t
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys, values, t):
        B, n_kv, _, k_dim = keys.shape
        v_dim = values.shape[3]
        # New capacity: the next whole number of steps that fits offset + t positions.
        capacity = -(-(self.offset + t) // self.step) * self.step
        extra = capacity - self.offset
        new_k = mx.zeros((B, n_kv, extra, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv, extra, v_dim), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            # Keep only the filled part, then extend.
            self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)

    @property
    def state(self):
        if self.keys is None:
            return None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv):
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions (rejected draft tokens, an edited chat turn); returns how many."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
