"""The Lottery Ticket Hypothesis experiment (Frankle & Carbin 2019) from one config.

:func:`run_lottery` is what ``python experiments/lottery.py`` runs; a notebook can call it
the same way. It builds data, model and optimizer from the config, runs IMP with the two
controls for all seeds in one compiled program per level (:func:`lottojax.imp.run_imp`),
and writes into ``<root>/lottery-<config hash>/``:

- ``config.json``; ``results.json`` (per level and arm: mean, std, n and per-seed values;
  per level the first seed's ticket size: parameters and forward FLOPs per example of the
  dense, masked and compacted network, :func:`ticket_sizes`);
- ``results.npz`` (every per-level array, training curves included);
- ``params.npz`` (``θ0`` and the training state at ``θ_k`` of every seed) and ``checkpoint/levels/level-NNNN.npz``
  (each level's ticket mask and record): :func:`load_lottery` rebuilds the
  :class:`~lottojax.imp.IMPResult`, tickets included, from them;
- ``lottery.png`` (accuracy and early-stop iteration vs density).

Re-running the same config resumes from the last finished level; the same config with
more ``rounds`` continues a finished run.
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial

import jax
import numpy as np

from lottojax.checkpoint import load_arrays, load_npz, save_arrays
from lottojax.compact import count
from lottojax.experiments.base import ConfigError, ExperimentConfig, build, model_kwargs, option
from lottojax.experiments.metrics import log_imp_level
from lottojax.experiments.plots import dense_line, density_axis, figure, plural, save, spread_note
from lottojax.experiments.store import (config_from_json, diverged_runs, exclusive, mean_std, open_run, read_config,
                                        stats, write_results)
from lottojax.methods import METHODS
from lottojax.imp import ARMS, CONTROLS, RETRAINING, IMPResult, run_imp, saved_masks
from lottojax.prune import rates_by_layer
from lottojax.train import History

SCOPES = ("layerwise", "global")


@dataclasses.dataclass(frozen=True)
class LotteryConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D reproduction.

    The MLP 40-300-100-10 with Adam 1.2e-3, batch 60, 3000 steps per level, and per-round
    rates conv 10% / dense 20% / output 10% follow the paper's LeNet-300-100 setting
    scaled to MNIST-1D; 16 rounds reach 2.8% of the hidden-layer weights (3.2% overall).
    """

    rounds: int = option(16, "pruning rounds after the dense level", extends=True)
    conv_rate: float = option(0.1, "per-round pruning rate of convolution kernels (layerwise)")
    dense_rate: float = option(0.2, "per-round pruning rate of dense kernels (layerwise); of all weights (global)")
    output_rate: float = option(0.1, "per-round pruning rate of the output layer (layerwise)")
    output_name: str = option("output", "name of the output layer in the parameter paths")
    scope: str = option("layerwise", "per-layer rates (the LTH) or one global rate", choices=SCOPES)
    method: str = option("magnitude", "how trained weights are scored at each level (lottojax.methods.METHODS; "
                                      "magnitude is IMP)", choices=tuple(METHODS))
    rewind_step: int = option(0, "rewind survivors to their values after this many steps (0: θ0)")
    one_shot: bool = option(False, "prune the dense trained weights straight to each level's density")
    controls: tuple[str, ...] = option(CONTROLS, "control arms trained on every level's mask",
                                       choices=tuple(a for a in ARMS if a != "ticket"))
    retrain: str = option("weights", "how the ticket retrains after pruning: rewind the weights to step k (the "
                                     "LTH), rewind only the learning-rate schedule (lr), or fine-tune at the final "
                                     "rate (finetune)", choices=tuple(RETRAINING))

    def check(self) -> None:
        super().check()
        if self.rounds < 0:
            raise ConfigError("rounds", f"{self.rounds} must be >= 0")
        for name in ("conv_rate", "dense_rate", "output_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.rewind_step < self.num_steps:
            raise ConfigError("rewind_step", f"{self.rewind_step} must be in [0, num_steps={self.num_steps})")


@exclusive("lottery")
def run_lottery(config: LotteryConfig, root: str = "runs", *, progress: bool = True) -> tuple[IMPResult, str]:
    """Runs (or resumes) the experiment; returns the result and the run directory.

    Examples:
      >>> import tempfile
      >>> config = LotteryConfig(seeds=(0,), rounds=1, num_steps=20, eval_every=10, controls=())
      >>> result, workdir = run_lottery(config, tempfile.mkdtemp(), progress=False)  # doctest: +SKIP
    """
    config.check()
    with open_run(root, "lottery", config) as workdir:
        setup = build(config)
        if config.scope == "global":
            fraction = config.dense_rate
        else:
            fraction = rates_by_layer(conv=config.conv_rate, dense=config.dense_rate, output=config.output_rate,
                                      output_name=config.output_name)
        result = run_imp(
            setup.trainer, setup.data, seeds=config.seeds, rounds=config.rounds, fraction=fraction,
            num_steps=config.num_steps, scope=config.scope, rewind_step=config.rewind_step,
            one_shot=config.one_shot, controls=config.controls, retrain=config.retrain, method=config.method, seed_strategy=config.seed_strategy,
            devices=config.devices, checkpoint_dir=os.path.join(workdir, "checkpoint"), progress=progress,
            on_level=partial(log_imp_level, workdir),
        )
    if jax.process_index() == 0:
        _write(config, result, workdir, setup.data.input_shape)
    return result, workdir


def ticket_sizes(config: LotteryConfig, result: IMPResult, input_shape) -> list[dict]:
    """Per level, what the first seed's ticket costs: parameters and forward FLOPs per
    example of the dense, masked and compacted network (:func:`lottojax.compact.count`)."""
    rows = []
    params = jax.tree.map(lambda x: x[0], result.rewind_params)
    for mask in result.masks:
        total = count(params, jax.tree.map(lambda m: m[0], mask), name=config.model, input_shape=tuple(input_shape),
                      xla=False, **model_kwargs(config)).total
        rows.append({"params": {"dense": total.params, "kept": total.nonzero, "compacted": total.compacted},
                     "flops": {"dense": total.flops_dense, "masked": total.flops_masked,
                               "compacted": total.flops_compacted}})
    return rows


def _write(config: LotteryConfig, result: IMPResult, workdir: str, input_shape) -> None:
    arrays = {k: v for k, v in result._asdict().items() if isinstance(v, np.ndarray)}
    arrays.update({f"history_{k}": v for k, v in result.history._asdict().items()})
    levels = [dict(row, ticket_size=size) for row, size in zip(imp_summary(result),
                                                                ticket_sizes(config, result, input_shape))]
    write_results(workdir, {"config": dataclasses.asdict(config), "levels": levels},
                  dict(arms=np.array(result.arms), seeds=np.array(result.seeds), **arrays))
    save_arrays(os.path.join(workdir, "params.npz"), (result.init_params, result.rewind_state))
    plot_imp(result, os.path.join(workdir, "lottery.png"),
             title=f"IMP on {config.dataset} ({config.model}), {plural(len(config.seeds), 'seed')}, "
                   f"rewind to step {config.rewind_step}")


def load_lottery(workdir: str) -> tuple[LotteryConfig, IMPResult]:
    """The config and the full :class:`~lottojax.imp.IMPResult` (tickets of every level,
    ``θ0`` and ``θ_k``) of a finished run directory, for new tables, plots or tickets.

    The parameter structure comes from the config (the model is built, not trained).
    """
    config = config_from_json(LotteryConfig, read_config(workdir))
    path = os.path.join(workdir, "results.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no results.npz: the run has not finished; run it again to resume")
    arrays = load_npz(path)
    history = History(**{k.removeprefix("history_"): v for k, v in arrays.items() if k.startswith("history_")})
    shapes = jax.eval_shape(build(config).trainer.init, jax.random.key(0))
    state = jax.tree.map(lambda s: np.zeros((len(config.seeds), *s.shape), s.dtype), shapes)
    init_params, rewind_state = load_arrays(os.path.join(workdir, "params.npz"), (state.params, state))
    params = state.params
    masks = saved_masks(os.path.join(workdir, "checkpoint"), params, arrays["density"].shape[0])
    masks = tuple(jax.tree.map(lambda m: m[:len(config.seeds)], mask) for mask in masks)
    result = IMPResult(arms=tuple(str(a) for a in arrays["arms"]), seeds=tuple(int(s) for s in arrays["seeds"]),
                       density=arrays["density"], final_accuracy=arrays["final_accuracy"],
                       early_stop_step=arrays["early_stop_step"], early_stop_accuracy=arrays["early_stop_accuracy"],
                       history=history, masks=masks, init_params=init_params, rewind_state=rewind_state)
    return config, result


def imp_summary(result: IMPResult) -> list[dict]:
    """One JSON-ready dict per level: density, and per arm the mean, std, n and per-seed
    values of the early-stop test accuracy, final test accuracy and early-stop step. A run
    whose training or validation loss became NaN or inf is left out and counted as diverged."""
    diverged = diverged_runs(result.history.train_loss, result.history.val_loss)
    rows = []
    for level in range(len(result.density)):
        row = {"level": level, "density": float(result.density[level].mean()), "arms": {}}
        for a, arm in enumerate(result.arms):
            row["arms"][arm] = {
                name: stats(values[level, :, a], diverged=diverged[level, :, a])
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
      >>> z = np.zeros((2, 2, 1, 1))
      >>> r = IMPResult(('ticket',), (0, 1), np.array([[1., 1.], [.8, .8]]),
      ...               np.full((2, 2, 1), .9), np.array([[[300], [500]], [[200], [200]]]),
      ...               np.array([[[.90], [.92]], [[.95], [.95]]]), History(*[z] * 6))
      >>> print(imp_table(r))
      level  density | ticket acc    ticket step
          0  100.00% | 91.00 ± 1.00   400 ± 100
          1   80.00% | 95.00 ± 0.00     200 ± 0
      >>> steps = np.broadcast_to(np.array([100., 200, 300, 500]), (2, 2, 1, 4))  # evaluations
      >>> print(imp_table(r._replace(history=History(steps, *[np.zeros((2, 2, 1, 4))] * 5))))
      level  density | ticket acc    ticket step
          0  100.00% | 91.00 ± 1.00   400 ± 100!
          1   80.00% | 95.00 ± 0.00     200 ± 0
      ! early stop at the last evaluation (step 500) in 1 of 4 runs: validation loss was still falling, so these runs may be undertrained
    """
    diverged = diverged_runs(result.history.train_loss, result.history.val_loss)  # shown as "(k diverged)"
    last = np.asarray(result.history.step)[..., -1]  # (levels, seeds, arms): each run's last evaluation
    at_end = np.asarray(result.early_stop_step) == last  # early stop there: the run may be undertrained
    header = ["level  density"] + [f"{arm + ' acc':<13} {arm + ' step':>10}" for arm in result.arms]
    lines = [" | ".join(header)]
    for level in range(len(result.density)):
        cells = [f"{level:>5}  {result.density[level].mean():>7.2%}"]
        for a in range(len(result.arms)):
            acc = mean_std(result.early_stop_accuracy[level, :, a], diverged=diverged[level, :, a])
            step = mean_std(result.early_stop_step[level, :, a], scale=1, digits=0, diverged=diverged[level, :, a])
            cells.append(f"{acc:<13} {step:>10}" + ("!" if at_end[level, :, a].any() else ""))
        lines.append(" | ".join(cells))
    if at_end.any():
        lines.append(f"! early stop at the last evaluation (step {int(last.max())}) in {int(at_end.sum())} of "
                     f"{at_end.size} runs: validation loss was still falling, so these runs may be undertrained")
    return "\n".join(lines)


def plot_imp(result: IMPResult, path: str, *, title: str = "") -> None:
    """Saves a two-panel figure: test accuracy at early stop vs density, and early-stop
    step vs density, one line per arm with ± std error bars over the seeds (log-scaled
    density axis), the dense network's accuracy (level 0) as a dashed line."""
    density = 100 * result.density.mean(axis=1)
    fig, axes = figure(2)
    panels = (
        (axes[0], 100 * result.early_stop_accuracy, "test accuracy at early stop (%)"),
        (axes[1], result.early_stop_step, "early-stop iteration"),
    )
    for ax, values, label in panels:
        for a, arm in enumerate(result.arms):
            ax.errorbar(density, np.nanmean(values[:, :, a], 1), yerr=np.nanstd(values[:, :, a], 1), marker="o",
                        markersize=3, capsize=3, label=arm)
        density_axis(ax, density)
        ax.set_ylabel(label)
    if result.density[0].mean() == 1:
        dense_line(axes[0], np.nanmean(100 * result.early_stop_accuracy[0, :, 0]))
    axes[1].axhline(np.nanmax(result.history.step[0, :, 0, -1]), color="gray", linestyle=":", linewidth=1,
                    label="last step (early stop there: undertrained)")
    axes[0].legend()
    axes[1].legend(fontsize=7)
    save(fig, path, title=title, note=spread_note(len(result.seeds)))
