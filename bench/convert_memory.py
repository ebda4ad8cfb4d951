"""Peak resident memory of a conversion, against the size of what it writes.

    python bench/convert_memory.py            # SmolLM2 bf16 -> bf16, -> float32, -> 4-bit default

Each conversion runs in a fresh process (`convert.py`), and its peak resident set size (ru_maxrss)
is read when it exits. The interpreter with mlx, numpy and tokenizers imported is measured the same
way and reported beside it, since a tiny model cannot get under that floor. Results:
bench/results/convert_memory.md.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = [("bf16 (as stored)", []), ("float32", ["--dtype", "float32"]), ("4-bit default", ["-q"])]


def peak_rss_of(cmd) -> int:
    """Run cmd as a child; return its peak RSS in bytes (Linux reports KiB, macOS bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak >= before
    return peak * (1 if sys.platform == "darwin" else 1024)


def main():
    sys.path.insert(0, str(ROOT))
    from mlx_llama.smollm2 import smollm2_hf_dir

    hf = smollm2_hf_dir()
    floor = peak_rss_of([sys.executable, "-c", "import mlx.core, numpy, tokenizers, mlx_llama.convert"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in CASES:
            out = Path(tmp) / label.split()[0]
            # Each measurement in its own grandchild so ru_maxrss (a maximum over children) is this one's.
            script = (
                "import resource, subprocess, sys; "
                f"subprocess.run({[sys.executable, 'convert.py', '--hf-path', str(hf), '--mlx-path', str(out), '--force', *extra]!r}, "
                "check=True, capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            kib = int(subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip())
            peak = kib * (1 if sys.platform == "darwin" else 1024)
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            rows.append((label, size, peak))
            print(f"{label}: output {size / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, ratio {peak / size:.2f}")

    lines = [
        "# Conversion memory",
        "",
        f"Written by `python bench/convert_memory.py` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
        f"Python {platform.python_version()}). SmolLM2-135M-Instruct from its bf16 Hugging Face export "
        f"({sum(p.stat().st_size for p in hf.glob('*.safetensors')) / 1e6:.0f} MB).",
        f"Floor: the interpreter with mlx, numpy, tokenizers and our converter imported peaks at {floor / 1e6:.0f} MB.",
        "",
        "| conversion | output (MB) | peak RSS (MB) | peak / output | (peak - floor) / output |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, size, peak in rows:
        lines.append(f"| {label} | {size / 1e6:.0f} | {peak / 1e6:.0f} | {peak / size:.2f} | {(peak - floor) / size:.2f} |")
    path = HERE / "results" / "convert_memory.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
