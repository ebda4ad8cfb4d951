"""How much does quantization hurt a model, in numbers: perplexity on a fixed text and, against a
reference model (usually the float original), KL divergence, top-1 agreement and logit error.

    python -m mlx_llama.evaluate --model smollm2-4bit --reference smollm2-bf16 --dequantize
    python -m mlx_llama.evaluate --model smollm2-bf16 --reference smollm2-bf16 --kv-bits 8

With ``--kv-bits``/``--kv-dtype``/``--kv-chunk`` the model under test reads each window through a
KV cache, a chunk at a time as generation does, so the cost of how the cache stores keys and values
is measured too (the reference still runs each window whole, without a cache).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm import tqdm

from .cache import KV_BITS, KV_GROUP_SIZES, resolve_group_size
from .cli import _Parser, _positive_int, _run
from .errors import MlxLlamaError

# Standard-library docstrings that are mostly prose: real English read at run time from what is
# installed, so no copied text ships with the package. About 28,000 characters (~7,000 SmolLM2
# tokens) on CPython 3.11; the exact text changes only with the Python version.
PROSE_DOCSTRINGS = (
    "argparse", "argparse.Action", "unittest.TestCase", "textwrap.TextWrapper", "difflib.SequenceMatcher", "copy",
    "heapq", "io.IOBase", "io.TextIOWrapper", "subprocess", "tempfile", "tempfile.mkstemp", "shutil.copytree",
    "threading.Condition", "threading.Semaphore", "pickle.Pickler", "functools.lru_cache", "dataclasses.field", "cmd",
)  # fmt: skip


def _stdlib_object(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)


def default_eval_text() -> tuple[str, str]:
    """(text, description of where it came from): the docstrings of PROSE_DOCSTRINGS, joined by blank lines."""
    docs = [inspect.getdoc(_stdlib_object(name)) for name in PROSE_DOCSTRINGS]
    if not all(docs):  # python -OO strips docstrings
        raise MlxLlamaError("this Python has no docstrings (run without -OO) to evaluate on; pass --text FILE")
    source = f"docstrings of the Python {platform.python_version()} standard library ({', '.join(PROSE_DOCSTRINGS)})"
    return "\n\n".join(docs), source


@dataclass
class EvalResult:
    """What ``evaluate`` measured; the comparison fields stay None without a reference."""

    tokens: int  # predictions scored: each window of T tokens scores T - 1
    windows: int
    nll: float  # mean negative log-likelihood, nats per token
    perplexity: float
    seconds: float  # forward passes of the model under test only
    tokens_per_s: float  # tokens run through the model under test per second
    kl: Optional[float] = None  # mean KL(P_reference || P_model), nats per token
    top1: Optional[float] = None  # fraction of positions whose most likely token agrees
    rel_logit_error: Optional[float] = None  # ||logits - ref||_2 / ||ref||_2 over all positions and vocabulary
    reference_nll: Optional[float] = None
    reference_perplexity: Optional[float] = None


def _row_sum(x: mx.array) -> mx.array:
    """Sum over the last axis, (T, V) -> (T,). A plain float32 sum over a 49k vocabulary is off by
    ~1e-5 relative (1e-4 in a logsumexp); summing blocks of 256 first keeps it near 1e-7."""
    pad = -x.shape[-1] % 256
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)])
    return x.reshape(x.shape[0], -1, 256).sum(axis=-1).sum(axis=-1)


def _logsumexp(x: mx.array) -> mx.array:
    m = x.max(axis=-1)
    return m + mx.log(_row_sum(mx.exp(x - m[:, None])))


def _kl(logits: mx.array, ref: mx.array, lse: mx.array, ref_lse: mx.array) -> mx.array:
    """KL(P_ref || P_model) per position, (T,).

    The textbook sum p (log p - log q) loses digits in float32 when the models are close: its terms
    are log-probabilities of ~10, each off by ~1e-6, so a KL of 1e-5 keeps two digits, 1e-7 none. With
    x = log(q/p), E_p[e^x] = 1 gives KL = E_p[f(x)], f(x) = e^x - 1 - x >= 0: no cancellation between
    terms, and an error in the per-row constant of x changes the sum only to second order. f comes
    from its series where |x| is small, from expm1 elsewhere."""
    x = (logits - ref) - (lse - ref_lse)[:, None]
    series = x * x * (0.5 + x * (1 / 6 + x / 24))
    f = mx.where(mx.abs(x) < 0.01, series, mx.expm1(x) - x)
    p = mx.exp(ref - ref_lse[:, None])
    total = _row_sum(p)  # 1 up to rounding; dividing by it keeps E_p exact
    kl = _row_sum(p * f) / total
    # Where q/p passes e^80, p lies below float32's range and E_p[f] loses mass: the textbook form
    # is accurate there (such a KL is large).
    return mx.where(x.max(axis=-1) > 80, -_row_sum(p * x) / total, kl)


def _window_sums(logits: mx.array, targets: mx.array, ref: Optional[mx.array]) -> dict:
    """Statistics of one window's (T, V) float32 logits, summed over positions in float64."""
    lse = _logsumexp(logits)
    stats = {"nll": lse - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]}
    if ref is not None:
        ref_lse = _logsumexp(ref)
        stats["ref_nll"] = ref_lse - mx.take_along_axis(ref, targets[:, None], axis=-1)[:, 0]
        stats["kl"] = _kl(logits, ref, lse, ref_lse)
        stats["top1"] = mx.argmax(logits, axis=-1) == mx.argmax(ref, axis=-1)
        stats["err2"] = _row_sum(mx.square(logits - ref))
        stats["ref2"] = _row_sum(mx.square(ref))
    mx.eval(stats)
    return {k: float(np.array(v).astype(np.float64).sum()) for k, v in stats.items()}


