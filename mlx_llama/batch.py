"""Greedy generation for several prompts at once.

Prompts of different lengths are left-padded to a common length, so that every sequence's newest
token sits in the same column and one forward pass serves them all. Two things keep the padding
invisible, so that each sequence gets exactly its single-prompt greedy output:

- an explicit attention mask, causal and hiding each sequence's pad keys (and keys beyond a
  sliding window): the model asks its cache for the mask (``make_mask``), as it does a rotating
  cache's;
- per-sequence RoPE positions: a sequence with p pad columns has its real tokens at positions
  0, 1, ... although they sit in cache columns p, p + 1, ... ``BatchKVCache.offset`` is that
  position, one per sequence, and ``mx.fast.rope`` takes such a vector of offsets (one per
  leading, batch, index), so the model's own attention layer rotates each row correctly.
  (RoPE scores depend only on distances, so a shift common to a whole sequence would give the
  same attention in exact arithmetic; the positions still make the cached keys those of the
  single-prompt run, and they are what any position-dependent scaling needs.)

Sequences that reach an EOS id stay in the batch (the shapes stay fixed) but their further tokens
are ignored; generation ends when all have stopped or after ``max_tokens``.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import KVCache
from .errors import MlxLlamaError
from .rope import rope_type
from .sample import log_softmax


class BatchKVCache:
    """One layer's cache for a batch of left-padded sequences: a ``KVCache`` of shape
    (B, kv_heads, columns, head_dim) plus each sequence's number of pad columns."""

    def __init__(self, left_padding: Sequence[int]):
        self._kv = KVCache()
        self.left_padding = mx.array(list(left_padding), dtype=mx.int32)

    @property
    def columns(self) -> int:
        """Columns stored so far, padding included (the same for every sequence)."""
        return self._kv.offset

    @property
    def offset(self) -> mx.array:
        """(B,) position of each sequence's next token: what RoPE rotates by."""
        return self._kv.offset - self.left_padding

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self._kv.update_and_fetch(keys, values)

    def make_mask(self, t: int, window: Optional[int] = None) -> mx.array:
        """The mask for the next ``update_and_fetch`` of ``t`` columns (the model asks its first
        layer's cache for it): see ``batch_mask``."""
        return batch_mask(self.left_padding, self.columns, t, window)

    def trim(self, n: int) -> int:
        """Forget the last ``n`` columns of every sequence; returns how many."""
        return self._kv.trim(n)

    @property
    def state(self):
        return self._kv.state

    @property
    def nbytes(self) -> int:
        return self._kv.nbytes


def batch_mask(left_padding: mx.array, start: int, t: int, window: Optional[int] = None) -> mx.array:
    """Boolean (B, 1, t, start + t) mask for t new columns after ``start`` stored ones.

    Query column q sees key column k when k <= q, k is not padding and, with a sliding window,
    q - k < window. Every query also sees itself, so that a pad query is never left with no key at
    all: its output is then finite (it is never read), where an all-masked row could give NaN and
    a NaN value vector poisons even the queries that give it zero weight.
    """
    q = mx.arange(start, start + t)[:, None]
    k = mx.arange(start + t)[None, :]
    allowed = (k <= q) & (k >= left_padding[:, None, None])  # (B, t, start + t)
    if window is not None:
        allowed = allowed & (q - k < window)
    return (allowed | (k == q))[:, None]


def _check_rope(model) -> None:
    # Dynamic NTK scaling picks one RoPE base from the sequence length: with a different length
    # per sequence there is no single base to give the fused kernel.
    kind = rope_type(model.args.rope_scaling)
    if kind == "dynamic":
        raise MlxLlamaError(f"batch generation does not support rope_scaling type {kind!r}")


def batch_generate_step(
    prompts: Sequence[Sequence[int]],
    model,
    *,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
    pad_token_id: int = 0,
) -> Iterator[Tuple[List[int], mx.array]]:
    """Yield (one greedy token per sequence, logprobs (B, vocab)) for up to ``max_tokens`` steps.

    Every sequence gets a token at every step, also after its EOS: stopping is the caller's job.
    """
    _check_rope(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MlxLlamaError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    pads = [length - len(p) for p in prompts]
    # (B, length): left padding puts every prompt's last token in the last column.
    tokens = mx.array([[pad_token_id] * n + list(p) for n, p in zip(pads, prompts)], dtype=mx.uint32)
    cache = [BatchKVCache(pads) for _ in model.layers]

    def step(x: mx.array):
        logits = model(x, cache)[:, -1, :]
        logprobs = log_softmax(logits)
        return mx.argmax(logprobs, axis=-1), logprobs

    # As generate_step: prefill all but the last column in chunks, then decode one column a step.
    rest = tokens
    while rest.shape[1] > 1:
        n = min(prefill_step_size, rest.shape[1] - 1)
        model(rest[:, :n], cache)
        mx.eval([c.state for c in cache])
        rest = rest[:, n:]

    y, logprobs = step(rest)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y[:, None])
            mx.async_eval(next_y, next_logprobs)
        yield y.tolist(), logprobs
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def _encode_all(tokenizer, prompts, vocab: int) -> List[List[int]]:
    if not prompts:
        raise MlxLlamaError("no prompts given")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p.strip():
                raise MlxLlamaError(f"prompt {i} is empty")
            p = tokenizer.encode(p)
        p = list(p)
        if not p:
            raise MlxLlamaError(f"prompt {i} is empty")
        bad = next((t for t in p if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:  # an id past the embedding table would read out of bounds
            raise MlxLlamaError(f"prompt {i}: token id {bad!r} is outside the model's vocabulary (0..{vocab - 1})")
        ids.append(p)
    return ids


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[Union[str, Sequence[int]]],
    *,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
) -> List[List[int]]:
    """Greedy tokens for each prompt, as ``generate_step`` gives them for that prompt alone: up to
    ``max_tokens`` each, ending with the EOS id where one was generated.

    String prompts are encoded as they are (no chat template): use ``tokenizer.encode_chat`` for that.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise MlxLlamaError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    ids = _encode_all(tokenizer, prompts, model.args.vocab_size)
    eos = tokenizer.eos_token_ids
    out: List[List[int]] = [[] for _ in ids]
    done = [False] * len(ids)
    for tokens, _ in batch_generate_step(ids, model, max_tokens=max_tokens, prefill_step_size=prefill_step_size):
        for b, t in enumerate(tokens):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos
        if all(done):
            break
    return out


def batch_generate_text(model, tokenizer, prompts, **kwargs) -> List[str]:
    """``batch_generate``, decoded; a final EOS id is not part of the text."""
    eos = tokenizer.eos_token_ids
    out = batch_generate(model, tokenizer, prompts, **kwargs)
    return [tokenizer.decode(t[:-1] if t and t[-1] in eos else t) for t in out]
