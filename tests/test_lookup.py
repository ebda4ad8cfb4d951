"""Prompt-lookup decoding: the draft search, and the generated tokens, logprobs and KV cache
against plain greedy ``generate_step`` on a tiny random model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, load
from mlx_llama.cache import KVCache
from mlx_llama.generate import generate_step
from mlx_llama.lookup import LookupStats, find_draft, lookup_generate_step

RANDOM = [1, 40, 41, 42, 43]  # the greedy continuation wanders before it settles: drafts get rejected
COUNTING = list(range(3, 60))  # its greedy continuation falls into a 4-token loop (for a while)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lookup")
    config = tiny_config()
    hf = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=11))
    return load(str(convert(str(hf), str(root / "mlx"), progress=False)))[0]


def greedy(model, prompt, n, cache=None):
    return [(t, lp) for t, lp in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=n, cache=cache)]


def lookup(model, prompt, n, cache=None, **kwargs):
    stats = LookupStats()
    prompt = mx.array(prompt, dtype=mx.uint32)
    out = list(lookup_generate_step(prompt, model, max_tokens=n, cache=cache, stats=stats, **kwargs))
    return out, stats


@pytest.fixture(scope="module")
def looping(model):
    """A prompt whose greedy continuation mostly repeats what it ends with: many drafts are right."""
    loop = [t for t, _ in greedy(model, COUNTING, 30)]
    assert loop[-8:-4] == loop[-4:], "the tiny model no longer loops; pick another prompt"
    return COUNTING + loop


def test_find_draft_takes_the_longest_ngram_and_its_latest_occurrence():
    #         0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    # "2 6 7" never occurred before, "6 7" did, at 1 and 5: the latest (5) is followed by 1, 2, 6, 7.
    assert find_draft(tokens, ngram_max=3, num_draft=10) == [1, 2, 6, 7]
    assert find_draft(tokens, ngram_max=3, num_draft=2) == [1, 2]
    # The longest n-gram wins over a later match of a shorter one.
    assert find_draft([9, 6, 7, 4, 1, 6, 7, 5, 9, 6, 7], ngram_max=3, num_draft=3) == [4, 1, 6]
    assert find_draft([9, 6, 7, 4, 1, 6, 7, 5, 9, 6, 7], ngram_max=2, num_draft=3) == [5, 9, 6]
    # Only 1-grams match; with ngram_min = 2 nothing does.
    assert find_draft([3, 4, 5, 4], ngram_max=3, num_draft=5) == [5, 4]
    assert find_draft([3, 4, 5, 4], ngram_max=3, ngram_min=2, num_draft=5) == []
    assert find_draft([1, 2, 3], num_draft=5) == [] and find_draft([7], num_draft=5) == []
    # A run of one token: the latest earlier occurrence is the one just before the last.
    assert find_draft([8, 8, 8, 8], ngram_max=2, num_draft=5) == [8]
    assert find_draft([1, 2, 1, 2], ngram_max=3, num_draft=0) == []


@pytest.mark.parametrize(
    "kwargs", [{}, {"ngram_max": 1}, {"ngram_min": 2, "ngram_max": 4, "num_draft": 3}, {"num_draft": 1}]
)
@pytest.mark.parametrize("which", ["random", "counting", "looping", "short"])
def test_same_tokens_and_logprobs_as_greedy(model, looping, which, kwargs):
    prompt = {"random": RANDOM, "counting": COUNTING, "looping": looping, "short": [7]}[which]
    want = greedy(model, prompt, 40)
    got, stats = lookup(model, prompt, 40, **kwargs)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a.shape == b.shape == (model.args.vocab_size,)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    assert math.isclose(float(mx.logsumexp(got[-1][1]).item()), 0.0, abs_tol=1e-5)
    assert stats.generated == 40 and stats.accepted <= stats.drafted
    # Each pass yields its accepted drafts plus the model's own token.
    assert stats.forward_passes + stats.accepted == 40


class Successor:
    """A stand-in model whose greedy choice after token t is (t + 1) mod 10, through a real KV cache:
    on a counting prompt every draft copied from the context is right, so the number of passes is
    known in advance."""

    args = SimpleNamespace(vocab_size=12)

    def make_cache(self, **kwargs):
        return [KVCache()]

    def __call__(self, tokens, cache=None):
        if cache is not None:
            k = tokens[:, None, :, None].astype(mx.float32)  # (B, 1, T, 1)
            cache[0].update_and_fetch(k, k)
        return 5.0 * (mx.arange(12) == ((tokens[..., None] + 1) % 10)).astype(mx.float32)


def test_drafts_are_accepted_when_the_output_repeats_and_rejected_when_it_does_not(model, looping):
    _, stats = lookup(model, looping, 40)
    assert stats.acceptance_rate > 0.3
    _, stats = lookup(model, RANDOM, 40)
    assert 0 < stats.accepted < stats.drafted
    _, stats = lookup(Successor(), list(range(10)) * 2, 40)
    assert stats.drafted > 0 and stats.accepted == stats.drafted and stats.acceptance_rate == 1.0
    assert stats.forward_passes == math.ceil(40 / 11)  # 10 drafts + 1 per pass


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 11, 12, 23])
def test_stops_exactly_at_max_tokens(model, looping, n):
    want = [t for t, _ in greedy(model, looping, n)]
    got, stats = lookup(model, looping, n)
    assert [t for t, _ in got] == want and stats.generated == n
    # Drafts are cut to what max_tokens leaves room for: with every draft right, n tokens take
    # ceil(n / 11) passes, and the last one ends inside what would have been a longer draft.
    fake, prompt = Successor(), list(range(10)) * 2
    cache = fake.make_cache()
    got, stats = lookup(fake, prompt, n, cache=cache)
    assert [t for t, _ in got] == [t for t, _ in greedy(fake, prompt, n)] == [i % 10 for i in range(n)]
    assert stats.forward_passes == math.ceil(n / 11)
    assert stats.drafted == stats.accepted == n - stats.forward_passes
    assert cache[0].offset == (len(prompt) + n - 1 if n else len(prompt) - 1)


def test_every_max_tokens_gives_a_prefix_of_the_same_output(model):
    full = [t for t, _ in greedy(model, COUNTING, 30)]
    for n in range(1, 31):
        got, _ = lookup(model, COUNTING, n, num_draft=4)
        assert [t for t, _ in got] == full[:n], n


@pytest.mark.parametrize("which", ["random", "looping"])
@pytest.mark.parametrize("n", [1, 9, 40])
def test_cache_matches_plain_greedy_afterwards(model, looping, which, n):
    prompt = RANDOM if which == "random" else looping
    plain_cache, lookup_cache = model.make_cache(), model.make_cache()
    greedy(model, prompt, n, cache=plain_cache)
    got, _ = lookup(model, prompt, n, cache=lookup_cache)
    # The prompt and every token but the last (which is yielded, not yet fed back).
    assert all(c.offset == len(prompt) + n - 1 for c in lookup_cache)
    assert [c.offset for c in lookup_cache] == [c.offset for c in plain_cache]
    for a, b in zip(lookup_cache, plain_cache):
        for x, y in zip(a.state, b.state):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-4)
    # Decoding can carry on from that cache: the last token fed back gives the next greedy token.
    nxt = model(mx.array([[got[-1][0]]], dtype=mx.uint32), lookup_cache)[0, -1]
    assert int(mx.argmax(nxt).item()) == greedy(model, prompt, n + 1)[-1][0]


def test_quantized_cache_gives_what_generate_step_gives_with_it(tmp_path):
    config = tiny_config(num_attention_heads=2, num_key_value_heads=1)  # head_dim 32: quantizable
    hf = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config, seed=3))
    model = load(str(convert(str(hf), str(tmp_path / "mlx"), progress=False)))[0]
    for prompt in (RANDOM, COUNTING):
        want = list(generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=30, kv_bits=8, kv_group_size=32))
        got, stats = lookup(model, prompt, 30, kv_bits=8, kv_group_size=32)
        assert [t for t, _ in got] == [t for t, _ in want] and stats.drafted > 0


def test_a_rotating_cache_is_refused(model):
    with pytest.raises(MlxLlamaError, match="rotating"):
        lookup(model, RANDOM, 5, cache=model.make_cache(max_kv_size=64))


def test_chunked_prefill_gives_the_same_tokens(model, looping):
    a, _ = lookup(model, looping, 20)
    b, _ = lookup(model, looping, 20, prefill_step_size=7)
    assert [t for t, _ in a] == [t for t, _ in b]


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": -1}, {"max_tokens": 1.5}, {"ngram_min": 0}, {"ngram_min": 3, "ngram_max": 2}]
)
def test_bad_arguments_are_user_errors(model, kwargs):
    with pytest.raises(MlxLlamaError):
        list(lookup_generate_step(mx.array([1, 2], dtype=mx.uint32), model, **kwargs))
    with pytest.raises(MlxLlamaError, match="empty"):
        list(lookup_generate_step(mx.array([], dtype=mx.uint32), model))
