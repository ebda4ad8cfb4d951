"""The Llama architecture as mlx.nn modules.

Module attribute names are the Hugging Face weight names (``model.layers.0.self_attn.q_proj``),
so a converted checkpoint loads with a strict ``load_weights`` and no renaming.
The hard parts run as fused MLX kernels: ``mx.fast.rms_norm`` (inside ``nn.RMSNorm``),
``mx.fast.rope`` and ``mx.fast.scaled_dot_product_attention``.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .config import ModelArgs
from .rope import RoPE


def causal_mask(t: int, offset: int = 0, window: Optional[int] = None) -> mx.array:
    """Boolean (t, offset + t): query i, at absolute position offset + i, sees keys 0 .. offset + i
    (only the last ``window`` of them with a sliding window)."""
    q_pos = mx.arange(offset, offset + t)[:, None]
    k_pos = mx.arange(offset + t)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.rope = RoPE(
            self.head_dim,
            traditional=args.rope_traditional,
            base=args.rope_theta,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache: Optional[KVCache] = None) -> mx.array:
        B, T, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # K/V keep their n_kv_heads: the fused kernel broadcasts each over its group of query heads.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one compiled kernel instead of three elementwise ops (sigmoid, two
    products) per layer. Shapeless: one compilation serves every prompt length."""
    return nn.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache: Optional[KVCache] = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The body: embedding, blocks, final norm. Returns hidden states."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.sliding_window = args.sliding_window

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(tokens)
        if cache is None:
            cache = [None] * len(self.layers)
        t = h.shape[1]
        offset = cache[0].offset if cache[0] is not None else 0
        window = self.sliding_window
        if hasattr(cache[0], "make_mask"):
            # A rotating cache keeps only some positions, in its own order: it knows what each query sees.
            mask = cache[0].make_mask(t, window)
        elif window is not None and offset + t > window:
            # Mistral v0.1: keys further back than the window are hidden.
            mask = causal_mask(t, offset, window)
        elif t > 1:
            # Several new tokens need the causal mask, aligned so the last query sees the last key
            # (what "causal" does in MLX, checked against causal_mask() in the tests).
            mask = "causal"
        else:
            mask = None  # one new token attends to everything cached
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """The head: the body plus ``lm_head`` (or the tied embedding matrix) to vocabulary logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        h = self.model(tokens, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self, **kwargs) -> list:
        """One cache per layer; max_kv_size, kv_bits, kv_group_size, keep as in cache.make_cache."""
        return make_cache(self, **kwargs)

    @property
    def layers(self):
        return self.model.layers
