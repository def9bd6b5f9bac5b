"""The plotting preamble every experiment shares (matplotlib, headless)."""
from __future__ import annotations

import os

import numpy as np


def figure(ncols: int = 1, *, nrows: int = 1, width: float = 5.5, height: float = 4.2):
    """A headless matplotlib figure with ``nrows`` rows of ``ncols`` axes, each
    ``width`` x ``height`` inches: ``(fig, axes)``, the axes in one flat array, row by row."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes.ravel()


def density_axis(ax, density_percent) -> None:
    """A log-scaled, inverted 'weights remaining (%)' x axis with round ticks."""
    density_percent = np.asarray(density_percent)
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if density_percent.min() * 0.9 <= t <= 100]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.grid(alpha=0.3)


def save(fig, path: str, *, title: str = "") -> None:
    """Titles, lays out and writes the figure atomically, then closes it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
