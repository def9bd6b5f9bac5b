"""Sparse training, gradual pruning and IMP's retraining modes at equal final density.

:func:`run_sparse_training` is what ``python experiments/sparse_training.py`` runs; a
notebook can call it the same way. For every density in ``densities`` (default 10% and 2%
of the prunable weights) it trains each method of ``methods`` (the registry :data:`ARMS`)
for all seeds (``seed_strategy`` over ``devices``), every run ``num_steps`` T long:

- ``dense``: the unpruned network;
- ``imp``, ``imp-lr``, ``imp-finetune``: IMP pruning ``imp_rate`` of every layer per round,
  T steps per level, retrained by weight rewinding to θ0, learning-rate rewinding or
  fine-tuning (Renda et al. 2020; :data:`lottojax.imp.RETRAINING`); one run per mode
  reaches every density (level L keeps ``(1 - imp_rate)^L``; the default rate reaches 10%
  at level 10 and 2.0% at level 17);
- ``gmp``: gradual magnitude pruning per layer on Zhu & Gupta's cubic schedule, from
  ``gmp_begin`` to ``gmp_end`` of training, every ``gmp_every`` steps;
- ``static`` / ``static-erk``: a fixed random mask, uniform per layer / ERK;
- ``set``: SET (uniform), ``rigl``: RigL (ERK, drop fraction ``drop_fraction`` decayed by
  a cosine), both updating every ``update_every`` steps until ``update_end`` of training;
- ``ste``: straight-through magnitude masks recomputed every step (uniform).

Accuracy is the test accuracy after the last step, for every method alike. Training cost
is counted in FLOPs of the prunable dense layers, as a multiple of dense training: a step
costs ``3 F`` at the mask's forward FLOPs ``F`` (forward, input and weight gradients); a
RigL update step and every STE step cost ``2 F_S + F_D`` (their weight gradient is dense);
GMP pays its density at each step; IMP pays every level.

It writes into ``<root>/sparse_training-<config hash>/``: ``config.json``,
``results.json`` (per method and density: accuracy mean/std/n/per seed, density reached,
FLOPs, seconds; IMP's whole curve), ``sparse_training.png`` (accuracy vs density) and
``arms/<method>.json`` once a method is trained (IMP checkpoints each level in
``imp-<mode>/``), so a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from functools import partial
from types import MappingProxyType
from typing import Callable, NamedTuple

import jax
import numpy as np

from lottojax.checkpoint import read_json, write_json
from lottojax.experiments.base import (ConfigError, ExperimentConfig, Setup, build, learning_rate_schedule,
                                       make_optimizer, option, over_seeds, stream_keys)
from lottojax.experiments.metrics import log_history, log_imp_level
from lottojax.experiments.plots import dense_line, density_axis, figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.imp import run_imp
from lottojax.masks import PyTree, leaves_with_paths, prunable_flags
from lottojax.optim import get_mask
from lottojax.seeds import gather, put_seeded
from lottojax.sparse_training import cosine_drop_fraction, cubic, get_sparse_method, one_shot, periodic, sparse_training
from lottojax.straight_through import ste_mask, ste_model
from lottojax.train import make_trainer


@dataclasses.dataclass(frozen=True)
class SparseTrainingConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D MLP comparison.

    The MLP 40-300-100-10 with Adam 1.2e-3, batch 60, 3000 steps per run (the LTH
    reproduction's setting); RigL's ΔT = 100, α = 0.3 and T_end = 75% of training; SET
    with the same ΔT and α; GMP from 10% to 75% of training every 100 steps.
    """

    densities: tuple[float, ...] = option((0.1, 0.02), "fractions of the prunable weights kept at the end")
    methods: tuple[str, ...] = option(("dense", "imp", "imp-lr", "imp-finetune", "gmp", "static", "static-erk",
                                       "set", "rigl", "ste"),
                                      "methods compared (lottojax.experiments.sparse_training.ARMS)",
                                      choices=("dense", "imp", "imp-lr", "imp-finetune", "gmp", "static",
                                               "static-erk", "set", "rigl", "ste"))
    imp_rate: float = option(round(1 - 0.1 ** 0.1, 6), "IMP: fraction of every layer pruned per round")
    update_every: int = option(100, "SET/RigL: steps between mask updates (ΔT)")
    drop_fraction: float = option(0.3, "SET/RigL: fraction of the active weights dropped and regrown per update "
                                       "(RigL decays it by a cosine to 0 at --update-end)")
    update_end: float = option(0.75, "SET/RigL: fraction of training after which the mask stays fixed (T_end)")
    gmp_begin: float = option(0.1, "GMP: fraction of training at which pruning starts")
    gmp_end: float = option(0.75, "GMP: fraction of training at which the final density is reached")
    gmp_every: int = option(100, "GMP: steps between pruning events")

    def check(self) -> None:
        super().check()
        if not self.densities or not all(0 < d < 1 for d in self.densities):
            raise ConfigError("densities", f"{self.densities} must be fractions in (0, 1)")
        if not 0 < self.imp_rate < 1:
            raise ConfigError("imp_rate", f"{self.imp_rate} must be in (0, 1)")
        for name in ("update_every", "gmp_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not 0 < self.drop_fraction < 1:
            raise ConfigError("drop_fraction", f"{self.drop_fraction} must be in (0, 1)")
        if not 0 < self.update_end <= 1:
            raise ConfigError("update_end", f"{self.update_end} must be in (0, 1]")
        if not 0 <= self.gmp_begin < self.gmp_end <= 1:
            raise ConfigError("gmp_end", f"need 0 <= gmp_begin ({self.gmp_begin}) < gmp_end ({self.gmp_end}) <= 1")
        if _gmp_window(self)[1] <= _gmp_window(self)[0]:
            raise ConfigError("gmp_every", f"{self.gmp_every} leaves no pruning event between gmp_begin and gmp_end "
                                           f"of {self.num_steps} steps")


class Context(NamedTuple):
    """What every arm gets: the config, its :class:`~lottojax.experiments.base.Setup`
    (data, model, the dense trainer), the loop that trains every seed, the dense layers'
    forward FLOPs per example (``F_D``), the run directory and whether to show progress."""

    config: SparseTrainingConfig
    setup: Setup
    train: Callable  # (trainer, final_mask: state -> mask, unit) -> (accuracy (seeds,), masks); logs the unit's metrics
    dense_flops: float
    workdir: str
    progress: bool


def _gmp_window(config: SparseTrainingConfig) -> tuple[int, int]:
    """GMP's first and last pruning steps: a whole number of ``gmp_every`` apart."""
    begin = int(round(config.gmp_begin * config.num_steps))
    events = int((config.gmp_end - config.gmp_begin) * config.num_steps // config.gmp_every)
    return begin, begin + events * config.gmp_every


def forward_flops(tree: PyTree) -> float:
    """Forward FLOPs per example of the prunable dense kernels (2 per multiply-add):
    ``2 * nnz`` of each on a bool mask, ``2 * size`` on params.

    Examples:
      >>> forward_flops({'w': np.array([[True, False, True]]), 'b': np.ones(3, bool)})
      4.0
      >>> forward_flops({'w': np.zeros((3, 4)), 'b': np.zeros(4)})
      24.0
    """
    paths, leaves, _ = leaves_with_paths(tree)
    total = 0.0
    for path, leaf, flag in zip(paths, leaves, prunable_flags(tree)):
        if not flag:
            continue
        if leaf.ndim != 2:
            raise ConfigError("model", f"{path} is not a dense kernel: FLOPs are counted for dense layers only")
        total += 2.0 * (float(np.sum(leaf)) if leaf.dtype == bool else float(np.prod(leaf.shape)))
    return total


def seed_flops(masks: PyTree) -> np.ndarray:
    """:func:`forward_flops` of each seed's mask (leaves ``(seeds, ...)``)."""
    count = jax.tree.leaves(masks)[0].shape[0]
    return np.array([forward_flops(jax.tree.map(lambda m: np.asarray(m)[i], masks)) for i in range(count)])


def _record(context: Context, target: float, accuracy, masks, flops: float, seconds: float, **extra) -> dict:
    density = seed_flops(masks) / context.dense_flops
    return dict(target=target, accuracy=stats(accuracy), density=stats(density), flops=float(flops),
                seconds=float(seconds), **extra)


def _inner_optimizer(config: SparseTrainingConfig):
    return make_optimizer(config.optimizer, learning_rate_schedule(config, config.num_steps),
                          momentum=config.momentum, weight_decay=config.weight_decay, masked=False)


def dense_arm(context: Context) -> dict:
    """The dense network, trained ``num_steps``."""
    start = time.perf_counter()
    accuracy, masks = context.train(context.setup.trainer, lambda state: get_mask(state.opt_state), "dense")
    return dict(records=[_record(context, 1.0, accuracy, masks, 1.0, time.perf_counter() - start)])


def imp_arm(retrain: str) -> Callable[[Context], dict]:
    """IMP retrained by ``retrain`` (:data:`lottojax.imp.RETRAINING`): one run to the lowest
    density; each density is read at the level closest to it."""

    def run(context: Context) -> dict:
        config, start = context.config, time.perf_counter()
        rounds = math.ceil(math.log(min(config.densities)) / math.log(1 - config.imp_rate) - 1e-6)
        result = run_imp(context.setup.trainer, context.setup.data, seeds=config.seeds, rounds=rounds, fraction=config.imp_rate,
                         num_steps=config.num_steps, controls=(), retrain=retrain,
                         seed_strategy=config.seed_strategy, devices=config.devices,
                         checkpoint_dir=os.path.join(context.workdir, f"imp-{retrain}"), progress=context.progress,
                         on_level=partial(log_imp_level, context.workdir, prefix=f"imp-{retrain}-"))
        level_cost = [float(np.mean(seed_flops(mask))) / context.dense_flops for mask in result.masks]
        curve = [dict(density=float(np.mean(seed_flops(mask))) / context.dense_flops,
                      accuracy=stats(result.final_accuracy[level, :, 0]))
                 for level, mask in enumerate(result.masks)]
        seconds = time.perf_counter() - start
        records = []
        for target in config.densities:
            level = int(np.argmin([abs(c["density"] - target) for c in curve]))
            records.append(_record(context, target, result.final_accuracy[level, :, 0], result.masks[level],
                                   sum(level_cost[:level + 1]), seconds, level=level))
        return dict(records=records, curve=curve)

    return run


def sparse_arm(method: str, scope: str) -> Callable[[Context], dict]:
    """A method of :data:`lottojax.sparse_training.SPARSE_METHODS` with ``scope`` as its
    distribution, on the schedule this experiment gives it (see the module doc)."""

    def run(context: Context) -> dict:
        config, records = context.config, []
        steps = config.num_steps
        update_end = int(round(config.update_end * steps))
        begin, end = _gmp_window(config)
        for target in config.densities:
            start = time.perf_counter()
            sparsity = 1.0 - target
            hparams, schedule = {}, one_shot(sparsity, at_step=0)
            if method in ("set", "rigl"):
                schedule = periodic(sparsity, every=config.update_every, end_step=update_end)
                hparams["drop_fraction"] = (config.drop_fraction if method == "set" else
                                            cosine_drop_fraction(config.drop_fraction, end_step=update_end))
            elif method == "gmp":
                schedule = cubic(sparsity, begin_step=begin, end_step=end, every=config.gmp_every)
            tx = sparse_training(_inner_optimizer(config), get_sparse_method(method, **hparams), schedule, scope=scope)
            trainer = make_trainer(context.setup.model, tx, batch_size=config.batch_size, eval_every=config.eval_every)
            accuracy, masks = context.train(trainer, lambda state: get_mask(state.opt_state), f"{method}-{scope}-{target:g}")
            sparse = float(np.mean(seed_flops(masks))) / context.dense_flops
            if method == "gmp":
                steps_at = np.arange(steps)
                events = np.asarray(jax.vmap(schedule.is_update)(steps_at))
                levels = np.where(events, np.asarray(jax.vmap(schedule.sparsity)(steps_at)), np.nan)
                levels[0] = 0.0 if np.isnan(levels[0]) else levels[0]
                flops = float(np.mean(1.0 - _forward_fill(levels)))  # uniform per layer: F = (1 - s) F_D
            elif method == "rigl":
                updates = len(range(config.update_every, update_end, config.update_every))
                flops = (3 * sparse * (steps - updates) + updates * (2 * sparse + 1)) / (3 * steps)
            else:
                flops = sparse
            records.append(_record(context, target, accuracy, masks, flops, time.perf_counter() - start))
        return dict(records=records)

    return run


def _forward_fill(values: np.ndarray) -> np.ndarray:
    index = np.where(np.isnan(values), 0, np.arange(len(values)))
    return values[np.maximum.accumulate(index)]


def ste_arm(context: Context) -> dict:
    """Straight-through estimation: the forward pass sees the top-|θ| weights of each
    layer (recomputed every step), the gradient reaches every weight."""
    config, records = context.config, []
    for target in config.densities:
        start = time.perf_counter()
        model = ste_model(context.setup.model, sparsity=1.0 - target, scope="uniform")
        trainer = make_trainer(model, _inner_optimizer(config), batch_size=config.batch_size,
                               eval_every=config.eval_every)
        accuracy, masks = context.train(trainer, lambda s: ste_mask(s.params, sparsity=1.0 - target, scope="uniform"),
                                        f"ste-{target:g}")
        sparse = float(np.mean(seed_flops(masks))) / context.dense_flops
        records.append(_record(context, target, accuracy, masks, (2 * sparse + 1) / 3, time.perf_counter() - start))
    return dict(records=records)


#: The compared methods, by name: ``Context -> {'records': [one per density], 'curve': ...}``.
#: A new method is one function (or one call of a factory) and one entry here.
ARMS = MappingProxyType({
    "dense": dense_arm,
    "imp": imp_arm("weights"),
    "imp-lr": imp_arm("lr"),
    "imp-finetune": imp_arm("finetune"),
    "gmp": sparse_arm("gmp", "uniform"),
    "static": sparse_arm("static", "uniform"),
    "static-erk": sparse_arm("static", "erk"),
    "set": sparse_arm("set", "uniform"),
    "rigl": sparse_arm("rigl", "erk"),
    "ste": ste_arm,
})


def _seed_trainer(config: SparseTrainingConfig, data, workdir: str) -> Callable:
    """``(trainer, final_mask, unit) -> (accuracy, masks)`` for every seed: each seed's own
    ``init`` and ``data`` key streams (the ones IMP uses), ``num_steps`` steps; the
    evaluations go to ``workdir``'s metrics as ``unit``."""
    n = len(config.seeds)
    init_keys, data_keys = stream_keys(config, "init", "data")
    data = put_seeded(data, config.devices, stacked=False)

    def train(trainer, final_mask, unit: str):
        def one_seed(init_key, data_key, data):
            state, history = trainer.train(trainer.init(init_key), data, data_key, start=0, num_steps=config.num_steps)
            return history, final_mask(state)

        history, masks = gather(over_seeds(config, one_seed, (0, 0, None))(init_keys, data_keys, data))
        history = jax.tree.map(lambda h: np.asarray(h)[:n], history)
        if jax.process_index() == 0:
            log_history(workdir, unit, history, {"seed": config.seeds})
        diverged = diverged_runs(history.train_loss, history.val_loss)  # flagged, never averaged in
        accuracy = np.where(diverged, np.nan, history.test_accuracy[:, -1])
        return accuracy, jax.tree.map(lambda m: np.asarray(m)[:n], masks)

    return train


@exclusive("sparse_training")
def run_sparse_training(config: SparseTrainingConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "sparse_training", config) as workdir:
        setup = build(config)
        dense_flops = forward_flops(jax.eval_shape(setup.model.init, jax.random.key(0))[0])
        context = Context(config, setup, _seed_trainer(config, setup.data, workdir), dense_flops, workdir, progress)
        arms = {}
        for name in config.methods:
            arms[name], fresh = load_or_run(os.path.join(workdir, "arms", f"{name}.json"), partial(ARMS[name], context),
                                            save=write_json, load=read_json)
            if fresh and progress:
                cells = "  ".join(f"{100 * r['target']:g}%: {100 * r['accuracy']['mean']:.2f}"
                                  for r in arms[name]["records"])
                print(f"{name:>13}: {cells}  ({arms[name]['records'][-1]['seconds']:.0f} s)", flush=True)
    summary = {"config": dataclasses.asdict(config), "methods": arms}
    if jax.process_index() == 0:
        write_results(workdir, summary, {})
        plot_sparse_training(summary, os.path.join(workdir, "sparse_training.png"),
                             title=f"Sparse training on {config.dataset} ({config.model}), {plural(len(config.seeds), 'seed')}, "
                                   f"{config.num_steps} steps per run")
    return summary, workdir


def sparse_training_table(summary: dict) -> str:
    """Per method and density: test accuracy (%) mean ± std over seeds, the density reached
    and the training FLOPs as a multiple of dense training.

    Examples:
      >>> rec = lambda t, a, f: {'target': t, 'accuracy': {'mean': a, 'std': .01, 'n': 5},
      ...                        'density': {'mean': t}, 'flops': f}
      >>> s = {'config': {'densities': [0.1]}, 'methods': {
      ...     'dense': {'records': [rec(1.0, .9, 1.0)]}, 'rigl': {'records': [rec(0.1, .85, .2)]}}}
      >>> print(sparse_training_table(s))
      method       |                 10% of weights
      dense        | 90.00 ± 1.00 (n=5)  100.0%  1.00x
      rigl         | 85.00 ± 1.00 (n=5)   10.0%  0.20x
    """
    densities = summary["config"]["densities"]
    lines = ["method       | " + " | ".join(f"{f'{100 * d:g}% of weights':>30}" for d in densities)]
    for name, arm in summary["methods"].items():
        cells = []
        for record in arm["records"]:
            a = record["accuracy"]
            cells.append(f"{100 * a['mean']:5.2f} ± {100 * a['std']:4.2f} (n={a['n']}) "
                         f"{100 * record['density']['mean']:6.1f}% {record['flops']:5.2f}x")
        lines.append(f"{name:<12} | " + " | ".join(cells))
    return "\n".join(lines)


def plot_sparse_training(summary: dict, path: str, *, title: str = "") -> None:
    """Final test accuracy vs density (log axis): IMP's curves over every level, the other
    methods at each density, dense as a line; ± std bars."""
    fig, (ax,) = figure(1, width=7.5, height=4.6)
    densities = [100 * d for d in summary["config"]["densities"]]
    for name, arm in summary["methods"].items():
        records = arm["records"]
        if name == "dense":
            dense_line(ax, 100 * records[0]["accuracy"]["mean"])
            continue
        points = arm.get("curve", records)
        ax.errorbar([100 * (p["density"] if "curve" in arm else p["density"]["mean"]) for p in points],
                    [100 * p["accuracy"]["mean"] for p in points], yerr=[100 * p["accuracy"]["std"] for p in points],
                    marker="o" if "curve" in arm else "s", markersize=3, capsize=2, label=name,
                    linestyle="-" if "curve" in arm else ":")
        densities += [100 * (p["density"] if "curve" in arm else p["density"]["mean"]) for p in points]
    density_axis(ax, densities)
    ax.set_ylabel("test accuracy after training (%)")
    ax.legend(fontsize=8, ncol=2)
    save(fig, path, title=title, note=spread_note(len(summary["config"]["seeds"])))
