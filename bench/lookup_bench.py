"""Prompt-lookup decoding against plain greedy decoding on a real model.

For each model directory and task, runs plain ``generate_step`` (greedy) and ``lookup_generate_step``
``--runs`` times each, alternating, and prints a markdown table of medians: decoding speed (tokens
per second after the prompt's prefill, which is the same work for both), the share of drafted tokens
the model accepted, tokens per forward pass, and whether both produced the same tokens. Generation
stops at an EOS id or after ``--max-tokens``.

    python bench/lookup_bench.py --model /tmp/smol-f32 --model /tmp/smol-q4b
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import mlx.core as mx

from mlx_llama import load
from mlx_llama.generate import generate_step
from mlx_llama.lookup import LookupStats, lookup_generate_step

PARAGRAPH = (
    "The lighthouse stood at the end of a narrow spit of rock, and for ninety years its keepers had "
    "climbed the same one hundred and twelve steps every evening to light the lamp. In winter the "
    "spray froze on the windows and had to be scraped off with a knife; in summer the gulls nested "
    "on the gallery and screamed at anyone who came near. When the light was automated in 1987, the "
    "last keeper left a note in the logbook: the stairs are yours now, look after them."
)

TASKS = {
    "copy": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "edit": f"Rewrite the following paragraph in the present tense, changing nothing else:\n\n{PARAGRAPH}",
    "free": "Write a short story about a robot who learns to paint.",
}

PREFILL_STEP = 512


class Timed:
    """The model, noting when each forward pass is asked for."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(time.perf_counter())
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def run(make_steps, model, prompt, eos):
    """(tokens, prefill seconds, decoding seconds). Both generators prefill all but the last prompt
    token in chunks, evaluated before the first decoding pass is built: that pass's start splits them."""
    timed = Timed(model)
    tokens = []
    tic = time.perf_counter()
    for t, _ in make_steps(timed):
        tokens.append(t)
        if t in eos:
            break
    end = time.perf_counter()
    decode_start = timed.calls[math.ceil((prompt.size - 1) / PREFILL_STEP)]
    return tokens, decode_start - tic, end - decode_start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="MLX model directory (repeatable)")
    ap.add_argument("--task", action="append", choices=list(TASKS), help="default: all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--num-draft", type=int, default=10)
    ap.add_argument("--ngram-max", type=int, default=3)
    ap.add_argument("--ngram-min", type=int, default=1)
    args = ap.parse_args(argv)
    models = args.model or ["/tmp/smol-f32", "/tmp/smol-q4b"]

    rows = []
    for path in models:
        model, tokenizer = load(path)
        eos = tokenizer.eos_token_ids
        for task in args.task or list(TASKS):
            prompt = mx.array(tokenizer.encode_chat(TASKS[task]), dtype=mx.uint32)
            kw = dict(max_tokens=args.max_tokens, prefill_step_size=PREFILL_STEP)

            def plain(m):
                return generate_step(prompt, m, **kw)

            def lookup(m):
                return lookup_generate_step(
                    prompt, m, num_draft=args.num_draft, ngram_max=args.ngram_max, ngram_min=args.ngram_min,
                    stats=stats, **kw,
                )

            # Warm-up on a short prompt: the first calls pay for allocations.
            list(generate_step(prompt[-8:], model, max_tokens=4))
            list(lookup_generate_step(prompt[-8:], model, max_tokens=4))
            plain_tps, lookup_tps, prefill, same, rates, per_pass = [], [], [], True, [], []
            for _ in range(args.runs):
                ref, pre, dt = run(plain, model, prompt, eos)
                plain_tps.append(len(ref) / dt)
                prefill.append(pre)
                stats = LookupStats()
                got, pre, dt = run(lookup, model, prompt, eos)
                lookup_tps.append(len(got) / dt)
                prefill.append(pre)
                same &= got == ref
                rates.append(stats.acceptance_rate)
                per_pass.append(stats.generated / max(stats.forward_passes, 1))
            p, q = statistics.median(plain_tps), statistics.median(lookup_tps)
            rows.append(
                f"| {path.rstrip('/').split('/')[-1]} | {task} | {prompt.size} | {statistics.median(prefill):.1f} "
                f"| {len(ref)} | {p:.2f} | {q:.2f} | {q / p:.2f}x | {statistics.median(rates):.0%} "
                f"| {statistics.median(per_pass):.2f} | {'yes' if same else 'NO'} |"
            )
            print(rows[-1], f"plain {[round(x, 2) for x in plain_tps]} lookup {[round(x, 2) for x in lookup_tps]}",
                  flush=True)

    print()
    print(f"greedy, max {args.max_tokens} tokens, num_draft {args.num_draft}, "
          f"ngram {args.ngram_min}..{args.ngram_max}; medians of {args.runs} runs; "
          "tok/s = generated tokens / decoding time (prefill excluded)")
    print()
    print("| model | task | prompt tokens | prefill s | generated | plain tok/s | lookup tok/s | speedup "
          "| accepted drafts | tokens per pass | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
