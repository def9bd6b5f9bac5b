"""Pruning at initialisation versus IMP tickets at matched densities, from one config.

:func:`run_prune_at_init` is what ``python experiments/prune_at_init.py`` runs; a notebook
can call it the same way. It

1. runs global IMP (rewinding to θ0, ``imp_rate`` of the survivors per round) for all seeds
   at once (:func:`lottojax.imp.run_imp`); its level ``L`` fixes the density compared there;
2. for each method in ``methods`` and each compared level, prunes *the same* θ0 of every
   seed at initialisation to exactly the IMP ticket's number of weights, then trains it
   with the same data order as the ticket (all levels and seeds in one vmapped program):

   - ``random``: uniform random scores, one global threshold (every layer keeps the
     density in expectation);
   - ``random-erk``: random within each layer, layer densities by ERK (:func:`lottojax.erk`);
   - ``magnitude``: ``|θ0|``, global;
   - ``snip``: :func:`lottojax.snip` on one random minibatch of ``snip_batch`` examples;
   - ``grasp``: :func:`lottojax.grasp` on a class-balanced sample (``grasp_per_class``
     per class), ``T = grasp_temperature``;
   - ``synflow``: :func:`lottojax.synflow_mask`, ``synflow_rounds`` rounds, data-free;

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
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.distributions import densities_to_fractions, erk
from lottojax.experiment import TrainingConfig, make_training, run_directory, write_json
from lottojax.masks import PyTree, leaves_with_paths, ones_like, prunable_flags
from lottojax.prune import prune_layerwise, remove_lowest_global
from lottojax.scores import class_balanced_sample, grasp, magnitude, random_scores, snip, synflow_mask
from lottojax.train import early_stop

METHODS = ("random", "random-erk", "magnitude", "snip", "grasp", "synflow")


@dataclasses.dataclass(frozen=True)
class PruneAtInitConfig(TrainingConfig):
    """Everything that defines a run; the defaults are the MNIST-1D comparison.

    The MLP 40-300-100-10 trains with Adam 1.2e-3, batch 60, for 3000 steps (the LTH
    reproduction's setting). IMP prunes 20% of the surviving weights per round, globally
    (Frankle et al. 2019/2021), for ``max(levels)`` rounds; the methods are compared at
    IMP levels 7, 11, 15, 19, 23: 21%, 8.6%, 3.5%, 1.4% and 0.59% of the weights (add
    level 3, 51%, where all methods are within 2.5 points of dense, with ``--levels``).
    """

    imp_rate: float = 0.2
    levels: tuple[int, ...] = (7, 11, 15, 19, 23)
    methods: tuple[str, ...] = METHODS
    seeds: int = 5
    snip_batch: int = 100
    grasp_per_class: int = 10
    grasp_temperature: float = 200.0
    synflow_rounds: int = 100


def seed_keys(seeds) -> tuple[jax.Array, jax.Array]:
    """(init keys, data keys) of each seed, derived as :func:`lottojax.imp.run_imp` does,
    so that a method and the IMP ticket of one seed share θ0 and the data order."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(list(seeds), jnp.uint32))
    return jax.vmap(jax.random.fold_in, (0, None))(keys, 0), jax.vmap(jax.random.fold_in, (0, None))(keys, 1)


def prunable_size(params: PyTree) -> int:
    """Number of prunable (kernel) entries."""
    return sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(params), prunable_flags(params)) if f)


