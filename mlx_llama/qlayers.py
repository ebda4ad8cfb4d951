"""Quantized layers that take the fastest CPU path for each shape.

MLX's CPU ``quantized_matmul`` is built for decoding (one token at a time); for a prompt of many
tokens it runs at ~7 tokens/s on SmolLM2. Dequantizing the matrix once and using the float matmul
is ~4x faster when that matmul is a real BLAS (OpenBLAS preloaded on Linux: a 128-token SmolLM2
4-bit forward went from 35 s to 9.7 s on a busy 2-core machine), but slower with the reference BLAS
MLX's Linux wheel links (2 tokens: 0.68 s against 0.27 s; 32 tokens: 4.9 s against 4.0 s). So the
switch is made only where a fast BLAS is loaded, and only for inputs of PROMPT_TOKENS or more.
The dequantized values are exactly the ones quantized_matmul multiplies by, so the function is
the same up to float rounding. Decoding (one token) keeps quantized_matmul, which reads 4-8x fewer
bytes. Used on the CPU only; Metal and CUDA have fast quantized kernels for both shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn


def _dequantized(m) -> mx.array:
    return mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)


PROMPT_TOKENS = 32  # below this, draft verification and short chunks keep quantized_matmul


def fast_blas_loaded() -> bool:
    """Whether the process has a BLAS that makes float matmuls fast (macOS always has Accelerate)."""
    if sys.platform == "darwin":
        return True
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(name in maps for name in ("libopenblas", "libmkl", "libblis"))


class PromptQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim < 2 or x.shape[-2] < PROMPT_TOKENS:
            return super().__call__(x)
        y = x @ _dequantized(self).T
        return y + self["bias"] if "bias" in self else y


class PromptQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:  # the tied output head
        if x.ndim < 2 or x.shape[-2] < PROMPT_TOKENS:
            return super().as_linear(x)
        return x @ _dequantized(self).T


def use_prompt_paths(model: nn.Module) -> None:
    """Switch the model's quantized layers to the variants above (same parameters, same results)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = PromptQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = PromptQuantizedEmbedding
