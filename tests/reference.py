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


def inv_freq_for_config(config: dict, seq_len: Optional[int] = None) -> np.ndarray:
    """The theta_i a config's RoPE rotates by (radians per position). For `linear` these are the
    equivalent theta_i / factor; `dynamic` needs seq_len (the largest position + 1) once it exceeds
    max_position_embeddings; YaRN's q/k scale is not part of this (see rope_plan)."""
    _, _, head_dim = head_dims(config)
    theta, scaling = rope_settings(config)
    if scaling is None:
        return default_inv_freq(head_dim, theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return llama3_inv_freq(
            head_dim,
            theta,
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"],
        )
    plan = rope_plan(config, seq_len)
    return plan["inv_freq"] * plan["position_scale"]


# ---------------------------------------------------------------------------------------------
# Other rope_scaling types (Hugging Face's rope_scaling / transformers-5 rope_parameters), written
# from their definitions, one pair at a time.


def dynamic_ntk_base(base: float, head_dim: int, factor: float, max_position_embeddings: int, seq_len: int) -> float:
    """NTK-aware ("dynamic") RoPE base for a sequence of seq_len positions (largest position + 1):
    unchanged up to max_position_embeddings, then
    base * ((factor * L / max_position_embeddings) - (factor - 1)) ** (d / (d - 2))."""
    L, n, d = float(seq_len), float(max_position_embeddings), float(head_dim)
    if L <= n:
        return float(base)
    return float(base) * ((factor * L / n) - (factor - 1.0)) ** (d / (d - 2.0))


def yarn_correction_range(
    head_dim: int,
    base: float,
    original_max_position_embeddings: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
) -> tuple[float, float]:
    """(low, high) pair indices of YaRN's ramp. The pair whose wavelength 2*pi/theta_i fits n_rot
    times into the original context solves orig / (2*pi/theta_i) = n_rot for i:
    i = d * ln(orig / (n_rot * 2*pi)) / (2 ln base). beta_fast gives low, beta_slow high."""

    def pair_index(n_rot: float) -> float:
        return head_dim * math.log(original_max_position_embeddings / (n_rot * 2.0 * math.pi)) / (2.0 * math.log(base))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = float(math.floor(low)), float(math.ceil(high))
    # Clamped as Hugging Face does: low from below at 0, high from above at d - 1.
    return max(low, 0.0), min(high, float(head_dim - 1))


def yarn_inv_freq(
    head_dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> np.ndarray:
    """YaRN theta'_i: pairs below the ramp keep theta_i (extrapolate), pairs above it get
    theta_i / factor (interpolate), linear in the pair index in between."""
    low, high = yarn_correction_range(head_dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    if high == low:
        high += 0.001
    out = np.empty(head_dim // 2, dtype=np.float64)
    for i in range(head_dim // 2):
        theta = float(base) ** (-2.0 * i / head_dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp
        out[i] = theta / factor * (1.0 - extrapolation) + theta * extrapolation
    return out


def yarn_attention_factor(
    factor: float,
    attention_factor: Optional[float] = None,
    mscale: Optional[float] = None,
    mscale_all_dim: Optional[float] = None,
) -> float:
    """YaRN's multiplier on q and k: an explicit attention_factor wins; else, with both mscale and
    mscale_all_dim set, m(mscale) / m(mscale_all_dim); else m(1), where m(s) = 0.1 * s * ln(factor) + 1
    for factor > 1 and 1 otherwise."""
    if attention_factor is not None:
        return float(attention_factor)

    def m(s: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return m(mscale) / m(mscale_all_dim)
    return m(1.0)


def rope_plan(config: dict, seq_len: Optional[int] = None) -> dict:
    """How a config rotates q and k over a sequence of seq_len positions:
    {"inv_freq": theta_i, "position_scale": positions are multiplied by this,
     "qk_scale": q and k are multiplied by this after rotation, "kind": the rope type}."""
    _, _, head_dim = head_dims(config)
    base, scaling = rope_settings(config)
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    plan = {"inv_freq": default_inv_freq(head_dim, base), "position_scale": 1.0, "qk_scale": 1.0, "kind": kind}
    if kind == "default":
        return plan
    if kind == "llama3":
        plan["inv_freq"] = inv_freq_for_config(config)
    elif kind == "linear":
        plan["position_scale"] = 1.0 / float(scaling["factor"])
    elif kind == "dynamic":
        max_pos = config.get("max_position_embeddings", 2048)
        if seq_len is not None:
            base = dynamic_ntk_base(base, head_dim, float(scaling["factor"]), max_pos, seq_len)
        plan["inv_freq"] = default_inv_freq(head_dim, base)
    elif kind == "yarn":
        factor = float(scaling["factor"])
        orig = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048)
        plan["inv_freq"] = yarn_inv_freq(
            head_dim,
            base,
            factor,
            orig,
            scaling.get("beta_fast") or 32.0,
            scaling.get("beta_slow") or 1.0,
            scaling.get("truncate", True),
        )
        plan["qk_scale"] = yarn_attention_factor(
            factor, scaling.get("attention_factor"), scaling.get("mscale"), scaling.get("mscale_all_dim")
        )
    else:
        raise NotImplementedError(f"reference has no rope_scaling {kind!r}")
    return plan


def rope_for_config(x: np.ndarray, positions, config: dict, seq_len: Optional[int] = None) -> np.ndarray:
    """x (..., T, head_dim) rotated as the config's RoPE does (Hugging Face rotate-half layout) at
    `positions`; seq_len (for `dynamic`) defaults to the largest position + 1."""
    positions = np.asarray(positions, dtype=np.float64)
    if seq_len is None:
        seq_len = int(np.max(positions)) + 1
    plan = rope_plan(config, seq_len)
    out = rope(x, positions * plan["position_scale"], traditional=False, freqs=plan["inv_freq"])
    return out * plan["qk_scale"]


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


def self_attention(
    x: np.ndarray, w: dict, prefix: str, config: dict, positions, mask, rope_per_position: bool = False
) -> np.ndarray:
    """Llama self-attention on x (B, T, hidden) with weights w[prefix + "q_proj.weight"], ...
    (no cache: keys are the same T positions as the queries).

    rope_per_position=True rotates the q and k of position p with the RoPE of a sequence of p + 1
    positions, as token-by-token decoding with a cache does (differs only for `dynamic`)."""
    x = np.asarray(x, dtype=np.float64)
    B, T, _ = x.shape
    n_heads, n_kv, head_dim = head_dims(config)
    # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
    q = _linear(x, w, prefix + "q_proj").reshape(B, T, n_heads, head_dim).transpose(0, 2, 1, 3)
    k = _linear(x, w, prefix + "k_proj").reshape(B, T, n_kv, head_dim).transpose(0, 2, 1, 3)
    v = _linear(x, w, prefix + "v_proj").reshape(B, T, n_kv, head_dim).transpose(0, 2, 1, 3)
    # Hugging Face checkpoints: rotate-half layout; the config's rope_scaling decides the angles.
    if rope_per_position:
        pos = np.broadcast_to(np.asarray(positions), (T,))
        for t in range(T):
            seq_len = int(pos[t]) + 1
            q[..., t : t + 1, :] = rope_for_config(q[..., t : t + 1, :], pos[t : t + 1], config, seq_len)
            k[..., t : t + 1, :] = rope_for_config(k[..., t : t + 1, :], pos[t : t + 1], config, seq_len)
    else:
        q = rope_for_config(q, positions, config)
        k = rope_for_config(k, positions, config)
    a = attention(q, k, v, mask)  # (B, H, T, head_dim)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, n_heads * head_dim)
    return _linear(a, w, prefix + "o_proj")


def mlp(x: np.ndarray, w: dict, prefix: str) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    x = np.asarray(x, dtype=np.float64)
    gate = _linear(x, w, prefix + "gate_proj")
    up = _linear(x, w, prefix + "up_proj")
    return _linear(silu(gate) * up, w, prefix + "down_proj")


def block(
    h: np.ndarray, w: dict, prefix: str, config: dict, positions, mask, rope_per_position: bool = False
) -> np.ndarray:
    """Pre-norm residual block: h + attn(norm1(h)), then + mlp(norm2(.))."""
    eps = config.get("rms_norm_eps", 1e-6)
    h = np.asarray(h, dtype=np.float64)
    x = rms_norm(h, w[prefix + "input_layernorm.weight"], eps)
    h = h + self_attention(x, w, prefix + "self_attn.", config, positions, mask, rope_per_position)
    x = rms_norm(h, w[prefix + "post_attention_layernorm.weight"], eps)
    return h + mlp(x, w, prefix + "mlp.")


def llama_forward(weights: dict, config: dict, tokens, rope_per_position: bool = False) -> np.ndarray:
    """Logits (B, T, V) in float64 for tokens (B, T) at positions 0..T-1, no cache.

    weights: Hugging Face names -> arrays (any float dtype; used as float64). Biases are used
    when present (attention_bias / mlp_bias). With tie_word_embeddings (HF's default: false)
    the head is the embedding matrix and lm_head.weight is not used. The config's rope_scaling
    (or rope_parameters) applies; for `dynamic` the sequence length is T, or, with
    rope_per_position=True, p + 1 for position p: what decoding one token at a time with a cache
    gives (Hugging Face recomputes the base for each new length; cached keys keep theirs)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    tokens = np.asarray(tokens)
    T = tokens.shape[1]
    positions = np.arange(T)
    mask = causal_mask(T, 0)
    if config.get("sliding_window"):  # Mistral v0.1: only the last `sliding_window` positions are visible
        mask = mask & (positions[None, :] > positions[:, None] - config["sliding_window"])
    h = w["model.embed_tokens.weight"][tokens]  # (B, T, hidden)
    for i in range(config["num_hidden_layers"]):
        h = block(h, w, f"model.layers.{i}.", config, positions, mask, rope_per_position)
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
