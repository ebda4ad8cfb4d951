"""Command-line front ends. Everything here is argument parsing and printing; the work is done by
library functions. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .errors import MlxLlamaError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _parse_optional(self, arg_string):
        # argparse takes only '-1' and '-.5' for negative numbers; '-inf', '-nan' or '-1e-3' after
        # `--temp` would be read as an unknown option and end in "expected one argument", hiding the
        # real mistake. No option of ours looks like a number, so anything float() reads is a value,
        # which then reaches the option's type check and its message naming option and value.
        try:
            float(arg_string)
            return None  # a value, not an option
        except ValueError:
            return super()._parse_optional(arg_string)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # One line, printed around any progress bar rather than into it.
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so half-written output is removed on the way out.
    raise KeyboardInterrupt


def _run(main, argv) -> int:
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(argv) or 0
    except BrokenPipeError:  # `generate.py ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MlxLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the user's to fix, not a bug
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _parse(s: str, cast, what: str):
    try:
        return cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None


def _positive_int(s: str) -> int:
    v = _parse(s, int, "an integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _probability(s: str) -> float:
    v = _parse(s, float, "a number")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def _non_negative(s: str) -> float:
    v = _parse(s, float, "a number")
    if not v >= 0.0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _positive(s: str) -> float:
    v = _non_negative(s)
    if v == 0:
        raise argparse.ArgumentTypeError("must be a finite number > 0, got 0")
    return v


def _seed(s: str) -> int:
    v = _non_negative_int(s)
    if v >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2^64, got {v}")
    return v


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxLlamaError(f"standard input is not UTF-8 text (byte {e.start})") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Options shared by generate.py and the chat: sampling, seed, prefill chunk."""
    p.add_argument("--temp", type=_non_negative, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass (default: 1, off)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="keep the k most likely tokens (default: 0, off)")
    p.add_argument("--min-p", type=_probability, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--seed", type=_seed, help="random seed, for reproducible sampling")
    p.add_argument("--prefill-step-size", type=_positive_int, default=512, help="prompt tokens per prefill chunk")


def _non_negative_int(s: str) -> int:
    v = _parse(s, int, "an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def convert_args(argv=None):
    p = _Parser(prog="convert.py", description="Convert a Hugging Face Llama checkpoint to an MLX model directory.")
    p.add_argument("--hf-path", required=True, help="local Hugging Face model directory, Hub repo id (ORG/NAME), or a .gguf file (imported as stored)")
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when --hf-path is a repo id")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="cast floating weights (default: keep)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize Linear and embedding weights")
    p.add_argument("--q-bits", type=int, choices=[4, 8], help="bits per weight (default: 4)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], help="weights per scale (default: 32)")
    p.add_argument(
        "--q-recipe",
        choices=["default", "mixed", "uniform"],
        help="default: embedding/head at --q-bits + 1 and gate/up projections at twice the group size, measured "
        "best under 5 bits/weight; mixed: embedding/head at 8 bits (best quality, larger); uniform: all alike",
    )
    p.add_argument("--dequantize", action="store_true", help="turn a quantized MLX model directory back to float")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --mlx-path")
    a = p.parse_args(argv)
    given = [f for f, v in (("--q-bits", a.q_bits), ("--q-group-size", a.q_group_size), ("--q-recipe", a.q_recipe)) if v]
    if given and not a.quantize:
        p.error(f"{given[0]} needs -q/--quantize")
    a.q_bits, a.q_group_size, a.q_recipe = a.q_bits or 4, a.q_group_size or 32, a.q_recipe or "default"
    return a


def convert_main(argv=None) -> int:
    def main(argv):
        from .convert import convert

        a = convert_args(argv)
        out = convert(
            a.hf_path,
            a.mlx_path,
            dtype=a.dtype,
            quantize=a.quantize,
            q_bits=a.q_bits,
            q_group_size=a.q_group_size,
            q_recipe=a.q_recipe,
            force=a.force,
            revision=a.revision,
            dequantize=a.dequantize,
        )
        if a.quantize:
            from .convert import bits_per_weight

            print(f"Wrote {out} ({bits_per_weight(out):.2f} bits per weight)")
        else:
            print(f"Wrote {out}")

    return _run(main, argv)


def generate_args(argv=None):
    p = _Parser(prog="generate.py", description="Generate text with a converted MLX Llama model.")
    p.add_argument("--model", required=True, help="MLX model directory (from convert.py) or Hub repo id")
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads it from standard input)")
    p.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens to generate (default: 256)")
    add_sampling_args(p)
    p.add_argument("--repetition-penalty", type=_positive, default=1.0, help="> 1 discourages repeats (default: 1)")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument(
        "--prompt-cache-file",
        help="reuse the prompt's KV cache from this file where it matches the prompt, and save it there",
    )
    p.add_argument(
        "--max-kv-size",
        type=_positive_int,
        help="keep at most this many positions in the KV cache (the first 4 and the most recent): bounded memory",
    )
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="store the KV cache quantized to 4 or 8 bits")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64, help="KV cache quantization group")
    p.add_argument(
        "--memory-budget",
        type=_non_negative,
        metavar="GB",
        help="refuse to start when weights + KV cache for prompt + --max-tokens would exceed this many GB",
    )
    a = p.parse_args(argv)
    if a.max_kv_size is not None and a.max_kv_size <= 4:
        p.error(f"argument --max-kv-size: must exceed 4 (the first positions always kept), got {a.max_kv_size}")
    if a.memory_budget == 0:
        p.error("argument --memory-budget: must be > 0")
    return a


