"""Pruning at initialisation versus IMP tickets at matched densities, from one config.

:func:`run_prune_at_init` is what ``python experiments/prune_at_init.py`` runs; a notebook
can call it the same way. It

1. runs global IMP (rewinding to θ0, ``imp_rate`` of the survivors per round) for all seeds
   at once (:func:`lottojax.imp.run_imp`); its level ``L`` fixes the density compared there;
2. for each method in ``methods`` and each compared level, prunes *the same* θ0 of every
   seed at initialisation to exactly the IMP ticket's number of weights, then trains it
   with the same data order as the ticket (all levels of a seed in one vmapped program,
   the seeds by ``seed_strategy`` over ``devices``). The methods are the registered
   :data:`lottojax.methods.METHODS` (random, random-erk, magnitude, snip, grasp, synflow;
   any method added there is available here), built by :func:`lottojax.methods.prune_with`
   with ``keep`` = the ticket's count; ``snip_batch``, ``grasp_per_class``,
   ``grasp_temperature`` and ``synflow_rounds`` are their hyperparameters;

3. writes into ``<root>/prune_at_init-<config hash>/``: ``config.json``, ``results.json``
   (per level and method: density, mean, std and per-seed test accuracy at the early-stop
   iteration, final accuracy, connectivity), ``results.npz``, ``prune_at_init.png``
   (accuracy vs density) and checkpoints (IMP per level; each method's results once
   trained), so a killed run resumes.

Connectivity: :func:`input_output_paths` counts the paths of kept weights from the input
to the output; a mask with none is *disconnected* (layer collapse), and every such seed is
counted. ``results.json`` also gives ``log10_paths`` per method and density.
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import read_json, write_json
from lottojax.experiments.base import ConfigError, ExperimentConfig, build, option, over_seeds, stream_keys
from lottojax.experiments.metrics import log_history, log_imp_level
from lottojax.experiments.plots import dense_line, density_axis, figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.imp import run_imp
from lottojax.masks import PyTree, leaves_with_paths, ones_like, prunable_flags, prunable_size
from lottojax.methods import METHODS, ScoreContext, get_method, prune_with
from lottojax.seeds import gather, put_seeded
from lottojax.train import History, early_stop


@dataclasses.dataclass(frozen=True)
class PruneAtInitConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D comparison.

    The MLP 40-300-100-10 trains with Adam 1.2e-3, batch 60, for 3000 steps (the LTH
    reproduction's setting). IMP prunes 20% of the surviving weights per round, globally
    (Frankle et al. 2019/2021), for ``max(levels)`` rounds; the methods are compared at
    IMP levels 7, 11, 15, 19, 23: 21%, 8.6%, 3.5%, 1.4% and 0.59% of the weights (add
    level 3, 51%, where all methods are within 2.5 points of dense, with ``--levels``).
    """

    imp_rate: float = option(0.2, "global IMP rate per round (fixes the compared densities)")
    levels: tuple[int, ...] = option((7, 11, 15, 19, 23), "IMP levels whose densities the methods are compared at")
    methods: tuple[str, ...] = option(("random", "random-erk", "magnitude", "snip", "grasp", "synflow"),
                                      "pruning methods at initialisation (any of lottojax.methods.METHODS)",
                                      choices=tuple(METHODS))
    snip_batch: int = option(100, "SNIP: examples in its one minibatch")
    grasp_per_class: int = option(10, "GraSP: examples per class in its class-balanced sample")
    grasp_temperature: float = option(200.0, "GraSP: softmax temperature T")
    synflow_rounds: int = option(100, "SynFlow: pruning rounds (exponential schedule)")

    def check(self) -> None:
        super().check()
        if not self.levels or min(self.levels) < 1:
            raise ConfigError("levels", f"{self.levels} must be IMP levels >= 1 (level L keeps (1 - imp_rate)^L)")
        if not 0 < self.imp_rate < 1:
            raise ConfigError("imp_rate", f"{self.imp_rate} must be in (0, 1)")
        for name in ("snip_batch", "grasp_per_class", "synflow_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")

    def method(self, name: str):
        """The registered method ``name`` with this config's hyperparameters for it."""
        hparams = {"snip": dict(batch_size=self.snip_batch),
                   "grasp": dict(per_class=self.grasp_per_class, temperature=self.grasp_temperature),
                   "synflow": dict(rounds=self.synflow_rounds)}
        return get_method(name, **hparams.get(name, {}))


def input_output_paths(model, mask: PyTree, model_state: PyTree, input_shape) -> jax.Array:
    """The number of input-to-output paths through kept weights (0: the mask disconnects
    the network, i.e. layer collapse), by running the net with kernels = mask (as 0/1),
    biases 0 and other parameters (norm scales) 1 on an all-ones input."""
    paths, leaves, treedef = leaves_with_paths(mask)
    flags = prunable_flags(mask)
    values = [
        m.astype(jnp.float32) if f else jnp.full(m.shape, 0.0 if p.endswith("bias") else 1.0)
        for p, m, f in zip(paths, leaves, flags)
    ]
    logits, _ = model.apply(jax.tree.unflatten(treedef, values), model_state, jnp.ones((1, *input_shape)), False)
    return jnp.sum(logits)


