"""Which tensors to quantize, at how many bits, and how the choice is recorded.

The recipe is stored in config.json the way mlx-lm stores it, so either tool rebuilds the model:
``"quantization": {"group_size": g, "bits": b, "<module path>": {"group_size": .., "bits": ..}}``.
The loader then quantizes exactly the modules whose ``.scales`` the weight files carry.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

# Modules whose weight matrix can be quantized (the Linear layers and the embedding).
QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
# The embedding is also the output head when tied: every logit passes through it. At 4 bits it
# is the largest single source of error on SmolLM2 (FACTS.md section 3: 4-bit g32 with an
# 8-bit embedding keeps the answer right, 4-bit g64 throughout does not), and for a small model
# it is a large share of the weights, so keeping it at 8 bits costs little size for much quality.
HIGH_PRECISION = ("embed_tokens", "lm_head")
RECIPES = ("mixed", "uniform")


def module_path(weight_name: str) -> Optional[str]:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj' if quantizable, else None."""
    if not weight_name.endswith(".weight"):
        return None
    path = weight_name[: -len(".weight")]
    return path if path.rsplit(".", 1)[-1] in QUANTIZABLE else None


def plan(shapes: Dict[str, tuple], bits: int, group_size: int, recipe: str = "mixed") -> Dict[str, Tuple[int, int]]:
    """module path -> (bits, group_size) for every tensor that will be quantized.

    A matrix whose input size is not a multiple of the group size is left in float: quantizing it
    would need padding that neither MLX nor mlx-lm understands.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    out = {}
    for name, shape in shapes.items():
        path = module_path(name)
        if path is None or len(shape) != 2:
            continue
        b = bits
        if recipe == "mixed" and path.rsplit(".", 1)[-1] in HIGH_PRECISION:
            b = max(bits, 8)
        if shape[1] % group_size == 0:
            out[path] = (b, group_size)
    return out


def config_entry(qplan: Dict[str, Tuple[int, int]], bits: int, group_size: int) -> dict:
    """The config.json "quantization" object: defaults plus one entry per module that differs."""
    entry = {"group_size": group_size, "bits": bits}
    for path, (b, g) in sorted(qplan.items()):
        if (b, g) != (bits, group_size):
            entry[path] = {"group_size": g, "bits": b}
    return entry


def params_for(config_q: dict, path: str) -> Tuple[int, int]:
    """(bits, group_size) of one module, from a config.json "quantization" object."""
    override = config_q.get(path)
    if isinstance(override, dict):
        return override["bits"], override["group_size"]
    return config_q["bits"], config_q["group_size"]
