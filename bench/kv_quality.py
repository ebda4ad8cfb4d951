"""What the KV cache's storage costs in quality, on SmolLM2-135M-Instruct: float32, the model's
stored dtype (bf16), 8-bit and 4-bit keys/values, each as KL divergence against the same model read
through a float32 cache, plus perplexity and top-1 agreement.

    python bench/kv_quality.py                 # writes bench/results/kv_quality.md (+ .json)
    python bench/kv_quality.py --models bf16   # the bf16 model only

Every window is fed through a fresh cache 64 tokens at a time (``mlx_llama.evaluate.ThroughKVCache``),
as generation's prefill does, so each chunk attends to keys and values as the cache stores them
(its own included). The reference is the same model through a float32 cache: the computation
generation would do if the cache lost nothing. A row without a cache (each window whole) checks that
the reference is indeed the plain forward pass.

Only the cache is varied. What does not change the measured function is used for speed: the 4-bit
model's layers are dequantized to float32 (``dequantize_model``; the same weights), the bf16
model's matrices widened to float32 once instead of piece by piece at every call (the same values),
and on Linux OpenBLAS is preloaded when installed (MLX's wheel links the reference BLAS).
The models are read from bench/.work (shared with bench/speed.py), converted there if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import OPENBLAS, machine  # bench/common.py (the script's folder is on sys.path)

if sys.platform == "linux" and os.path.exists(OPENBLAS) and OPENBLAS not in os.environ.get("LD_PRELOAD", ""):
    os.environ["LD_PRELOAD"] = OPENBLAS  # must be set before the process starts: re-run ourselves
    os.execv(sys.executable, [sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_llama import convert, load  # noqa: E402
from mlx_llama.evaluate import ThroughKVCache, default_eval_text, dequantize_model, evaluate  # noqa: E402
from mlx_llama.smollm2 import smollm2_hf_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
# name -> (directory under bench/.work, convert() keyword arguments, label)
MODELS = {
    "bf16": ("smollm2-bfloat16", dict(dtype="bfloat16"), "bf16 weights (the export as stored)"),
    "4bit": ("smollm2-4bit", dict(quantize=True), "4-bit default recipe (-q), 4.91 bits/weight"),
}
# (label, ThroughKVCache keyword arguments); None: no cache, each window run whole.
ROWS = [
    ("KV float32 (reference)", dict(kv_dtype="float32")),
    ("no cache, whole window (check)", None),
    ("KV bf16 (stored dtype; generation's default)", dict(kv_dtype="stored")),
    ("KV 8-bit g64 (--kv-bits 8)", dict(kv_bits=8, kv_group_size=64)),
    ("KV 4-bit g64 (--kv-bits 4)", dict(kv_bits=4, kv_group_size=64)),
]
EXTRA_ROWS = [  # --extra: smaller groups for the 4-bit cache
    ("KV 4-bit g32 (--kv-bits 4 --kv-group-size 32)", dict(kv_bits=4, kv_group_size=32)),
]


class Remembered:
    """A model whose logits are computed once per window and then replayed: the reference is read
    by every row, and recomputing it each time would double the run."""

    def __init__(self, model):
        self.model, self.args, self._seen = model, model.args, {}

    def __call__(self, x: mx.array) -> mx.array:
        key = tuple(x.reshape(-1).tolist())
        if key not in self._seen:
            self._seen[key] = self.model(x)
        return self._seen[key]


def model_dir(name: str) -> Path:
    sub, kwargs, _ = MODELS[name]
    out = HERE / ".work" / sub
    if not (out / "config.json").exists():
        print(f"converting SmolLM2 to {out} ...", flush=True)
        convert(str(smollm2_hf_dir()), str(out), progress=False, **kwargs)
    return out


def widen_weights(model: nn.Module) -> nn.Module:
    """Float matrices cast to float32 once: the upcasting layers then multiply directly instead of
    widening their 16-bit weights piece by piece at every call. The same values, so the same
    function; the cache's dtype (model.kv_dtype, set at load) is untouched."""
    for _, m in model.named_modules():
        w = m.get("weight") if isinstance(m, (nn.Linear, nn.Embedding)) else None
        if isinstance(w, mx.array) and mx.issubdtype(w.dtype, mx.floating) and w.dtype != mx.float32:
            m.weight = w.astype(mx.float32)
    mx.eval(model.parameters())
    return model