@exclusive("prune_at_init")
def run_prune_at_init(config: PruneAtInitConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "prune_at_init", config) as workdir:
        setup = build(config)
        levels = tuple(sorted(set(config.levels)))
        imp, imp_seconds = _run_imp(config, setup, workdir, progress)
    run_method = _method_runner(config, setup, keep_density=imp.density[list(levels), 0])
    results = {}
    for method in config.methods:
        histories = {}  # the fresh run's

        def train():  # called at once, in this iteration
            record, histories[method] = run_method(method)
            return record

        results[method], fresh = load_or_run(os.path.join(workdir, f"method-{method}.npz"), train)
        if not fresh:  # finished in an earlier call
            continue
        if jax.process_index() == 0:
            log_history(workdir, f"method-{method}", histories[method], {"level": levels, "seed": config.seeds})
        if progress:
            acc = 100 * results[method]["early_stop_accuracy"].mean(1)
            print(f"{method:>10}: {' '.join(f'{a:5.1f}' for a in acc)}  ({results[method]['seconds']:.0f} s)", flush=True)

    summary = summarize(config, imp, levels, results, {"imp": imp_seconds})
    if jax.process_index() == 0:
        write_results(workdir, summary, dict(
            levels=np.array(levels), imp_density=imp.density, imp_early_stop_accuracy=imp.early_stop_accuracy[..., 0],
            imp_final_accuracy=imp.final_accuracy[..., 0], **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()}))
        plot_prune_at_init(summary, os.path.join(workdir, "prune_at_init.png"),
                           title=f"Pruning at init vs IMP on {config.dataset} ({config.model}), {plural(len(config.seeds), 'seed')}")
    return summary, workdir


def _run_imp(config: PruneAtInitConfig, setup, workdir: str, progress: bool):
    """Global IMP (ticket arm only) for all seeds, checkpointed per level; with the seconds
    of the call that finished it."""
    start = time.perf_counter()
    imp = run_imp(setup.trainer, setup.data, seeds=config.seeds, rounds=max(config.levels), fraction=config.imp_rate,
                  scope="global", num_steps=config.num_steps, controls=(), seed_strategy=config.seed_strategy,
                  devices=config.devices, checkpoint_dir=os.path.join(workdir, "imp"), progress=progress,
                  on_level=partial(log_imp_level, workdir, prefix="imp-"))
    seconds, _ = load_or_run(os.path.join(workdir, "imp", "seconds.json"), lambda: time.perf_counter() - start,
                             save=write_json, load=read_json)  # a resumed run keeps the first run's figure
    return imp, seconds


def _method_runner(config: PruneAtInitConfig, setup, *, keep_density: np.ndarray) -> Callable[[str], dict]:
    """``method -> record``: masks for every (level, seed), pruned from that seed's θ0 to
    exactly ``keep_density`` of each level, then all trained (the seeds by
    ``config.seed_strategy`` over ``config.devices``, the levels vmapped). Arrays in the
    record are ``(levels, seeds)``."""
    model, trainer, data = setup.model, setup.trainer, setup.data
    n = len(config.seeds)
    init_keys, data_keys, mask_keys = stream_keys(config, "init", "data", "mask")
    data = put_seeded(data, config.devices, stacked=False)
    one_params = jax.eval_shape(model.init, jax.random.key(0))[0]
    flags = prunable_flags(one_params)
    total = prunable_size(one_params)
    keep = jnp.asarray(np.round(keep_density.astype(np.float64) * total).astype(np.int32))
    input_shape, num_classes = data.input_shape, data.num_classes  # static: read outside the traced program

    def context(state, data):
        return ScoreContext(apply_fn=lambda p, x: model.apply(p, state, x, True)[0],
                            eval_apply_fn=lambda p, x: model.apply(p, state, x, False)[0],
                            x=data.x_train, y=data.y_train, input_shape=input_shape, num_classes=num_classes)

    def one_seed(method, init_key, data_key, mask_key, keep, data):
        params, state = model.init(init_key)

        def one_level(k):
            mask = prune_with(method, params, ones_like(params), key=mask_key, context=context(state, data), keep=k)
            _, history = trainer.train(trainer.init(init_key, mask), data, data_key, start=0, num_steps=config.num_steps)
            step, accuracy = early_stop(history)
            paths = input_output_paths(model, mask, state, input_shape)
            return mask, dict(early_stop_accuracy=accuracy, early_stop_step=step, final_accuracy=history.test_accuracy[-1],
                              paths=paths, history=history)

        return jax.vmap(one_level)(keep)

    def run(name: str) -> tuple[dict, History]:
        """The method's record and its training histories (leaves ``(levels, seeds, evals)``)."""
        start = time.perf_counter()
        method = config.method(name)
        masks, record = over_seeds(config, lambda *a: one_seed(method, *a), (0, 0, 0, None, None))(
            init_keys, data_keys, mask_keys, keep, data)
        record = jax.tree.map(lambda x: np.swapaxes(np.asarray(x)[:n], 0, 1), gather(record))  # (levels, seeds)
        leaves = [np.asarray(m)[:n] for m, f in zip(jax.tree.leaves(gather(masks)), flags) if f]
        kept = np.swapaxes(sum(m.sum(axis=tuple(range(2, m.ndim)), dtype=np.int64) for m in leaves), 0, 1)
        record.update(kept=kept, density=kept / total, seconds=np.array(time.perf_counter() - start))
        history = record.pop("history")
        diverged = diverged_runs(history.train_loss, history.val_loss)  # (levels, seeds): flagged, not averaged
        for field in ("early_stop_accuracy", "final_accuracy"):
            record[field] = np.where(diverged, np.nan, record[field])
        return record, history

    return run


