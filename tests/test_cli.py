"""The command-line tools as a user runs them: a good run end to end, and every user mistake
ending in one line on stderr, a non-zero exit, no traceback and no output directory left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT, input=stdin, timeout=300
    )


def assert_user_error(proc, *words):
    """Exit non-zero with a single stderr line naming the cause, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_mlx(tmp_path_factory):
    """A converted tiny model (and its source), shared by the generate.py tests."""
    root = tmp_path_factory.mktemp("cli")
    config = tiny_config()
    hf = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=3))
    proc = run("convert.py", "--hf-path", str(hf), "--mlx-path", str(root / "mlx"))
    assert proc.returncode == 0, proc.stderr
    return hf, root / "mlx"


def test_convert_and_generate_end_to_end(tiny_mlx):
    _, mlx = tiny_mlx
    assert (mlx / "config.json").exists() and (mlx / "model.safetensors").exists()
    assert (mlx / "tokenizer.json").exists()
    proc = run("generate.py", "--model", str(mlx), "--prompt", "hello world", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^Generation: [1-5] tokens", proc.stdout, re.M)  # at most --max-tokens, maybe an EOS first
    assert "Prompt:" in proc.stdout and "Peak memory:" in proc.stdout
    assert "computing in float32 on cpu" in proc.stderr


def test_quantized_convert_records_recipe(tiny_mlx, tmp_path):
    hf, _ = tiny_mlx
    proc = run("convert.py", "--hf-path", str(hf), "--mlx-path", str(tmp_path / "q"), "-q", "--q-group-size", "64")
    assert proc.returncode == 0, proc.stderr
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64
    # Default recipe: embedding one bit more; its preferred group (128) does not divide hidden 64, so 64.
    assert q["model.embed_tokens"] == {"group_size": 64, "bits": 5}
    proc = run("generate.py", "--model", str(tmp_path / "q"), "--prompt", "hi", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert "quantized 4-bit group 64 (5-bit for some layers)" in proc.stderr


def broken_checkpoint(root: Path, kind: str) -> Path:
    config = tiny_config()
    weights = random_weights(config, seed=0)
    tokenizer = True
    if kind == "missing config key":
        del config["hidden_size"]
    elif kind == "shape mismatch":
        config = dict(config, intermediate_size=128)
    elif kind == "missing weight":
        del weights["model.layers.1.mlp.down_proj.weight"]
    elif kind == "missing tokenizer":
        tokenizer = False
    elif kind == "unknown rope type":
        config["rope_scaling"] = {"rope_type": "wobbly", "factor": 2.0}
    elif kind == "heads do not divide":
        config["num_key_value_heads"] = 3
    return write_hf_checkpoint(root / "hf", config, weights, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing config key", ["config.json", "hidden_size"]),
        ("shape mismatch", ["mlp", "shape"]),
        ("missing weight", ["missing weight", "model.layers.1.mlp.down_proj.weight"]),
        ("missing tokenizer", ["tokenizer"]),
        ("unknown rope type", ["rope_scaling", "wobbly"]),
        ("heads do not divide", ["num_attention_heads", "num_key_value_heads"]),
    ],
)
def test_convert_refuses_broken_checkpoints(tmp_path, kind, words):
    hf = broken_checkpoint(tmp_path, kind)
    out = tmp_path / "out"
    proc = run("convert.py", "--hf-path", str(hf), "--mlx-path", str(out))
    assert_user_error(proc, *words)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left either


def test_convert_refuses_existing_output(tiny_mlx, tmp_path):
    hf, _ = tiny_mlx
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run("convert.py", "--hf-path", str(hf), "--mlx-path", str(out)), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces a model directory, never a directory of something else.
    assert_user_error(run("convert.py", "--hf-path", str(hf), "--mlx-path", str(out), "--force"), "not a model")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")  # an (old, broken) model: that may go
    proc = run("convert.py", "--hf-path", str(hf), "--mlx-path", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct((out).stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "args, words",
    [
        (["--q-bits", "8"], ["--q-bits", "-q"]),
        (["--mlx-path", "."], ["current directory"]),
    ],
)
def test_convert_refuses_confusing_options(tiny_mlx, tmp_path, args, words):
    hf, _ = tiny_mlx
    argv = ["--hf-path", str(hf), "--mlx-path", str(tmp_path / "o"), *args]
    assert_user_error(run("convert.py", *argv, "--force"), *words)


def test_group_size_that_leaves_layers_in_float_warns(tiny_mlx, tmp_path):
    hf, _ = tiny_mlx  # hidden 64: a group of 128 fits no matrix of this model
    proc = run("convert.py", "--hf-path", str(hf), "--mlx-path", str(tmp_path / "o"), "-q", "--q-group-size", "128")
    assert proc.returncode == 0, proc.stderr
    warns = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warns) == 1 and "stay in float" in warns[0] and "--q-group-size" in warns[0]


def test_missing_paths(tmp_path):
    missing = str(tmp_path / "nope")
    assert_user_error(run("convert.py", "--hf-path", missing, "--mlx-path", str(tmp_path / "o")), "nope")
    assert_user_error(run("generate.py", "--model", missing, "--prompt", "hi"), "nope")
    assert not (tmp_path / "o").exists()


def test_generate_directory_without_model(tmp_path):
    assert_user_error(run("generate.py", "--model", str(tmp_path), "--prompt", "hi"), "config.json")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prompt", ""], ["prompt is empty"]),
        (["--prompt", "   \n"], ["prompt is empty"]),
        (["--prompt", "hi", "--max-tokens", "0"], ["--max-tokens", "at least 1"]),
        (["--prompt", "hi", "--max-tokens", "-3"], ["--max-tokens"]),
        (["--prompt", "hi", "--temp", "-1"], ["--temp"]),
        # Values argparse alone would take for unknown options ("expected one argument"):
        (["--prompt", "hi", "--temp", "-inf"], ["--temp", ">= 0", "got -inf"]),
        (["--prompt", "hi", "--temp", "-1e-3"], ["--temp", ">= 0", "got -1e-3"]),
        (["--prompt", "hi", "--temp=-1"], ["--temp", ">= 0", "got -1"]),
        (["--prompt", "hi", "--top-p", "-inf"], ["--top-p", "got -inf"]),
        (["--prompt", "hi", "--memory-budget", "-1e9"], ["--memory-budget", "got -1e9"]),
        (["--prompt", "hi", "--top-p", "1.5"], ["--top-p"]),
        (["--prompt", "hi", "--seed", "-1"], ["--seed"]),
        (["--prompt", "hi", "--repetition-penalty", "0"], ["--repetition-penalty", "> 0"]),
    ],
)
def test_generate_refuses_bad_options(tiny_mlx, args, words):
    _, mlx = tiny_mlx
    assert_user_error(run("generate.py", "--model", str(mlx), *args), *words)