def kv_bytes_per_token(model, kwargs):
    """Bytes the cache holds per position, over all layers, measured on a cache filled with 512
    positions (a whole number of its growth steps); None without a cache."""
    if kwargs is None:
        return None
    a = model.args
    cache = model.make_cache(**ThroughKVCache(model, **kwargs).cache_kwargs)
    kv = mx.zeros((1, a.num_key_value_heads, 512, a.head_dim), mx.float32)
    for c in cache:
        c.update_and_fetch(kv, kv)
    return sum(c.nbytes for c in cache) / 512


def measure(name: str, tokens: list[int], window: int, chunk: int, rows: list) -> dict:
    path = model_dir(name)
    model, _ = load(str(path))
    info = dict(name=name, label=MODELS[name][2], path=str(path), stored_dtype=str(model.stored_dtype),
                compute_dtype=str(model.compute_dtype), kv_dtype=str(model.kv_dtype))
    model = dequantize_model(model) if model.args.quantization else widen_weights(model)
    reference = Remembered(ThroughKVCache(model, kv_dtype="float32", chunk=chunk))
    results = []
    for label, kwargs in rows:
        t0 = time.time()
        if kwargs is None:
            under_test = model
        elif kwargs == ROWS[0][1]:
            under_test = reference  # the reference row: computed here, replayed for the others
        else:
            under_test = ThroughKVCache(model, chunk=chunk, **kwargs)
        r = evaluate(under_test, tokens, window=window, reference=reference, progress=False)
        run = under_test.model if under_test is reference else under_test
        stores = run.describe() if isinstance(run, ThroughKVCache) else None
        row = dict(label=label, kv=kwargs, stores=stores, perplexity=r.perplexity, nll=r.nll, kl=r.kl,
                   top1=r.top1, rel_logit_error=r.rel_logit_error, tokens=r.tokens,
                   kv_bytes_per_token=kv_bytes_per_token(model, kwargs), seconds=time.time() - t0)
        results.append(row)
        print(json.dumps({"model": name, **row}), flush=True)
    return {**info, "rows": results}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64, help="tokens fed to the cache per step (default 64)")
    ap.add_argument("--extra", action="store_true", help="also a 4-bit cache with groups of 32")
    ap.add_argument("--out", default=str(HERE / "results" / "kv_quality.md"))
    ap.add_argument("--from-json", help="rewrite the table from a saved kv_quality.json instead of measuring")
    args = ap.parse_args()
    if args.from_json:
        return write_report(Path(args.out), json.loads(Path(args.from_json).read_text()))

    text, source = default_eval_text()
    tokenizer = load(str(model_dir(args.models[0])))[1]  # all the models share SmolLM2's tokenizer
    tokens = tokenizer.encode(text, add_bos=False)[: args.tokens]
    rows = ROWS + (EXTRA_ROWS if args.extra else [])
    saved = dict(
        date=time.strftime("%Y-%m-%d"), machine=machine(), source=source, tokens=len(tokens),
        window=args.window, chunk=args.chunk, models=[],
    )
    for name in args.models:
        saved["models"].append(measure(name, tokens, args.window, args.chunk, rows))
        write_report(Path(args.out), saved)  # after each model, so a long run keeps what it has


