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


class RoPE(nn.Module):
    def __init__(self, dims: int, traditional: bool = False, base: float = 10000.0, scaling: Optional[dict] = None):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self._freqs = None
        rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rtype == "llama3":
            inv = llama3_inv_freq(
                dims,
                base,
                scaling["factor"],
                scaling["low_freq_factor"],
                scaling["high_freq_factor"],
                scaling["original_max_position_embeddings"],
            )
            # mx.fast.rope's `freqs` are periods (1/theta_i), not theta_i: passing theta is silently wrong.
            self._freqs = 1.0 / inv
            self.base = None
        elif rtype != "default":
            raise ValueError(f"unsupported rope_scaling type {rtype!r}")

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # x: (B, heads, T, head_dim)
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=self.base, scale=1.0, offset=offset, freqs=self._freqs
        )
