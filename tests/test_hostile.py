"""A corpus of broken and hostile checkpoints, each run through `convert.py` as a user would.

Every broken input must end in exactly one line on stderr naming the file or tensor and the cause,
a non-zero exit (never a crash of the interpreter: a negative return code would be a signal), no
traceback, and no output directory or temporary left behind. Suspicious but loadable weights
(NaN, Inf, float16 overflow) convert with a one-line warning naming the tensor.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint, write_tokenizer
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def convert_cli(src: Path, out: Path, *extra):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", str(src), "--mlx-path", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


def good(root: Path, **overrides) -> Path:
    """A valid tiny checkpoint, whose config.json then gets `overrides` (which may be nonsense)."""
    config = tiny_config()
    src = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=0))
    if overrides:
        (src / "config.json").write_text(json.dumps({**config, **overrides}))
    return src


def rewrite_header(path: Path, edit) -> None:
    """Apply edit(header_dict) to a safetensors file's JSON header, keeping the data as is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


# Each case: builds a broken input under root, returns (path to convert, words the error must contain).
def truncated(root):
    src = good(root)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return src, ["model.safetensors", "truncated"]


def empty_weights_file(root):
    src = good(root)
    (src / "model.safetensors").write_bytes(b"")
    return src, ["model.safetensors", "too short"]


def header_length_lies(root):
    src = good(root)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:])
    return src, ["model.safetensors", "header length"]


def header_not_json(root):
    src = good(root)
    data = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (src / "model.safetensors").write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    return src, ["model.safetensors", "corrupt"]


def offsets_past_end(root):
    src = good(root)

    def edit(h):
        h[first_tensor(h)]["data_offsets"][1] += 10**9

    rewrite_header(src / "model.safetensors", edit)
    return src, ["model.safetensors", "bytes"]


def shape_lies(root):
    src = good(root)

    def edit(h):
        h[first_tensor(h)]["shape"] = [7, 7]

    rewrite_header(src / "model.safetensors", edit)
    return src, ["model.safetensors", "shape"]


def negative_shape(root):
    src = good(root)

    def edit(h):
        h[first_tensor(h)]["shape"] = [-1, 64]

    rewrite_header(src / "model.safetensors", edit)
    return src, ["model.safetensors", "corrupt"]


def unknown_dtype(root):
    src = good(root)

    def edit(h):
        h[first_tensor(h)]["dtype"] = "F8_E9"

    rewrite_header(src / "model.safetensors", edit)
    return src, ["model.safetensors", "corrupt"]


def index_names_missing_shard(root):
    config = tiny_config()
    src = write_hf_checkpoint(root / "hf", config, random_weights(config), shards=2)
    (src / "model-00002-of-00002.safetensors").unlink()
    return src, ["model-00002-of-00002.safetensors", "missing"]


def index_not_json(root):
    config = tiny_config()
    src = write_hf_checkpoint(root / "hf", config, random_weights(config), shards=2)
    (src / "model.safetensors.index.json").write_text("{not json")
    return src, ["model.safetensors.index.json"]


def index_lists_absent_tensor(root):
    config = tiny_config()
    src = write_hf_checkpoint(root / "hf", config, random_weights(config), shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, ["model.layers.0.mlp.extra.weight", "not in the file"]


def config_not_json(root):
    src = good(root)
    (src / "config.json").write_text("{'single': quotes}")
    return src, ["config.json", "JSON"]


def config_is_a_list(root):
    src = good(root)
    (src / "config.json").write_text("[1, 2, 3]")
    return src, ["config.json", "object"]


def heads_do_not_divide(root):
    return good(root, num_attention_heads=4, num_key_value_heads=3), ["num_key_value_heads"]


def vocab_larger_than_embedding(root):
    src = good(root)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    # Weights for a 64-row embedding, so only the tokenizer is too big.
    config = tiny_config(vocab_size=64)
    src2 = write_hf_checkpoint(root / "hf2", config, random_weights(config), tokenizer=False)
    write_tokenizer(src2, 320)
    return src2, ["tokenizer", "320", "64"]


def empty_directory(root):
    (root / "empty").mkdir()
    return root / "empty", ["config.json", "missing"]


def only_a_tokenizer(root):
    d = root / "tok"
    d.mkdir()
    write_tokenizer(d, 320)
    return d, ["config.json", "missing"]


def no_weights(root):
    src = good(root)
    (src / "model.safetensors").unlink()
    return src, ["no weights found"]


def dangling_weights_symlink(root):
    """A Hub-cache style snapshot whose blob was deleted: not "no weights found"."""
    src = good(root)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(root / "deleted-blob")
    return src, ["model.safetensors", "broken symlink"]


def dangling_pickled_weights_symlink(root):
    src = good(root)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").symlink_to(root / "deleted-blob")
    return src, ["pytorch_model.bin", "broken symlink"]


def config_is_endless(root):
    """Read whole, a config.json linked to /dev/zero would grow until memory ran out."""
    src = good(root)
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")
    return src, ["config.json", "not a regular file"]


def config_too_large(root):
    src = good(root)
    with open(src / "config.json", "r+b") as f:
        f.truncate((16 << 20) + 1)  # just over the 16 MiB cap; sparse, so cheap to make
    return src, ["config.json", "too large"]


def only_pickled_weights(root):
    src = good(root)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    return src, ["pytorch_model.bin"]


def a_file_not_a_directory(root):
    f = root / "model.safetensors"
    f.write_bytes(b"x")
    return f, ["not a directory"]


def gguf_cut_short(root):
    """The first 40 bytes of a GGUF: the magic and counts are there, the rest is not."""
    import mlx.core as mx

    full = root / "full.gguf"
    mx.save_gguf(str(full), {"token_embd.weight": mx.zeros((8, 4))}, {"general.architecture": "llama"})
    cut = root / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:40])
    return cut, ["cut.gguf", "truncated"]


