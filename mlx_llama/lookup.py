"""Prompt-lookup decoding: greedy generation that drafts tokens by copying from the context.

When the output repeats something already in the prompt or the text so far (quoting, editing,
code), the tokens that followed the last occurrence of the current n-gram are a good guess for
what comes next. ``lookup_generate_step`` proposes up to ``num_draft`` such tokens, checks them
all in one forward pass with the KV cache, keeps the longest prefix the model agrees with plus
the model's own next token, and drops the rejected positions from the cache. No draft model is
needed, and the tokens are the greedy ones: only how many come out of each forward pass changes.

Identical to ``generate_step``'s greedy output in exact arithmetic; in floating point a pass over
several positions rounds differently from one position at a time, so a near tie in the logits
could in principle go the other way (as in any speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import RotatingKVCache
from .errors import MlxLlamaError
from .generate import prefill
from .sample import log_softmax


@dataclass
class LookupStats:
    """Counters filled in by ``lookup_generate_step`` as it runs."""

    drafted: int = 0  # draft tokens sent to the model for checking
    accepted: int = 0  # draft tokens the model agreed with
    forward_passes: int = 0  # decoding passes after the prefill (each yields at least one token)
    generated: int = 0  # tokens yielded

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def find_draft(tokens: Sequence[int], *, ngram_max: int = 3, ngram_min: int = 1, num_draft: int = 10) -> List[int]:
    """The tokens that followed the most recent earlier occurrence of the last n tokens, for the
    longest n from ``ngram_max`` down to ``ngram_min`` that occurs; at most ``num_draft`` of them."""
    size = len(tokens)
    if num_draft <= 0:
        return []
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        tail = list(tokens[size - n :])
        last = tail[-1]
        # Start positions i whose n-gram ends before the tail itself does: i + n <= size - 1.
        for i in range(size - n - 1, -1, -1):
            if tokens[i + n - 1] == last and list(tokens[i : i + n]) == tail:
                return list(tokens[i + n : i + n + num_draft])
    return []


def lookup_generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    ngram_max: int = 3,
    ngram_min: int = 1,
    num_draft: int = 10,
    prefill_step_size: int = 512,
    cache: Optional[list] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    stats: Optional[LookupStats] = None,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield (token id, logprobs over the vocabulary) for exactly ``max_tokens`` greedy tokens.

    ``stats``, when given, is updated in place (drafted / accepted / forward passes). Without a
    ``cache`` one is made (quantized with ``kv_bits``); it must keep every position, so that
    rejected drafts can be forgotten: a rotating (``max_kv_size``) cache is refused. Afterwards the
    cache holds the prompt and every yielded token but the last, as with ``generate_step``.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise MlxLlamaError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    if not 1 <= ngram_min <= ngram_max:
        raise MlxLlamaError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
    if prompt.size == 0:
        raise MlxLlamaError("the prompt is empty")
    stats = stats if stats is not None else LookupStats()
    if cache is None:
        cache = model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)
    if any(isinstance(c, RotatingKVCache) for c in cache):
        raise MlxLlamaError(
            "prompt lookup needs a KV cache that keeps every position: a rotating one cannot take back rejected drafts"
        )
    history = prompt.tolist()

    # Prefill exactly as generate_step does (all but the last token, in chunks), so that the
    # first token comes out of the same computation.
    prefill(model, prompt[:-1], cache, prefill_step_size)

    # `pending` is the newest token: in the history, not yet in the cache.
    pending = history[-1]
    produced = 0
    while produced < max_tokens:
        # Never draft past max_tokens: a pass yields its accepted drafts plus one token.
        draft = find_draft(
            history, ngram_max=ngram_max, ngram_min=ngram_min, num_draft=min(num_draft, max_tokens - produced - 1)
        )
        inputs = mx.array([pending] + draft, dtype=mx.uint32)
        logits = model(inputs[None], cache)[0]  # (1 + len(draft), vocab)
        logprobs = log_softmax(logits)
        # Position j predicts the token after inputs[j]: the model's choice where draft[j] stands.
        choice = mx.argmax(logprobs, axis=-1)
        mx.eval(choice, logprobs)
        choice = choice.tolist()
        accepted = 0
        while accepted < len(draft) and choice[accepted] == draft[accepted]:
            accepted += 1
        # The cache took 1 + len(draft) positions; the pending token and the accepted drafts stay.
        rejected = len(draft) - accepted
        if rejected and any([c.trim(rejected) != rejected for c in cache]):
            raise MlxLlamaError("the KV cache could not forget the rejected draft tokens")
        stats.forward_passes += 1
        stats.drafted += len(draft)
        stats.accepted += accepted
        for j in range(accepted + 1):
            history.append(choice[j])
            produced += 1
            stats.generated += 1
            yield choice[j], logprobs[j]
        pending = choice[accepted]
