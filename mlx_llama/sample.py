"""Sampling as pure functions of logits.

``make_sampler`` composes the filters (top-k, top-p, min-p) and returns ``logprobs -> token``;
``make_logits_processors`` returns functions ``(tokens so far, logits) -> logits`` applied before it.
Randomness comes from MLX's global key (``mx.random.seed``), so a seed reproduces a run.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, List

import mlx.core as mx


@partial(mx.compile, shapeless=True)
def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis, compiled into one kernel (it runs once per token)."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, -math.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    # A token stays if the mass of the tokens strictly before it is still below p; the top one always does.
    before = mx.cumsum(probs, axis=-1) - probs
    keep_sorted = before < p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -math.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, -math.inf)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Callable:
    """logprobs (B, V) -> tokens (B,). temp 0 is greedy."""
    if temp == 0:
        return greedy

    def sample(logprobs: mx.array) -> mx.array:
        lp = apply_min_p(apply_top_p(apply_top_k(logprobs, top_k), top_p), min_p)
        return mx.random.categorical(lp * (1.0 / temp), axis=-1)

    return sample


def repetition_penalty(penalty: float, context_size: int = 64) -> Callable:
    """Make already-seen tokens less likely (CTRL-style): positive logits divided, negative multiplied."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context_size:]
        seen = logits[:, recent]
        logits[:, recent] = mx.where(seen > 0, seen / penalty, seen * penalty)
        return logits

    return process


def make_logits_processors(repetition_penalty_value: float = 1.0, repetition_context_size: int = 64) -> List[Callable]:
    procs = []
    if repetition_penalty_value and repetition_penalty_value != 1.0:
        procs.append(repetition_penalty(repetition_penalty_value, repetition_context_size))
    return procs
