"""Does ``--max-kv-size`` bound memory? Peak memory against generation length, with and without it.

    python bench/kv_memory.py                                   # 128 256 512 1024 tokens, bound 128
    python bench/kv_memory.py --lengths 256 512 1024 2048 --max-kv-size 256

SmolLM2-135M-Instruct, 4-bit (our default recipe), greedy from a short chat prompt, end of sequence
ignored so that every run generates exactly the asked number of tokens. Four configurations:
unbounded, ``max_kv_size``, ``kv_bits=8``, and both. Every measurement is a fresh process (the
``--worker`` pattern of bench/speed.py), so the peak (``mx.get_peak_memory``, weights included) is
that run's alone; one process at a time, to keep the CPU load modest.

Each worker passes its own cache to ``stream_generate`` so that the bytes the cache holds at the
end (its whole storage capacity, ``c.nbytes`` summed over layers) can be read back.

Results accumulate in bench/results/kv_memory.json keyed by (configuration, length): an interrupted
run keeps what it measured, and a later run with other lengths adds to it (``--fresh`` starts
over). kv_memory.md and kv_memory.png are rewritten from the JSON each time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import machine, run_json  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Tell me a long story about a lighthouse keeper and the ships she guided home."


def configs(max_kv_size: int) -> dict:
    """name -> stream_generate keyword arguments (None: the library default)."""
    return {
        "unbounded": dict(max_kv_size=None, kv_bits=None),
        f"max_kv_size {max_kv_size}": dict(max_kv_size=max_kv_size, kv_bits=None),
        "kv_bits 8": dict(max_kv_size=None, kv_bits=8),
        f"max_kv_size {max_kv_size} + kv_bits 8": dict(max_kv_size=max_kv_size, kv_bits=8),
    }


# ---------------------------------------------------------------------------------------------
# Worker: one measurement, printed as one JSON line.


def worker(model_dir: str, gen: int, max_kv_size, kv_bits) -> dict:
    import mlx.core as mx

    from mlx_llama import load, stream_generate
    from mlx_llama.memory import kv_bytes_per_position, kv_storage_dtype, model_weights_bytes

    model, tokenizer = load(model_dir)
    tokenizer.eos_token_ids = set()  # exactly `gen` tokens, as bench/speed.py's worker does
    ids = tokenizer.encode_chat(PROMPT)
    cache = model.make_cache(max_kv_size=max_kv_size, kv_bits=kv_bits)
    r = None
    for r in stream_generate(model, tokenizer, ids, max_tokens=gen, cache=cache):
        pass
    # stream_generate resets the peak when it starts, so this is the generation's peak (weights,
    # which stay allocated, included), not the loader's.
    peak = mx.get_peak_memory()
    # Positions actually stored per layer: a rotating cache keeps _size, a plain one offset.
    stored = getattr(cache[0], "_size", cache[0].offset)
    keys = cache[0].keys
    capacity = (keys[0] if isinstance(keys, tuple) else keys).shape[2]
    return dict(
        # Which library was measured: it is edited while benchmarks run, so say so in every row.
        library=library_revision(),
        kv_capacity=capacity,
        # Measured, not estimated: what one position of storage really costs (all layers).
        kv_bytes_per_position_measured=sum(c.nbytes for c in cache) // capacity,
        peak_gb=peak / 1e9,
        kv_nbytes=sum(c.nbytes for c in cache),
        # What the stored positions cost at the model's per-position rate; nbytes can exceed it
        # because the unbounded cache grows its storage in steps of 256 positions.
        kv_expected=stored * kv_bytes_per_position(model.args, kv_bits, kv_dtype=kv_storage_dtype(model, kv_bits)),
        kv_positions=stored,
        kv_offset=cache[0].offset,
        kv_dtype=str(model.kv_dtype),
        kv_bytes_per_position=kv_bytes_per_position(model.args, kv_bits, kv_dtype=kv_storage_dtype(model, kv_bits)),
        weights_bytes=model_weights_bytes(model),
        generation_tps=r.generation_tps,
        prompt_tokens=len(ids),
        tokens=r.generation_tokens,
    )


def library_revision() -> str:
    """HEAD's short hash, with "+dirty" when mlx_llama/ has uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "?") + ("+dirty" if git("status", "--porcelain", "mlx_llama") else "")


# ---------------------------------------------------------------------------------------------


def run_worker(model_dir: Path, gen: int, kw: dict, timeout: int) -> dict:
    return run_json([sys.executable, Path(__file__).resolve(), "--worker", model_dir, gen, json.dumps(kw)], timeout)


def model_dir(work: Path) -> Path:
    d = work / "smollm2-4bit"
    if not (d / "config.json").exists():
        from mlx_llama import convert
        from mlx_llama.smollm2 import smollm2_hf_dir

        convert(str(smollm2_hf_dir()), str(d), quantize=True, progress=False, force=True)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512, 1024], help="generated tokens")
    ap.add_argument("--max-kv-size", type=int, default=128)
    ap.add_argument("--configs", nargs="+", help="only these configuration names (default: all four)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results instead of merging with them")
    ap.add_argument("--report", action="store_true", help="only rewrite the table and chart from the JSON")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement before giving up")
    ap.add_argument("--work", default=str(HERE / ".work"), help="where the converted model is kept")
    ap.add_argument("--out", default=str(HERE / "results" / "kv_memory.md"))
    args = ap.parse_args()

    d = model_dir(Path(args.work))
    out = Path(args.out)
    js = out.with_suffix(".json")
    doc = json.loads(js.read_text()) if js.exists() and not args.fresh else {}
    rows = doc.get("rows", [])
    if args.report:
        write(out, doc)
        return
    cfgs = configs(args.max_kv_size)
    names = [n for n in cfgs if not args.configs or n in args.configs]
    # Length outermost: the short runs of every configuration come first, so a run cut short still
    # gives a comparable table for the lengths it reached.
    for gen in args.lengths:
        for name in names:
            r = run_worker(d, gen, cfgs[name], args.timeout)
            row = dict(config=name, length=gen, **cfgs[name], **r, date=time.strftime("%Y-%m-%d %H:%M"))
            print(json.dumps(row), flush=True)
            rows = [x for x in rows if (x["config"], x["length"]) != (name, gen)] + [row]
            # A hand-written note already in the JSON survives reruns.
            doc = dict(doc, machine=machine(), model=str(d.relative_to(ROOT)) if d.is_relative_to(ROOT) else str(d),
                       prompt=PROMPT, rows=rows)
            write(out, doc)  # after every measurement: an interrupted run keeps what it measured


