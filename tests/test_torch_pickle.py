"""PyTorch checkpoints read without torch: values round-trip exactly, hostile pickles are refused
without running, broken files fail with one line naming them.

The fixtures are written here by hand, opcode by opcode, the way torch.save lays them out (protocol 2;
a zip of <root>/data.pkl, <root>/data/<key>, <root>/byteorder, ...): torch is not installed, and a
writer of our own that shares no code with the reader keeps a misreading of the format from hiding.
(Checked once by hand: torch 2.13's torch.load(weights_only=True) reads these files to the same values,
and the reader reads torch.save's own output, views and bfloat16 included.)
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from .tiny import bf16_bits_to_float32, float32_to_bf16_bits
except ImportError:
    from tiny import bf16_bits_to_float32, float32_to_bf16_bits

from mlx_llama.errors import MlxLlamaError
from mlx_llama.torch_pickle import (
    load_torch_file,
    open_torch_weights,
    torch_file_shapes,
    torch_weight_files,
)

# ---------------------------------------------------------------------------------------------
# A torch.save-format writer

# storage class -> numpy element type of its bytes (bfloat16 as uint16 bit patterns)
STORAGE_KINDS = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
                 "LongStorage": np.int64, "DoubleStorage": np.float64}


@dataclass(eq=False)
class Storage:
    kind: str  # "FloatStorage", "HalfStorage", "BFloat16Storage", ...
    data: np.ndarray  # 1-D, STORAGE_KINDS[kind]
    numel: Optional[int] = None  # what the pickle claims; the real size by default


@dataclass(eq=False)
class View:
    storage: Storage
    offset: int
    shape: tuple
    stride: tuple
    parameter: bool = False  # pickled through torch._utils._rebuild_parameter, as nn.Parameter is


def storage_of(arr: np.ndarray, dtype: str = "float32") -> Storage:
    arr = np.asarray(arr)
    if dtype == "bfloat16":
        return Storage("BFloat16Storage", float32_to_bf16_bits(arr.astype(np.float32)).ravel())
    if dtype == "float16":
        return Storage("HalfStorage", arr.astype(np.float16).ravel())
    if dtype == "int64":
        return Storage("LongStorage", arr.astype(np.int64).ravel())
    return Storage("FloatStorage", arr.astype(np.float32).ravel())


def contiguous(arr: np.ndarray, dtype: str = "float32") -> View:
    arr = np.asarray(arr)
    strides, step = [], 1
    for n in reversed(arr.shape):
        strides.insert(0, step)
        step *= n
    return View(storage_of(arr, dtype), 0, tuple(arr.shape), tuple(strides))


class Ops:
    """Pickle protocol 2 opcodes, written out by hand."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")  # PROTO 2

    def glob(self, module: str, name: str):
        self.b += b"c" + f"{module}\n{name}\n".encode()

    def mark(self):
        self.b += b"("

    def tuple(self):
        self.b += b"t"

    def empty_tuple(self):
        self.b += b")"

    def reduce(self):
        self.b += b"R"

    def int(self, v: int):
        if 0 <= v < 256:
            self.b += b"K" + bytes([v])  # BININT1
        elif 0 <= v < 65536:
            self.b += b"M" + struct.pack("<H", v)  # BININT2
        elif -(2**31) <= v < 2**31:
            self.b += b"J" + struct.pack("<i", v)  # BININT
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.b += b"\x8a" + bytes([len(raw)]) + raw  # LONG1

    def str(self, s: str):
        raw = s.encode()
        self.b += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def bool(self, v: bool):
        self.b += b"\x88" if v else b"\x89"

    def int_tuple(self, values):
        self.mark()
        for v in values:
            self.int(v)
        self.tuple()

    def ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.empty_tuple()
        self.reduce()

    def finish(self) -> bytes:
        return bytes(self.b + b".")  # STOP


