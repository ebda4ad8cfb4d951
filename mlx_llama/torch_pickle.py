"""Reading PyTorch checkpoints without torch, and without running any code a pickle asks for.

``torch.save`` (since 1.6) writes a zip archive: ``<root>/data.pkl`` is a pickle of the state dict in
which every tensor is a call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
and every storage a persistent id ``("storage", torch.FloatStorage, key, location, numel)``; the
storage bytes are the stored entry ``<root>/data/<key>``, in the byte order named by
``<root>/byteorder`` (little when absent). ``<root>`` is whatever name torch chose (the file's stem,
or "archive").

A pickle is a program: loading one with ``pickle.load`` can run any function it names. The unpickler
here resolves exactly the handful of globals a state dict uses, each to a harmless stand-in of ours
that only records what the tensor looks like; any other global (``os.system``, ``builtins.eval``, ...)
is refused by name before anything is called. Bytes are read afterwards, with every view checked to
lie inside its storage.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import mlx.core as mx
import numpy as np

from .errors import MlxLlamaError

HF_SINGLE_FILE = "pytorch_model.bin"
HF_INDEX_FILE = "pytorch_model.bin.index.json"
# What torch.save wrote before 1.6: a bare pickle stream that starts with this magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_MAX_PICKLE_BYTES = 256 << 20  # a 70B state dict pickles to well under 1 MB
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths at offset 26


class TorchFileError(MlxLlamaError):
    pass


@dataclass(frozen=True)
class _StorageType:
    """Stands for a torch storage class (torch.FloatStorage, ...): the element type of its bytes."""

    name: str
    dtype: str  # numpy type code without byte order; bfloat16 travels as its uint16 bit patterns

    def __setstate__(self, state):
        raise _Refused(f"pickle BUILD on {self.name}")


# The element types a state dict can hold. Only the float ones occur in Llama weights; the others are
# inert data types too (buffers, step counters) and cost nothing to allow.
STORAGE_TYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "DoubleStorage": "f8",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
}


@dataclass(frozen=True)
class _Storage:
    """A persistent id resolved: the record data/<key>, holding numel elements of stype."""

    stype: _StorageType
    key: str
    numel: int

    def __setstate__(self, state):  # a changed numel would defeat the bounds checks
        raise _Refused(f"pickle BUILD on storage data/{self.key}")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the pickle describes it: a strided view of one storage. Nothing is read yet."""

    storage: _Storage
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.stype.dtype

    def __setstate__(self, state):
        raise _Refused("pickle BUILD on a tensor")


class _Refused(Exception):
    """Raised inside the unpickler; turned into a TorchFileError naming the file."""