def write(out: Path, doc: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    write_table(out, doc)
    chart(out.with_suffix(".json"), out.with_suffix(".png"))


def chart(json_path: Path, png: Path) -> None:
    """kv_memory.png, drawn by bench/kv_memory_chart.py in the peer's environment (matplotlib
    lives there, not among our dependencies), as bench/speed.py draws speed.png."""
    py = HERE / ".venv-mlxlm" / "bin" / "python"
    proc = subprocess.run([str(py), str(HERE / "kv_memory_chart.py"), str(json_path), str(png)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"chart not drawn: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)


def write_table(path: Path, doc: dict) -> None:
    rows, m = doc["rows"], doc["machine"]
    names = list(dict.fromkeys(r["config"] for r in sorted(rows, key=config_order)))
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["config"], r["length"]): r for r in rows}

    def get(name, n, key, spec, scale=1.0):
        r = cell.get((name, n))
        if r is None:
            return "—"
        if "error" in r:
            return "error"
        return format(r[key] / scale, spec)

    ok = [r for r in rows if "error" not in r]
    per_pos = {r["config"]: r["kv_bytes_per_position"] for r in ok}
    weights = ok[0]["weights_bytes"] if ok else None
    prompt_tokens = ok[0]["prompt_tokens"] if ok else None
    lines = [
        "# Does `--max-kv-size` bound memory? Peak memory against generation length",
        "",
        f"Written by `python bench/kv_memory.py` on {time.strftime('%Y-%m-%d')}: {m['machine']} {m['system']}, "
        f"{m['cores']} cores (shared with other jobs), Python {m['python']}, mlx {m['mlx']}, device {m['device']}, "
        f"OpenBLAS preloaded: {m['openblas_preloaded']}. Model: SmolLM2-135M-Instruct, 4-bit default recipe "
        f"(`{doc['model']}`, weights as loaded {fmt_mb(weights)}), greedy from a {prompt_tokens}-token chat "
        "prompt, end of sequence ignored so every run generates exactly `length` tokens; one fresh process "
        "per cell. Peak = `mx.get_peak_memory()` of the generation (weights included).",
        "",
    ]
    sections = (
        ("Peak memory (MB)", "peak_gb", ".1f", 1e-3),
        ("KV cache bytes held at the end (MB, sum of `c.nbytes` over layers: the storage capacity)",
         "kv_nbytes", ".2f", 1e6),
        ("Generation tokens/s", "generation_tps", ".1f", None),
    )
    for title, key, spec, scale in sections:
        lines += ["## " + title, "", "| generated tokens | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for n in lengths:
            args = (scale,) if scale is not None else ()
            lines.append(f"| {n} | " + " | ".join(get(c, n, key, spec, *args) for c in names) + " |")
        lines.append("")
    lines += [
        "Expected KV bytes per position (all layers): "
        + ", ".join(f"{c}: {per_pos[c]:,} B" for c in names if c in per_pos)
        + ". For the float cache that is 30 layers x 2 (K and V) x 3 KV heads x 64 dims x 2 bytes "
        "(stored as bfloat16) = 23,040 B; 8-bit is 64 bytes + a scale and a bias per group of 64: 68 bytes "
        "per row with bf16 scales (12,240 B per position), 72 with float32 ones (12,960 B), as the library "
        "keeps them since f064a71.",
        "",
    ]
    lines += growth(names, lengths, cell) + [""]
    notes = doc.get("interpretation")
    if notes:
        lines += ["## Interpretation", "", notes, ""]
    lines += ["![peak memory against generated tokens](kv_memory.png)"]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def growth(names, lengths, cell) -> list:
    """One line per configuration: how much the peak rose from the shortest length to the longest,
    per added token, against what the stored cache alone would add. Computed, so it stays true
    to whatever the table holds."""
    out = []
    for c in names:
        pts = [cell[(c, n)] for n in lengths if (c, n) in cell and "error" not in cell[(c, n)]]
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        rise = (b["peak_gb"] - a["peak_gb"]) * 1e9
        per_token = rise / (b["length"] - a["length"])
        out.append(
            f"- {c}: peak {a['peak_gb'] * 1e3:.1f} -> {b['peak_gb'] * 1e3:.1f} MB from {a['length']} to "
            f"{b['length']} tokens ({rise / 1e6:+.1f} MB, {per_token:,.0f} B per added token; the cache stores "
            f"{b['kv_positions']} positions at the end, {b['kv_bytes_per_position']:,} B each)."
        )
    return out


def config_order(r: dict):
    # unbounded, bounded, 8-bit, both: the order configs() defines.
    return (r["max_kv_size"] is not None) + 2 * (r["kv_bits"] is not None)


def fmt_mb(n) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_path, gen, kw = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
        print(json.dumps(worker(model_path, gen, kw["max_kv_size"], kw["kv_bits"])))
    else:
        main()