def state_dict_pickle(tensors: dict, keys: dict, metadata: bool = True) -> bytes:
    """data.pkl as torch.save writes a state dict: OrderedDict() then SETITEMS of
    name -> _rebuild_tensor_v2((persistent storage id), offset, size, stride, False, OrderedDict()),
    then (with metadata) a BUILD setting its _metadata attribute, as Module.state_dict() has."""
    ops = Ops()
    ops.ordered_dict()
    ops.mark()
    for name, view in tensors.items():
        ops.str(name)
        if view.parameter:
            ops.glob("torch._utils", "_rebuild_parameter")
            ops.mark()
        ops.glob("torch._utils", "_rebuild_tensor_v2")
        ops.mark()
        ops.mark()  # the persistent id ('storage', type, key, location, numel)
        ops.str("storage")
        ops.glob("torch", view.storage.kind)
        ops.str(keys[id(view.storage)])
        ops.str("cpu")
        ops.int(view.storage.data.size if view.storage.numel is None else view.storage.numel)
        ops.tuple()
        ops.b += b"Q"  # BINPERSID
        ops.int(view.offset)
        ops.int_tuple(view.shape)
        ops.int_tuple(view.stride)
        ops.bool(False)  # requires_grad
        ops.ordered_dict()  # backward hooks
        ops.tuple()
        ops.reduce()
        if view.parameter:
            ops.bool(True)
            ops.ordered_dict()
            ops.tuple()
            ops.reduce()
    ops.b += b"u"  # SETITEMS
    if metadata:
        ops.b += b"}"  # EMPTY_DICT: the BUILD state {'_metadata': OrderedDict({'': {'version': 1}})}
        ops.str("_metadata")
        ops.ordered_dict()
        ops.str("")
        ops.b += b"}"
        ops.str("version")
        ops.int(1)
        ops.b += b"sss"  # SETITEM x3
        ops.b += b"b"  # BUILD
    return ops.finish()