def make_mask_fn(method: str, model, config: PruneAtInitConfig, *, input_shape, num_classes: int) -> Callable:
    """``(params, model_state, keep, erk_fractions, key, data) -> mask`` keeping exactly
    ``keep`` prunable weights (``random-erk``: per layer by ``erk_fractions``); SNIP and
    GraSP draw their examples from ``data.x_train``. Jittable, vmappable."""

    def logits(state, train):
        return lambda p, x: model.apply(p, state, x, train)[0]

    def keep_top(scores, keep):
        return remove_lowest_global(scores, ones_like(scores), lambda alive: alive - keep)

    def mask_fn(params, state, keep, erk_fractions, key, data):
        x_train, y_train = data.x_train, data.y_train
        if method == "random":
            return keep_top(random_scores(params, key=key), keep)
        if method == "random-erk":
            return prune_layerwise(random_scores(params, key=key), ones_like(params), erk_fractions)
        if method == "magnitude":
            return keep_top(magnitude(params), keep)
        if method == "snip":
            index = jax.random.choice(key, x_train.shape[0], (config.snip_batch,), replace=False)
            return keep_top(snip(params, apply_fn=logits(state, True), batch=(x_train[index], y_train[index])), keep)
        if method == "grasp":
            batch = class_balanced_sample(x_train, y_train, per_class=config.grasp_per_class, key=key,
                                          num_classes=num_classes)
            scores = grasp(params, apply_fn=logits(state, True), batch=batch, temperature=config.grasp_temperature)
            return keep_top(scores, keep)
        if method == "synflow":
            total = prunable_size(params)
            return synflow_mask(params, apply_fn=logits(state, False), input_shape=input_shape,
                                density=keep / total, rounds=config.synflow_rounds)
        raise ValueError(f"method={method!r} unknown; choose from {METHODS}")

    return mask_fn


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


def _save_npz(path: str, **arrays) -> None:
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run_prune_at_init(config: PruneAtInitConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} unknown; choose from {METHODS}")
    if not config.levels or min(config.levels) < 1:
        raise ValueError(f"levels={config.levels} must be IMP levels >= 1 (level L keeps (1 - imp_rate)^L)")
    workdir = run_directory(root, "prune_at_init", config)
    data, model, trainer = make_training(config)
    levels = tuple(sorted(set(config.levels)))
    imp, imp_seconds = _run_imp(config, trainer, data, workdir, progress)

    run_method = _method_runner(config, model, trainer, data, keep_density=imp.density[list(levels), 0])
    results = {}
    for method in config.methods:
        path = os.path.join(workdir, f"method-{method}.npz")
        if os.path.exists(path):  # finished in an earlier call
            with np.load(path) as saved:
                results[method] = dict(saved)
            continue
        results[method] = run_method(method)
        _save_npz(path, **results[method])
        if progress:
            acc = 100 * results[method]["early_stop_accuracy"].mean(1)
            print(f"{method:>10}: {' '.join(f'{a:5.1f}' for a in acc)}  ({results[method]['seconds']:.0f} s)", flush=True)

    summary = summarize(config, imp, levels, results, {"imp": imp_seconds})
    write_json(os.path.join(workdir, "results.json"), summary)
    _save_npz(os.path.join(workdir, "results.npz"), levels=np.array(levels), imp_density=imp.density,
              imp_early_stop_accuracy=imp.early_stop_accuracy[..., 0], imp_final_accuracy=imp.final_accuracy[..., 0],
              **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()})
    plot_prune_at_init(summary, os.path.join(workdir, "prune_at_init.png"),
                       title=f"Pruning at init vs IMP on {config.dataset} ({config.model}), {config.seeds} seeds")
    return summary, workdir


def _run_imp(config: PruneAtInitConfig, trainer, data, workdir: str, progress: bool):
    """Global IMP (ticket arm only) for all seeds, checkpointed per level; with the seconds
    of the call that finished it."""
    from lottojax.imp import run_imp

    start = time.perf_counter()
    imp = run_imp(trainer, data, seeds=range(config.seeds), rounds=max(config.levels), fraction=config.imp_rate,
                  scope="global", num_steps=config.num_steps, controls=(),
                  checkpoint_dir=os.path.join(workdir, "imp"), progress=progress)
    seconds_file = os.path.join(workdir, "imp", "seconds.json")
    if not os.path.exists(seconds_file):  # a resumed run keeps the first run's figure
        write_json(seconds_file, time.perf_counter() - start)
    with open(seconds_file) as f:
        return imp, json.load(f)


