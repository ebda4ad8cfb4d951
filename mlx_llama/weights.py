"""Finding, checking and lazily opening safetensors weight files.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets)
and the raw data. We read and check the header ourselves before handing the file to ``mx.load``
(which maps tensors lazily): a truncated file or a header whose offsets do not add up becomes a
one-line error naming the file, not a crash deep inside a load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx

from .errors import MlxLlamaError, broken_symlink, broken_symlink_message, read_small_file
from .torch_pickle import open_torch_weights, torch_weight_files

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024


class WeightsError(MlxLlamaError):
    pass


def tensor_nbytes(dtype: str, shape: tuple) -> int:
    """Bytes of a safetensors tensor of this dtype ("F32", "BF16", "U32", ...) and shape."""
    n = _DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def read_safetensors_header(path: Path) -> Dict[str, Tuple[str, tuple]]:
    """name -> (dtype, shape), after checking that every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise WeightsError(f"{path}: truncated or not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header")
    data_size = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            nbytes = tensor_nbytes(dtype, shape)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if end - start != nbytes or start < 0:
            raise WeightsError(f"{path}: tensor {name!r} has shape {list(shape)} but {end - start} bytes")
        if end > data_size:
            raise WeightsError(f"{path}: truncated (tensor {name!r} ends past the end of the file)")
        out[name] = (dtype, shape)
    return out


def weight_files(model_dir: Path) -> Dict[str, Path]:
    """tensor name -> the file holding it, from the index when there is one.

    Only files the index names are read: a stray extra .safetensors in the directory is not merged in.
    """
    index = model_dir / INDEX_FILE
    if index.exists() or broken_symlink(index):  # a dangling index says so, not "no weights found"
        try:
            data = json.loads(read_small_file(index, WeightsError))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{index}: not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightsError(f"{index}: not a valid safetensors index (no weight_map of file names)")
        for fname in set(weight_map.values()):
            # Shards are files beside the index; never follow a name out of the model directory.
            if Path(fname).name != fname or fname in ("", ".", ".."):
                raise WeightsError(f"{index}: shard name {fname!r} is not a file in the model directory")
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if broken_symlink(single):  # e.g. a Hub cache snapshot whose blob was deleted
        raise WeightsError(broken_symlink_message(single))
    if single.exists():
        return {name: single for name in read_safetensors_header(single)}
    torch_files = torch_weight_files(model_dir)  # pytorch_model.bin (+ index): only when there are no safetensors
    if torch_files is not None:
        return torch_files
    if any(model_dir.glob("*.pth")):
        raise WeightsError(
            f"{model_dir}: only .pth files; a Meta checkpoint needs params.json beside consolidated.*.pth"
        )
    # A weight file that is only a dangling link (pytorch_model.bin in a cache whose blob is gone)
    # was skipped above as absent; name it rather than claim there are no weights.
    for p in sorted(model_dir.iterdir()):
        if (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")) and broken_symlink(p):
            raise WeightsError(broken_symlink_message(p))
    raise WeightsError(f"{model_dir}: no weights found ({SINGLE_FILE} or {INDEX_FILE})")


def open_weights(model_dir: Path) -> Dict[str, mx.array]:
    """Lazily map every tensor (nothing is read until a tensor is evaluated)."""
    files = weight_files(model_dir)
    if any(p.suffix == ".bin" for p in files.values()):
        return open_torch_weights(files)
    out = {}
    for path in sorted(set(files.values())):
        if broken_symlink(path):
            raise WeightsError(broken_symlink_message(path))
        if not path.exists():
            missing = sorted(n for n, p in files.items() if p == path)[0]
            raise WeightsError(f"{path}: missing (the index lists {missing!r} in it)")
        header = read_safetensors_header(path)
        try:
            arrays = mx.load(str(path))
        except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
            raise WeightsError(f"{path}: cannot load ({e})") from None
        for name in header:
            if files.get(name) == path:
                out[name] = arrays[name]
    for name, path in files.items():
        if name not in out:
            raise WeightsError(f"{path}: tensor {name!r} listed in the index is not in the file")
    return out


def check_weights(expected: Dict[str, mx.array], found: Dict[str, mx.array], source: str) -> None:
    """Strict comparison of a model's parameters with a checkpoint's tensors: every weight present,
    nothing unexpected, every shape equal, floats where floats belong (an integer tensor would be
    cast silently). The first problem is reported by name. Only shapes and dtypes are read."""
    for name in sorted(expected):
        if name not in found:
            raise WeightsError(f"{source}: missing weight {name!r}")
    for name in sorted(found):
        if name not in expected:
            raise WeightsError(f"{source}: unexpected weight {name!r} (not part of this model)")
        if tuple(found[name].shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{source}: weight {name!r} has shape {list(found[name].shape)}, "
                f"the config implies {list(expected[name].shape)}"
            )
        if mx.issubdtype(expected[name].dtype, mx.floating) != mx.issubdtype(found[name].dtype, mx.floating):
            raise WeightsError(f"{source}: weight {name!r} is stored as {found[name].dtype}, not a floating type")
