"""Generate text with a converted MLX Llama model. Run `python generate.py --help`."""

import sys

from mlx_llama.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
