"""Realized compression as a dict and as a per-layer × per-head heatmap."""

from __future__ import annotations

import pathlib

from ..stats import CompressionStats


def compression_report(stats: CompressionStats) -> dict:
    return {
        "cr": stats.overall_cr,
        "per_layer_cr": [round(float(x), 4) for x in stats.per_layer_cr],
        "per_head_cr": [[round(float(x), 4) for x in row] for row in stats.per_head_cr],
        "tokens": int(stats.tokens.sum()),
        "slots": int(stats.slots.sum()),
    }


def compression_heatmap(stats: CompressionStats, path: str | pathlib.Path, title: str = "realized CR") -> None:
    """Write a PNG of CR per (layer, KV head), log-scaled colours, values printed in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    cr = stats.per_head_cr.numpy()
    layers, heads = cr.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * heads + 2), max(3, 0.35 * layers + 1.5)))
    image = ax.imshow(cr, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=max(2.0, float(cr.max()))))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    for axis in (ax.xaxis, ax.yaxis):  # whole heads and layers (two heads' default ticks: -0.5, 0.0, 0.5, ...)
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title} (overall {stats.overall_cr:.2f}x)")
    if layers * heads <= 400:
        for i in range(layers):
            for j in range(heads):
                ax.text(j, i, f"{cr[i, j]:.1f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label="tokens per slot")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
