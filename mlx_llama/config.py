"""Model configuration: a Hugging Face ``config.json`` read into a dataclass.

Field names are the Hugging Face ones, so ``ModelArgs.from_dict(json.load(f))`` is the whole story;
unknown keys are ignored, derived defaults are filled in ``__post_init__`` and impossible values
raise a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import MlxLlamaError, read_small_file


class ConfigError(MlxLlamaError):
    pass


SUPPORTED_MODEL_TYPES = ("llama", "mistral")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUPS = (32, 64, 128)
# rope_scaling types we implement. Anything else is refused rather than silently ignored:
# a wrong RoPE gives a model that runs and talks nonsense.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class ModelArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = "llama"
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    # True for Meta / GGUF checkpoints whose q/k rows pair dims (2j, 2j+1); Hugging Face
    # checkpoints pair (j, j + d/2). Converted models are always in the HF layout.
    rope_traditional: bool = False
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    # Mistral v0.1 attends only to the last `sliding_window` positions; null for Llama.
    sliding_window: Optional[int] = None
    quantization: Optional[dict] = None
    hidden_act: str = "silu"

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelArgs":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        d = dict(d)
        # transformers >= 5 nests rope settings in rope_parameters; older files keep them top level.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp and "rope_theta" not in d:
                d["rope_theta"] = rp["rope_theta"]
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in names})
        args.validate(source)
        return args

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ModelArgs":
        path = Path(path)
        try:
            d = json.loads(read_small_file(path, ConfigError))  # capped: a config is a few KB
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_pos_int(self.num_attention_heads) and _is_int(self.hidden_size):
            if self.hidden_size % self.num_attention_heads == 0:
                self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self, source: str = "config.json") -> None:
        def bad(name, why):
            raise ConfigError(f"{source}: {name} = {getattr(self, name)!r} {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.head_dim is None and _is_pos_int(self.hidden_size) and _is_pos_int(self.num_attention_heads):
            bad("hidden_size", f"is not a multiple of num_attention_heads = {self.num_attention_heads} (and no head_dim)")
        for name in (*self.REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not _is_pos_int(getattr(self, name)):
                bad(name, "must be a positive integer")
            if getattr(self, name) >= 2**31:
                bad(name, "is implausibly large (2^31 or more)")
        if self.hidden_act not in ("silu", "swish"):
            bad("hidden_act", "is not supported: Llama's MLP uses silu")
        self._validate_quantization(source)
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"is not a multiple of num_key_value_heads = {self.num_key_value_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even (RoPE rotates pairs of dimensions)")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, "must be a positive number")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "rope_traditional"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        self._validate_rope_scaling(source)
        eos = self.eos_token_id
        if eos is not None and not (_is_id(eos) or (isinstance(eos, list) and all(_is_id(i) for i in eos))):
            bad("eos_token_id", "must be a token id or a list of token ids")
        if self.sliding_window is not None and not _is_pos_int(self.sliding_window):
            bad("sliding_window", "must be a positive integer or null")

    def _validate_quantization(self, source: str) -> None:
        """The "quantization" object of a converted model: defaults plus per-module overrides."""
        q = self.quantization
        if q is None:
            return

        def ok(entry):
            return (isinstance(entry, dict) and entry.get("bits") in QUANT_BITS
                    and entry.get("group_size") in QUANT_GROUPS)

        if not ok(q):
            raise ConfigError(
                f"{source}: quantization = {q!r} needs bits in {QUANT_BITS} and group_size in {QUANT_GROUPS}"
            )
        for path, entry in q.items():
            if path not in ("bits", "group_size", "mode") and not (entry is False or ok(entry)):
                raise ConfigError(f"{source}: quantization[{path!r}] = {entry!r} is not a valid override")

    def _validate_rope_scaling(self, source: str) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null")
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_scaling type {rtype!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        required = {
            "linear": ("factor",),
            "dynamic": ("factor",),
            "yarn": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        }.get(rtype, ())
        for key in required:
            v = rs.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{source}: rope_scaling.{key} = {v!r} must be a positive number")
        if rtype == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
            raise ConfigError(f"{source}: rope_scaling.high_freq_factor must exceed low_freq_factor")

    @property
    def eos_token_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["quantization"] is None:
            del d["quantization"]
        return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_id(v: Any) -> bool:
    return _is_int(v) and v >= 0