class _Allowed:
    """An allowed global, as the unpickler hands it out: calling it calls our stand-in. The wrapper
    itself refuses BUILD, so a pickle cannot set attributes on our functions."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        self.qualname, self.fn = qualname, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise _Refused(f"pickle BUILD on {self.qualname}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> TensorInfo:
    """Stand-in for torch._utils._rebuild_tensor and _rebuild_tensor_v2 (whose extra arguments,
    requires_grad, backward hooks and metadata, mean nothing for inference)."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"a tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise _Refused("a tensor whose size and stride are not tuples of equal length")
    if not (_is_int(storage_offset) and storage_offset >= 0 and all(_is_int(v) and v >= 0 for v in size + stride)):
        raise _Refused(f"a tensor with offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise _Refused(
                f"tensor view (offset {storage_offset}, size {list(size)}, stride {list(stride)}) "
                f"runs past its storage data/{storage.key} of {storage.numel} elements"
            )
    return TensorInfo(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored) -> TensorInfo:
    """Stand-in for torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
    if not isinstance(data, TensorInfo):
        raise _Refused(f"a parameter made of {type(data).__name__}, not a tensor")
    return data


def _allowed_globals() -> dict:
    allowed = {
        ("collections", "OrderedDict"): _Allowed("collections.OrderedDict", collections.OrderedDict),
        ("torch._utils", "_rebuild_tensor"): _Allowed("torch._utils._rebuild_tensor", _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Allowed("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _Allowed("torch._utils._rebuild_parameter", _rebuild_parameter),
    }
    for name, dtype in STORAGE_TYPES.items():
        allowed[("torch", name)] = _StorageType(f"torch.{name}", dtype)
    return allowed


_ALLOWED = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals of a state dict; everything else is refused without being called."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self._source = source
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module, name):
        # Both arrive as the file spells them: nothing has been imported or looked up yet.
        found = _ALLOWED.get((module, name))
        if found is None:
            raise TorchFileError(
                f"{self._source}: refused to load the global {module}.{name} "
                "(a checkpoint needs only tensors and dicts; the file may be malicious)"
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {str(pid)[:80]!r} (expected a storage)")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise _Refused(f"storage id {str(pid)[:80]!r}")
        storage = _Storage(stype, key, numel)
        if self._storages.setdefault(key, storage) != storage:
            raise _Refused(f"storage data/{key} declared twice with different types or sizes")
        return storage


class TorchCheckpoint:
    """One torch.save zip file: the tensors its pickle describes, read on demand.

    Opening reads and checks the zip directory and unpickles data.pkl (small); ``load`` reads bytes.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise TorchFileError(f"{self.path}: no such file") from None
        except OSError as e:
            raise TorchFileError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, ValueError, struct.error, EOFError):
            self._file.close()
            raise TorchFileError(f"{self.path}: {self._not_a_zip_reason()}") from None
        except BaseException:
            self._file.close()
            raise
        try:
            self._entries = {info.filename: info for info in self._zip.infolist()}
            self._root = self._find_root()
            self._big_endian = self._read_byteorder()
            self.tensors = self._unpickle()
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}

    def load(self, names: Optional[Iterable[str]] = None) -> Dict[str, mx.array]:
        """The tensors named (all by default) as MLX arrays in their stored dtype; each storage is read
        once, however many tensors view it."""
        names = list(self.tensors) if names is None else list(names)
        for name in names:
            if name not in self.tensors:
                raise TorchFileError(f"{self.path}: no tensor {name!r} in the file")
        by_storage: Dict[str, list] = {}
        for name in names:
            by_storage.setdefault(self.tensors[name].storage.key, []).append(name)
        out = {}
        for key, group in by_storage.items():
            storage = self._read_storage(self.tensors[group[0]].storage)
            for name in group:
                out[name] = _view(storage, self.tensors[name])
            del storage  # at most one storage's bytes in numpy at a time
        return {name: out[name] for name in names}

    # -- inside the zip -------------------------------------------------------------------------

    def _not_a_zip_reason(self) -> str:
        try:  # zipfile may have closed our handle on the way out
            with open(self.path, "rb") as f:
                head = f.read(len(LEGACY_MAGIC))
        except OSError as e:
            return f"cannot read ({e.strerror})"
        if head == LEGACY_MAGIC:
            return "legacy PyTorch format not supported; re-save with torch>=1.6 or use safetensors"
        if head.startswith(b"PK"):
            return "truncated or corrupt PyTorch checkpoint (a zip archive without its directory)"
        return "not a PyTorch checkpoint (not a zip archive)"

    def _find_root(self) -> str:
        roots = sorted({n.split("/", 1)[0] for n in self._entries if n.count("/") == 1 and n.endswith("/data.pkl")})
        if len(roots) != 1:
            found = "no data.pkl" if not roots else f"{len(roots)} data.pkl files"
            raise TorchFileError(f"{self.path}: not a torch.save checkpoint ({found} in the zip archive)")
        return roots[0]

    def _read_byteorder(self) -> bool:
        name = f"{self._root}/byteorder"
        if name not in self._entries:
            return False  # written before torch recorded it: little-endian
        order = self._read_record(name, max_bytes=16).tobytes().strip()
        if order not in (b"little", b"big"):
            raise TorchFileError(f"{self.path}: unknown byte order {order[:16]!r}")
        return order == b"big"

    def _unpickle(self) -> Dict[str, TensorInfo]:
        name = f"{self._root}/data.pkl"
        data = self._read_record(name, max_bytes=_MAX_PICKLE_BYTES).tobytes()
        try:
            obj = _StateDictUnpickler(data, str(self.path)).load()
        except TorchFileError:
            raise
        except _Refused as e:
            raise TorchFileError(f"{self.path}: refused: {e}") from None
        except Exception as e:  # pickle raises many types for corrupt data (EOFError, KeyError, TypeError, ...)
            why = (str(e).strip().splitlines() or [""])[0]
            raise TorchFileError(f"{self.path}: corrupt data.pkl ({type(e).__name__}: {why})") from None
        if not isinstance(obj, dict):
            raise TorchFileError(f"{self.path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TorchFileError(f"{self.path}: state dict key {key!r} is not a string")
            if not isinstance(value, TensorInfo):
                raise TorchFileError(f"{self.path}: {key!r} is not a tensor ({type(value).__name__})")
        return dict(obj)

    def _entry(self, name: str) -> zipfile.ZipInfo:
        info = self._entries.get(name)
        if info is None:
            raise TorchFileError(f"{self.path}: truncated or corrupt checkpoint ({name} is missing)")
        return info

    def _read_record(self, name: str, max_bytes: int) -> np.ndarray:
        """The bytes of one archive entry, as uint8. Stored entries (all torch writes) are read
        straight from their offset, so a checksum torch left out (set_crc32_options) does not matter."""
        info = self._entry(name)
        if info.file_size > max_bytes:
            raise TorchFileError(f"{self.path}: {name} is implausibly large ({info.file_size} bytes)")
        try:
            if info.compress_type != zipfile.ZIP_STORED:
                return np.frombuffer(self._zip.read(name), dtype=np.uint8)
            f = self._file
            f.seek(info.header_offset)
            sig, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            if sig != b"PK\x03\x04":
                raise zipfile.BadZipFile("bad local header")
            f.seek(name_len + extra_len, io.SEEK_CUR)
            buf = np.empty(info.file_size, dtype=np.uint8)
            if f.readinto(memoryview(buf)) != info.file_size:
                raise zipfile.BadZipFile("entry runs past the end of the file")
            return buf
        except (zipfile.BadZipFile, struct.error, EOFError, ValueError, NotImplementedError) as e:
            raise TorchFileError(f"{self.path}: truncated or corrupt checkpoint ({name}: {e})") from None
        except OSError as e:
            raise TorchFileError(f"{self.path}: cannot read {name} ({e.strerror})") from None

    def _read_storage(self, storage: _Storage) -> np.ndarray:
        code = storage.stype.dtype
        dtype = np.dtype({"bf16": "u2", "b1": "?"}.get(code, code)).newbyteorder(">" if self._big_endian else "<")
        nbytes = storage.numel * dtype.itemsize
        name = f"{self._root}/data/{storage.key}"
        if self._entry(name).file_size != nbytes:
            raise TorchFileError(
                f"{self.path}: storage data/{storage.key} holds {self._entry(name).file_size} bytes; "
                f"the pickle says {storage.numel} elements of {storage.stype.name} ({nbytes} bytes)"
            )
        raw = self._read_record(name, max_bytes=nbytes)
        return raw.view(dtype).astype(dtype.newbyteorder("="), copy=False)


_MX_DTYPES = {"f4": mx.float32, "f2": mx.float16, "f8": mx.float64, "i8": mx.int64, "i4": mx.int32,
              "i2": mx.int16, "i1": mx.int8, "u1": mx.uint8, "b1": mx.bool_}


def _view(storage: np.ndarray, t: TensorInfo) -> mx.array:
    """The tensor t as an MLX array of its own (copied out of the storage, so views stay independent)."""
    itemsize = storage.dtype.itemsize
    # _rebuild_tensor checked this against the declared numel already; as_strided checks nothing, so
    # once more against the bytes actually read.
    if 0 not in t.shape and t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) >= storage.size:
        raise TorchFileError(f"tensor view runs past its storage data/{t.storage.key}")
    view = np.lib.stride_tricks.as_strided(
        storage[t.offset :], shape=t.shape, strides=tuple(s * itemsize for s in t.stride), writeable=False
    )
    arr = mx.array(view if view.flags.c_contiguous else view.copy())
    return arr.view(mx.bfloat16) if t.dtype == "bf16" else arr


