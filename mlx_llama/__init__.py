"""mlx-llama: Meta's Llama architecture in MLX."""

from .convert import convert
from .errors import MlxLlamaError
from .generate import GenerationResponse, generate, stream_generate
from .loader import load

__all__ = ["convert", "load", "generate", "stream_generate", "GenerationResponse", "MlxLlamaError"]
__version__ = "0.1.0"
