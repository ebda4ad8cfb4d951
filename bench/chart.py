"""Draw bench/results/speed.png from speed.json: the ratios ours / mlx-lm for every row.

    bench/.venv-mlxlm/bin/python bench/chart.py bench/results/speed.json bench/results/speed.png

Run by speed.py in the peer's virtual environment, where matplotlib is installed (it is not one
of our dependencies). Ratios on a log scale: 1 is parity; above it is better for speed, below
it better for memory.
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = (  # key in a run, label, colour
    ("prompt_tps", "prompt tokens/s (higher is better)", "#1f77b4"),
    ("generation_tps", "generation tokens/s (higher is better)", "#2ca02c"),
    ("peak_gb", "peak memory (lower is better)", "#d62728"),
)


def ratio(row, key):
    vals = {e: [r[key] for r in runs if key in r] for e, runs in row["runs"].items()}
    if not vals.get("ours") or not vals.get("mlx-lm"):
        return None
    return statistics.median(vals["ours"]) / statistics.median(vals["mlx-lm"])


def main(src, dst):
    rows = json.loads(open(src).read())
    labels = [f"{r['model']}\n{r['prompt']} tok" for r in rows]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.8))
    for i, (key, label, colour) in enumerate(SERIES):
        xs, ys = [], []
        for j, row in enumerate(rows):
            v = ratio(row, key)
            if v is not None:
                xs.append(j + (i - 1) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=label, color=colour)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.2f}" if y < 10 else f"{y:.0f}", (x, y), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("ours / mlx-lm")
    ax.set_title("mlx-llama against mlx-lm, SmolLM2-135M (ratio 1 = parity)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
