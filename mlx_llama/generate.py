"""Text generation as stacked generators.

``generate_step`` yields (token, logprobs) forever from a prompt: chunked prefill, then one token
per step with the KV cache. ``stream_generate`` adds detokenizing, stop conditions and timing and
yields small ``GenerationResponse`` records. ``generate`` returns the whole text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .errors import MlxLlamaError
from .memory import RunAheadBound
from .sample import log_softmax, make_sampler


@dataclass
class GenerationResponse:
    text: str  # the text this step finished (may be empty while a character is incomplete)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop" (an EOS id) or "length" (max_tokens), on the last record


def prefill(model, tokens, cache: list, step_size: int = 512, bound=None) -> None:
    """Run ``tokens`` through the model into ``cache`` (no logits are computed: nothing reads them).

    In chunks of ``step_size``, so peak memory for activations stays bounded by the chunk, whatever
    the prompt length. ``bound``: a ``memory.RunAheadBound`` to update before each chunk."""
    tokens = mx.array(tokens, dtype=mx.uint32) if not isinstance(tokens, mx.array) else tokens
    for start in range(0, tokens.size, step_size):
        chunk = tokens[None, start : start + step_size]
        if bound is not None:
            bound.update(chunk.shape[1])
        model(chunk, cache)
        mx.eval([c.keys for c in cache])


def bounds_run_ahead(model) -> bool:
    """Whether generation bounds MLX's run-ahead (memory.RunAheadBound): on the CPU, for a model the
    loader set up. It matters most where layers widen weights (16-bit storage, quantized: upcast.py);
    on float32 SmolLM2 it still trims the peak (0.5557 -> 0.5533 GB) at the same speed (alternating
    runs: prompt 236 vs 240 tokens/s, decoding 15.5 vs 15.2, medians of 3)."""
    return mx.default_device() == mx.cpu and hasattr(model, "compute_dtype")


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Sequence[Callable] = (),
    prefill_step_size: int = 512,
    cache: Optional[list] = None,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield (token id, logprobs over the vocabulary) for up to ``max_tokens`` new tokens.

    Without a ``cache``, one is made: bounded to ``max_kv_size`` positions and quantized to
    ``kv_bits`` when given (see ``cache.make_cache``)."""
    sampler = sampler or make_sampler(0.0)
    if cache is None:
        cache = model.make_cache(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    history = prompt

    def step(y: mx.array):
        nonlocal history
        logits = model(y[None], cache)[:, -1, :]
        for proc in logits_processors:
            logits = proc(history, logits)
        logprobs = log_softmax(logits)
        token = sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token])
        return token, logprobs[0]

    bound = RunAheadBound(model, cache) if bounds_run_ahead(model) else None
    try:
        prefill(model, prompt[:-1], cache, prefill_step_size, bound)
        if bound is not None:
            bound.update()
        y, logprobs = step(prompt[-1:])
        mx.async_eval(y, logprobs)
        for n in range(max_tokens):
            # Queue the next step before reading this one, so the graph for token n+1 is built while
            # token n is still computing; the host waits only for the token id itself.
            if n + 1 < max_tokens:
                if bound is not None:
                    bound.update()
                next_y, next_logprobs = step(y)
                mx.async_eval(next_y, next_logprobs)
            yield y.item(), logprobs
            if n + 1 < max_tokens:
                y, logprobs = next_y, next_logprobs
    finally:
        if bound is not None:
            bound.close()


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Sequence[Callable] = (),
    prefill_step_size: int = 512,
    cache: Optional[list] = None,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
) -> Iterator[GenerationResponse]:
    """Yield a ``GenerationResponse`` per generated token; stops at any EOS id or after ``max_tokens``.

    A string prompt is encoded as is (no chat template): use ``tokenizer.encode_chat`` for that.
    With ``cache``, ``prompt`` is only what the cache does not hold yet; the cache is updated in place.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise MlxLlamaError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids or (isinstance(prompt, str) and not prompt.strip()):
        raise MlxLlamaError("the prompt is empty")
    vocab = model.args.vocab_size
    bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < vocab), None)
    if bad is not None:  # an id past the embedding table would read out of bounds
        raise MlxLlamaError(f"prompt token id {bad!r} is outside the model's vocabulary (0..{vocab - 1})")
    detok = tokenizer.detokenizer()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    for n, (token, _) in enumerate(
        generate_step(
            mx.array(ids, dtype=mx.uint32),
            model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
            prefill_step_size=prefill_step_size,
            cache=cache,
            max_kv_size=max_kv_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        ),
        start=1,
    ):
        if n == 1:
            # The first token's time is the prompt's: prefill plus one step.
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        stop = token in tokenizer.eos_token_ids
        finish = "stop" if stop else ("length" if n == max_tokens else None)
        # The stop token's own text is never shown; whatever the detokenizer held back is.
        text = "" if stop else detok.add_token(token)
        if finish:
            text += detok.finalize()
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish:
            break


def generate(model, tokenizer, prompt: Union[str, List[int]], *, verbose: bool = False, **kwargs) -> str:
    """Generate and return the text; with ``verbose`` stream it to stdout and print the speed."""
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return "".join(text)


def format_stats(r: GenerationResponse) -> str:
    # A single token's time is the prompt's (prefill includes its step): no generation rate to give.
    rate = f"{r.generation_tps:.1f} tokens/s" if r.generation_tokens > 1 else "rate n/a for a single token"
    return (
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s\n"
        f"Generation: {r.generation_tokens} tokens, {rate}\n"
        f"Peak memory: {r.peak_memory_gb:.3f} GB"
    )
