"""Tables, JSON summaries and plots of IMP results (mean ± std over seeds)."""
from __future__ import annotations

import numpy as np

from lottojax.imp import IMPResult


def imp_summary(result: IMPResult) -> list[dict]:
    """One JSON-ready dict per level: density, and per arm the mean, std and per-seed values
    of the early-stop test accuracy, final test accuracy and early-stop step."""
    rows = []
    for level in range(len(result.density)):
        row = {"level": level, "density": float(result.density[level].mean()), "arms": {}}
        for a, arm in enumerate(result.arms):
            row["arms"][arm] = {
                name: {
                    "mean": float(values[level, :, a].mean()),
                    "std": float(values[level, :, a].std()),
                    "per_seed": values[level, :, a].tolist(),
                }
                for name, values in (
                    ("early_stop_accuracy", result.early_stop_accuracy),
                    ("final_accuracy", result.final_accuracy),
                    ("early_stop_step", result.early_stop_step),
                )
            }
        rows.append(row)
    return rows


def imp_table(result: IMPResult) -> str:
    """Density, then per arm the test accuracy at early stop and the early-stop step (mean ± std).

    Examples:
      >>> from lottojax.train import History
      >>> z = np.zeros((2, 2, 1, 1))
      >>> r = IMPResult(('ticket',), (0, 1), np.array([[1., 1.], [.8, .8]]),
      ...               np.full((2, 2, 1), .9), np.array([[[300], [500]], [[200], [200]]]),
      ...               np.array([[[.90], [.92]], [[.95], [.95]]]), History(*[z] * 6))
      >>> print(imp_table(r))
      level  density | ticket acc      ticket step
          0  100.00% | 91.00 ± 1.00      400 ± 100
          1   80.00% | 95.00 ± 0.00      200 ± 0
    """
    header = ["level  density"] + [f"{arm} acc      {arm} step" for arm in result.arms]
    lines = [" | ".join(header)]
    for level in range(len(result.density)):
        cells = [f"{level:>5}  {result.density[level].mean():>7.2%}"]
        for a in range(len(result.arms)):
            acc = 100 * result.early_stop_accuracy[level, :, a]
            step = result.early_stop_step[level, :, a]
            cells.append(f"{acc.mean():5.2f} ± {acc.std():4.2f}  {step.mean():>7.0f} ± {step.std():.0f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot_imp(result: IMPResult, path: str, *, title: str = "") -> None:
    """Saves a two-panel figure: test accuracy at early stop vs density, and early-stop
    step vs density, one line per arm with ± std error bars (log-scaled density axis)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    density = 100 * result.density.mean(axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (axes[0], 100 * result.early_stop_accuracy, "test accuracy at early stop (%)"),
        (axes[1], result.early_stop_step, "early-stop iteration"),
    )
    for ax, values, label in panels:
        for a, arm in enumerate(result.arms):
            ax.errorbar(density, values[:, :, a].mean(1), yerr=values[:, :, a].std(1), marker="o",
                        markersize=3, capsize=3, label=arm)
        ax.set_xscale("log")
        ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if density.min() * 0.9 <= t <= 100]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
