"""Load a converted MLX model directory: skeleton from config.json, quantized layers rebuilt from
the recorded recipe, then a strict load of the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import quant
from .config import ModelArgs
from .errors import MlxLlamaError
from .hub import resolve
from .model import Model
from .tokenizer import Tokenizer, load_tokenizer
from .upcast import compute_in, fast_blas_loaded
from .weights import check_weights, open_weights


def default_compute_dtype(stored: mx.Dtype) -> mx.Dtype:
    """float32 on the CPU whatever the storage: 16-bit compute there is slower and, over 30 layers,
    drifts enough to change SmolLM2's answers (FACTS.md section 3). On a GPU compute in what was
    stored."""
    return mx.float32 if mx.default_device() == mx.cpu else stored


def load_model(model_dir: Path, compute_dtype: Optional[mx.Dtype] = None) -> Model:
    model_dir = Path(model_dir)
    args = ModelArgs.from_file(model_dir / "config.json")
    model = Model(args)
    weights = open_weights(model_dir)
    if args.quantization:
        qconf = args.quantization

        def predicate(path, module):
            if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
                return False
            bits, group_size = quant.params_for(qconf, path)
            return {"bits": bits, "group_size": group_size}

        nn.quantize(model, class_predicate=predicate)
    check_weights(dict(tree_flatten(model.parameters())), weights, str(model_dir))
    model.load_weights(list(weights.items()), strict=True)

    stored = _stored_float_dtype(weights)
    dtype = compute_dtype or default_compute_dtype(stored)
    # The matrices stay as stored (half the memory of float32 for a 16-bit model) and are widened
    # piece by piece as they are used; see upcast.py.
    on_cpu = mx.default_device() == mx.cpu
    if stored != dtype or args.quantization:
        # A float model computing in its own dtype keeps MLX's stock layers: nothing to widen.
        compute_in(model, dtype, prompt_dequantize=bool(args.quantization) and on_cpu and fast_blas_loaded())
    mx.eval(model.parameters())
    model.stored_dtype, model.compute_dtype = stored, dtype
    # The KV cache is kept in the narrower of the two, as the weights are (mlx-lm keeps it in the
    # stored dtype too); attention reads it widened.
    model.kv_dtype = stored if stored.size < dtype.size else dtype
    return model


def load(path_or_repo: str, revision: Optional[str] = None) -> Tuple[Model, Tokenizer]:
    """Load a converted model and its tokenizer from a directory or a Hub repo id."""
    model_dir = resolve(path_or_repo, revision)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir, model.args.eos_token_ids)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise MlxLlamaError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
            f"{model.args.vocab_size} rows: ids past the table cannot be looked up"
        )
    return model, tokenizer


def _stored_float_dtype(weights: dict) -> mx.Dtype:
    """The dtype most of the floating-point bytes are stored in."""
    sizes = {}
    for w in weights.values():
        if mx.issubdtype(w.dtype, mx.floating):
            sizes[w.dtype] = sizes.get(w.dtype, 0) + w.size
    return max(sizes, key=sizes.get) if sizes else mx.float32
