"""Instability and IMP with late rewinding, swept over the rewind step ``k`` (Frankle et al.).

:func:`run_stability` is what ``python experiments/stability.py`` runs; a notebook can call
it the same way. For each ``k`` in ``config.rewind_steps``, for all seeds at once:

1. IMP with global magnitude pruning rewound to ``θ_k`` (:func:`lottojax.imp.run_imp`)
   down to ``(1 - prune_rate) ** rounds`` of the prunable weights, with the random
   reinitialisation and random pruning (shuffled mask) controls at every level;
2. the instability of the dense network at ``θ_k`` and of the IMP subnetwork
   ``m_k ⊙ θ_k``: two copies of each trained from step ``k`` to ``num_steps`` with the
   same two data orders, and the test error along the segment between them
   (:func:`lottojax.stability.instability`, BatchNorm statistics recomputed at each
   point). Both networks of all seeds, both copies each, train in one compiled program
   (the seeds by ``config.seed_strategy``, split across ``config.devices``).
   ``θ_k`` is IMP's rewind point; the copies' data orders come from the ``copies``
   key stream (:data:`lottojax.seeds.KEY_STREAMS`), which IMP does not use.

It writes into ``<root>/stability-<config hash>/``: ``config.json``, ``results.json``
(per ``k``: mean, std, n and per-seed values), ``results.npz`` (every array, the curves
along the path included), ``stability.png`` and ``checkpoint/`` plus ``imp-k<k>/``
(a killed run resumes at the last finished ``k``, and inside it at the last IMP level).

Divergence: an IMP run whose training or validation loss became NaN or inf, a pair of
copies whose loss along the path did, and the subnetwork of a seed whose ticket diverged
at any IMP level are NaN in the results: left out of every mean and counted (the table
says ``(k diverged)``, ``results.json`` lists them).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import Checkpointer
from lottojax.experiments.base import (ConfigError, ExperimentConfig, Setup, build, load_dataset, option, override,
                                       put_seed_slots, stream_keys)
from lottojax.experiments.metrics import log_imp_level
from lottojax.experiments.plots import density_axis, figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, mean_std, open_run, stats, write_results
from lottojax.imp import ARMS, CONTROLS, run_imp
from lottojax.masks import ones_like
from lottojax.seeds import gather, map_seeds, put_seeded
from lottojax.stability import instability, recompute_batch_stats


@dataclasses.dataclass(frozen=True)
class StabilityConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D MLP with Adam.

    The MLP 40-300-100-10 is the LeNet-300-100 of Frankle & Carbin scaled to MNIST-1D
    (Adam 1.2e-3, batch 60), trained 1500 steps (26 epochs). IMP prunes 53% of the
    surviving weights per round globally (Frankle et al. prune 20%); 4 rounds reach
    ``0.47 ** 4 = 4.9%`` density at a fifth of the cost of 14 rounds at 20%.
    """

    num_steps: int = override(ExperimentConfig, "num_steps", 1500)
    rewind_steps: tuple[int, ...] = option((0, 5, 25), "rewind steps k: IMP rewinds to θ_k and the copies train "
                                                       "from θ_k (distinct, in [0, num_steps))")
    num_points: int = option(30, "points on the linear path between the two copies (the error barrier's)")
    rounds: int = option(4, "IMP pruning rounds at each k")
    prune_rate: float = option(0.53, "global pruning rate of IMP per round")
    prune_output: bool = option(True, "prune the output layer too (--no-prune-output: it stays dense, as in "
                                      "OpenLTH's ResNet/VGG setting)")
    controls: tuple[str, ...] = option(CONTROLS, "IMP control arms trained at every level",
                                       choices=tuple(a for a in ARMS if a != "ticket"))
    stats_batches: int = option(16, "training batches over which BatchNorm statistics are recomputed at each "
                                    "point of the path")

    def check(self) -> None:
        """:meth:`ExperimentConfig.check`, then the sweep's own fields.

        Examples:
          >>> StabilityConfig(rewind_steps=(0, 1500)).check()
          Traceback (most recent call last):
          ...
          lottojax.experiments.base.ConfigError: rewind_steps: (0, 1500) must be distinct steps in [0, num_steps=1500)
        """
        super().check()
        ks = self.rewind_steps
        if not ks or len(set(ks)) != len(ks) or not all(0 <= k < self.num_steps for k in ks):
            raise ConfigError("rewind_steps", f"{ks} must be distinct steps in [0, num_steps={self.num_steps})")
        for name in ("rounds", "stats_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if self.num_points < 2:
            raise ConfigError("num_points", f"{self.num_points} must be >= 2 (the path's two ends)")
        if not 0 < self.prune_rate < 1:
            raise ConfigError("prune_rate", f"{self.prune_rate} must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class CNN1DStabilityConfig(StabilityConfig):
    """The BatchNorm net: CNN1D with 32 channels per convolution, SGD with momentum 0.9 at
    learning rate 0.2, divided by 10 at 50% and 75% of training (the shape of the ResNet-20
    schedule of Frankle et al.), batch 128, 800 steps (29 epochs); its output layer is not
    pruned, so the density is that of the convolutions.

    The schedule counts the optimizer's own steps, so the copies and the IMP ticket,
    which start from ``θ_k``'s optimizer state, follow it exactly; the random-reinit
    control starts a fresh optimizer at step ``k``, so its drops come ``k`` steps later.
    """

    model: str = override(StabilityConfig, "model", "cnn1d")
    widths: tuple[int, ...] = override(StabilityConfig, "widths", (32, 32, 32))
    optimizer: str = override(StabilityConfig, "optimizer", "momentum")
    learning_rate: float = override(StabilityConfig, "learning_rate", 0.2)
    lr_drops: tuple[float, ...] = override(StabilityConfig, "lr_drops", (0.5, 0.75))
    batch_size: int = override(StabilityConfig, "batch_size", 128)
    num_steps: int = override(StabilityConfig, "num_steps", 800)
    prune_output: bool = override(StabilityConfig, "prune_output", False)


#: ``--net`` name -> config class whose defaults are that net's setting.
PRESETS = {"mlp": StabilityConfig, "cnn1d": CNN1DStabilityConfig}


class StabilityResult(NamedTuple):
    """Per rewind step ``k`` and seed, as numpy arrays (percentages are fractions here).

    Attributes:
      rewind_steps: ``(K,)`` the ``k`` values.
      seeds: the seeds.
      arms: IMP arms, ``('ticket', 'reinit', 'shuffle')``.
      alpha: ``(P,)`` interpolation weights.
      dense_error, dense_loss: ``(K, S, P)`` test error / loss along the path between the
        two copies of the dense network trained from ``θ_k``.
      dense_barrier: ``(K, S)`` its error barrier.
      sparse_error, sparse_loss, sparse_barrier: the same for the IMP subnetwork ``m_k ⊙ θ_k``.
      density: ``(K, S)`` density of the IMP subnetwork (prunable weights).
      imp_accuracy: ``(K, S, A)`` final test accuracy of each arm at that density.
      imp_early_stop_accuracy: ``(K, S, A)`` test accuracy at the early-stop step.
      dense_accuracy: ``(K, S)`` final test accuracy of the dense network (IMP level 0).
      level_density: ``(K, L, S)`` density at every IMP level.
      level_accuracy: ``(K, L, S, A)`` final test accuracy at every IMP level.
      seconds: ``(K,)`` wall time per ``k`` (compilation included).
    """

    rewind_steps: np.ndarray
    seeds: np.ndarray
    arms: tuple[str, ...]
    alpha: np.ndarray
    dense_error: np.ndarray
    dense_loss: np.ndarray
    dense_barrier: np.ndarray
    sparse_error: np.ndarray
    sparse_loss: np.ndarray
    sparse_barrier: np.ndarray
    density: np.ndarray
    imp_accuracy: np.ndarray
    imp_early_stop_accuracy: np.ndarray
    dense_accuracy: np.ndarray
    level_density: np.ndarray
    level_accuracy: np.ndarray
    seconds: np.ndarray


def _prunable(config: StabilityConfig):
    if config.prune_output:
        return None
    return lambda path, leaf: jnp.ndim(leaf) >= 2 and not path.startswith("output")


def _stats_batches(model, data, config: StabilityConfig):
    """The first ``stats_batches`` training batches, on which BatchNorm statistics are
    recomputed along the path; None for a model without floating-point state."""
    _, state = jax.eval_shape(model.init, jax.random.key(0))
    if not any(jnp.issubdtype(s.dtype, jnp.floating) for s in jax.tree.leaves(state)):
        return None
    count = config.stats_batches * config.batch_size
    if count > len(data.x_train):
        raise ConfigError("stats_batches", f"stats_batches * batch_size = {count} exceeds the "
                                           f"{len(data.x_train)} training examples")
    return jnp.asarray(np.asarray(data.x_train[:count]).reshape(config.stats_batches, config.batch_size,
                                                                *data.input_shape))


@partial(jax.jit, static_argnames=("config", "trainer", "model"))
def _instability(states, keys, tickets, data, k, stats_batches, *, config: StabilityConfig, trainer, model):
    """``LinearPath`` with leaves ``(seed slots, 2, ...)``: per seed the dense network and
    its IMP subnetwork at ``θ_k``, two copies each trained to ``config.num_steps``. ``k`` is
    traced: the copies run ``T - min(rewind_steps)`` steps and stop changing at ``T``, so
    one compiled program serves every ``k`` of the sweep."""
    recompute = None if stats_batches is None else partial(recompute_batch_stats, model, batches=stats_batches)

    def one_seed(state, key, ticket, data, k):
        def one_network(mask):
            return instability(trainer, state, data, key=key, start=k, until=config.num_steps,
                               num_steps=config.num_steps - min(config.rewind_steps), mask=mask,
                               num_points=config.num_points, recompute_stats=recompute)[0]

        masks = jax.tree.map(lambda dense, sparse: jnp.stack([dense, sparse]), ones_like(state.params), ticket)
        return jax.vmap(one_network)(masks)

    over_seeds = map_seeds(one_seed, in_axes=(0, 0, 0, None, None), strategy=config.seed_strategy, devices=config.devices)
    return over_seeds(states, keys, tickets, data, k)


def _one_rewind_step(config: StabilityConfig, setup: Setup, k: int, workdir: str, progress: bool) -> dict:
    imp = run_imp(setup.trainer, setup.data, seeds=config.seeds, rounds=config.rounds, fraction=config.prune_rate,
                  num_steps=config.num_steps, scope="global", rewind_step=k, controls=config.controls,
                  prunable=_prunable(config), seed_strategy=config.seed_strategy, devices=config.devices,
                  checkpoint_dir=os.path.join(workdir, f"imp-k{k}"), progress=progress,
                  on_level=partial(log_imp_level, workdir, prefix=f"imp-k{k}-"))
    n = len(config.seeds)
    padded = partial(put_seed_slots, config)
    (copy_keys,) = stream_keys(config, "copies")
    # θ_k is IMP's own rewind state: the same network the tickets are rewound to, not retrained.
    path = _instability(padded(imp.rewind_state), copy_keys, padded(imp.masks[-1]), setup.data, np.int32(k),
                        _stats_batches(setup.model, setup.data, config), config=config, trainer=setup.trainer,
                        model=setup.model)
    path = jax.tree.map(lambda x: np.asarray(x[:n]), gather(path))
    # Divergence is flagged (NaN), never averaged in: an IMP run (level, seed, arm) whose training or
    # validation loss became non-finite, a pair of copies whose loss along the path did, and the
    # subnetwork of a seed whose ticket diverged at any level (its mask comes from those weights).
    imp_diverged = diverged_runs(imp.history.train_loss, imp.history.val_loss)  # (levels, seeds, arms)
    path_diverged = diverged_runs(path.loss)  # (seeds, 2): the dense network, the subnetwork
    path_diverged[:, 1] |= imp_diverged[:, :, 0].any(0)
    on_path = lambda values: np.where(path_diverged.reshape(*path_diverged.shape, *[1] * (values.ndim - 2)),
                                      np.nan, values)
    error, loss, barrier = on_path(path.error), on_path(path.loss), on_path(path.barrier)
    accuracy = np.where(imp_diverged, np.nan, imp.final_accuracy)
    return dict(
        alpha=path.alpha[0, 0],
        dense_error=error[:, 0], dense_loss=loss[:, 0], dense_barrier=barrier[:, 0],
        sparse_error=error[:, 1], sparse_loss=loss[:, 1], sparse_barrier=barrier[:, 1],
        density=imp.density[-1], imp_accuracy=accuracy[-1],
        imp_early_stop_accuracy=np.where(imp_diverged[-1], np.nan, imp.early_stop_accuracy[-1]),
        dense_accuracy=accuracy[0, :, 0], level_density=imp.density, level_accuracy=accuracy,
    )


@exclusive("stability")
def run_stability(config: StabilityConfig, root: str = "runs", *, progress: bool = True) -> tuple[StabilityResult, str]:
    """Runs (or resumes) the sweep over ``config.rewind_steps``; returns the result and the
    run directory.

    Examples:
      >>> import tempfile
      >>> config = StabilityConfig(seeds=(0,), rewind_steps=(0,), rounds=1, num_steps=20, num_points=3)
      >>> result, workdir = run_stability(config, tempfile.mkdtemp(), progress=False)  # doctest: +SKIP
    """
    config.check()
    ks = config.rewind_steps
    with open_run(root, "stability", config) as workdir:
        data = load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation)
        setup = build(config, data=put_seeded(data, config.devices, stacked=False))
        checkpoint = Checkpointer(os.path.join(workdir, "checkpoint"), dataclasses.asdict(config))
        carry = checkpoint.restore()[1]  # numpy arrays as saved, or None before the first k is done
        for i, k in enumerate(ks):
            if carry is not None and i < int(carry["done"]):
                continue
            started = time.time()
            record = _one_rewind_step(config, setup, k, workdir, progress)
            record["seconds"] = np.float64(time.time() - started)
            if carry is None:
                carry = {"done": np.array(0, np.int32), "results": {
                    name: np.zeros((len(ks), *np.shape(v)), np.asarray(v).dtype) for name, v in record.items()}}
            for name, value in record.items():
                carry["results"][name][i] = value
            carry["done"] = np.array(i + 1, np.int32)
            checkpoint.save(i + 1, carry)
            if progress:
                table = stability_table(_as_result(carry, config, i + 1)).splitlines()
                print(f"k={k} done in {record['seconds']:.0f} s\n{table[0]}\n{table[-1]}", flush=True)
    result = _as_result(carry, config, len(ks))
    if jax.process_index() == 0:
        _write(result, config, workdir)
    return result, workdir


def _as_result(carry: dict, config: StabilityConfig, done: int) -> StabilityResult:
    r = {name: np.asarray(v)[:done] for name, v in carry["results"].items()}
    r["alpha"] = r["alpha"][0]
    return StabilityResult(rewind_steps=np.asarray(config.rewind_steps[:done]), seeds=np.asarray(config.seeds),
                           arms=("ticket", *config.controls), **r)


def stability_table(result: StabilityResult) -> str:
    """Per ``k`` (percent, mean ± std over seeds): error barrier of the dense network and of
    the IMP subnetwork, the subnetwork's density, the final test accuracy of each IMP arm
    at that density, and of the dense network.

    Examples:
      >>> z = np.zeros((1, 2, 3)); b = np.array([[0.1, 0.2]]); a = np.full((1, 2, 1), 0.9)
      >>> r = StabilityResult(np.array([0]), np.arange(2), ('ticket',), np.linspace(0, 1, 3), z, z, b, z, z,
      ...                     b / 2, np.full((1, 2), .05), a, a, np.full((1, 2), .95), z, z, np.zeros(1))
      >>> print(stability_table(r))
          k | dense barrier  | subnet barrier | density | ticket acc     | dense acc
          0 | 15.00 ± 5.00   | 7.50 ± 2.50    |   5.00% | 90.00 ± 0.00   | 95.00 ± 0.00
    """
    cell = lambda values: f"{mean_std(values):<14}"
    header = ["    k", f"{'dense barrier':<14}", "subnet barrier", "density"]
    lines = [" | ".join(header + [f"{arm + ' acc':<14}" for arm in result.arms] + ["dense acc"])]
    for i, k in enumerate(result.rewind_steps):
        cells = [f"{k:>5}", cell(result.dense_barrier[i]), cell(result.sparse_barrier[i]),
                 f"{100 * result.density[i].mean():6.2f}%"]
        cells += [cell(result.imp_accuracy[i, :, a]) for a in range(len(result.arms))]
        lines.append(" | ".join(cells + [mean_std(result.dense_accuracy[i])]))
    return "\n".join(lines)


def stability_summary(result: StabilityResult) -> list[dict]:
    """One JSON-ready dict per ``k``: mean, std, n and per-seed values of every measurement."""
    rows = []
    for i, k in enumerate(result.rewind_steps):
        row = {"rewind_step": int(k), "seconds": float(result.seconds[i])}
        for name in ("dense_barrier", "sparse_barrier", "density", "dense_accuracy"):
            row[name] = stats(getattr(result, name)[i])
        for name in ("imp_accuracy", "imp_early_stop_accuracy"):
            row[name] = {arm: stats(getattr(result, name)[i, :, a]) for a, arm in enumerate(result.arms)}
        rows.append(row)
    return rows


def plot_stability(result: StabilityResult, path: str, *, title: str = "") -> None:
    """Saves six panels (mean ± std over the seeds that did not diverge): test error along
    the path for each ``k`` (dense; IMP subnetwork), error barrier vs ``k``, accuracy at the
    final density vs ``k`` for each IMP arm against the dense network, and accuracy vs
    density at every IMP level for each ``k`` (the ticket; the controls)."""
    fig, axes = figure(3, nrows=2)
    import matplotlib

    ks = np.asarray(result.rewind_steps)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, errors, name in ((axes[0], result.dense_error, "dense"), (axes[1], result.sparse_error, "IMP subnetwork")):
        for i, k in enumerate(ks):
            mean, std = 100 * np.nanmean(errors[i], 0), 100 * np.nanstd(errors[i], 0)
            ax.plot(result.alpha, mean, color=colors[i % len(colors)], label=f"k = {k}")
            ax.fill_between(result.alpha, mean - std, mean + std, color=colors[i % len(colors)], alpha=0.15)
        ax.set_xlabel("interpolation α")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{name}: error along the path")
    for barrier, name in ((result.dense_barrier, "dense"), (result.sparse_barrier, "IMP subnetwork")):
        axes[2].errorbar(ks, 100 * np.nanmean(barrier, 1), yerr=100 * np.nanstd(barrier, 1), marker="o", capsize=3, label=name)
    axes[2].axhline(2, color="gray", linestyle="--", linewidth=1, label="2% (stable below)")
    axes[2].set_ylabel("error barrier (%)")
    axes[2].set_title("instability vs rewind step")
    for a, arm in enumerate(result.arms):
        acc = 100 * result.imp_accuracy[:, :, a]
        axes[3].errorbar(ks, np.nanmean(acc, 1), yerr=np.nanstd(acc, 1), marker="o", capsize=3, label=arm)
    dense = 100 * result.dense_accuracy
    axes[3].errorbar(ks, np.nanmean(dense, 1), yerr=np.nanstd(dense, 1), color="black", linestyle="--", capsize=3, label="dense")
    axes[3].set_ylabel("final test accuracy (%)")
    axes[3].set_title(f"IMP at {100 * result.density.mean():.1f}% density vs rewind step")
    for ax in axes[2:4]:
        ax.set_xscale("symlog", linthresh=max(1, int(ks[ks > 0].min())) if (ks > 0).any() else 1)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("rewind step k")
    styles = {"ticket": "-", "reinit": "--", "shuffle": ":"}
    density = 100 * result.level_density.mean(-1)  # (K, L)
    for ax, arms in ((axes[4], ("ticket",)), (axes[5], result.arms[1:])):
        for i, k in enumerate(ks):
            for arm in arms:
                acc = 100 * result.level_accuracy[i, :, :, result.arms.index(arm)]
                ax.errorbar(density[i], np.nanmean(acc, 1), yerr=np.nanstd(acc, 1), capsize=2, marker="o", markersize=3,
                            color=colors[i % len(colors)], linestyle=styles.get(arm, "-"), label=f"{arm}, k = {k}")
        density_axis(ax, density)
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title("IMP " + " and ".join(arms) + " at every level")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path, title=title, note=spread_note(len(result.seeds)))


def _write(result: StabilityResult, config: StabilityConfig, workdir: str) -> None:
    arrays = {k: v for k, v in result._asdict().items() if isinstance(v, np.ndarray)}
    write_results(workdir, {"config": dataclasses.asdict(config), "rewind_steps": stability_summary(result)},
                  dict(arms=np.array(result.arms), **arrays))
    plot_stability(result, os.path.join(workdir, "stability.png"),
                   title=f"Linear mode connectivity on {config.dataset} ({config.model}, {config.optimizer} "
                         f"lr {config.learning_rate}, {config.num_steps} steps), {plural(len(config.seeds), 'seed')}")
