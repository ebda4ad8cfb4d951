"""Import a llama GGUF file straight into an MLX model directory, without re-quantizing.

GGUF's Q8_0, Q4_0 and Q4_1 blocks are affine quantization with 32 weights per scale, which is what
MLX's quantized layers compute (`w * scale + bias` per group). `mx.load` hands such a tensor over as
an MLX triple (packed uint32 weight, float16 scales, float16 biases) holding exactly the file's
values, so the triples are stored as they are: the imported model computes with the file's own
weights, bit for bit, where a dequantize-then-quantize round trip would add a second quantization
error on top of the file's. F32, F16 and BF16 tensors keep their dtype. The only change to any
tensor is the q/k row permutation from GGUF's interleaved RoPE layout back to Hugging Face's, which
moves whole rows and so is exact for quantized tensors too.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import quant
from .config import ModelArgs
from .errors import MlxLlamaError
from .gguf import GROUP_SIZE, gguf_config, gguf_modules, quant_bits, read_gguf, tokenizer_files_from_gguf
from .model import Model
from .weights import check_weights
from .writer import check_target, write_model_dir

# F32/F16 load as they are, BF16 is read from the file's bytes, and these three block formats come
# back from mx.load as exact affine triples. mx.load dequantizes the K-quants (Q2_K, Q4_K, Q6_K) to
# float16 and fails on the rest; both are refused by name before loading.
IMPORTABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def import_gguf(gguf_path, mlx_path, *, force: bool = False, progress: bool = True) -> Path:
    """Write an MLX model directory holding a llama GGUF file's weights as stored; returns its path.

    Quantized tensors (Q8_0, Q4_0, Q4_1) become MLX quantized layers with group size 32 and their
    bit width recorded in config.json's "quantization"; F32, F16 and BF16 tensors keep their dtype.
    The tokenizer and chat template come from the GGUF metadata. An existing non-empty ``mlx_path``
    is refused unless ``force``; the directory is written under a temporary name and renamed at the end.
    """
    out, src = Path(mlx_path).expanduser(), Path(gguf_path).expanduser()
    check_target(out, force)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise MlxLlamaError(f"{out}: the output would overwrite the input {src}")
    tensors, metadata = read_gguf(src, tensor_types=IMPORTABLE_TYPES)
    config = gguf_config(metadata, tensors.keys())
    tokenizer_files = tokenizer_files_from_gguf(metadata)  # a broken tokenizer fails before any writing
    modules = gguf_modules(tensors, config)

    qplan = {p: (quant_bits(p, t["weight"], t["scales"]), GROUP_SIZE) for p, t in modules.items() if "scales" in t}
    if qplan:
        config["quantization"] = quant.config_entry(qplan, _most_common_bits(qplan), GROUP_SIZE)
    config["torch_dtype"] = _main_float_dtype(modules)
    _check_shapes(config, qplan, modules, src)

    groups = ({f"{path}.{k}": t for k, t in parts.items()} for path, parts in sorted(modules.items()))
    with tempfile.TemporaryDirectory(prefix=".gguf-tokenizer-") as tmp:
        files = {}
        for name, content in tokenizer_files.items():
            files[name] = Path(tmp) / name
            files[name].write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return write_model_dir(out, config, groups, files=files, total=len(modules), progress=progress)


def _most_common_bits(qplan: dict) -> int:
    """The default bit width of the config entry: the one most modules use (the higher on a tie)."""
    counts = Counter(bits for bits, _ in qplan.values())
    return max(counts, key=lambda b: (counts[b], b))


def _main_float_dtype(modules: dict) -> str:
    """config.json's torch_dtype: the dtype most floating-point values are stored in (scales included)."""
    sizes = Counter()
    for parts in modules.values():
        for t in parts.values():
            if mx.issubdtype(t.dtype, mx.floating):
                sizes[t.dtype] += t.size
    return str(max(sizes, key=sizes.get)).rpartition(".")[2] if sizes else "float32"


def _check_shapes(config: dict, qplan: dict, modules: dict, source: Path) -> None:
    """Every tensor against the model config.json describes, quantized as the loader will quantize it,
    so a file whose metadata and tensors disagree fails here rather than after writing."""
    model = Model(ModelArgs.from_dict(config, source=f"{source} (metadata)"))  # lazy init: allocates nothing

    def predicate(path, module):
        if path not in qplan or not hasattr(module, "to_quantized"):
            return False
        return {"bits": qplan[path][0], "group_size": qplan[path][1]}

    nn.quantize(model, class_predicate=predicate)
    found = {f"{path}.{k}": t for path, parts in modules.items() for k, t in parts.items()}
    check_weights(dict(tree_flatten(model.parameters())), found, str(source))
