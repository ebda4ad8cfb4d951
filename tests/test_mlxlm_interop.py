"""Interoperability with mlx-lm, both ways, with mlx-lm itself running in its own environment.

mlx-lm (with transformers) is not a dependency of ours, so the first run installs it from PyPI into
a virtual environment in the cache ($MLX_LLAMA_CACHE, else ~/.cache/mlx_llama), with the same mlx
version; set MLX_LLAMA_PEER_PYTHON to use an existing interpreter that has mlx_lm instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

try:
    from . import reference as R
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    import reference as R
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import convert, load
from mlx_llama.smollm2 import cache_root

TOKENS = [[1, 17, 99, 5, 250, 31, 7, 64]]

PEER_SCRIPT = """
import json, sys
import numpy as np
import mlx.core as mx
cmd = sys.argv[1]
if cmd == "logits":
    from mlx_lm import load
    model, _ = load(sys.argv[2])
    out = model(mx.array(json.loads(sys.argv[3])))
    np.save(sys.argv[4], np.array(out.astype(mx.float32)))
elif cmd == "convert":
    from mlx_lm import convert
    kw = json.loads(sys.argv[4])
    convert(sys.argv[2], sys.argv[3], **kw)
"""


@pytest.fixture(scope="session")
def peer(tmp_path_factory):
    python = os.environ.get("MLX_LLAMA_PEER_PYTHON")
    if not python:
        venv = cache_root() / f"peer-mlx-lm-mlx{mx.__version__}"
        python = str(venv / "bin" / "python")
        if not Path(python).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            mlx_req = f"mlx[cpu]=={mx.__version__}" if sys.platform == "linux" else f"mlx=={mx.__version__}"
            subprocess.run([python, "-m", "pip", "install", "-q", mlx_req, "mlx-lm"], check=True)
    script = tmp_path_factory.mktemp("peer") / "peer.py"
    script.write_text(PEER_SCRIPT)

    def call(*args):
        proc = subprocess.run([python, str(script), *map(str, args)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return call


def peer_logits(peer, model_dir: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / f"logits-{model_dir.name}.npy"
    peer("logits", model_dir, json.dumps(TOKENS), out)
    return np.load(out).astype(np.float64)


def our_logits(model_dir: Path) -> np.ndarray:
    model, _ = load(str(model_dir))
    return np.array(model(mx.array(TOKENS))).astype(np.float64)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    # hidden 128 (head_dim 64) keeps every quantization group size valid, for weights and for mlx-lm.
    config = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    weights = random_weights(config, seed=8)
    return write_hf_checkpoint(tmp_path_factory.mktemp("interop") / "hf", config, weights), config, weights


@pytest.mark.parametrize(
    "label, kw",
    [
        ("float", {}),
        ("q4-default", dict(quantize=True)),
        ("q4-mixed", dict(quantize=True, q_recipe="mixed")),
        ("q8-g64", dict(quantize=True, q_bits=8, q_group_size=64, q_recipe="uniform")),
    ],
)
def test_mlx_lm_loads_our_models_with_the_same_logits(peer, tiny_hf, tmp_path, label, kw):
    hf, config, weights = tiny_hf
    out = convert(str(hf), str(tmp_path / label), progress=False, **kw)
    ours, theirs = our_logits(out), peer_logits(peer, out, tmp_path)
    assert R.rel_l2(theirs, ours) < 1e-5
    if label == "float":  # and both are the true function of these weights
        assert R.rel_l2(ours, R.llama_forward(weights, config, np.array(TOKENS))) < 1e-4


@pytest.mark.parametrize("label, kw", [("float", {}), ("q4-g64", dict(quantize=True, q_bits=4, q_group_size=64))])
def test_we_load_mlx_lm_models_with_the_same_logits(peer, tiny_hf, tmp_path, label, kw):
    hf, _, _ = tiny_hf
    theirs_dir = tmp_path / f"mlxlm-{label}"
    peer("convert", hf, theirs_dir, json.dumps(kw))
    theirs = peer_logits(peer, theirs_dir, tmp_path)
    assert R.rel_l2(our_logits(theirs_dir), theirs) < 1e-5
    if kw:
        # --dequantize gives a float model computing the same function.
        deq = convert(str(theirs_dir), str(tmp_path / "deq"), dequantize=True, progress=False)
        cfg = json.loads((deq / "config.json").read_text())
        assert "quantization" not in cfg
        assert R.rel_l2(our_logits(deq), theirs) < 1e-5
