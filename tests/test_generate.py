"""Generation and sampling: samplers against numpy, greedy decoding against the full forward pass,
stop conditions, reproducible seeds, and the KV cache growing past its step size."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, generate, load, stream_generate
from mlx_llama.cache import KVCache
from mlx_llama.generate import generate_step
from mlx_llama.sample import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    config = tiny_config()
    hf = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=11))
    return load(str(convert(str(hf), str(root / "mlx"), progress=False)))


def logprobs_np(rng, v=50):
    x = rng.normal(size=(1, v)) * 2
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kept(filtered) -> set:
    return set(np.nonzero(np.isfinite(np.array(filtered)[0]))[0].tolist())


def test_top_k_keeps_the_k_largest():
    lp = logprobs_np(np.random.default_rng(0))
    assert kept(apply_top_k(mx.array(lp, dtype=mx.float32), 5)) == set(np.argsort(-lp[0])[:5].tolist())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_nucleus(p):
    lp = logprobs_np(np.random.default_rng(1))
    order = np.argsort(-lp[0])
    mass = np.cumsum(np.exp(lp[0][order]))
    n = int(np.searchsorted(mass, p) + 1)  # first prefix whose mass reaches p
    assert kept(apply_top_p(mx.array(lp, dtype=mx.float32), p)) == set(order[:n].tolist())


def test_min_p_threshold_is_relative_to_the_top_token():
    lp = logprobs_np(np.random.default_rng(2))
    probs = np.exp(lp[0])
    expect = set(np.nonzero(probs >= 0.2 * probs.max())[0].tolist())
    assert kept(apply_min_p(mx.array(lp, dtype=mx.float32), 0.2)) == expect


def test_sampling_follows_the_distribution_and_the_seed():
    lp = mx.array(np.log([[0.7, 0.2, 0.1]]), dtype=mx.float32)
    sampler = make_sampler(temp=1.0)
    mx.random.seed(7)
    draws = np.array([sampler(lp).item() for _ in range(2000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.04)
    mx.random.seed(7)
    again = np.array([sampler(lp).item() for _ in range(2000)])
    assert (draws == again).all()
    # Low temperature sharpens towards the mode.
    cold = make_sampler(temp=0.05)
    assert all(cold(lp).item() == 0 for _ in range(50))


def test_repetition_penalty_discourages_seen_tokens():
    (proc,) = make_logits_processors(2.0)
    logits = mx.array([[1.0, -1.0, 2.0, 3.0]])
    out = np.array(proc(mx.array([0, 1], dtype=mx.uint32), logits))
    assert np.allclose(out, [[0.5, -2.0, 2.0, 3.0]])


def test_greedy_decoding_equals_argmax_of_full_forward(tiny):
    model, _ = tiny
    prompt = [1, 40, 41, 42, 43]
    tokens = [t for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=8)]
    seq = list(prompt)
    for t in tokens:  # recompute each step from scratch, no cache
        logits = model(mx.array([seq]))[0, -1]
        assert t == int(mx.argmax(logits).item())
        seq.append(t)


def test_chunked_prefill_gives_the_same_tokens(tiny):
    model, _ = tiny
    prompt = mx.array(list(range(3, 40)), dtype=mx.uint32)
    a = [t for t, _ in generate_step(prompt, model, max_tokens=6, prefill_step_size=512)]
    b = [t for t, _ in generate_step(prompt, model, max_tokens=6, prefill_step_size=5)]
    assert a == b


def test_logprobs_are_normalized(tiny):
    model, _ = tiny
    _, lp = next(generate_step(mx.array([1, 5], dtype=mx.uint32), model, max_tokens=1))
    assert math.isclose(float(mx.logsumexp(lp).item()), 0.0, abs_tol=1e-5)


def test_stream_text_equals_decode_and_respects_max_tokens(tiny):
    model, tokenizer = tiny
    tokenizer.eos_token_ids = set()  # no early stop: exercise the length limit
    records = list(stream_generate(model, tokenizer, "hello there", max_tokens=7))
    assert len(records) == 7 and records[-1].finish_reason == "length"
    assert "".join(r.text for r in records) == tokenizer.decode([r.token for r in records])
    assert [r.generation_tokens for r in records] == list(range(1, 8))
    assert records[-1].prompt_tokens == len(tokenizer.encode("hello there"))


def test_stops_at_any_eos_id_without_showing_it(tiny):
    model, tokenizer = tiny
    tokenizer.eos_token_ids = set()
    free = [r.token for r in stream_generate(model, tokenizer, "hello", max_tokens=6)]
    tokenizer.eos_token_ids = {free[3], 99999}  # the 4th token becomes a stop token
    records = list(stream_generate(model, tokenizer, "hello", max_tokens=6))
    assert [r.token for r in records] == free[: free.index(free[3]) + 1]
    assert records[-1].finish_reason == "stop"
    assert "".join(r.text for r in records) == tokenizer.decode(free[: free.index(free[3])])


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    tokenizer.eos_token_ids = set()
    runs = []
    for _ in range(2):
        mx.random.seed(123)
        runs.append(generate(model, tokenizer, "abc", max_tokens=10, sampler=make_sampler(temp=1.0, top_p=0.9)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_tokens_is_a_user_error(tiny, bad):
    model, tokenizer = tiny
    with pytest.raises(MlxLlamaError, match="max_tokens"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=bad))


def test_empty_prompt_is_a_user_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(MlxLlamaError, match="empty"):
        list(stream_generate(model, tokenizer, "", max_tokens=3))


def test_kv_cache_grows_in_steps_and_keeps_its_contents():
    cache = KVCache()
    cache.step = 4
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=(1, 2, n, 3)).astype(np.float32) for n in (3, 1, 1, 6, 1)]
    sizes = []
    for c in chunks:
        k, v = cache.update_and_fetch(mx.array(c), mx.array(-c))
        sizes.append(cache.keys.shape[2])
    expect = np.concatenate(chunks, axis=2)
    assert cache.offset == 12 and k.shape == (1, 2, 12, 3)
    assert np.array_equal(np.array(k), expect) and np.array_equal(np.array(v), -expect)
    # Capacity is always whole steps and grows only when a chunk does not fit.
    assert sizes == [4, 4, 8, 12, 12]


def test_compiled_and_eager_steps_give_identical_tokens(tiny):
    """The compiled kernels (swiglu in every MLP, log-softmax per step) compute what the eager ops
    do: same tokens, log-probabilities equal to float32 rounding, sampled too (same seed)."""
    from mlx_llama.model import swiglu
    from mlx_llama.sample import log_softmax

    model, _ = tiny
    prompt = mx.array([1, 40, 41, 42, 43], dtype=mx.uint32)

    def run(temp):
        mx.random.seed(3)
        out = list(generate_step(prompt, model, max_tokens=10, sampler=make_sampler(temp=temp)))
        return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out])

    compiled = {temp: run(temp) for temp in (0.0, 0.9)}
    mx.disable_compile()
    try:
        eager = {temp: run(temp) for temp in (0.0, 0.9)}
        g, u = mx.random.normal((3, 7)), mx.random.normal((3, 7))
        eager_glue = (np.array(swiglu(g, u)), np.array(log_softmax(g)))
    finally:
        mx.enable_compile()
    for temp in compiled:
        assert compiled[temp][0] == eager[temp][0]
        np.testing.assert_allclose(compiled[temp][1], eager[temp][1], rtol=1e-5, atol=1e-5)
    # Both paths against plain numpy, so neither can be wrong in the same way.
    gn, un = np.array(g, dtype=np.float64), np.array(u, dtype=np.float64)
    want_swiglu = gn / (1 + np.exp(-gn)) * un
    want_lsm = gn - np.log(np.exp(gn).sum(-1, keepdims=True))
    for got, want in ((np.array(swiglu(g, u)), want_swiglu), (eager_glue[0], want_swiglu),
                      (np.array(log_softmax(g)), want_lsm), (eager_glue[1], want_lsm)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