CASES = [
    truncated, empty_weights_file, header_length_lies, header_not_json, offsets_past_end, shape_lies,
    negative_shape, unknown_dtype, index_names_missing_shard, index_not_json, index_lists_absent_tensor,
    config_not_json, config_is_a_list, heads_do_not_divide, vocab_larger_than_embedding, empty_directory,
    only_a_tokenizer, no_weights, a_file_not_a_directory, gguf_cut_short, dangling_weights_symlink,
    dangling_pickled_weights_symlink, config_is_endless, config_too_large,
]
BAD_SIZES = [("hidden_size", 0), ("num_hidden_layers", -2), ("intermediate_size", 96.5), ("vocab_size", "320"),
             ("num_attention_heads", True)]


def check_refused(root: Path, src: Path, words):
    out = root / "out"
    proc = convert_cli(src, out)
    assert proc.returncode > 0, (proc.returncode, proc.stdout, proc.stderr)  # > 0: an exit, not a signal
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "converting:" not in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out")]  # no temporary left behind


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_refused(tmp_path, case):
    src, words = case(tmp_path)
    check_refused(tmp_path, src, words)


@pytest.mark.parametrize("key, value", BAD_SIZES, ids=[k for k, _ in BAD_SIZES])
def test_bad_sizes_refused(tmp_path, key, value):
    check_refused(tmp_path, good(tmp_path, **{key: value}), ["config.json", key, "positive integer"])


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_weights_warn_naming_the_tensor(tmp_path, bad, word):
    config = tiny_config()
    weights = random_weights(config)
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    src = write_hf_checkpoint(tmp_path / "hf", config, weights)
    proc = convert_cli(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    warns = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warns) == 1 and "model.layers.1.mlp.up_proj.weight" in warns[0] and word in warns[0]


def test_float16_overflow_warns_naming_the_tensor(tmp_path):
    config = tiny_config()
    weights = random_weights(config)
    weights["model.norm.weight"][0] = 1e6
    src = write_hf_checkpoint(tmp_path / "hf", config, weights)
    proc = convert_cli(src, tmp_path / "out", "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    warns = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warns) == 1 and "model.norm.weight" in warns[0] and "float16" in warns[0]
    # Without the cast there is nothing to warn about.
    proc = convert_cli(src, tmp_path / "out2")
    assert proc.returncode == 0 and "warning:" not in proc.stderr



def test_stray_safetensors_beside_an_index_is_not_merged(tmp_path):
    """Only the files the index names are read: an extra (say, half-downloaded) file is ignored."""
    config = tiny_config()
    src = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config), shards=2)
    (src / "model-stray.safetensors").write_bytes(b"\x00" * 64)  # would be refused if it were read
    (src / "consolidated.safetensors").write_bytes((src / "model-00001-of-00002.safetensors").read_bytes())
    proc = convert_cli(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr


def test_bf16_stays_bit_identical_by_default(tmp_path):
    import mlx.core as mx

    config = tiny_config()
    src = write_hf_checkpoint(tmp_path / "hf", config, random_weights(config), dtype="bfloat16")
    assert convert_cli(src, tmp_path / "out").returncode == 0
    before = mx.load(str(src / "model.safetensors"))
    after = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert set(before) == set(after)
    for name, w in before.items():
        assert after[name].dtype == mx.bfloat16
        assert mx.array_equal(after[name].view(mx.uint16), w.view(mx.uint16)).item(), name