def torch_file_shapes(path) -> Dict[str, Tuple[int, ...]]:
    """name -> shape of every tensor in a torch.save file; reads only the (small) pickle."""
    with TorchCheckpoint(path) as ckpt:
        return ckpt.shapes


def load_torch_file(path, names: Optional[Iterable[str]] = None) -> Dict[str, mx.array]:
    """The state dict in a torch.save zip file (torch >= 1.6), as name -> MLX array in the stored dtype
    (bfloat16 stays bfloat16). ``names`` limits what is read. No torch needed, no pickled code run:
    a file naming any global beyond a state dict's is refused with a one-line TorchFileError."""
    with TorchCheckpoint(path) as ckpt:
        return ckpt.load(names)


# ---------------------------------------------------------------------------------------------
# Hugging Face's pickled layout: pytorch_model.bin, or shards listed in pytorch_model.bin.index.json


def torch_weight_files(model_dir) -> Optional[Dict[str, Path]]:
    """tensor name -> file for a Hugging Face directory of PyTorch weights, from the index when there is
    one; None when the directory has neither pytorch_model.bin nor its index. Safetensors, when present,
    should be preferred: check for them first."""
    model_dir = Path(model_dir)
    index = model_dir / HF_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {}
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                    raise TypeError
                files[name] = model_dir / fname
            return files
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise TorchFileError(f"{index}: not a valid index (needs a weight_map of name -> file name)") from None
    single = model_dir / HF_SINGLE_FILE
    if single.is_file():
        return {name: single for name in torch_file_shapes(single)}
    return None


def open_torch_weights(files: Dict[str, Path]) -> Dict[str, mx.array]:
    """Load the tensors ``torch_weight_files`` listed, file by file; a missing file, or a tensor missing
    from the file the index names, is an error naming both."""
    by_file: Dict[Path, list] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out = {}
    for path in sorted(by_file):
        names = sorted(by_file[path])
        if not path.is_file():
            raise TorchFileError(f"{path}: missing (the index lists {names[0]!r} in it)")
        with TorchCheckpoint(path) as ckpt:
            absent = [n for n in names if n not in ckpt.tensors]
            if absent:
                raise TorchFileError(f"{path}: tensor {absent[0]!r} listed in the index is not in the file")
            out.update(ckpt.load(names))
    return out
