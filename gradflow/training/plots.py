"""grad_norms.png: per-layer gradient norm over training (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os


def plot_grad_norms(history: list[dict], path: str) -> bool:
    """Write the plot; False when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = list(dict.fromkeys(k for row in history for k in row["layers"]))
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        points = [(row["step"], row["layers"][layer]) for row in history
                  if layer in row["layers"] and math.isfinite(row["layers"][layer]) and row["layers"][layer] > 0]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=2, linewidth=1, label=layer,
                    color=cmap(i / max(1, len(layers) - 1)))
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient L2 norm (trainable params)")
    ax.set_title("gradflow: per-layer gradient norm")
    ax.grid(True, which="both", alpha=0.3)
    if len(layers) <= 20:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True
