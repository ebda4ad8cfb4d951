"""Prompt caches on disk: the KV cache of a token prefix, saved so it need not be computed again.

A file is a safetensors file with each layer's keys and values (the filled part only) and, in its
metadata under ``mlx_llama.prompt_cache``, a JSON object: the format version, the token ids the
cache holds, a fingerprint of the model that computed it, and whatever the caller adds (a chat
keeps its messages there). Keys and values are only meaningful for the exact model (and weights)
that produced them, so loading checks the fingerprint and refuses a cache made by another model.
Files are written under a temporary name and renamed, so a failed save leaves the old file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import warnings
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import KVCache
from .errors import MlxLlamaError
from .generate import prefill

FORMAT_VERSION = 1
METADATA_KEY = "mlx_llama.prompt_cache"
# Bytes per element of the dtypes a KV cache can hold.
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 256 << 20  # token ids are JSON in the header: 256 MB is millions of tokens


class PromptCacheError(MlxLlamaError):
    """A prompt cache file that cannot be used: missing, corrupt, truncated, or another format."""


class PromptCacheMismatch(PromptCacheError):
    """A valid prompt cache made by a different model."""


def model_fingerprint(model) -> dict:
    """What identifies the model a KV cache belongs to: the shapes that must agree, a hash of the
    config, and a hash of a sample of every weight (two fine-tunes of one architecture differ there).

    Floating weights are hashed as float32, so the same checkpoint computing in bfloat16 on a GPU
    and in float32 on a CPU has one fingerprint."""
    a = model.args
    config = json.dumps(a.to_dict(), sort_keys=True, default=str)
    names, samples = [], []
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        s = p.reshape(-1)[:64]
        names.append(name)
        samples.append(s.astype(mx.float32) if mx.issubdtype(s.dtype, mx.floating) else s)
    mx.eval(samples)
    h = hashlib.sha256()
    for name, s in zip(names, samples):
        h.update(name.encode())
        h.update(np.array(s).tobytes())
    return {
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "vocab_size": a.vocab_size,
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
    }


def save_prompt_cache(
    path, cache: list, tokens: Sequence[int], model_id: dict, metadata: Optional[dict] = None
) -> Path:
    """Write the KV ``cache`` holding ``tokens`` (its first ``len(tokens)`` positions) to ``path``.

    ``model_id`` is ``model_fingerprint(model)``; ``metadata`` (JSON-serializable) comes back from
    ``load_prompt_cache(..., return_metadata=True)``. The file appears complete or not at all."""
    path = Path(path)
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    arrays = {}
    for i, c in enumerate(cache):
        if type(c) is not KVCache:
            # A rotating cache has lost positions and a quantized one stores triples: neither is a prefix cache.
            raise ValueError(f"a prompt cache holds KVCache layers only, not {type(c).__name__}")
        if c.offset < n:
            raise ValueError(f"cache layer {i} holds {c.offset} positions, fewer than the {n} tokens")
        if n:
            # A generator one step ahead may have written a position past the known tokens: drop it.
            k, v = c.state
            arrays[f"layers.{i}.keys"] = k[..., :n, :]
            arrays[f"layers.{i}.values"] = v[..., :n, :]
    header = {"format": FORMAT_VERSION, "model": model_id, "tokens": tokens, "metadata": metadata or {}}
    meta = {METADATA_KEY: json.dumps(header, separators=(",", ":"))}
    if not path.parent.is_dir():
        raise PromptCacheError(f"{path}: cannot write (no directory {path.parent})")
    if path.is_dir():
        raise PromptCacheError(f"{path}: cannot write (it is a directory)")
    # A hidden name beside the target (same file system, so the rename is atomic), created with the
    # usual permissions.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            mx.save_safetensors(f, arrays, metadata=meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError, ValueError)):  # disk full, permissions, MLX's own write errors
            raise PromptCacheError(f"{path}: cannot write ({_first_line(e)})") from e
        raise
    return path


def load_prompt_cache(path, model, return_metadata: bool = False):
    """Read a prompt cache made for ``model``: returns ``(cache, tokens)``, or ``(cache, tokens, metadata)``.

    Raises ``PromptCacheMismatch`` for a cache made by another model and ``PromptCacheError`` for a
    file that is missing, truncated, corrupt or not a prompt cache; both one line naming the file."""
    path = Path(path)
    header, n_tensors = _read_header(path)
    fp = model_fingerprint(model)
    saved = header["model"]
    if saved != fp:
        diff = next((k for k in fp if saved.get(k) != fp[k]), None) or next(k for k in saved if k not in fp)
        what = (
            "its config differs" if diff == "config_sha256"
            else "its weights differ" if diff == "weights_sha256"
            else f"{diff} {saved.get(diff)} in the file, {fp.get(diff)} here"
        )
        raise PromptCacheMismatch(f"{path}: prompt cache was made for a different model ({what})")
    tokens = header["tokens"]
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < fp["vocab_size"] for t in tokens):
        raise PromptCacheError(f"{path}: corrupt prompt cache (token ids outside the vocabulary)")

    cache = model.make_cache()
    n = len(tokens)
    expected = 2 * len(cache) if n else 0
    if n_tensors != expected:
        raise PromptCacheError(f"{path}: corrupt prompt cache ({n_tensors} tensors, expected {expected})")
    if n:
        try:
            arrays = mx.load(str(path), format="safetensors")
            mx.eval(arrays)
        except (RuntimeError, ValueError) as e:
            raise PromptCacheError(f"{path}: corrupt prompt cache ({_first_line(e)})") from e
        shape = (1, fp["num_key_value_heads"], n, fp["head_dim"])
        for i, c in enumerate(cache):
            kv = [arrays.get(f"layers.{i}.{part}") for part in ("keys", "values")]
            if any(a is None or tuple(a.shape) != shape for a in kv):
                raise PromptCacheError(f"{path}: corrupt prompt cache (layer {i} missing or not of shape {shape})")
            c.state = tuple(kv)  # stored as the cache stores (its dtype), whatever the file holds
    if return_metadata:
        return cache, tokens, header["metadata"]
    return cache, tokens


def _read_header(path: Path) -> tuple[dict, int]:
    """Our JSON header from the safetensors metadata, after checking the file's tensors all fit in it
    (a truncated file fails here, with a message that says so, before MLX reads anything)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise PromptCacheError(f"{path}: not a prompt cache (not a safetensors file, or truncated)")
            st = json.loads(f.read(n))
    except FileNotFoundError:
        raise PromptCacheError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptCacheError(f"{path}: is a directory, not a prompt cache") from None
    except ValueError as e:  # bad UTF-8 or JSON in the header
        raise PromptCacheError(f"{path}: not a prompt cache (unreadable header: {_first_line(e)})") from None
    if not isinstance(st, dict):
        raise PromptCacheError(f"{path}: not a prompt cache (unreadable header)")
    raw = (st.get("__metadata__") or {}).get(METADATA_KEY) if isinstance(st.get("__metadata__"), dict) else None
    if raw is None:
        raise PromptCacheError(f"{path}: not a prompt cache (no {METADATA_KEY} metadata)")
    try:
        header = json.loads(raw)
    except ValueError:
        raise PromptCacheError(f"{path}: corrupt prompt cache (metadata is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else None
        raise PromptCacheError(
            f"{path}: prompt cache format {found!r} is not supported (this version reads {FORMAT_VERSION})"
        )
    if not (isinstance(header.get("model"), dict) and isinstance(header.get("tokens"), list)
            and isinstance(header.get("metadata", {}), dict)):
        raise PromptCacheError(f"{path}: corrupt prompt cache (metadata lacks model or tokens)")
    header.setdefault("metadata", {})

    tensors = {k: v for k, v in st.items() if k != "__metadata__"}
    end = 0
    for name, t in tensors.items():
        try:
            begin, stop = t["data_offsets"]
            count = int(np.prod(t["shape"], dtype=np.int64))
            ok = stop - begin == count * _ITEMSIZE[t["dtype"]] and 0 <= begin <= stop
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise PromptCacheError(f"{path}: corrupt prompt cache (tensor {name!r})")
        end = max(end, stop)
    if size != 8 + n + end:
        raise PromptCacheError(f"{path}: truncated or corrupt prompt cache ({size} bytes, expected {8 + n + end})")
    return header, len(tensors)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trim_cache(cache: list, n: int) -> None:
    """Cut every layer back to its first ``n`` positions."""
    for c in cache:
        if c.offset < n:  # KVCache.trim of a negative count would move the offset forward
            raise ValueError(f"cannot trim a cache of {c.offset} positions to {n}")
        c.trim(c.offset - n)
        if c.offset != n:  # a rotating cache that has evicted positions trims nothing
            raise ValueError(f"{type(c).__name__} cannot be trimmed to {n} positions")


class CachedPrompt(NamedTuple):
    cache: list  # holds all of the prompt but its last token
    rest: List[int]  # what still goes to generate_step(..., cache=cache): the last token
    reused: int  # prompt tokens that came from the file instead of being computed


def process_prompt_with_cache_file(model, tokenizer, ids, path, *, prefill_step_size: int = 512) -> CachedPrompt:
    """Process a prompt with a prompt cache file: reuse the longest prefix ``path`` holds, compute the rest
    (all but the last token, which generation needs to produce logits), and save the result to ``path``.

    A long system prompt is thus computed once and reused by every later run that starts with it.
    ``ids`` may be a string (encoded with ``tokenizer``, as is). A file made by another model is
    replaced, with a warning; any other unreadable file is an error and is left alone."""
    ids = tokenizer.encode(ids) if isinstance(ids, str) else [int(i) for i in ids]
    if not ids:
        raise MlxLlamaError("the prompt is empty")
    path = Path(path)
    cache, cached = model.make_cache(), []
    if path.exists():
        try:
            cache, cached = load_prompt_cache(path, model)
        except PromptCacheMismatch as e:
            warnings.warn(f"{e}; replacing it")
    keep = min(common_prefix(cached, ids), len(ids) - 1)
    trim_cache(cache, keep)
    prefill(model, ids[keep:-1], cache, prefill_step_size)
    if cached != ids[:-1]:
        save_prompt_cache(path, cache, ids[:-1], model_fingerprint(model))
    return CachedPrompt(cache, ids[-1:], keep)
