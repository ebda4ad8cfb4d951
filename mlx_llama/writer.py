"""Writing an MLX model directory safely: shard by shard, into a hidden temporary directory that is
renamed into place only when everything is written. An interrupted or failed run leaves nothing
that looks like a model, and ``--force`` removes the old directory only after the new one is ready."""

from __future__ import annotations

import json
import os
import struct
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import MlxLlamaError
from .weights import INDEX_FILE, SINGLE_FILE


def check_target(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty output unless forced, and even then anything that is not a
    model directory. Call before any expensive work."""
    if str(out) in ("", "."):
        raise MlxLlamaError("the output path is empty or the current directory")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise MlxLlamaError(f"{out}: refusing to write over the current directory or one above it")
    if out.is_file():
        raise MlxLlamaError(f"{out}: is a file, not a model directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MlxLlamaError(f"{out}: already exists and is not empty (use --force to replace it)")
        if not (out / "config.json").exists():
            # --force replaces models, not whatever directory a typo pointed at.
            raise MlxLlamaError(f"{out}: not a model directory (no config.json); refusing to replace it")
    if out.parent.exists() and not os.access(out.parent, os.W_OK):
        raise MlxLlamaError(f"{out.parent}: not writable")


def write_model_dir(
    out: Path,
    config: dict,
    tensor_groups: Iterable[Dict[str, mx.array]],
    *,
    files: Optional[Dict[str, Path]] = None,
    texts: Optional[Dict[str, str]] = None,
    total: Optional[int] = None,
    fmt: str = "mlx",
    max_shard_bytes: int = 5 << 30,
    progress: bool = True,
) -> Path:
    """Write config.json, the tensors (each written as soon as it is computed, so memory holds one at
    a time), ``files`` (name -> source path, copied) and ``texts`` (name -> content) as the directory
    ``out``. ``fmt`` is the safetensors metadata "format" ("mlx"; "pt" for a Hugging Face export)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    # mkdtemp makes the directory private (0700); the finished model should have the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        groups = tqdm(tensor_groups, total=total, desc="converting", unit="tensor", disable=not progress)
        try:
            _write_shards(tmp, groups, max_shard_bytes, fmt)
        except OSError as e:  # a full disk, an I/O error
            raise MlxLlamaError(f"{out}: cannot write the weights ({e.strerror or e})") from None
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
              mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.int64: "I64", mx.bool_: "BOOL"}


class _ShardFile:
    """A safetensors file written tensor by tensor: each tensor's bytes go to a spill file as soon as it
    is computed (then it can be freed), and ``close`` writes the header followed by the spilled data.
    Memory holds one tensor at a time instead of a whole shard; disk briefly holds the shard twice."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self.entries, self.nbytes = path, fmt, {}, 0
        self._spill = open(path.with_suffix(".spill"), "wb")

    def add(self, name: str, t: mx.array) -> None:
        mx.eval(t)
        # numpy has no bfloat16: write its bits as uint16, which is the same bytes.
        data = np.array(t.view(mx.uint16) if t.dtype == mx.bfloat16 else t, copy=False)
        self._spill.write(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
        self.entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.nbytes, self.nbytes + t.nbytes]}
        self.nbytes += t.nbytes

    def close(self) -> None:
        self._spill.close()
        header = json.dumps({"__metadata__": {"format": self.fmt}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned
        spill = self.path.with_suffix(".spill")
        with open(self.path, "wb") as f, open(spill, "rb") as src:
            f.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(src, f, 16 << 20)
        spill.unlink()


def _write_shards(tmp: Path, groups: Iterable[Dict[str, mx.array]], max_shard_bytes: int, fmt: str) -> None:
    shards = []
    shard = None
    for tensors in groups:
        if shard is None:
            shard = _ShardFile(tmp / f"shard-{len(shards):05d}.safetensors", fmt)
        for name, t in tensors.items():
            shard.add(name, t)
        if shard.nbytes >= max_shard_bytes:
            shard.close()
            shards.append((shard.path, list(shard.entries)))
            shard = None
    if shard is not None or not shards:
        shard = shard or _ShardFile(tmp / f"shard-{len(shards):05d}.safetensors", fmt)
        shard.close()
        shards.append((shard.path, list(shard.entries)))

    if len(shards) == 1:
        shards[0][0].rename(tmp / SINGLE_FILE)
        return
    weight_map = {}
    for i, (path, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(tmp / final)
        weight_map.update({n: final for n in names})
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / "x")
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
