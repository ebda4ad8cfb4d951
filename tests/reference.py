"""Plain-numpy float64 reference for the Llama forward pass.

Written from the math (shared FACTS.md, section 1), not from the library, and on purpose as
unclever as possible: explicit loops over layers, explicit repetition of K/V heads, explicit
cos/sin rotation of pairs. The tests compare the MLX library against these functions.

Conventions: everything is computed in float64. Hugging Face weight names and config.json keys.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2 over the last axis) + eps) * g; no mean subtraction, no bias."""
    x = np.asarray(x, dtype=np.float64)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * np.asarray(g, dtype=np.float64)


def default_inv_freq(head_dim: int, base: float) -> np.ndarray:
    """theta_i = base^(-2i/d) for i in 0..d/2-1 (angular frequency of pair i, radians per position)."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    return np.asarray(base, dtype=np.float64) ** (-2.0 * i / head_dim)


def llama3_inv_freq(
    head_dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Llama 3.x scaled theta_i (see FACTS.md): keep short wavelengths, divide long ones by
    `factor`, blend linearly (in 1/wavelength) in between."""
    theta = default_inv_freq(head_dim, base)
    orig = float(original_max_position_embeddings)
    low_wavelen = orig / low_freq_factor  # L: longer than this -> fully scaled
    high_wavelen = orig / high_freq_factor  # H: shorter than this -> untouched
    out = np.empty_like(theta)
    for i, t in enumerate(theta):
        w = 2.0 * math.pi / t
        if w < high_wavelen:
            out[i] = t
        elif w > low_wavelen:
            out[i] = t / factor
        else:
            s = (orig / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out[i] = (1.0 - s) * t / factor + s * t
    return out


def rope(
    x: np.ndarray,
    positions,
    base: float = 10000.0,
    traditional: bool = False,
    freqs: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Rotate pairs of the last axis of x (..., T, D) by angle positions[t] * theta_i.

    traditional=True pairs dims (2j, 2j+1) (Meta / GGUF layout); False pairs (j, j + D/2)
    (Hugging Face "rotate half"). `freqs`, when given, are the theta_i themselves (radians per
    position, length D/2) -- NOT the inverse that mx.fast.rope's `freqs` argument expects.
    """
    x = np.asarray(x, dtype=np.float64)
    D = x.shape[-1]
    T = x.shape[-2]
    assert D % 2 == 0
    half = D // 2
    theta = default_inv_freq(D, base) if freqs is None else np.asarray(freqs, dtype=np.float64)
    assert theta.shape == (half,)
    pos = np.broadcast_to(np.asarray(positions, dtype=np.float64), (T,))
    angle = pos[:, None] * theta[None, :]  # (T, D/2)
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    if traditional:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
    else:
        a, b = x[..., :half], x[..., half:]
        out[..., :half] = a * cos - b * sin
        out[..., half:] = a * sin + b * cos
    return out


def causal_mask(T: int, offset: int = 0) -> np.ndarray:
    """(T, offset+T) bool, True = may attend: query i (absolute position offset+i) sees keys
    0..offset+i."""
    q_pos = offset + np.arange(T)[:, None]
    k_pos = np.arange(offset + T)[None, :]
    return k_pos <= q_pos


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Scaled dot-product attention. q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0;
    mask: bool broadcastable to (T, S), True = attend (or None). Returns (B, H, T, D).

    K/V head j serves query heads j*n_rep .. (j+1)*n_rep-1 (Hugging Face's repeat_kv order);
    here the heads are repeated explicitly."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    H, Hkv = q.shape[1], k.shape[1]
    assert H % Hkv == 0
    n_rep = H // Hkv
    k = np.repeat(k, n_rep, axis=1)
    v = np.repeat(v, n_rep, axis=1)
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    return softmax(scores, axis=-1) @ v


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# The whole model


def rope_settings(config: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from a config.json dict, top level or rope_parameters."""
    rp = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rp.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and rp.get("rope_type", rp.get("type", "default")) != "default":
        scaling = rp
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling


def inv_freq_for_config(config: dict) -> np.ndarray:
    _, _, head_dim = head_dims(config)
    theta, scaling = rope_settings(config)
    if scaling is None:
        return default_inv_freq(head_dim, theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise NotImplementedError(f"reference has no rope_scaling {kind!r}")
    return llama3_inv_freq(
        head_dim,
        theta,
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    y = x @ np.asarray(w[name + ".weight"], dtype=np.float64).T
    if name + ".bias" in w:
        y = y + np.asarray(w[name + ".bias"], dtype=np.float64)
    return y


def head_dims(config: dict) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) with Hugging Face's defaults."""
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    return n_heads, n_kv, head_dim


def self_attention(x: np.ndarray, w: dict, prefix: str, config: dict, positions, mask) -> np.ndarray:
    """Llama self-attention on x (B, T, hidden) with weights w[prefix + "q_proj.weight"], ...
    (no cache: keys are the same T positions as the queries)."""
    x = np.asarray(x, dtype=np.float64)
    B, T, _ = x.shape
    n_heads, n_kv, head_dim = head_dims(config)
    inv_freq = inv_freq_for_config(config)
    # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
    q = _linear(x, w, prefix + "q_proj").reshape(B, T, n_heads, head_dim).transpose(0, 2, 1, 3)
    k = _linear(x, w, prefix + "k_proj").reshape(B, T, n_kv, head_dim).transpose(0, 2, 1, 3)
    v = _linear(x, w, prefix + "v_proj").reshape(B, T, n_kv, head_dim).transpose(0, 2, 1, 3)
    # Hugging Face checkpoints: rotate-half layout.
    q = rope(q, positions, traditional=False, freqs=inv_freq)
    k = rope(k, positions, traditional=False, freqs=inv_freq)
    a = attention(q, k, v, mask)  # (B, H, T, head_dim)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, n_heads * head_dim)
    return _linear(a, w, prefix + "o_proj")


def mlp(x: np.ndarray, w: dict, prefix: str) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    x = np.asarray(x, dtype=np.float64)
    gate = _linear(x, w, prefix + "gate_proj")
    up = _linear(x, w, prefix + "up_proj")
    return _linear(silu(gate) * up, w, prefix + "down_proj")


def block(h: np.ndarray, w: dict, prefix: str, config: dict, positions, mask) -> np.ndarray:
    """Pre-norm residual block: h + attn(norm1(h)), then + mlp(norm2(.))."""
    eps = config.get("rms_norm_eps", 1e-6)
    h = np.asarray(h, dtype=np.float64)
    x = rms_norm(h, w[prefix + "input_layernorm.weight"], eps)
    h = h + self_attention(x, w, prefix + "self_attn.", config, positions, mask)
    x = rms_norm(h, w[prefix + "post_attention_layernorm.weight"], eps)
    return h + mlp(x, w, prefix + "mlp.")


def llama_forward(weights: dict, config: dict, tokens) -> np.ndarray:
    """Logits (B, T, V) in float64 for tokens (B, T) at positions 0..T-1, no cache.

    weights: Hugging Face names -> arrays (any float dtype; used as float64). Biases are used
    when present (attention_bias / mlp_bias). With tie_word_embeddings (HF's default: false)
    the head is the embedding matrix and lm_head.weight is not used."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    tokens = np.asarray(tokens)
    T = tokens.shape[1]
    positions = np.arange(T)
    mask = causal_mask(T, 0)
    h = w["model.embed_tokens.weight"][tokens]  # (B, T, hidden)
    for i in range(config["num_hidden_layers"]):
        h = block(h, w, f"model.layers.{i}.", config, positions, mask)
    h = rms_norm(h, w["model.norm.weight"], config.get("rms_norm_eps", 1e-6))
    if config.get("tie_word_embeddings", False):
        head = w["model.embed_tokens.weight"]
    else:
        head = w["lm_head.weight"]
    return h @ head.T


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