KV_DTYPES = ("stored", "float32")
DEFAULT_KV_CHUNK = 64


def _kv_storage_dtype(kv_dtype) -> Optional[mx.Dtype]:
    """make_cache's ``dtype=`` for a ``kv_dtype`` choice: "stored" -> None, i.e. the model's own
    ``kv_dtype`` (the narrower of stored and compute dtype: what generation keeps), "float32" ->
    mx.float32; an mx.Dtype passes through."""
    if isinstance(kv_dtype, mx.Dtype):
        return kv_dtype
    if kv_dtype not in KV_DTYPES:
        raise MlxLlamaError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} or an mx.Dtype, got {kv_dtype!r}")
    return mx.float32 if kv_dtype == "float32" else None


class ThroughKVCache:
    """A model that computes ``model(x)`` the way generation does: ``chunk`` tokens at a time into
    a fresh KV cache per call, so that every chunk attends to keys and values as the cache stores
    them (rounded to its dtype, or quantized). Called like the model, logits of all chunks joined.

    With float32 storage this is the plain forward pass up to float rounding; anything else
    measures what the storage costs."""

    def __init__(self, model, *, kv_bits=None, kv_group_size: int = 64, kv_dtype="stored", chunk=DEFAULT_KV_CHUNK):
        if kv_bits is not None and kv_bits not in KV_BITS:
            raise MlxLlamaError(f"kv_bits must be 4 or 8, got {kv_bits!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise MlxLlamaError(f"the KV chunk must be a positive number of tokens, got {chunk!r}")
        self.model, self.args, self.chunk = model, model.args, chunk
        if kv_bits is not None:
            # Resolved once here, so a group size that head_dim forces down is warned about once
            # (and an impossible head_dim refused) before any window runs.
            kv_group_size = resolve_group_size(model.args.head_dim, kv_group_size)
        self.cache_kwargs = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, dtype=_kv_storage_dtype(kv_dtype))
        self.cache_dtype = self.cache_kwargs["dtype"] or getattr(model, "kv_dtype", None)

    def describe(self) -> str:
        """What the cache stores, in words, e.g. "8-bit groups of 64 (scales in bfloat16), chunks of 64"."""
        bits, group = self.cache_kwargs["kv_bits"], self.cache_kwargs["kv_group_size"]
        if bits is None:
            what = _dtype_name(self.cache_dtype)
        else:  # quantized caches keep scales in the dtype the keys come in (see cache._Quantized)
            what = f"{bits}-bit groups of {group} (scales in {_dtype_name(getattr(self.model, 'compute_dtype', None))})"
        return f"{what}, chunks of {self.chunk}"

    def __call__(self, x: mx.array) -> mx.array:
        cache = self.model.make_cache(**self.cache_kwargs)
        outs = []
        for start in range(0, x.shape[1], self.chunk):
            logits = self.model(x[:, start : start + self.chunk], cache)
            # Evaluated chunk by chunk, as generation's prefill does, so the graph stays one chunk deep.
            mx.eval(logits, [(c.keys, c.values) for c in cache])
            outs.append(logits)
        return mx.concatenate(outs, axis=1)


def _dtype_name(dtype: Optional[mx.Dtype]) -> str:
    return "the incoming dtype" if dtype is None else str(dtype).rpartition(".")[2]