def test_revision_of_a_local_directory_is_refused(tiny_mlx, tmp_path):
    hf, mlx = tiny_mlx
    out = tmp_path / "out"
    proc = run("convert.py", "--hf-path", str(hf), "--mlx-path", str(out), "--revision", "v2")
    assert_user_error(proc, str(hf), "--revision", "Hub repo ids")
    assert not out.exists()
    # The library entry point generate.py's loader goes through, too.
    from mlx_llama.errors import MlxLlamaError
    from mlx_llama.hub import resolve

    with pytest.raises(MlxLlamaError, match="--revision"):
        resolve(str(mlx), revision="main")
    assert resolve(str(mlx)) == mlx


def _dangling_weights(d: Path):
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(d / "deleted-blob")


def _endless_config(d: Path):
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")


def _huge_config(d: Path):
    with open(d / "config.json", "r+b") as f:
        f.truncate((16 << 20) + 1)  # just over the cap; sparse


@pytest.mark.parametrize(
    "breakage, words",
    [
        (_dangling_weights, ["model.safetensors", "broken symlink"]),
        (_endless_config, ["config.json", "not a regular file"]),
        (_huge_config, ["config.json", "too large"]),
    ],
)
def test_generate_refuses_hostile_model_files(tiny_mlx, tmp_path, breakage, words):
    _, mlx = tiny_mlx
    model = tmp_path / "model"
    shutil.copytree(mlx, model)
    breakage(model)
    assert_user_error(run("generate.py", "--model", str(model), "--prompt", "hi"), *words)


def test_stdin_that_is_not_utf8_is_refused(tiny_mlx):
    _, mlx = tiny_mlx
    proc = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--model", str(mlx), "--prompt", "-"],
        input=b"\xff\xfe bad", capture_output=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 1 and b"UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


def test_prompt_from_stdin(tiny_mlx):
    _, mlx = tiny_mlx
    proc = run("generate.py", "--model", str(mlx), "--prompt", "-", "--max-tokens", "2", stdin="hello there")
    assert proc.returncode == 0, proc.stderr
    assert "Prompt:" in proc.stdout
