"""mlx_llama.evaluate on tiny random checkpoints: every number against a float64 numpy computation
from the same logits, the properties a comparison must have, dequantization, evaluation through a
KV cache, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

try:
    from .tiny import config_dims, random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import config_dims, random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, load
from mlx_llama.evaluate import ThroughKVCache, default_eval_text, dequantize_model, evaluate

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
W = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """dir name -> model directory: the float32 original and 4- and 8-bit uniform quantizations."""
    root = tmp_path_factory.mktemp("eval")
    config = tiny_config(tie_word_embeddings=True)  # the embedding is the head too, as in SmolLM2
    hf = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=5))
    dirs = {"f32": convert(str(hf), str(root / "f32"), progress=False)}
    for bits in (4, 8):
        out = str(root / f"q{bits}")
        q = dict(quantize=True, q_bits=bits, q_group_size=32, q_recipe="uniform")
        dirs[f"q{bits}"] = convert(str(hf), out, progress=False, **q)
    return dirs


@pytest.fixture(scope="module")
def models(tiny):
    return {k: load(str(d))[0] for k, d in tiny.items()}


def tokens_for(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 320, size=n).tolist()


def logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def numpy_stats(model, tokens, window, reference=None) -> dict:
    """The same quantities, in float64 numpy from each window's float32 logits."""
    nll, ref_nll, kl, top1, err2, ref2, n = 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0
    for i in range(0, len(tokens), window):
        w = tokens[i : i + window]
        if len(w) < 2:
            continue
        lg = np.array(model(mx.array([w]))[0]).astype(np.float64)[:-1]
        logp = lg - logsumexp(lg)
        rows = np.arange(len(w) - 1)
        nll -= logp[rows, w[1:]].sum()
        n += len(w) - 1
        if reference is not None:
            rl = np.array(reference(mx.array([w]))[0]).astype(np.float64)[:-1]
            rlogp = rl - logsumexp(rl)
            ref_nll -= rlogp[rows, w[1:]].sum()
            kl += (np.exp(rlogp) * (rlogp - logp)).sum()
            top1 += (lg.argmax(-1) == rl.argmax(-1)).sum()
            err2 += ((lg - rl) ** 2).sum()
            ref2 += (rl**2).sum()
    out = {"tokens": n, "nll": nll / n, "perplexity": np.exp(nll / n)}
    if reference is not None:
        out |= {"kl": kl / n, "top1": top1 / n, "rel_logit_error": np.sqrt(err2 / ref2)}
        out |= {"reference_nll": ref_nll / n, "reference_perplexity": np.exp(ref_nll / n)}
    return out


# A short last window is kept, one of a single token dropped. At 8 bits the KL is ~4e-4: float32
# must not lose it to cancellation.
@pytest.mark.parametrize("name, n_tokens", [("q4", 2 * W + 7), ("q8", 2 * W + 1)])
def test_numbers_match_numpy(models, name, n_tokens):
    tokens = tokens_for(n_tokens)
    r = evaluate(models[name], tokens, window=W, reference=models["f32"], progress=False)
    want = numpy_stats(models[name], tokens, W, reference=models["f32"])
    assert r.tokens == want["tokens"] == (2 * (W - 1) + (6 if n_tokens == 2 * W + 7 else 0))
    for key, value in want.items():
        assert getattr(r, key) == pytest.approx(value, rel=RTOL), key
    assert r.seconds > 0 and r.tokens_per_s > 0


def test_without_reference(models):
    tokens = tokens_for(3 * W, seed=1)
    r = evaluate(models["f32"], tokens, window=W, progress=False)
    want = numpy_stats(models["f32"], tokens, W)
    assert r.nll == pytest.approx(want["nll"], rel=RTOL) and r.perplexity == pytest.approx(want["perplexity"], rel=RTOL)
    assert r.kl is None and r.top1 is None and r.rel_logit_error is None


def test_model_against_itself(models):
    r = evaluate(models["q8"], tokens_for(2 * W, seed=2), window=W, reference=models["q8"], progress=False)
    assert abs(r.kl) < 1e-6 and r.top1 == 1.0 and r.rel_logit_error == 0.0
    assert r.reference_perplexity == r.perplexity


