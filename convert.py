"""Convert a Hugging Face Llama checkpoint to MLX. Run `python convert.py --help`."""

import sys

from mlx_llama.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
