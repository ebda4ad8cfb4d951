"""What the benchmarks share: running one measurement in a fresh process and reading its JSON line.

A fresh process per measurement makes MLX's peak memory that run's alone. On Linux, OpenBLAS is
preloaded when installed (Debian: libopenblas0-pthread): MLX's Linux wheel links the reference BLAS,
under which float matmuls (prompts above all) are tens of times slower.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def openblas_preloaded() -> bool:
    return sys.platform == "linux" and os.path.exists(OPENBLAS)


def run_json(cmd: list, timeout: int) -> dict:
    """Run ``cmd`` (with OpenBLAS preloaded where there is one) and return the JSON object on the last
    line of its output, or {"error": ...} with the last line of its stderr."""
    env = dict(os.environ)
    if openblas_preloaded():
        env["LD_PRELOAD"] = OPENBLAS
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """Where a benchmark ran, for its results file (the keys both kv_memory.py and kv_quality.py report)."""
    import mlx.core as mx

    from mlx_llama.upcast import fast_blas_loaded

    return dict(
        platform=platform.platform(), machine=platform.machine(), system=platform.system(),
        cores=os.cpu_count(), cpus=os.cpu_count(), python=platform.python_version(), mlx=mx.__version__,
        device=str(mx.default_device()), openblas_preloaded=openblas_preloaded(), fast_blas=fast_blas_loaded(),
    )