def generate_main(argv=None) -> int:
    def main(argv):
        a = generate_args(argv)
        prompt = _read_stdin() if a.prompt == "-" else a.prompt
        if not prompt.strip():
            raise MlxLlamaError("the prompt is empty")

        import mlx.core as mx

        from .generate import format_stats, stream_generate
        from .loader import load
        from .sample import make_logits_processors, make_sampler

        if a.seed is not None:
            mx.random.seed(a.seed)
        model, tokenizer = load(a.model)
        use_template = tokenizer.chat_template is not None and not a.ignore_chat_template
        ids = tokenizer.encode_chat(prompt, system_prompt=a.system_prompt, use_template=use_template)
        if len(ids) + a.max_tokens > model.args.max_position_embeddings:
            warnings.warn(
                f"prompt ({len(ids)} tokens) + --max-tokens {a.max_tokens} exceed the model's context of "
                f"{model.args.max_position_embeddings} positions: expect degraded text past it"
            )
        kv = dict(max_kv_size=a.max_kv_size, kv_bits=a.kv_bits, kv_group_size=a.kv_group_size)
        if a.memory_budget is not None:
            from .memory import check_budget, estimate_bytes, kv_storage_dtype, model_weights_bytes

            need = estimate_bytes(
                model.args, model_weights_bytes(model), len(ids) + a.max_tokens,
                kv_dtype=kv_storage_dtype(model, a.kv_bits), **kv,
            )
            check_budget(need, a.memory_budget * 1e9)
        cache = None
        if a.prompt_cache_file:
            if a.max_kv_size or a.kv_bits:
                raise MlxLlamaError("--prompt-cache-file works with the plain KV cache only (no --max-kv-size/--kv-bits)")
            from .prompt_cache import process_prompt_with_cache_file

            cache, rest, reused = process_prompt_with_cache_file(
                model, tokenizer, ids, a.prompt_cache_file, prefill_step_size=a.prefill_step_size
            )
            print(f"[prompt cache {a.prompt_cache_file}: reused {reused} of {len(ids)} prompt tokens]", file=sys.stderr)
            ids = rest
        device = mx.default_device().type.name
        print(
            f"[{a.model}: weights stored as {_dtype_name(model.stored_dtype)}"
            f"{_quant_note(model.args.quantization)}, computing in {_dtype_name(model.compute_dtype)} on {device}]",
            file=sys.stderr,
        )
        last = None
        for last in stream_generate(
            model,
            tokenizer,
            ids,
            max_tokens=a.max_tokens,
            sampler=make_sampler(a.temp, a.top_p, a.top_k, a.min_p),
            logits_processors=make_logits_processors(a.repetition_penalty),
            prefill_step_size=a.prefill_step_size,
            cache=cache,
            **kv,
        ):
            print(last.text, end="", flush=True)
        print()
        print("=" * 10)
        print(format_stats(last))

    return _run(main, argv)


def _dtype_name(d) -> str:
    return str(d).rsplit(".", 1)[-1]


def _quant_note(q) -> str:
    if not q:
        return ""
    extra = sorted({(v["bits"]) for v in q.values() if isinstance(v, dict)} - {q["bits"]})
    more = f" ({', '.join(f'{b}-bit' for b in extra)} for some layers)" if extra else ""
    return f", quantized {q['bits']}-bit group {q['group_size']}{more}"