def test_more_bits_hurt_less(models):
    tokens = tokens_for(4 * W, seed=3)
    q4, q8 = (evaluate(models[k], tokens, window=W, reference=models["f32"], progress=False) for k in ("q4", "q8"))
    assert q8.kl < q4.kl and q8.rel_logit_error < q4.rel_logit_error
    assert q8.top1 >= q4.top1


def test_bad_input(models, tmp_path):
    with pytest.raises(MlxLlamaError, match="at least 2"):
        evaluate(models["f32"], tokens_for(10), window=1, progress=False)
    with pytest.raises(MlxLlamaError, match="too few"):
        evaluate(models["f32"], tokens_for(1), window=W, progress=False)
    config = tiny_config(vocab_size=384)
    hf = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config, seed=6))
    other, _ = load(str(convert(str(hf), str(tmp_path / "mlx"), progress=False)))
    with pytest.raises(MlxLlamaError, match="384"):
        evaluate(models["f32"], tokens_for(W), window=W, reference=other, progress=False)


def test_dequantize_model_same_logits(tiny):
    quantized, _ = load(str(tiny["q4"]))
    x = mx.array([tokens_for(W, seed=4)])
    want = np.array(quantized(x)).astype(np.float64)
    model = dequantize_model(load(str(tiny["q4"]))[0])
    got = np.array(model(x)).astype(np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    kinds = {type(m) for _, m in model.named_modules()}
    assert not kinds & {nn.QuantizedLinear, nn.QuantizedEmbedding}
    assert nn.Linear in kinds and nn.Embedding in kinds


def test_default_text():
    text, source = default_eval_text()
    assert (text, source) == default_eval_text()
    assert len(text) > 12_000
    assert "Python" in source and "argparse" in source


def run_cli(*args):
    cmd = [sys.executable, "-m", "mlx_llama.evaluate", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_json(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    args = ["--reference", tiny["f32"], "--text", text, "--window", W, "--dequantize", "--json"]
    proc = run_cli("--model", tiny["q4"], *args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    keys = ("tokens", "nll", "perplexity", "kl", "top1", "rel_logit_error", "seconds", "tokens_per_s", "text_source")
    assert set(keys) <= set(out), set(keys) - set(out)
    assert out["dequantized"] is True and out["tokens"] > 0 and out["kl"] > 0

    proc = run_cli("--model", tiny["q4"], *args[:-1])  # the same as text
    assert proc.returncode == 0, proc.stderr
    for line in ("perplexity:", "reference perplexity:", "KL(reference || model):", "top-1 agreement:", "dequantized"):
        assert line in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--text", "/nonexistent/text.txt"], ["/nonexistent/text.txt", "no such"]),
        (["--window", "1"], ["--window", "at least 2"]),
        (["--window", "64", "--max-tokens", "50"], ["50 tokens", "fewer than one window"]),
    ],
)
def test_cli_user_errors(tiny, args, words):
    proc = run_cli("--model", tiny["f32"], *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# Through a KV cache. The tiny models above have head_dim 16, too small for a quantized cache
# (groups of at least 32 along head_dim): these have 2 query heads of 32 sharing one KV head.

KV_CONFIG = tiny_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
KV_W = 64  # several chunks per window


@pytest.fixture(scope="module")
def kv_tiny(tmp_path_factory):
    """storage dtype -> model directory of the same random weights, stored as float32 and as bf16."""
    assert config_dims(KV_CONFIG)[2] == 32
    root = tmp_path_factory.mktemp("eval_kv")
    weights = random_weights(KV_CONFIG, seed=7)
    dirs = {}
    for dtype in ("float32", "bfloat16"):
        hf = write_hf_checkpoint(root / f"hf-{dtype}", KV_CONFIG, weights, dtype=dtype)
        dirs[dtype] = convert(str(hf), str(root / dtype), progress=False)
    return dirs


@pytest.fixture(scope="module")
def kv_models(kv_tiny):
    return {k: load(str(d))[0] for k, d in kv_tiny.items()}


def float_cache(model, chunk=16):
    """The reference for KV-storage comparisons: the same model through a float32 cache."""
    return ThroughKVCache(model, kv_dtype="float32", chunk=chunk)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_float32_kv_cache_is_the_plain_forward(kv_models, stored):
    # Even for a bf16 checkpoint (whose default cache is bf16): float32 storage loses nothing.
    model, tokens = kv_models[stored], tokens_for(3 * KV_W + 9, seed=10)
    plain = evaluate(model, tokens, window=KV_W, progress=False)
    cached = evaluate(model, tokens, window=KV_W, reference=model, progress=False, kv_dtype="float32", kv_chunk=16)
    assert cached.tokens == plain.tokens == 3 * (KV_W - 1) + 8
    assert cached.perplexity == pytest.approx(plain.perplexity, rel=RTOL)
    assert abs(cached.kl) < 1e-7 and cached.top1 == 1.0 and cached.rel_logit_error < 1e-5


def test_chunk_size_does_not_change_a_float_cache(kv_models):
    model, tokens = kv_models["float32"], tokens_for(2 * KV_W, seed=11)
    want = evaluate(model, tokens, window=KV_W, progress=False).perplexity
    for chunk in (1, 7, 16, KV_W, 1000):  # one token at a time, ragged, even, the whole window, more
        r = evaluate(model, tokens, window=KV_W, progress=False, kv_dtype="float32", kv_chunk=chunk)
        assert r.perplexity == pytest.approx(want, rel=RTOL), chunk


def test_chunk_size_does_not_change_a_quantized_cache(kv_models):
    # Groups run along head_dim, one position at a time, and each chunk reads its own keys back as
    # stored: decoding token by token sees the rounding that a 64-token chunk does.
    model, tokens = kv_models["bfloat16"], tokens_for(2 * KV_W, seed=15)
    runs = [
        evaluate(model, tokens, window=KV_W, progress=False, kv_bits=4, kv_group_size=32, kv_chunk=chunk)
        for chunk in (1, 16, KV_W)
    ]
    assert runs[0].perplexity != evaluate(model, tokens, window=KV_W, progress=False).perplexity
    for r in runs[1:]:
        assert r.perplexity == pytest.approx(runs[0].perplexity, rel=RTOL)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_quantized_kv_cache_costs_more_at_4_bits(kv_models, stored):
    model, tokens = kv_models[stored], tokens_for(3 * KV_W, seed=12)
    ref = float_cache(model)
    q8, q4 = (
        evaluate(model, tokens, window=KV_W, reference=ref, progress=False, kv_bits=bits, kv_group_size=32, kv_chunk=16)
        for bits in (8, 4)
    )
    assert 0 < q8.kl < q4.kl, (q8.kl, q4.kl)
    assert q8.rel_logit_error < q4.rel_logit_error and q8.top1 >= q4.top1
    assert q4.kl > 1e-3  # 4-bit keys move this model's distributions visibly
    plain = evaluate(model, tokens, window=KV_W, progress=False)
    assert q8.reference_perplexity == pytest.approx(plain.perplexity, rel=RTOL)


def test_stored_kv_dtype_rounds_only_a_16_bit_checkpoint(kv_models):
    tokens = tokens_for(2 * KV_W, seed=13)
    # float32 checkpoint: the stored dtype is float32, nothing is rounded.
    f32 = kv_models["float32"]
    same = evaluate(f32, tokens, window=KV_W, reference=float_cache(f32), progress=False, kv_dtype="stored")
    assert abs(same.kl) < 1e-7 and same.top1 == 1.0
    # bf16 checkpoint: keys and values are kept in bf16 (the default for generation), a small cost.
    bf16 = kv_models["bfloat16"]
    assert bf16.kv_dtype == mx.bfloat16
    r = evaluate(bf16, tokens, window=KV_W, reference=float_cache(bf16), progress=False, kv_dtype="stored")
    assert 0 < r.kl < 1e-3 and r.rel_logit_error > 1e-5
    # The default storage is the stored one.
    assert evaluate(bf16, tokens, window=KV_W, progress=False, kv_chunk=16).perplexity == r.perplexity


def test_kv_cache_with_dequantized_model(kv_tiny, tmp_path):
    hf = write_hf_checkpoint(tmp_path / "hf", KV_CONFIG, random_weights(KV_CONFIG, seed=7))
    q, _ = load(str(convert(str(hf), str(tmp_path / "q8"), progress=False, quantize=True, q_bits=8, q_group_size=32)))
    tokens = tokens_for(2 * KV_W, seed=14)
    want = evaluate(q, tokens, window=KV_W, progress=False, kv_bits=8, kv_group_size=32)
    got = evaluate(dequantize_model(q), tokens, window=KV_W, progress=False, kv_bits=8, kv_group_size=32)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-4)


def test_kv_bad_settings(models, kv_models):
    tokens = tokens_for(W)
    with pytest.raises(MlxLlamaError, match="head_dim 16"):
        evaluate(models["f32"], tokens, window=W, progress=False, kv_bits=8)
    model = kv_models["float32"]
    for kwargs, words in [
        (dict(kv_bits=5), "kv_bits must be 4 or 8"),
        (dict(kv_bits=8, kv_group_size=48), "kv_group_size must be one of"),
        (dict(kv_dtype="float16"), "kv_dtype must be one of"),
        (dict(kv_chunk=0), "positive number of tokens"),
    ]:
        with pytest.raises(MlxLlamaError, match=words):
            evaluate(model, tokens, window=W, progress=False, **kwargs)


def test_cli_kv_json(kv_tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    base = ["--model", kv_tiny["bfloat16"], "--reference", kv_tiny["bfloat16"], "--text", text, "--window", KV_W]
    runs = {}
    for name, extra in [
        ("none", []),
        ("f32", ["--kv-dtype", "float32", "--kv-chunk", "16"]),
        ("q8", ["--kv-bits", "8", "--kv-group-size", "32"]),
    ]:
        proc = run_cli(*base, *extra, "--json")
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(proc.stdout)
    assert "kv_cache" not in runs["none"]  # without the options, the output is as before
    assert runs["f32"]["kv_cache"]["stores"] == "float32, chunks of 16"
    assert runs["f32"]["perplexity"] == pytest.approx(runs["none"]["perplexity"], rel=RTOL)
    assert abs(runs["f32"]["kl"]) < 1e-7
    assert runs["q8"]["kv_cache"]["stores"] == "8-bit groups of 32 (scales in float32), chunks of 64"
    assert runs["q8"]["kl"] > 0 and runs["q8"]["kv_cache"]["kv_bits"] == 8

    proc = run_cli(*base, "--kv-bits", "4", "--kv-group-size", "32")  # as text
    assert proc.returncode == 0, proc.stderr
    assert "KV cache (model only, the reference runs without): 4-bit groups of 32" in proc.stdout, proc.stdout


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--kv-bits", "5"], ["--kv-bits", "invalid choice", "5"]),
        (["--kv-bits", "eight"], ["--kv-bits", "eight"]),
        (["--kv-bits", "8", "--kv-group-size", "48"], ["--kv-group-size", "48"]),
        (["--kv-dtype", "float16"], ["--kv-dtype", "float16"]),
        (["--kv-chunk", "0"], ["--kv-chunk", "at least 1"]),
        (["--kv-group-size", "32"], ["--kv-group-size needs --kv-bits"]),
    ],
)
def test_cli_kv_flag_errors(kv_tiny, args, words):
    proc = run_cli("--model", kv_tiny["float32"], *args)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    for w in words:
        assert w in line, line


def test_cli_kv_bits_needs_groupable_head_dim(tiny):
    proc = run_cli("--model", tiny["f32"], "--kv-bits", "8", "--window", "8", "--max-tokens", "64")
    assert proc.returncode == 1, proc.stderr
    assert "head_dim 16" in one_line_error(proc)
