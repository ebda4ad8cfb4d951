"""Hub repo ids, resolved through huggingface_hub against a cache laid out on disk the way
huggingface_hub writes one (blobs, snapshots of symlinks, refs), with HF_HUB_OFFLINE=1.
The Hub itself is never contacted."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(hf_home: Path, repo_id: str, commit: str, files: dict, ref: str = None) -> None:
    """Place files in the cache: content-addressed blobs, a snapshot of relative symlinks, a ref."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hf_home = root / "hf_home"
    config = tiny_config()
    a = write_hf_checkpoint(root / "a", config, random_weights(config, seed=1))
    b = write_hf_checkpoint(root / "b", config, random_weights(config, seed=2))
    files_a = {p.name: p for p in a.iterdir()}
    files_b = {p.name: p for p in b.iterdir()}
    add_snapshot(hf_home, "tiny-org/tiny-llama", COMMIT_A, files_a)
    add_snapshot(hf_home, "tiny-org/tiny-llama", COMMIT_B, files_b, ref="main")
    return root, hf_home


def run(hub_home, *args):
    env = dict(os.environ, HF_HOME=str(hub_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_repo_id_converts_from_the_cache_and_revision_selects_the_snapshot(hub, tmp_path):
    root, hf_home = hub
    for rev, expect in ((None, "b"), (COMMIT_A, "a")):
        out = tmp_path / f"out-{expect}"
        args = ["convert.py", "--hf-path", "tiny-org/tiny-llama", "--mlx-path", str(out)]
        proc = run(hf_home, *args, *(["--revision", rev] if rev else []))
        assert proc.returncode == 0, proc.stderr
        # Same weights as the snapshot asked for: compare with a conversion of the local copy.
        ref = tmp_path / f"ref-{expect}"
        assert run(hf_home, "convert.py", "--hf-path", str(root / expect), "--mlx-path", str(ref)).returncode == 0
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_generate_accepts_a_repo_id_of_a_converted_model(hub, tmp_path):
    root, hf_home = hub
    mlx = tmp_path / "mlx"
    assert run(hf_home, "convert.py", "--hf-path", str(root / "a"), "--mlx-path", str(mlx)).returncode == 0
    home2 = tmp_path / "home2"
    add_snapshot(home2, "tiny-org/tiny-llama-mlx", COMMIT_A, {p.name: p for p in mlx.iterdir()}, ref="main")
    proc = run(home2, "generate.py", "--model", "tiny-org/tiny-llama-mlx", "--prompt", "hi", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert "Generation:" in proc.stdout


def test_unknown_repo_offline_is_one_line(hub, tmp_path):
    _, hf_home = hub
    out = tmp_path / "out"
    proc = run(hf_home, "convert.py", "--hf-path", "nobody/nothing", "--mlx-path", str(out))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nobody/nothing" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_repo_with_only_pickled_weights_converts(tmp_path):
    """No safetensors in the repo: the .bin weights are taken (and read without torch)."""
    import mlx.core as mx

    try:
        from .test_torch_pickle import write_torch_file
    except ImportError:
        from test_torch_pickle import write_torch_file
    config = tiny_config()
    src = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config, seed=5))
    tensors = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items()}
    (src / "model.safetensors").unlink()
    write_torch_file(src / "pytorch_model.bin", tensors)
    home = tmp_path / "home"
    add_snapshot(home, "old-org/bin-only", COMMIT_A, {p.name: p for p in src.iterdir()}, ref="main")
    proc = run(home, "convert.py", "--hf-path", "old-org/bin-only", "--mlx-path", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_download_patterns_take_only_what_a_conversion_needs():
    """Offline, huggingface_hub returns the cached snapshot whole, so the filter is checked on its patterns:
    the files a conversion reads match, the rest of a typical repo (docs, other frameworks' weights) does not."""
    from mlx_llama.hub import ALLOW_PATTERNS

    def wanted(name):
        return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)

    for name in ("README.md", "pytorch_model.bin", "flax_model.msgpack", "onnx/model.onnx", "original/consolidated.00.pth"):
        assert not wanted(name), name
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json",
                 "tokenizer.model", "generation_config.json", "model.safetensors.index.json"):
        assert wanted(name), name