def _method_runner(config: PruneAtInitConfig, model, trainer, data, *, keep_density: np.ndarray) -> Callable[[str], dict]:
    """``method -> record``: masks for every (level, seed), pruned from that seed's θ0 to
    ``keep_density`` of each level, then all trained in one vmapped program. Arrays in the
    record are ``(levels, seeds)``."""
    init_keys, data_keys = seed_keys(range(config.seeds))
    mask_keys = jax.vmap(jax.random.fold_in, (0, None))(init_keys, 2)
    params, states = jax.vmap(model.init)(init_keys)
    one_params = jax.tree.map(lambda x: x[0], params)
    flags = prunable_flags(one_params)
    total = prunable_size(one_params)
    keep = np.round(keep_density.astype(np.float64) * total).astype(np.int32)
    erk_fractions = jax.tree.map(
        lambda *xs: np.asarray(xs, np.float32), *[densities_to_fractions(erk(one_params, density=k / total)) for k in keep]
    )

    def train_one(mask, init_key, data_key):
        state = trainer.init(init_key, mask)
        _, history = trainer.train(state, data, data_key, start=0, num_steps=config.num_steps)
        step, accuracy = early_stop(history)
        return dict(early_stop_accuracy=accuracy, early_stop_step=step, final_accuracy=history.test_accuracy[-1])

    def paths_one(mask, state):
        return input_output_paths(model, mask, state, data.input_shape)

    levels_seeds = lambda f, seed_axes, level_axes: jax.jit(jax.vmap(jax.vmap(f, in_axes=seed_axes), in_axes=level_axes))
    train_all = levels_seeds(train_one, (0, 0, 0), (0, None, None))
    paths_all = levels_seeds(paths_one, (0, 0), (0, None))

    def run(method: str) -> dict:
        start = time.perf_counter()
        mask_fn = make_mask_fn(method, model, config, input_shape=data.input_shape, num_classes=data.num_classes)
        masks_all = levels_seeds(mask_fn, (0, 0, None, None, 0, None), (None, None, 0, 0, None, None))
        masks = jax.block_until_ready(masks_all(params, states, jnp.asarray(keep), erk_fractions, mask_keys, data))
        mask_seconds = time.perf_counter() - start
        record = jax.device_get(train_all(masks, init_keys, data_keys))
        leaves = [np.asarray(m) for m, f in zip(jax.tree.leaves(masks), flags) if f]
        kept = sum(m.sum(axis=tuple(range(2, m.ndim)), dtype=np.int64) for m in leaves)
        record.update(kept=kept, density=kept / total, paths=np.asarray(paths_all(masks, states)),
                      mask_seconds=np.array(mask_seconds), seconds=np.array(time.perf_counter() - start))
        return record

    return run


def _stats(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "std": float(values.std()), "per_seed": values.tolist()}


def summarize(config: PruneAtInitConfig, imp, levels, results: dict, timings: dict) -> dict:
    """The JSON summary: the IMP curve (every level) and, per compared level, every method."""
    imp_levels = [
        {"level": level, "density": float(imp.density[level, 0]),
         "early_stop_accuracy": _stats(imp.early_stop_accuracy[level, :, 0]),
         "final_accuracy": _stats(imp.final_accuracy[level, :, 0])}
        for level in range(len(imp.density))
    ]
    compared = []
    for i, level in enumerate(levels):
        row = {"level": level, "density": float(imp.density[level, 0]),
               "imp": imp_levels[level]["early_stop_accuracy"], "methods": {}}
        for method, r in results.items():
            row["methods"][method] = {
                "density": _stats(r["density"][i]),
                "early_stop_accuracy": _stats(r["early_stop_accuracy"][i]),
                "final_accuracy": _stats(r["final_accuracy"][i]),
                "early_stop_step": _stats(r["early_stop_step"][i]),
                "disconnected_seeds": int(np.sum(r["paths"][i] <= 0)),
                "log10_paths": _stats(np.log10(np.maximum(r["paths"][i], 1.0))),
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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    dense = summary["dense"]["early_stop_accuracy"]
    ax.axhline(100 * dense["mean"], color="gray", linestyle="--", linewidth=1, label="dense")
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
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05) if min(low, high) <= t <= max(low, high)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy at early stop (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