def write_report(path: Path, saved: dict) -> None:
    m = saved["machine"]
    lines = [
        "# KV cache storage: quality cost on SmolLM2-135M-Instruct",
        "",
        f"Written by `python bench/kv_quality.py` on {saved['date']}: {m['platform']}, {m['cpus']} CPUs, "
        f"Python {m['python']}, mlx {m['mlx']}, device {m['device']}, fast BLAS loaded: {m['fast_blas']}.",
        f"Evaluation: {saved['tokens']} tokens in windows of {saved['window']} from the {saved['source']}.",
        f"Each window goes through a fresh KV cache {saved['chunk']} tokens at a time, as generation's prefill",
        "feeds it. KL is KL(reference || row) in nats per token, the reference being the same model through",
        "a float32 cache; top-1 is the share of positions whose most likely next token agrees with it.",
        "Bytes per token: what the cache holds per position over all 30 layers (keys and values).",
        "",
    ]
    for model in saved["models"]:
        lines += [
            f"## {model['label']}",
            "",
            f"`{Path(model['path']).name}` in bench/.work: weights stored as {short(model['stored_dtype'])}, "
            f"computed in {short(model['compute_dtype'])}; generation's KV cache dtype {short(model['kv_dtype'])}.",
            "",
            "| KV cache | stores | bytes/token | perplexity | KL vs float32 KV | top-1 | rel. logit error | time (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in model["rows"]:
            size = "-" if r["kv_bytes_per_token"] is None else f"{r['kv_bytes_per_token']:.0f}"
            lines.append(
                f"| {r['label']} | {r['stores'] or 'no cache'} | {size} | {r['perplexity']:.4f} | {r['kl']:.2e} "
                f"| {100 * r['top1']:.2f}% | {r['rel_logit_error']:.4f} | {r['seconds']:.0f} |"
            )
        lines.append("")
    lines += interpretation(saved)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def short(dtype: str) -> str:
    return dtype.rpartition(".")[2]  # "mlx.core.bfloat16" -> "bfloat16"


def interpretation(saved: dict) -> list:
    """Written by hand for the run of 2026-12-03 (kept here so that --from-json keeps it); a rerun on
    another machine or text should check that it still reads true."""
    return ["## Reading (written for the run of 2026-12-03)", "", *INTERPRETATION]


INTERPRETATION = """\
- The method measures the storage and nothing else: the float32 cache fed 64 tokens at a time gives
  the plain forward pass (KL 5e-12, logits within 6e-7 relative) on both models.
- **bf16 KV cache (generation's default: the cache follows the stored dtype): free in practice.**
  KL 3.6e-5 and 3.8e-5 nats/token, perplexity within 0.01%, top-1 99.5-99.6%, for half the bytes of
  float32. That is some 60x below the cost of 8-bit weights (KL 0.0022 over 4096 tokens in
  bench/results/quality.md).
- **8-bit KV (`--kv-bits 8`, g64): small.** KL 4.6e-4 to 5.1e-4, top-1 98.5-99.5%, perplexity within
  0.05%, at 28% of float32's bytes. Scales and biases stay float32: an earlier run of this benchmark
  kept them in bf16 (the cache's dtype) and measured 4x the KL (2.0e-3 and 1.7e-3, top-1 ~97.7%) for
  6% fewer bytes (12240 against 12960 per token), because bf16's 8 significant bits round a group's
  scale and minimum by about half an 8-bit step; the cache was changed after that run.
- **4-bit KV (`--kv-bits 4`): a real loss.** With groups of 64: KL 0.14-0.15, top-1 79-81%,
  perplexity +15% (16.21 -> 18.68 on bf16 weights, 18.17 -> 20.93 on the 4-bit model), more than the
  whole 4-bit default weight recipe costs (KL 0.090 in quality.md). Groups of 32 halve that (KL
  0.078-0.083, top-1 85-86%, perplexity +8-10%) for 20% more bytes (8640 against 7200): if a 4-bit
  cache is needed, use `--kv-group-size 32`.
- The cache's cost is about the same on the 4-bit model as on the bf16 one (each row is compared with
  the same model's float32 cache, so these KLs add to the weights' own cost rather than replace it).
- The chunk size does not matter: quantization groups run along head_dim, one position at a time, and
  each chunk reads its own keys back from the cache as stored, so decoding one token at a time sees the
  same rounding (checked on tiny models in tests/test_evaluate.py).
- Limits: 2048 tokens of one kind of text (English prose from docstrings), one small model with 64-wide
  heads; differences under ~10% between the two models' KLs, and perplexities that move by less than
  0.01%, are noise. This run shared the machine with a benchmark on the other core (one BLAS thread,
  lowest priority): the time column is not a speed figure.
""".splitlines()


if __name__ == "__main__":
    main()