def write_torch_zip(path, pkl: bytes, storages: dict, root: str = "archive", byteorder: Optional[str] = "little"):
    """The zip around a data.pkl: storages maps key -> raw bytes. Entries stored, uncompressed."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/.format_version", "1")
        z.writestr(f"{root}/.storage_alignment", "64")
        if byteorder is not None:
            z.writestr(f"{root}/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"{root}/data/{key}", raw)
        z.writestr(f"{root}/version", "3\n")
        z.writestr(f"{root}/.data/serialization_id", "0" * 40)
    return path


def write_torch_file(path, tensors: dict, root: str = "archive", big_endian: bool = False, metadata: bool = True):
    """torch.save(state_dict) without torch. tensors: name -> np.ndarray (float32, own storage) or View."""
    views = {k: v if isinstance(v, View) else contiguous(v) for k, v in tensors.items()}
    keys, storages = {}, {}
    for view in views.values():
        if id(view.storage) not in keys:
            key = str(len(keys))
            keys[id(view.storage)] = key
            data = view.storage.data
            storages[key] = data.astype(data.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
    pkl = state_dict_pickle(views, keys, metadata)
    return write_torch_zip(path, pkl, storages, root, "big" if big_endian else "little")


def as_float64(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)  # exact: every bfloat16 is a float32
    return np.array(a).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("dtype, mx_dtype", [("float32", mx.float32), ("float16", mx.float16),
                                             ("bfloat16", mx.bfloat16)])
def test_round_trip_exact(tmp_path, dtype, mx_dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7)).astype(np.float32) * 3
    b = rng.standard_normal(11).astype(np.float32)
    path = write_torch_file(tmp_path / "w.pt", {"a": contiguous(a, dtype), "b": contiguous(b, dtype)})
    got = load_torch_file(path)
    assert list(got) == ["a", "b"]
    for name, x in (("a", a), ("b", b)):
        assert got[name].dtype == mx_dtype and got[name].shape == x.shape
        if dtype == "bfloat16":
            want = bf16_bits_to_float32(float32_to_bf16_bits(x))
            np.testing.assert_array_equal(np.array(got[name].view(mx.uint16)), float32_to_bf16_bits(x))
        else:
            want = x.astype(dtype)
        np.testing.assert_array_equal(as_float64(got[name]), want.astype(np.float64))


def test_views_share_one_storage(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    s = storage_of(base)
    tensors = {
        "whole": View(s, 0, (6, 8), (8, 1)),
        "rows_2_4": View(s, 16, (2, 8), (8, 1)),  # storage offset
        "row_1": View(s, 8, (8,), (1,)),
        "transposed": View(s, 0, (8, 6), (1, 8)),  # non-contiguous
        "column_3": View(s, 3, (6,), (8,)),
        "every_other": View(s, 1, (3, 4), (16, 2)),
        "scalar": View(s, 47, (), ()),
        "empty": View(s, 0, (0, 5), (5, 1)),
    }
    path = write_torch_file(tmp_path / "views.pt", tensors)
    got = load_torch_file(path)
    flat = base.ravel()
    want = {
        "whole": base, "rows_2_4": base[2:4], "row_1": base[1], "transposed": base.T, "column_3": base[:, 3],
        "every_other": base[::2, 1::2], "scalar": np.array(flat[47]), "empty": np.zeros((0, 5), np.float32),
    }
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        np.testing.assert_array_equal(np.array(got[name]), w, err_msg=name)
    # Each tensor is its own array: nothing aliases the shared storage.
    assert torch_file_shapes(path)["transposed"] == (8, 6)


def test_parameter_int64_subset_and_other_root(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    v = contiguous(w)
    v.parameter = True
    tensors = {"p": v, "steps": contiguous(np.array([3, -1, 2**40]), "int64"), "x": np.ones(4, np.float32)}
    path = write_torch_file(tmp_path / "pytorch_model.bin", tensors, root="pytorch_model", metadata=False)
    got = load_torch_file(path)
    np.testing.assert_array_equal(np.array(got["p"]), w)
    assert got["steps"].dtype == mx.int64 and np.array(got["steps"]).tolist() == [3, -1, 2**40]
    assert list(load_torch_file(path, names=["x"])) == ["x"]


def test_big_endian_storage(tmp_path):
    x = np.linspace(-2, 3, 10, dtype=np.float32)
    path = write_torch_file(tmp_path / "be.pt", {"x": x, "h": contiguous(x, "float16")}, big_endian=True)
    got = load_torch_file(path)
    np.testing.assert_array_equal(np.array(got["x"]), x)
    np.testing.assert_array_equal(np.array(got["h"]), x.astype(np.float16))


def test_no_torch_imported():
    code = (
        "import sys, mlx_llama.torch_pickle, mlx_llama.meta, mlx_llama.weights, mlx_llama.convert\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# Hostile pickles: refused by name, one line, and the payload never runs


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_zip(path: Path, payload) -> Path:
    """A well-formed checkpoint zip whose data.pkl is {"x": payload}, pickled with the standard pickler
    (as an attacker would: the callable is stored by name and called at load time)."""
    pkl = pickle.dumps({"x": payload}, protocol=2, fix_imports=False)  # Python 3 module names
    return write_torch_zip(path, pkl, {"0": b"\0" * 16})


def hostile_cases(marker: Path):
    m = str(marker)
    return {
        "os.system": (Evil(os.system, f"touch {m}"), f"{os.system.__module__}.system"),  # posix.system
        "builtins.eval": (Evil(eval, f"open({m!r}, 'w').write('pwned')"), "builtins.eval"),
        "subprocess.Popen": (Evil(subprocess.Popen, ["touch", m]), "subprocess.Popen"),
        "builtins.open": (Evil(open, m, "w"), "io.open"),  # builtins.open is io.open
    }


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "subprocess.Popen", "builtins.open"])
def test_hostile_globals_refused_without_running(tmp_path, case):
    marker = tmp_path / "pwned"
    payload, word = hostile_cases(marker)[case]
    path = evil_zip(tmp_path / "evil.bin", payload)
    with pytest.raises(MlxLlamaError) as e:
        load_torch_file(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refused" in msg and word in msg, msg
    with pytest.raises(MlxLlamaError):
        torch_file_shapes(path)
    assert not marker.exists()


def test_hostile_global_after_valid_tensors(tmp_path):
    """The payload sits behind a genuine tensor, in a file that is otherwise torch's layout."""
    marker = tmp_path / "pwned"
    ops = Ops()  # one more key/value for the state dict: "evil" -> posix.system("touch ...")
    ops.str("evil")
    ops.glob("posix", "system")
    ops.mark()
    ops.str(f"touch {marker}")
    ops.tuple()
    ops.reduce()
    v = contiguous(np.ones(4, np.float32))
    good = state_dict_pickle({"w": v}, {id(v.storage): "0"}, metadata=False)
    spliced = good[:-2] + bytes(ops.b[2:]) + good[-2:]  # ... value, evil key/value, SETITEMS, STOP
    path = write_torch_zip(tmp_path / "evil.pt", spliced, {"0": np.ones(4, "<f4").tobytes()})
    with pytest.raises(MlxLlamaError, match=r"refused to load the global posix\.system"):
        load_torch_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("pkl", [
    b"(S'touch MARKER'\nios\nsystem\n.",  # protocol 0 INST: a global named without GLOBAL
    b"\x80\x02ctorch.storage\n_load_from_bytes\nC\x01x\x85R.",  # torch's nested legacy loader
    b"\x80\x02cbuiltins\ngetattr\n.",
    b"\x80\x02c__builtin__\neval\nX\x03\x00\x00\x001+1\x85R.",
    b"\x80\x02cbuiltins\nopen\nX\x06\x00\x00\x00MARKERX\x01\x00\x00\x00w\x86R.",  # MARKER: 6 bytes here
])
def test_other_refusals(tmp_path, monkeypatch, pkl):
    monkeypatch.chdir(tmp_path)  # the payloads name the relative file "pwned!" (its length is in the opcodes)
    path = write_torch_zip(tmp_path / "evil.pt", pkl.replace(b"MARKER", b"pwned!"), {})
    with pytest.raises(MlxLlamaError, match="refused") as e:
        load_torch_file(path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned!").exists()


def test_hostile_payloads_are_live(tmp_path):
    """Control: the standard unpickler does run these payloads, so the refusals above are what saves us."""
    for case in hostile_cases(tmp_path / "pwned"):
        marker = tmp_path / case
        payload, _ = hostile_cases(marker)[case]
        result = pickle.loads(pickle.dumps(payload, protocol=2))
        if isinstance(result, subprocess.Popen):
            result.wait()
        elif hasattr(result, "close"):
            result.close()
        assert marker.exists(), case


@pytest.mark.parametrize("target", ["tensor", "storage", "global"])
def test_build_on_our_stand_ins_refused(tmp_path, target):
    """BUILD (set attributes) on what the unpickler handed out could rewrite what the bounds checks rely on
    (a storage's size) or our stand-in functions: refused."""
    v = contiguous(np.ones(4, np.float32))
    pkl = state_dict_pickle({"w": v}, {id(v.storage): "0"}, metadata=False)
    build = b"}X\x05\x00\x00\x00numelM\xe8\x03sb"  # BUILD with the state {'numel': 1000}
    persid = b"X\x03\x00\x00\x00cpuK\x04tQ"  # ..., 'cpu', 4, TUPLE, BINPERSID
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    assert pkl.count(persid) == 1 and pkl.count(rebuild) == 1
    if target == "tensor":  # right after the tensor's REDUCE, before SETITEMS
        pkl = pkl[:-2] + build + pkl[-2:]
    elif target == "storage":
        pkl = pkl.replace(persid, persid + build)
    else:
        pkl = pkl.replace(rebuild, rebuild + build)
    path = write_torch_zip(tmp_path / "b.pt", pkl, {"0": np.ones(4, "<f4").tobytes()})
    with pytest.raises(MlxLlamaError, match="refused: pickle BUILD on"):
        load_torch_file(path)


def test_view_past_storage_refused(tmp_path):
    s = storage_of(np.ones(6, np.float32))
    for view in (View(s, 4, (3,), (1,)), View(s, 0, (2, 3), (4, 1)), View(s, 0, (2,), (-1,))):
        path = write_torch_file(tmp_path / "v.pt", {"w": view})
        with pytest.raises(MlxLlamaError) as e:
            load_torch_file(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_storage_smaller_than_declared(tmp_path):
    s = storage_of(np.ones(6, np.float32))
    s.numel = 600  # the pickle claims more than the record holds
    path = write_torch_file(tmp_path / "v.pt", {"w": View(s, 0, (600,), (1,))})
    with pytest.raises(MlxLlamaError, match=r"data/0 holds 24 bytes"):
        load_torch_file(path)


# ---------------------------------------------------------------------------------------------
# Broken files: one line naming the file


def broken_files(tmp_path) -> dict:
    good = write_torch_file(tmp_path / "good.pt", {"w": np.arange(64, dtype=np.float32)})
    raw = good.read_bytes()
    cases = {}

    def put(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        cases[name] = p

    put("truncated.pt", raw[: len(raw) // 2])
    put("truncated_end.pt", raw[:-10])
    put("empty.pt", b"")
    put("not_a_zip.pt", b"hello, this is not a checkpoint at all")
    put("safetensors.bin", struct.pack("<Q", 2) + b"{}")
    put("legacy.pt", bytes.fromhex("80028a0a6cfc9c46f9206aa85019") + pickle.dumps(1001, protocol=2))
    with zipfile.ZipFile(tmp_path / "no_pickle.pt", "w") as z:
        z.writestr("archive/data/0", b"\0" * 4)
    cases["no_pickle.pt"] = tmp_path / "no_pickle.pt"
    v = contiguous(np.ones(2))
    no_storage = state_dict_pickle({"w": v}, {id(v.storage): "0"})
    cases["no_storage.pt"] = write_torch_zip(tmp_path / "no_storage.pt", no_storage, {})
    cut = zipfile.ZipFile(good).read("archive/data.pkl")[:50]
    cases["pickle_cut.pt"] = write_torch_zip(tmp_path / "pickle_cut.pt", cut, {})
    cases["not_a_dict.pt"] = write_torch_zip(tmp_path / "not_a_dict.pt", pickle.dumps([1, 2], protocol=2), {})
    cases["dict_of_ints.pt"] = write_torch_zip(tmp_path / "dict_of_ints.pt", pickle.dumps({"epoch": 3}, protocol=2), {})
    cases["missing_file.pt"] = tmp_path / "missing_file.pt"
    return cases


WHY = {
    "truncated.pt": "truncated",
    "truncated_end.pt": "truncated",
    "empty.pt": "not a zip",
    "not_a_zip.pt": "not a zip",
    "safetensors.bin": "not a zip",
    "legacy.pt": "legacy PyTorch format not supported; re-save with torch>=1.6 or use safetensors",
    "no_pickle.pt": "no data.pkl",
    "no_storage.pt": "data/0 is missing",
    "pickle_cut.pt": "corrupt data.pkl",
    "not_a_dict.pt": "not a state dict",
    "dict_of_ints.pt": "'epoch' is not a tensor (int)",
    "missing_file.pt": "no such file",
}


def test_broken_files_one_line(tmp_path):
    for name, path in broken_files(tmp_path).items():
        with pytest.raises(MlxLlamaError) as e:
            load_torch_file(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(path)) and WHY[name] in msg, (name, msg)


# ---------------------------------------------------------------------------------------------
# Hugging Face's pytorch_model.bin layout


def test_weight_files_single_and_sharded(tmp_path):
    rng = np.random.default_rng(3)
    w = {f"t{i}": rng.standard_normal((3, i + 1)).astype(np.float32) for i in range(5)}
    single = tmp_path / "single"
    single.mkdir()
    assert torch_weight_files(single) is None
    write_torch_file(single / "pytorch_model.bin", w)
    files = torch_weight_files(single)
    assert files == {k: single / "pytorch_model.bin" for k in w}
    got = open_torch_weights(files)
    for k in w:
        np.testing.assert_array_equal(np.array(got[k]), w[k])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    groups = [["t0", "t1"], ["t2", "t3", "t4"]]
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        write_torch_file(sharded / fname, {k: w[k] for k in g}, root=fname[:-4])
        weight_map |= {k: fname for k in g}
    index = sharded / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files = torch_weight_files(sharded)
    assert {k: p.name for k, p in files.items()} == weight_map
    got = open_torch_weights(files)
    assert set(got) == set(w)
    for k in w:
        np.testing.assert_array_equal(np.array(got[k]), w[k])

    # The index names a tensor its shard lacks / a shard that is not there / a path outside.
    index.write_text(json.dumps({"weight_map": {**weight_map, "t9": weight_map["t0"]}}))
    with pytest.raises(MlxLlamaError, match="'t9' listed in the index is not in the file"):
        open_torch_weights(torch_weight_files(sharded))
    index.write_text(json.dumps({"weight_map": {"t0": "pytorch_model-9.bin"}}))
    with pytest.raises(MlxLlamaError, match="missing"):
        open_torch_weights(torch_weight_files(sharded))
    for bad in ({"weight_map": {"t0": "../x.bin"}}, {"nothing": 1}, [1]):
        index.write_text(json.dumps(bad))
        with pytest.raises(MlxLlamaError, match="not a valid index"):
            torch_weight_files(sharded)


def _hook_added(module_name: str, attr: str) -> bool:
    import importlib

    return attr in vars(importlib.import_module(module_name))


@pytest.mark.skipif(not _hook_added("mlx_llama.weights", "torch_weight_files"),
                    reason="weights.py does not read pytorch_model.bin yet")
def test_convert_reads_pytorch_bin_and_prefers_safetensors(tmp_path):
    try:
        from .tiny import random_weights, tiny_config, write_hf_checkpoint
    except ImportError:
        from tiny import random_weights, tiny_config, write_hf_checkpoint
    from mlx_llama import convert
    from mlx_llama.weights import open_weights

    config = tiny_config()
    weights = random_weights(config)
    src = write_hf_checkpoint(tmp_path / "hf", config, weights)
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    weight_map = {}
    for i, group in enumerate((names[:half], names[half:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        write_torch_file(src / fname, {k: contiguous(weights[k], "bfloat16") for k in group})
        weight_map |= {k: fname for k in group}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = open_weights(src)
    assert set(got) == set(weights) and all(v.dtype == mx.bfloat16 for v in got.values())
    out = convert(str(src), str(tmp_path / "out"), progress=False)
    assert (out / "model.safetensors").exists()

    # With safetensors beside them, the .bin files are not read at all (here: they are garbage).
    for fname in set(weight_map.values()):
        (src / fname).write_bytes(b"garbage")
    try:
        from .tiny import write_safetensors
    except ImportError:
        from tiny import write_safetensors
    write_safetensors(src / "model.safetensors", weights)
    assert set(open_weights(src)) == set(weights)
