"""Generation speed and memory, ours against mlx-lm, on the same converted SmolLM2 directories.

    python bench/speed.py                          # full table: 5 models x 2 prompt lengths, 3 rounds
    python bench/speed.py --models float32 4bit --prompt-lengths 128 --rounds 2

mlx-lm is installed into its own virtual environment (bench/.venv-mlxlm, made on first use) with
the same mlx version as ours, and matplotlib for the chart. Every measurement is a fresh process
(so peak memory is that run's alone) and the two engines alternate, round after round, so drift
in the machine's speed hits both; the table shows medians and the ratios ours / mlx-lm. Both
engines get the same token ids, greedy, with end-of-sequence ignored so that every run generates
exactly --gen-tokens tokens.
On Linux, OpenBLAS is preloaded for both engines when installed (Debian: libopenblas0-pthread):
MLX's Linux wheel links the reference BLAS, under which a 1024-token prompt takes minutes.

Results accumulate in bench/results/speed.json: a run replaces the rows (model, prompt length,
generated tokens) and engines it measures and keeps the others, so slow rows can be measured in
separate invocations (``--engines mlx-lm`` measures only the peer; such rows are marked as not
alternated in the table). ``--fresh`` starts over. The table (speed.md) and the chart
(speed.png) are rewritten from the JSON each time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import openblas_preloaded, run_json  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {  # name -> convert() keyword arguments
    "float32": dict(dtype="float32"),
    "float16": dict(dtype="float16"),
    "bfloat16": dict(dtype="bfloat16"),
    "8bit": dict(quantize=True, q_bits=8, q_group_size=64, q_recipe="uniform"),
    "4bit": dict(quantize=True),
}


# ---------------------------------------------------------------------------------------------
# Workers: one measurement each, printed as one JSON line. They run in the engine's own Python.


def timed(records):
    """Exhaust a stream of response records: (the last record, seconds to the first)."""
    tic = time.perf_counter()
    ttft = r = None
    for r in records:
        if ttft is None:
            ttft = time.perf_counter() - tic
    return r, ttft


def worker_ours(model_dir: str, ids: list, gen: int) -> dict:
    import mlx.core as mx

    from mlx_llama import load, stream_generate

    model, tokenizer = load(model_dir)
    tokenizer.eos_token_ids = set()
    r, ttft = timed(stream_generate(model, tokenizer, ids, max_tokens=gen))
    return dict(prompt_tps=r.prompt_tps, generation_tps=r.generation_tps, ttft=ttft,
                peak_gb=mx.get_peak_memory() / 1e9, tokens=r.generation_tokens, compute=str(model.compute_dtype))


def worker_mlxlm(model_dir: str, ids: list, gen: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    model, tokenizer = load(model_dir)
    tokenizer._eos_token_ids = set()  # generate exactly `gen` tokens, as ours does
    r, ttft = timed(stream_generate(model, tokenizer, ids, max_tokens=gen))
    return dict(prompt_tps=r.prompt_tps, generation_tps=r.generation_tps, ttft=ttft,
                peak_gb=mx.get_peak_memory() / 1e9, tokens=r.generation_tokens, compute="stored dtype")


# ---------------------------------------------------------------------------------------------


def mlxlm_python() -> Path:
    venv = HERE / ".venv-mlxlm"
    py = venv / "bin" / "python"
    if not py.exists():
        import mlx.core as mx

        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        mlx_req = f"mlx[cpu]=={mx.__version__}" if sys.platform == "linux" else f"mlx=={mx.__version__}"
        subprocess.run([str(py), "-m", "pip", "install", "-q", mlx_req, "mlx-lm", "matplotlib"], check=True)
    return py


def run_worker(python: Path, engine: str, model_dir: Path, ids_file: Path, gen: int, timeout: int) -> dict:
    return run_json([python, Path(__file__).resolve(), "--worker", engine, model_dir, ids_file, gen], timeout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--prompt-lengths", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--fresh", action="store_true", help="forget earlier results instead of merging with them")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement before giving up")
    ap.add_argument("--work", default=str(HERE / ".work"), help="where converted models are kept")
    ap.add_argument("--out", default=str(HERE / "results" / "speed.md"))
    args = ap.parse_args()

    from mlx_llama import convert
    from mlx_llama.evaluate import default_eval_text
    from mlx_llama.smollm2 import smollm2_hf_dir
    from mlx_llama.tokenizer import load_tokenizer

    hf = smollm2_hf_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for name in args.models:
        dirs[name] = work / f"smollm2-{name}"
        if not (dirs[name] / "config.json").exists():
            convert(str(hf), str(dirs[name]), force=True, progress=False, **MODELS[name])
    tokenizer = load_tokenizer(hf)
    text_ids = tokenizer.encode(default_eval_text()[0], add_bos=False)
    prompts = {}
    for n in args.prompt_lengths:
        prompts[n] = work / f"prompt-{n}.json"
        prompts[n].write_text(json.dumps(text_ids[:n]))

    out = Path(args.out)
    results = [] if args.fresh or not out.with_suffix(".json").exists() else json.loads(out.with_suffix(".json").read_text())
    pythons = {"ours": Path(sys.executable), "mlx-lm": mlxlm_python()}
    engines = [e for e in ENGINES if e in args.engines]
    for name in args.models:
        for n in args.prompt_lengths:
            runs = {e: [] for e in engines}
            for rnd in range(args.rounds):
                order = engines if rnd % 2 == 0 else engines[::-1]  # alternate who goes first
                for e in order:
                    r = run_worker(pythons[e], e, dirs[name], prompts[n], args.gen_tokens, args.timeout)
                    r["date"] = time.strftime("%Y-%m-%d %H:%M")
                    runs[e].append(r)
                    print(json.dumps(dict(model=name, prompt=n, engine=e, round=rnd, **r)), flush=True)
            row = dict(model=name, prompt=n, gen=args.gen_tokens, runs=runs, alternated=len(engines) == 2)
            results = merge(results, row)
            write_results(out, results)  # after every row: an interrupted run keeps what it measured


ENGINES = ("ours", "mlx-lm")


def merge(results: list, row: dict) -> list:
    """``results`` with ``row``'s engines replacing those of the same (model, prompt, gen) row."""
    key = (row["model"], row["prompt"], row["gen"])
    old = next((r for r in results if (r["model"], r["prompt"], r.get("gen")) == key), None)
    if old is None:
        return results + [row]
    runs = {**old["runs"], **row["runs"]}
    merged = dict(row, runs=runs, alternated=row["alternated"] or (old.get("alternated", False) and len(row["runs"]) == 2))
    return [merged if r is old else r for r in results]