def evaluate(
    model,
    tokens: list[int],
    *,
    window: int = 512,
    reference=None,
    progress: bool = True,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    kv_dtype=None,
    kv_chunk: Optional[int] = None,
) -> EvalResult:
    """Score ``tokens`` in non-overlapping windows of ``window`` tokens, each run from a fresh start;
    a last window shorter than 2 tokens is dropped. With ``reference`` (a model over the same
    vocabulary) also compare the two output distributions position by position.

    Each window runs whole, without a cache, unless ``kv_bits`` (4 or 8, with ``kv_group_size``),
    ``kv_dtype`` ("stored": the model's ``kv_dtype``, as generation keeps it; "float32"; or an
    mx.Dtype) or ``kv_chunk`` is given: then the model under test reads it through a fresh KV cache
    ``kv_chunk`` tokens at a time (default 64; see ``ThroughKVCache``). The reference always runs
    whole."""
    if kv_bits is not None or kv_dtype is not None or kv_chunk is not None:
        model = ThroughKVCache(
            model,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            kv_dtype="stored" if kv_dtype is None else kv_dtype,
            chunk=DEFAULT_KV_CHUNK if kv_chunk is None else kv_chunk,
        )
    if window < 2:
        raise MlxLlamaError(f"the window must be at least 2 tokens, got {window}")
    chunks = [tokens[i : i + window] for i in range(0, len(tokens), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise MlxLlamaError(f"{len(tokens)} tokens are too few to evaluate: at least 2 are needed")
    vocab = model.args.vocab_size
    if reference is not None and reference.args.vocab_size != vocab:
        raise MlxLlamaError(f"the reference's vocabulary has {reference.args.vocab_size} tokens, the model's {vocab}")
    if not 0 <= min(tokens) <= max(tokens) < vocab:
        raise MlxLlamaError(f"token ids run from {min(tokens)} to {max(tokens)}, outside the vocabulary of {vocab}")

    sums: dict = {}
    seconds = 0.0
    for chunk in tqdm(chunks, desc="windows", unit="window", disable=not progress):
        x = mx.array([chunk])
        start = time.perf_counter()
        logits = model(x)
        mx.eval(logits)
        seconds += time.perf_counter() - start
        ref = reference(x)[0, :-1].astype(mx.float32) if reference is not None else None
        # Position t predicts token t + 1: the last position has nothing to predict.
        for k, v in _window_sums(logits[0, :-1].astype(mx.float32), mx.array(chunk[1:]), ref).items():
            sums[k] = sums.get(k, 0.0) + v

    n = sum(len(c) - 1 for c in chunks)
    r = EvalResult(
        tokens=n,
        windows=len(chunks),
        nll=sums["nll"] / n,
        perplexity=math.exp(sums["nll"] / n),
        seconds=seconds,
        tokens_per_s=sum(map(len, chunks)) / seconds if seconds > 0 else float("inf"),
    )
    if reference is not None:
        r.kl, r.top1 = sums["kl"] / n, sums["top1"] / n
        r.rel_logit_error = math.sqrt(sums["err2"] / sums["ref2"]) if sums["ref2"] > 0 else 0.0
        r.reference_nll = sums["ref_nll"] / n
        r.reference_perplexity = math.exp(r.reference_nll)
    return r


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear / QuantizedEmbedding by a float32 Linear / Embedding holding the
    dequantized weights, in place; returns the model.

    The result computes the same function up to float rounding. Why bother: on MLX's CPU backend a
    float32 matmul (with a good BLAS) runs prefill some 20x faster than ``quantized_matmul``, so
    evaluating a quantized model is quicker this way and measures the same numbers."""
    swaps = []
    for path, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        w = mx.dequantize(
            m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, mode=getattr(m, "mode", "affine")
        ).astype(mx.float32)
        if isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                new.bias = m["bias"]
        else:
            new = nn.Embedding(w.shape[0], w.shape[1])
        new.weight = w
        swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        mx.eval(model.parameters())
    return model


def _window_arg(s: str) -> int:
    v = _positive_int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {v}")
    return v


def parse_args(argv=None):
    p = _Parser(
        prog="python -m mlx_llama.evaluate",
        description="Perplexity of a model and, against a reference, KL divergence, top-1 agreement and logit error.",
    )
    p.add_argument("--model", required=True, help="MLX model directory (or Hub repo id) to evaluate")
    p.add_argument("--reference", help="model to compare against, e.g. the float original of a quantized model")
    p.add_argument("--text", help="UTF-8 text file to evaluate on (default: Python standard-library docstrings)")
    p.add_argument("--window", type=_window_arg, default=512, help="tokens per independent window (default: 512)")
    p.add_argument("--max-tokens", type=_positive_int, default=4096, help="use at most N tokens (default: 4096)")
    p.add_argument("--dequantize", action="store_true", help="dequantize both models to float32 first (faster on CPU)")
    kv = p.add_argument_group(
        "KV cache", "any of these runs the model under test through a KV cache, --kv-chunk tokens at a time"
    )
    kv.add_argument("--kv-bits", type=int, choices=KV_BITS, help="store keys and values quantized to 4 or 8 bits")
    kv.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, help="quantization group (default: 64)")
    kv.add_argument(
        "--kv-dtype", choices=KV_DTYPES, help="cache storage: the model's stored dtype (default) or float32"
    )
    kv.add_argument("--kv-chunk", type=_positive_int, help=f"tokens fed per step (default: {DEFAULT_KV_CHUNK})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a = p.parse_args(argv)
    if a.kv_group_size is not None and a.kv_bits is None:
        p.error("--kv-group-size needs --kv-bits (a float KV cache has no groups)")
    return a


def _kv_options(a) -> dict:
    """ThroughKVCache's keyword arguments from the command line; empty when no KV option was given."""
    if a.kv_bits is None and a.kv_dtype is None and a.kv_chunk is None:
        return {}
    return dict(
        kv_bits=a.kv_bits,
        kv_group_size=a.kv_group_size or 64,
        kv_dtype=a.kv_dtype or "stored",
        chunk=a.kv_chunk or DEFAULT_KV_CHUNK,
    )


def _read_text(path: str) -> tuple[str, str]:
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise MlxLlamaError(f"{path}: no such text file") from None
    except UnicodeDecodeError:
        raise MlxLlamaError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise MlxLlamaError(f"{path}: cannot read the text file ({e.strerror})") from None


def _main(argv) -> None:
    from .loader import load

    a = parse_args(argv)
    text, source = _read_text(a.text) if a.text else default_eval_text()
    model, tokenizer = load(a.model)
    tokens = tokenizer.encode(text, add_bos=False)[: a.max_tokens]
    if len(tokens) < a.window:
        raise MlxLlamaError(f"the text gives {len(tokens)} tokens, fewer than one window of {a.window} (see --window)")
    kv = _kv_options(a)
    # Wrapped here rather than by evaluate()'s keywords so it can describe itself in the report;
    # an impossible setting (a head_dim that cannot be grouped) fails before the reference loads.
    under_test = ThroughKVCache(model, **kv) if kv else model
    reference = load(a.reference)[0] if a.reference else None
    # Which models had quantized layers to dequantize, for the report.
    dequantized = [m is not None and a.dequantize and bool(m.args.quantization) for m in (model, reference)]
    for m, d in zip((model, reference), dequantized):
        if d:
            dequantize_model(m)  # in place: the wrapper sees the dequantized layers too
    r = evaluate(under_test, tokens, window=a.window, reference=reference, progress=not a.json)
    if a.json:
        info = {"model": a.model, "reference": a.reference, "text_source": source, "window": a.window}
        if kv:
            info["kv_cache"] = {**kv, "stores": under_test.describe()}
        print(json.dumps({**info, "dequantized": a.dequantize, **asdict(r)}))
        return
    print(f"text: {source}")
    note = " (quantized layers dequantized to float32 for speed: the same function)"
    print(f"model: {a.model}" + (note if dequantized[0] else ""))
    if kv:
        print(f"KV cache (model only, the reference runs without): {under_test.describe()}")
    print(f"tokens: {r.tokens} predictions in {r.windows} windows of up to {a.window}")
    print(f"perplexity: {r.perplexity:.4f} (nll {r.nll:.4f} nats/token)")
    print(f"speed: {r.tokens_per_s:.1f} tokens/s ({r.seconds:.2f} s, reference excluded)")
    if reference is not None:
        print(f"reference: {a.reference}" + (note if dequantized[1] else ""))
        print(f"reference perplexity: {r.reference_perplexity:.4f} (nll {r.reference_nll:.4f} nats/token)")
        print(f"KL(reference || model): {r.kl:.6f} nats/token")
        print(f"top-1 agreement: {100 * r.top1:.2f}%")
        print(f"relative logit error: {r.rel_logit_error:.5f}")


def main(argv=None) -> int:
    return _run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
