"""Batch generation: left-padded prompts of different lengths give, each, exactly what greedy
``generate_step`` gives for that prompt alone, with its logprobs; EOS in one sequence leaves the
others alone; the mask against a plain numpy construction."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, generate, load
from mlx_llama.batch import BatchKVCache, batch_generate, batch_generate_step, batch_generate_text, batch_mask
from mlx_llama.cache import KVCache
from mlx_llama.generate import generate_step

PROMPTS = [[1, 40, 41, 42, 43], list(range(3, 40)), [7], [5, 6, 7, 8] * 4]

CONFIGS = {
    "gqa": tiny_config(),
    # Tied head, multi-query attention, biases, Llama 3 frequencies (mx.fast.rope's freqs path).
    "mqa-tied-llama3": tiny_config(
        tie_word_embeddings=True,
        num_key_value_heads=1,
        attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    # Keys further back than 6 positions are hidden: the window is counted in each sequence's positions.
    "window": tiny_config(sliding_window=6),
}


def _load(root, config, seed=11):
    hf = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=seed))
    model, tokenizer = load(str(convert(str(hf), str(root / "mlx"), progress=False)))
    tokenizer.eos_token_ids = set()  # no early stop unless a test sets one
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _load(tmp_path_factory.mktemp("batch"), CONFIGS["gqa"])


def single(model, prompt, n):
    return list(generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=n))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_sequence_equals_its_single_prompt_greedy_output(tmp_path, name):
    model, tokenizer = _load(tmp_path, CONFIGS[name])
    n = 20
    steps = list(batch_generate_step(PROMPTS, model, max_tokens=n))
    assert len(steps) == n
    for b, prompt in enumerate(PROMPTS):
        want = single(model, prompt, n)
        assert [tokens[b] for tokens, _ in steps] == [t for t, _ in want]
        # Not just the argmax: the padding leaves the whole distribution as it was.
        for (_, logprobs), (_, lp) in zip(steps, want):
            np.testing.assert_allclose(np.array(logprobs[b]), np.array(lp), atol=1e-4)
    assert batch_generate(model, tokenizer, PROMPTS, max_tokens=n) == [[t[b] for t, _ in steps] for b in range(4)]


def test_batch_of_one_and_any_order_give_the_same(tiny):
    model, tokenizer = tiny
    want = [[t for t, _ in single(model, p, 12)] for p in PROMPTS]
    for b, p in enumerate(PROMPTS):
        assert batch_generate(model, tokenizer, [p], max_tokens=12) == [want[b]]
    order = [2, 0, 3, 1]
    assert batch_generate(model, tokenizer, [PROMPTS[i] for i in order], max_tokens=12) == [want[i] for i in order]


def test_chunked_prefill_gives_the_same_tokens(tiny):
    model, tokenizer = tiny
    a = batch_generate(model, tokenizer, PROMPTS, max_tokens=10)
    assert batch_generate(model, tokenizer, PROMPTS, max_tokens=10, prefill_step_size=4) == a


def test_eos_in_one_sequence_does_not_affect_the_others(tiny):
    model, tokenizer = tiny
    free = batch_generate(model, tokenizer, PROMPTS, max_tokens=16)
    others = {t for seq in free[1:] for t in seq}
    # A token sequence 0 generates early that no other sequence ever generates.
    stop = next(t for t in free[0][2:] if t not in others)
    cut = free[0].index(stop) + 1
    tokenizer.eos_token_ids = {stop, 99999}
    try:
        out = batch_generate(model, tokenizer, PROMPTS, max_tokens=16)
        texts = batch_generate_text(model, tokenizer, PROMPTS, max_tokens=16)
    finally:
        tokenizer.eos_token_ids = set()
    assert out[0] == free[0][:cut] and cut < 16
    assert out[1:] == free[1:]
    # The text leaves the stop token out, as stream_generate does.
    assert texts[0] == tokenizer.decode(free[0][: cut - 1])
    assert texts[1:] == [tokenizer.decode(t) for t in free[1:]]


def test_stops_when_every_sequence_has_stopped(tiny):
    model, tokenizer = tiny
    free = batch_generate(model, tokenizer, PROMPTS[:2], max_tokens=12)
    tokenizer.eos_token_ids = {free[0][1], free[1][3]}
    try:
        out = batch_generate(model, tokenizer, PROMPTS[:2], max_tokens=12)
    finally:
        tokenizer.eos_token_ids = set()
    for got, seq in zip(out, free):
        first = min(seq.index(t) for t in (free[0][1], free[1][3]) if t in seq)
        assert got == seq[: first + 1]


def test_string_prompts_give_the_text_of_single_generation(tiny):
    model, tokenizer = tiny
    prompts = ["hello there", "The quick brown fox jumps", "1234"]
    want = [generate(model, tokenizer, p, max_tokens=8) for p in prompts]
    assert batch_generate_text(model, tokenizer, prompts, max_tokens=8) == want


def test_attention_rotates_each_sequence_by_its_own_positions(tiny):
    # Shifting all of a sequence's positions by its padding would leave the attention output
    # unchanged (RoPE scores depend on distances only), so compare the cached keys themselves:
    # sequence b's real tokens must sit at positions 0, 1, ... whatever their column.
    model, _ = tiny
    attn = model.model.layers[0].self_attn
    pads, length = [0, 3, 6], 9
    x = mx.random.normal((len(pads), length, model.args.hidden_size), key=mx.random.key(0))
    cache = BatchKVCache(pads)
    out = attn(x, batch_mask(cache.left_padding, 0, length), cache)
    assert cache.offset.tolist() == [length - p for p in pads]
    for b, pad in enumerate(pads):
        plain = KVCache()
        want = attn(x[b : b + 1, pad:], "causal", plain)
        for got_kv, want_kv in zip(cache.state, plain.state):
            np.testing.assert_allclose(np.array(got_kv[b : b + 1, :, pad:]), np.array(want_kv), atol=1e-5)
        np.testing.assert_allclose(np.array(out[b : b + 1, pad:]), np.array(want), atol=1e-5)


def test_mask_against_numpy():
    pads = [0, 2, 5]
    start, t, window = 3, 4, 3
    got = np.array(batch_mask(mx.array(pads), start, t, window))
    assert got.shape == (3, 1, t, start + t)
    for b, pad in enumerate(pads):
        for i in range(t):
            q = start + i
            for k in range(start + t):
                want = (pad <= k <= q and q - k < window) or k == q
                assert got[b, 0, i, k] == want, (b, i, k)


def test_dynamic_rope_is_refused(tmp_path):
    model, tokenizer = _load(tmp_path, tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(MlxLlamaError, match="dynamic"):
        batch_generate(model, tokenizer, PROMPTS, max_tokens=2)


@pytest.mark.parametrize(
    "prompts, kwargs",
    [([], {}), ([[1], []], {}), (["hi", "  "], {}), ([[1], [2, 320]], {}), ([[1, -1]], {}), ([[1]], {"max_tokens": 0})],
)
def test_bad_input_is_a_user_error(tiny, prompts, kwargs):
    model, tokenizer = tiny
    with pytest.raises(MlxLlamaError):
        batch_generate(model, tokenizer, prompts, **kwargs)
