"""mlx_llama.evaluate on tiny random checkpoints: every number against a float64 numpy computation
from the same logits, the properties a comparison must have, dequantization, and the CLI."""

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
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, load
from mlx_llama.evaluate import default_eval_text, dequantize_model, evaluate

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