def write_results(out: Path, results: list) -> None:
    order = {m: i for i, m in enumerate(MODELS)}
    results = sorted(results, key=lambda r: (r["prompt"], r.get("gen", 0), order.get(r["model"], 99)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(out, results)
    chart(out.with_suffix(".json"), out.with_suffix(".png"))


def chart(json_path: Path, png: Path) -> None:
    """speed.png from speed.json, drawn by bench/chart.py in the peer's environment (matplotlib
    lives there, not among our dependencies)."""
    py = HERE / ".venv-mlxlm" / "bin" / "python"
    proc = subprocess.run([str(py), str(HERE / "chart.py"), str(json_path), str(png)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"chart not drawn: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)


def median(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def write_table(path: Path, results: list) -> None:
    import mlx.core as mx

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    lines = [
        "# Speed and memory: mlx-llama against mlx-lm",
        "",
        f"Written by `python bench/speed.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, mlx {mx.__version__}, "
        f"mlx-lm {mlxlm_version()}, device {mx.default_device()}, OpenBLAS preloaded: "
        f"{openblas_preloaded()}.",
        "SmolLM2-135M-Instruct converted once by our converter and loaded by both engines; greedy, end of "
        "sequence ignored. Medians over the rounds, each run a fresh process. Ratios are ours / mlx-lm: above 1 "
        "is better for tokens/s, below 1 for time to first token (TTFT) and peak memory (MLX's allocator "
        "peak, `mx.get_peak_memory`, weights included). Rounds: ours/mlx-lm runs; * = the two engines were "
        "measured in separate invocations instead of alternating (see dates in speed.json).",
        "",
        "| model | prompt | gen | rounds | prompt tok/s ours | mlx-lm | ratio | gen tok/s ours | mlx-lm | ratio "
        "| TTFT s ours | mlx-lm | ratio | peak GB ours | mlx-lm | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        o, m = r["runs"].get("ours", []), r["runs"].get("mlx-lm", [])
        cells = []
        for key, spec in (("prompt_tps", ".1f"), ("generation_tps", ".1f"), ("ttft", ".2f"), ("peak_gb", ".4f")):
            a, b = median(o, key), median(m, key)
            cells += [fmt(a, spec), fmt(b, spec), fmt(ratio(a, b), ".2f" if key != "peak_gb" else ".3f")]
        rounds = f"{len(o)}/{len(m)}" + ("" if r.get("alternated") else "*")
        lines.append(f"| {r['model']} | {r['prompt']} | {r.get('gen', '?')} | {rounds} | " + " | ".join(cells) + " |")
        errors = {e: x["error"] for e, runs in r["runs"].items() for x in runs if "error" in x}
        for e, err in errors.items():
            lines.append(f"|  | | | | {e}: {err} |" + " |" * 11)
    lines += ["", "![ratios ours / mlx-lm](speed.png)"]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def mlxlm_version() -> str:
    py = HERE / ".venv-mlxlm" / "bin" / "python"
    proc = subprocess.run([str(py), "-c", "import mlx_lm; print(mlx_lm.__version__)"], capture_output=True, text=True)
    return proc.stdout.strip() or "?"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        engine, model_dir, ids_file, gen = sys.argv[2:6]
        ids = json.loads(Path(ids_file).read_text())
        fn = worker_ours if engine == "ours" else worker_mlxlm
        print(json.dumps(fn(model_dir, ids, int(gen))))
    else:
        main()