def summarize(config: PruneAtInitConfig, imp, levels, results: dict, timings: dict) -> dict:
    """The JSON summary: the IMP curve (every level) and, per compared level, every method."""
    imp_levels = [
        {"level": level, "density": float(imp.density[level, 0]),
         "early_stop_accuracy": stats(imp.early_stop_accuracy[level, :, 0]),
         "final_accuracy": stats(imp.final_accuracy[level, :, 0])}
        for level in range(len(imp.density))
    ]
    compared = []
    for i, level in enumerate(levels):
        row = {"level": level, "density": float(imp.density[level, 0]),
               "imp": imp_levels[level]["early_stop_accuracy"], "methods": {}}
        for method, r in results.items():
            row["methods"][method] = {
                "density": stats(r["density"][i]),
                "early_stop_accuracy": stats(r["early_stop_accuracy"][i]),
                "final_accuracy": stats(r["final_accuracy"][i]),
                "early_stop_step": stats(r["early_stop_step"][i]),
                "disconnected_seeds": int(np.sum(r["paths"][i] <= 0)),
                "log10_paths": stats(np.log10(np.maximum(r["paths"][i], 1.0))),
            }
        compared.append(row)
    seconds = {**timings, **{m: float(r["seconds"]) for m, r in results.items()}}
    return {"config": dataclasses.asdict(config), "dense": imp_levels[0], "imp": imp_levels,
            "compared": compared, "seconds": seconds}


def prune_at_init_table(summary: dict) -> str:
    """Density, then per method the test accuracy (%) at the early-stop iteration, mean ± std
    over seeds; ``!k``: k seeds whose mask disconnects input from output.

    Examples:
      >>> s = {'dense': {'early_stop_accuracy': {'mean': .7, 'std': .01}},
      ...      'compared': [{'density': .5, 'imp': {'mean': .71, 'std': .02},
      ...                    'methods': {'snip': {'early_stop_accuracy': {'mean': .6, 'std': .03},
      ...                                         'disconnected_seeds': 0}}}]}
      >>> print(prune_at_init_table(s))
      density |        imp          snip
         dense | 70.00 ± 1.00
        50.00% | 71.00 ± 2.00  60.00 ± 3.00
    """
    methods = list(summary["compared"][0]["methods"]) if summary["compared"] else []
    cell = lambda s: f"{100 * s['mean']:5.2f} ± {100 * s['std']:4.2f}"
    lines = [" density | " + "  ".join(f"{name:>12}" for name in ["imp", *methods])]
    lines.append(f"{'dense':>8} | {cell(summary['dense']['early_stop_accuracy'])}")
    for row in summary["compared"]:
        cells = [cell(row["imp"])]
        for method in methods:
            r = row["methods"][method]
            mark = f" !{r['disconnected_seeds']}" if r["disconnected_seeds"] else ""
            cells.append(cell(r["early_stop_accuracy"]) + mark)
        lines.append(f"{100 * row['density']:>7.2f}% | " + "  ".join(cells))
    return "\n".join(lines)


def plot_prune_at_init(summary: dict, path: str, *, title: str = "") -> None:
    """Test accuracy at early stop vs density (log axis): the IMP curve over all its levels,
    each method at the compared densities, the dense accuracy as a line; ± std bars."""
    fig, (ax,) = figure(1, width=7.5, height=4.6)
    dense = summary["dense"]["early_stop_accuracy"]
    dense_line(ax, 100 * dense["mean"])
    imp = summary["imp"][1:]
    ax.errorbar([100 * r["density"] for r in imp], [100 * r["early_stop_accuracy"]["mean"] for r in imp],
                yerr=[100 * r["early_stop_accuracy"]["std"] for r in imp], marker="o", markersize=3,
                capsize=2, color="black", label="IMP ticket")
    methods = list(summary["compared"][0]["methods"]) if summary["compared"] else []
    for method in methods:
        rows = [r["methods"][method] for r in summary["compared"]]
        ax.errorbar([100 * r["density"]["mean"] for r in rows], [100 * r["early_stop_accuracy"]["mean"] for r in rows],
                    yerr=[100 * r["early_stop_accuracy"]["std"] for r in rows], marker="s", markersize=3,
                    capsize=2, label=method)
    density_axis(ax, [100 * r["density"] for r in imp])
    ax.set_ylabel("test accuracy at early stop (%)")
    ax.legend(fontsize=8)
    save(fig, path, title=title, note=spread_note(len(summary["config"]["seeds"])))
