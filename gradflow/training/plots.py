"""grad_norms.png: per-layer gradient norm over training (matplotlib, Agg backend)."""

from __future__ import annotations

import math

from gradflow.files import write_atomic
from gradflow.report.render.text import fold_runs


def plot_grad_norms(history: list[dict], path: str) -> bool:
    """Write the plot; False when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = grad_norm_figure(history)
    if fig is None:
        return False
    try:
        write_atomic(path, lambda fh: fig.savefig(fh, format="png"), binary=True)
    finally:
        plt.close(fig)
    return True


def grad_norm_figure(history: list[dict]):
    """The figure: one line per layer on a log axis; layers that never got a gradient named in one folded note."""
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(k for row in history for k in row["layers"]))
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    cmap = plt.get_cmap("viridis")
    silent = []
    for i, layer in enumerate(layers):
        points = [(row["step"], row["layers"][layer]) for row in history
                  if layer in row["layers"] and math.isfinite(row["layers"][layer]) and row["layers"][layer] > 0]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=2, linewidth=1, label=layer,
                    color=cmap(i / max(1, len(layers) - 1)))
        else:
            silent.append(layer)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient L2 norm (trainable params, log scale)")
    ax.set_title("gradflow: per-layer gradient norm (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if silent:  # a log axis cannot show a zero or missing gradient: name those layers, runs folded
        names = [key for key, _ in fold_runs([(layer, None) for layer in silent])]
        ax.text(0.01, 0.01, "no gradient: " + ", ".join(names), transform=ax.transAxes, fontsize="small",
                color="tab:red", va="bottom")
    if 0 < len(layers) - len(silent) <= 20:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig
