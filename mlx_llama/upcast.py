"""Layers that keep their weights as stored and compute in a wider dtype.

On the CPU we compute in float32 whatever the checkpoint stores (FACTS.md section 3: 16-bit
compute there is slower and drifts enough over 30 layers to change SmolLM2's answers). Casting
the weights to float32 once at load time is the fastest way to do that, but it doubles the memory
of a 16-bit model; so instead every layer widens what it multiplies by at the moment it needs it,
and the stored 16-bit weights (or quantization scales) are all that stays in memory.

Two things keep the widened copies from piling up:
- Big matrices (the vocabulary head above all: 28M parameters in SmolLM2) are widened and
  multiplied in pieces of at most CHUNK_ELEMENTS, each piece made to wait (``mx.depends``) for
  the previous product, so MLX does not widen every piece before multiplying the first.
- The quantized layers widen only their scales and biases (1/16 to 1/32 of the packed weights).

For prompts (PROMPT_TOKENS or more rows at once) on a CPU with a fast BLAS, a quantized layer
dequantizes its matrix and uses the float matmul: MLX's CPU ``quantized_matmul`` is made for one
token at a time and runs prompts some 20x slower than OpenBLAS (a 128-token SmolLM2 4-bit prompt:
5 -> 115 tokens/s). With the reference BLAS MLX's Linux wheel links, it is the other way round
(2 tokens: 0.68 s against 0.27 s), so the switch is made only where a fast BLAS is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

CHUNK_ELEMENTS = 1 << 17  # widened at once: 0.5 MB in float32 (see memory.RunAheadBound)
PROMPT_TOKENS = 32  # below this (decoding, draft verification), quantized_matmul


def fast_blas_loaded() -> bool:
    """Whether the process has a BLAS that makes float matmuls fast (macOS always has Accelerate)."""
    if sys.platform == "darwin":
        return True
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(name in maps for name in ("libopenblas", "libmkl", "libblis"))


def _by_rows(
    n_rows: int, row_elements: int, product: Callable[[slice, Optional[mx.array]], mx.array], widens: bool = True
) -> mx.array:
    """x times the weight's transpose, a block of rows at a time: ``product(rows, previous)`` gives
    x times those rows (transposed) and makes its widening wait for ``previous`` (None at first).
    In one piece when nothing is widened."""
    step = max(1, CHUNK_ELEMENTS // row_elements)
    if n_rows <= step or not widens:
        return product(slice(None), None)
    outs = []
    for start in range(0, n_rows, step):
        outs.append(product(slice(start, start + step), outs[-1] if outs else None))
    return mx.concatenate(outs, axis=-1)


def _after(arrays, previous: Optional[mx.array]):
    return arrays if previous is None else mx.depends(arrays, previous)


class UpcastLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        def product(rows, previous):
            (w,) = _after([self.weight[rows]], previous)
            return x @ w.astype(x.dtype).T

        y = _by_rows(*self.weight.shape, product, widens=self.weight.dtype != x.dtype)
        return y + self.bias if "bias" in self else y


class UpcastEmbedding(nn.Embedding):
    def __call__(self, tokens: mx.array) -> mx.array:
        return self.weight[tokens].astype(self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:  # the tied output head
        def product(rows, previous):
            (w,) = _after([self.weight[rows]], previous)
            return x @ w.astype(x.dtype).T

        return _by_rows(*self.weight.shape, product, widens=self.weight.dtype != x.dtype)


class _QuantizedProduct:
    """x times rows of a quantized matrix (transposed), with its scales and biases widened to x's dtype."""

    prompt_dequantize = False  # set where a fast BLAS makes dequantize + matmul the faster prompt path

    def _product(self, x: mx.array) -> mx.array:
        dequantize = self.prompt_dequantize and x.ndim >= 2 and x.shape[-2] >= PROMPT_TOKENS

        def product(rows, previous):
            w, s, b = _after([self.weight[rows], self.scales[rows], self.biases[rows]], previous)
            s, b = s.astype(x.dtype), b.astype(x.dtype)
            if dequantize:
                return x @ mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits).T
            return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=self.group_size, bits=self.bits)

        # Dequantizing widens the whole matrix; quantized_matmul only the scales and biases.
        n_rows, packed = self.weight.shape
        row_elements = packed * 32 // self.bits if dequantize else self.scales.shape[1]
        return _by_rows(n_rows, row_elements, product, widens=dequantize or self.scales.dtype != x.dtype)


class UpcastQuantizedLinear(_QuantizedProduct, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = self._product(x)
        return y + self.bias if "bias" in self else y


class UpcastQuantizedEmbedding(_QuantizedProduct, nn.QuantizedEmbedding):
    def __call__(self, tokens: mx.array) -> mx.array:
        # Widen before dequantizing: w * scale + bias computed in 16 bits would round the weights.
        s, b = self.scales[tokens].astype(self.compute_dtype), self.biases[tokens].astype(self.compute_dtype)
        return mx.dequantize(self.weight[tokens], s, b, group_size=self.group_size, bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._product(x)


_UPCAST = {
    nn.Linear: UpcastLinear,
    nn.Embedding: UpcastEmbedding,
    nn.QuantizedLinear: UpcastQuantizedLinear,
    nn.QuantizedEmbedding: UpcastQuantizedEmbedding,
}


def compute_in(model: nn.Module, dtype: mx.Dtype, prompt_dequantize: bool = False) -> None:
    """Make ``model`` compute in ``dtype`` while its matrices stay as stored.

    Vectors (norm weights, biases) are cast outright: they are tiny and used whole at every step.
    ``prompt_dequantize``: quantized layers take the dequantize + float matmul path for prompts."""
    for _, module in model.named_modules():
        cls = _UPCAST.get(type(module), type(module))
        if cls not in _UPCAST.values():
            continue
        module.__class__ = cls
        module.compute_dtype = dtype
        if isinstance(module, _QuantizedProduct):
            module.prompt_dequantize = prompt_dequantize
    for _, module in model.named_modules():
        for name, p in list(module.items()):
            if isinstance(p, mx.array) and p.ndim == 1 and mx.issubdtype(p.dtype, mx.floating):
                module[name] = p.astype(dtype)
