"""Quantization recipes on SmolLM2-135M-Instruct, measured: size, bits per weight, perplexity, KL
divergence and top-1 agreement against the float model, and the greedy answer to the France question.

    python bench/quality.py                    # writes bench/results/quality.md (the README's table)
    python bench/quality.py --tokens 1024      # quicker, noisier

Every row is converted from the same bf16 Hugging Face export (``python -m mlx_llama.smollm2``) by
our converter, except the last, which imports the GGUF's own Q4_1 tensors without re-quantizing.
Quality numbers are computed with quantized layers dequantized to float32 (the same function up to
float rounding; see ``mlx_llama.evaluate.dequantize_model``), because MLX's CPU quantized matmul is
~20x slower than an OpenBLAS float matmul for prompt-sized batches. The France answers come from the
quantized models themselves. On Linux, OpenBLAS is preloaded when installed (Debian:
libopenblas0-pthread): MLX's wheel links the reference BLAS, too slow to evaluate thousands of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
if sys.platform == "linux" and os.path.exists(OPENBLAS) and OPENBLAS not in os.environ.get("LD_PRELOAD", ""):
    os.environ["LD_PRELOAD"] = OPENBLAS  # must be set before the process starts: re-run ourselves
    os.execv(sys.executable, [sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_llama import convert, generate, load  # noqa: E402
from mlx_llama.evaluate import default_eval_text, dequantize_model, evaluate  # noqa: E402
from mlx_llama.smollm2 import smollm2_gguf_path, smollm2_hf_dir  # noqa: E402

QUESTIONS = ("What is the capital of France?", "What is the capital of France? Answer in one sentence.")
# (label, convert keyword arguments); None marks the GGUF import.
ROWS = [
    ("float (bf16 export, f32 compute)", {}),
    ("8-bit g64, uniform", dict(quantize=True, q_bits=8, q_group_size=64, q_recipe="uniform")),
    ("4-bit g64, uniform", dict(quantize=True, q_bits=4, q_group_size=64, q_recipe="uniform")),
    ("4-bit g32, uniform", dict(quantize=True, q_bits=4, q_group_size=32, q_recipe="uniform")),
    ("4-bit g32, embedding 8-bit (mixed)", dict(quantize=True, q_bits=4, q_group_size=32, q_recipe="mixed")),
    ("4-bit default (-q)", dict(quantize=True)),
    ("GGUF Q4_1 imported as is", None),
]


def weight_bytes(model_dir: Path) -> int:
    """Bytes of tensor data (file headers excluded)."""
    return sum(a.nbytes for f in model_dir.glob("*.safetensors") for a in mx.load(str(f)).values())


def answer(model, tokenizer, question: str) -> str:
    return generate(model, tokenizer, tokenizer.encode_chat(question), max_tokens=30).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.md"))
    ap.add_argument("--from-json", help="rewrite the table from a saved quality.json instead of measuring")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        return write_table(Path(args.out), saved["rows"], saved["source"], saved["tokens"], saved["window"])

    hf = smollm2_hf_dir()
    text, source = default_eval_text()
    work = Path(tempfile.mkdtemp(prefix="mlx-llama-quality-"))
    results = []
    reference = ref_tokens = n_params = None
    for label, kwargs in ROWS:
        out = work / f"m{len(results)}"
        t0 = time.time()
        if kwargs is None:
            convert(str(smollm2_gguf_path()), str(out), progress=False)
        else:
            convert(str(hf), str(out), progress=False, **kwargs)
        model, tokenizer = load(str(out))
        if reference is None:  # the first row is the float model everything is compared with
            reference, ref_tokens = model, tokenizer.encode(text, add_bos=False)[: args.tokens]
            n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        answers = [answer(model, tokenizer, q) for q in QUESTIONS]
        config = json.loads((out / "config.json").read_text())
        is_ref = model is reference
        r = evaluate(dequantize_model(model), ref_tokens, window=args.window,
                     reference=None if is_ref else reference, progress=False)
        size = weight_bytes(out)
        row = dict(label=label, size_mb=size / 1e6, bpw=8 * size / n_params, perplexity=r.perplexity,
                   kl=0.0 if is_ref else r.kl, top1=1.0 if is_ref else r.top1,
                   rel_logit_error=0.0 if is_ref else r.rel_logit_error, answers=answers,
                   quantization=config.get("quantization"), seconds=time.time() - t0)
        results.append(row)
        print(json.dumps(row), flush=True)

    write_table(Path(args.out), results, source, len(ref_tokens), args.window)


def summarize(q: dict) -> str:
    """The quantization entry with per-layer overrides folded into one line per module kind."""
    base = {k: v for k, v in q.items() if not k.startswith("model.layers.")}
    kinds = {}
    for k, v in q.items():
        if k.startswith("model.layers."):
            kinds.setdefault((k.split(".", 3)[3], json.dumps(v)), []).append(k)
    parts = [f"`{json.dumps(base)}`"]
    parts += [f"`{kind}` in {len(ks)} layers: `{v}`" for (kind, v), ks in sorted(kinds.items())]
    return "; ".join(parts)


def write_table(path: Path, results: list, source: str, tokens: int, window: int) -> None:
    lines = [
        "# Quantization quality on SmolLM2-135M-Instruct",
        "",
        f"Written by `python bench/quality.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"Python {platform.python_version()}, mlx {mx.__version__}, device {mx.default_device()}.",
        f"Evaluation: {tokens} tokens in windows of {window} from the {source}.",
        "KL is KL(float || model) in nats per token; top-1 is the share of positions whose most likely",
        "next token agrees with the float model's. Bits per weight count scales and biases, over all parameters.",
        "",
        "| model | size (MB) | bits/weight | perplexity | KL vs float | top-1 | rel. logit error "
        f"| \"{QUESTIONS[0]}\" | \"{QUESTIONS[1]}\" |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        a0, a1 = (x.replace("|", "\\|").replace("\n", " ") for x in r["answers"])
        lines.append(
            f"| {r['label']} | {r['size_mb']:.1f} | {r['bpw']:.2f} | {r['perplexity']:.2f} | {r['kl']:.4f} "
            f"| {100 * r['top1']:.1f}% | {r['rel_logit_error']:.3f} | {a0} | {a1} |"
        )
    lines += [
        "",
        "Caveat: the float model here is the bf16 export of the Q4_1 GGUF, the only copy of SmolLM2 we can",
        "obtain offline. Its linear layers therefore already lie on a 4-bit grid with groups of 32 (and the",
        "embedding on an 8-bit one), so any min/max quantizer with group 32 lands close to that grid again:",
        "the g32 rows (and the GGUF import, which is that grid) look better here than they would against an",
        "original float checkpoint, while g64 groups straddle two of the original groups.",
        "",
        "Recipes (config.json `quantization`; per-layer entries summarized):",
        "",
    ]
    for r in results:
        if r["quantization"]:
            lines.append(f"- {r['label']}: {summarize(r['quantization'])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    saved = dict(rows=results, source=source, tokens=tokens, window=window)
    path.with_suffix(".json").write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
