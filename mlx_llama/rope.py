"""Rotary position embedding (RoPE), with Llama 3's frequency scaling.

RoPE rotates each pair of dimensions i of q and k by the angle ``m * theta_i`` at position m,
``theta_i = base ** (-2i / d)``; the dot product of a rotated q and k then depends only on the
distance between their positions. The rotation itself is ``mx.fast.rope`` (a fused kernel on Metal
and CUDA); this module only decides the frequencies and the pair layout.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def llama3_inv_freq(
    dims: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> mx.array:
    """Llama 3.x scaled frequencies theta_i (radians per position), float32, shape (dims/2,).

    Long wavelengths (low frequencies) are stretched by ``factor`` so that positions beyond the
    original context stay in the range the model saw in training; short ones are kept; the band in
    between is blended linearly in ``original / wavelength``.
    """
    theta = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    wavelen = 2 * math.pi / theta
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    s = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - s) * theta / factor + s * theta
    scaled = mx.where(wavelen > low_wavelen, theta / factor, blended)
    return mx.where(wavelen < high_wavelen, theta, scaled)


def yarn_inv_freq(dims: int, base: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> mx.array:
    """YaRN frequencies: interpolate (divide by ``factor``) the dimensions that turn fewer than
    ``beta_slow`` times over the original context, keep those that turn more than ``beta_fast`` times,
    and ramp linearly between them (in dimension index)."""

    def dim_for_rotations(n_rot: float) -> float:
        # The pair index i whose wavelength fits n_rot times in the original context.
        return dims * math.log(original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if high == low:
        high += 0.001  # avoid a zero-width ramp
    theta = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    keep = 1 - mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    return theta / factor * (1 - keep) + theta * keep


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's scale on q and k (so on the attention logits, squared): 0.1 ln(factor) + 1 by default."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor, m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor = scaling["factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def rope_type(scaling: Optional[dict]) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


class RoPE(nn.Module):
    """Rotate q or k of shape (B, heads, T, head_dim) for positions offset .. offset + T - 1.

    Scaling types (Hugging Face's ``rope_scaling``): ``linear`` divides positions by ``factor``;
    ``dynamic`` (NTK-aware) raises the base once the sequence outgrows ``max_position_embeddings``;
    ``llama3`` and ``yarn`` replace the frequencies; ``yarn`` also scales q and k.
    """

    def __init__(self, dims: int, traditional: bool = False, base: float = 10000.0, scaling: Optional[dict] = None,
                 max_position_embeddings: int = 2048):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self._type = rope_type(scaling)
        self._scaling = dict(scaling or {})
        self._max_pos = max_position_embeddings
        self._scale = 1.0  # multiplies positions
        self._out_scale = 1.0  # multiplies the rotated vectors
        self._freqs = None
        inv = None
        if self._type == "linear":
            self._scale = 1.0 / scaling["factor"]
        elif self._type == "llama3":
            inv = llama3_inv_freq(
                dims, base, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                scaling["original_max_position_embeddings"],
            )
        elif self._type == "yarn":
            inv = yarn_inv_freq(
                dims, base, scaling["factor"],
                scaling.get("original_max_position_embeddings") or max_position_embeddings,
                scaling.get("beta_fast") or 32.0, scaling.get("beta_slow") or 1.0, scaling.get("truncate", True),
            )
            self._out_scale = yarn_attention_factor(scaling)
        elif self._type not in ("default", "dynamic"):
            raise ValueError(f"unsupported rope_scaling type {self._type!r}")
        if inv is not None:
            # mx.fast.rope's `freqs` are periods (1/theta_i), not theta_i: passing theta is silently wrong.
            self._freqs = 1.0 / inv
            self.base = None

    def _dynamic_base(self, length: int) -> float:
        if length <= self._max_pos:
            return self.base
        factor = self._scaling["factor"]
        return self.base * ((factor * length / self._max_pos) - (factor - 1)) ** (self.dims / (self.dims - 2))

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        base = self._dynamic_base(offset + x.shape[-2]) if self._type == "dynamic" else self.base
        out = mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=base, scale=self._scale, offset=offset, freqs=self._freqs
        )
        return out * self._out_scale if self._out_scale != 1.0 else out
