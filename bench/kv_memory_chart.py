"""Draw bench/results/kv_memory.png from kv_memory.json: peak memory against generated tokens,
one line per KV cache configuration.

    bench/.venv-mlxlm/bin/python bench/kv_memory_chart.py bench/results/kv_memory.json bench/results/kv_memory.png

Run by kv_memory.py in the peer's virtual environment, where matplotlib is installed (it is not one
of our dependencies). Lengths on a log-2 axis, since they double; memory on a linear axis from just
under the weights, so a flat line (bounded cache) and a growing one are told apart at a glance.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = (  # (bounded, quantized) -> colour, line style
    ((False, False), "#d62728", "-"),
    ((True, False), "#1f77b4", "-"),
    ((False, True), "#ff7f0e", "--"),
    ((True, True), "#2ca02c", "--"),
)


def main(src, dst):
    doc = json.loads(open(src).read())
    rows = [r for r in doc["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for (bounded, quantized), colour, ls in STYLE:
        series = sorted(
            (r for r in rows if (r["max_kv_size"] is not None, r["kv_bits"] is not None) == (bounded, quantized)),
            key=lambda r: r["length"],
        )
        if not series:
            continue
        xs = [r["length"] for r in series]
        ys = [r["peak_gb"] * 1e3 for r in series]
        ax.plot(xs, ys, ls, marker="o", color=colour, label=series[0]["config"])
    if rows:
        # The weights alone: what no cache setting can go below.
        ax.axhline(rows[0]["weights_bytes"] / 1e6, color="grey", linewidth=0.8, linestyle=":", label="weights as loaded")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("generated tokens (each point a fresh process)")
    ax.set_ylabel("peak memory, MB (mx.get_peak_memory)")
    ax.set_title("SmolLM2-135M 4-bit: peak memory against generation length")
    if rows:
        # From just under the weights: the cache is a few MB on top of ~83, invisible from zero.
        ax.set_ylim(bottom=0.95 * rows[0]["weights_bytes"] / 1e6)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.9))
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
