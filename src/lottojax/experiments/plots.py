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
    """A log-scaled, inverted 'weights remaining (%)' x axis with the same round ticks in
    every experiment (100, 50, 20, 10, 5, 2, 1, 0.5, down to the smallest density shown)."""
    density_percent = np.asarray(density_percent)
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if density_percent.min() * 0.9 <= t <= 100]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.grid(alpha=0.3)


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1, for titles and captions.

    Examples:
      >>> plural(1, "seed"), plural(5, "seed")
      ('1 seed', '5 seeds')
    """
    return f"{n} {noun}" + ("" if n == 1 else "s")


def spread_note(n: int, spread: str = "std") -> str:
    """The caption that says what error bars and bands are: ``spread`` over ``n`` seeds.

    Examples:
      >>> spread_note(5), spread_note(3, "min-max")
      ('mean ± std over n = 5 seeds', 'mean over n = 3 seeds; bands: min-max')
    """
    if spread not in ("std", "sem", "min-max"):
        raise ValueError(f"spread={spread!r}: use 'std', 'sem' or 'min-max'")
    seeds = f"n = {plural(n, 'seed')}"
    return f"mean ± {spread} over {seeds}" if spread != "min-max" else f"mean over {seeds}; bands: min-max"


def dense_line(ax, accuracy_percent: float, label: str = "dense") -> None:
    """The dense network's accuracy as the reference every sparse curve is read against."""
    ax.axhline(accuracy_percent, color="gray", linestyle="--", linewidth=1, label=label)


def colorbar(fig, image, ax, label: str):
    """A colour bar that says what its colours measure (``label`` is required)."""
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label(label)
    return bar


def save(fig, path: str, *, title: str = "", note: str = "") -> None:
    """Titles, lays out and writes the figure atomically, then closes it; ``note`` (e.g.
    :func:`spread_note`) is printed under the axes."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    if note:
        fig.text(0.01, 0.005, note, fontsize=8, color="dimgray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
