"""Reprogramming lottery tickets (Misra et al.): IMP tickets of a source task reused for a
target task by linear probing and visual prompting, full data and few-shot.

:func:`run_reprogram` is what ``python experiments/reprogram.py`` runs; a notebook can call
it the same way. For every seed (``seed_strategy`` over ``devices``) it

1. runs IMP on the source task (:func:`lottojax.imp.run_imp`, ticket arm only, rewinding to
   θ0, ``imp_rate`` of the prunable weights per round, ``scope`` global by default), once,
   to the deepest of ``levels``; level ``L`` keeps ``(1 - imp_rate)^L`` of the weights
   (the defaults 0, 3, 7, 11, 15 at 20%: 100%, 51.2%, 21.0%, 8.6%, 3.5%);
2. trains each chosen level's ticket (its mask on θ0, the seed's data order, ``num_steps``
   steps: the run IMP trained at that level, recomputed because IMP keeps masks, not
   trained weights; a separately compiled program, so it equals IMP's run up to
   floating-point rounding, which grows over training: test accuracies agree to within
   about a point) and freezes it in evaluation mode: the *source*;
3. builds the target task (:data:`TRANSFORMS`: by default MNIST-1D examples from another
   generator seed, time-reversed, the central ``target_length`` samples, labels permuted
   by a fixed permutation), shorter than the source input so that the prompt has room;
4. for every method of :data:`METHODS` (``lp``: a linear head on the frozen features of the
   zero-padded target; ``vp``: a prompt ``sigmoid(P)`` outside the padded target, source
   classes read as target classes by the frequency label mapping recomputed every epoch)
   and every entry of ``shots`` (0: the whole target training split; n: n examples per
   class, drawn per seed, the same for every level and method) trains only the head or the
   prompt (:func:`lottojax.reprogram.fit`: Adam, ``reprogram_learning_rate`` times 0.1 at
   50% and 72% of training, about ``reprogram_steps`` steps in whole epochs), all seeds in
   one compiled program, and measures target test accuracy and expected calibration error
   (15 bins, on softmax probabilities) after the last step.

It writes into ``<root>/reprogram-<config hash>/``: ``config.json``, ``imp/`` (IMP's
checkpoint), ``sources/level-NN.npz`` (the trained source tickets), ``units/<method>-<shots>-level-NN.npz``
(each reprogramming run once done: a killed run resumes after the last finished unit),
``metrics.csv``, ``results.json``, ``results.npz``, ``table.txt`` and ``reprogram.png``
(accuracy and ECE vs weights remaining).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from types import MappingProxyType, SimpleNamespace
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import load_arrays, save_arrays
from lottojax.data import Dataset, load_mnist1d
from lottojax.experiments.base import (ConfigError, ExperimentConfig, build, learning_rate_schedule, load_dataset,
                                       make_optimizer, option, over_seeds, put_seed_slots, stream_keys)
from lottojax.experiments.lottery import SCOPES
from lottojax.experiments.metrics import log_history, log_imp_level
from lottojax.experiments.plots import density_axis, figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.imp import run_imp
from lottojax.reprogram import fit, linear_probe, n_shot_indices, source_features, source_logits, visual_prompting
from lottojax.seeds import gather, put_seeded

#: How a method is built from the frozen source: ``(model, params, model_state, *,
#: source_shape, num_classes, head) -> lottojax.reprogram.Reprogram``. A new method is one line.
METHODS = MappingProxyType({
    "lp": lambda model, params, state, *, source_shape, num_classes, head: linear_probe(
        source_features(model, params, state, head=head), source_shape=source_shape, num_classes=num_classes),
    "vp": lambda model, params, state, *, source_shape, num_classes, head: visual_prompting(
        source_logits(model, params, state), source_shape=source_shape, num_classes=num_classes),
})
NAMES = MappingProxyType({"lp": "linear probing", "vp": "visual prompting"})

#: Target-input transforms, by name (they act on the first axis after the batch: time, or
#: image rows for images); the crop to ``target_length`` follows.
TRANSFORMS = MappingProxyType({
    "reverse": lambda x: x[:, ::-1],
    "identity": lambda x: x,
    "roll": lambda x: np.roll(x, x.shape[1] // 4, axis=1),
})

#: Key constants folded into a seed's streams: the few-shot sample (``control`` stream) and
#: the head/prompt initialisation and data order of every fit (``data`` stream).
FEW_SHOT, FIT = 7_000_001, 7_000_003


@dataclasses.dataclass(frozen=True)
class ReprogramConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D MLP source (the base
    config's Adam 1.2e-3, batch 60, 3000 steps per IMP level) reprogrammed to reversed,
    cropped, relabelled MNIST-1D of length 30 (PAPERS.md §10's small setting)."""

    levels: tuple[int, ...] = option((0, 3, 7, 11, 15), "IMP levels whose tickets are reprogrammed (level L keeps "
                                                        "(1 - imp_rate)^L of the weights)", extends=True)
    imp_rate: float = option(0.2, "fraction of the remaining prunable weights IMP prunes per round")
    scope: str = option("global", "IMP over all prunable weights at once, or per layer", choices=SCOPES)
    methods: tuple[str, ...] = option(tuple(METHODS), "reprogramming methods (lottojax.experiments.reprogram.METHODS)",
                                      choices=tuple(METHODS), extends=True)
    shots: tuple[int, ...] = option((0, 10), "target training examples per class (0: the whole training split)",
                                    extends=True)
    target_transform: str = option("reverse", "transform of the target inputs before the crop "
                                              "(lottojax.experiments.reprogram.TRANSFORMS)", choices=tuple(TRANSFORMS))
    target_length: int = option(30, "the target input keeps the central target_length samples (pixels along each "
                                    "spatial axis for images); the prompt fills the rest of the source input")
    target_seed: int = option(43, "MNIST-1D generator seed of the target examples (the source uses 42) and seed of "
                                  "the label permutation")
    reprogram_steps: int = option(1000, "optimizer steps per reprogramming run, rounded to whole epochs")
    reprogram_batch_size: int = option(128, "reprogramming minibatch size (capped at the few-shot training set)")
    reprogram_learning_rate: float = option(0.01, "Adam learning rate of the head or prompt, x0.1 at 0.5 and 0.72 "
                                                  "of the steps")
    reprogram_evaluations: int = option(10, "evaluations per reprogramming run (the resolution of the curves)")
    head: str = option("output", "the source model's last Dense layer (linear probing reads its input)")

    def check(self) -> None:
        super().check()
        if not self.levels or min(self.levels) < 0 or len(set(self.levels)) != len(self.levels):
            raise ConfigError("levels", f"{self.levels}: give distinct levels >= 0")
        if not 0 < self.imp_rate < 1:
            raise ConfigError("imp_rate", f"{self.imp_rate} must be in (0, 1)")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError("methods", f"{self.methods}: give distinct methods")
        if not self.shots or min(self.shots) < 0 or len(set(self.shots)) != len(self.shots):
            raise ConfigError("shots", f"{self.shots}: give distinct counts >= 0 (0: all examples)")
        for name in ("target_length", "reprogram_steps", "reprogram_batch_size", "reprogram_evaluations"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not self.reprogram_learning_rate > 0:
            raise ConfigError("reprogram_learning_rate", f"{self.reprogram_learning_rate} must be > 0")


def central_crop(x: np.ndarray, length: int) -> np.ndarray:
    """The central ``length`` entries of every spatial axis of a batch ``x`` (all axes after
    the batch but a trailing channel axis of images ``(N, H, W, C)``); an odd excess leaves
    the extra entry after the crop.

    Examples:
      >>> central_crop(np.arange(10)[None], 5).tolist()
      [[2, 3, 4, 5, 6]]
      >>> central_crop(np.zeros((2, 28, 28, 1)), 14).shape
      (2, 14, 14, 1)
    """
    spatial = x.shape[1:-1] if x.ndim == 4 else x.shape[1:]
    if any(length > s for s in spatial):
        raise ConfigError("target_length", f"{length} exceeds the source input's spatial size {spatial}")
    index = tuple(slice((s - length) // 2, (s - length) // 2 + length) for s in spatial)
    return x[(slice(None), *index)]


def target_task(config: ReprogramConfig, source: Dataset) -> Dataset:
    """The target task: MNIST-1D from generator seed ``target_seed`` (other datasets: the
    source's own splits), transformed (:data:`TRANSFORMS`), cropped to ``target_length``
    (:func:`central_crop`) and relabelled by a fixed permutation drawn from ``target_seed``."""
    if config.dataset == "mnist1d":
        raw = load_mnist1d(seed=config.target_seed, **({} if config.validation is None else
                                                       {"validation": config.validation}))
    else:
        raw = source if config.data_dir is None else load_dataset(config.dataset, data_dir=config.data_dir,
                                                                  validation=config.validation)
    permutation = np.asarray(jax.random.permutation(jax.random.key(config.target_seed), raw.num_classes))
    inputs = lambda x: np.ascontiguousarray(central_crop(TRANSFORMS[config.target_transform](np.asarray(x)),
                                                         config.target_length), np.float32)
    labels = lambda y: permutation[np.asarray(y)].astype(np.int32)
    return Dataset(inputs(raw.x_train), labels(raw.y_train), inputs(raw.x_val), labels(raw.y_val),
                   inputs(raw.x_test), labels(raw.y_test))


def shots_tag(shots: int) -> str:
    """``'full'`` for 0, else ``'<n>shot'``.

    Examples:
      >>> shots_tag(0), shots_tag(10)
      ('full', '10shot')
    """
    return "full" if shots == 0 else f"{shots}shot"


def _source_program(config: ReprogramConfig, setup) -> Callable:
    """Per seed: the ticket (mask on θ0) trained ``num_steps`` steps, as IMP trained it."""
    trainer = setup.trainer

    def one_seed(init_key, data_key, mask, data):
        state, history = trainer.train(trainer.init(init_key, mask), data, data_key, start=0,
                                       num_steps=config.num_steps)
        return dict(params=state.params, model_state=state.model_state, history=history)

    return over_seeds(config, one_seed, (0, 0, 0, None))


def _fit_program(config: ReprogramConfig, setup, method: str, *, train_size: int) -> Callable:
    """Per seed: one reprogramming run of ``method`` on a frozen source; the training split
    has ``train_size`` examples."""
    batch_size = min(config.reprogram_batch_size, train_size)
    steps_per_epoch = train_size // batch_size
    epochs = max(1, round(config.reprogram_steps / steps_per_epoch))
    schedule = learning_rate_schedule(
        SimpleNamespace(learning_rate=config.reprogram_learning_rate, lr_drops=(0.5, 0.72), lr_factor=0.1),
        epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    optimizer = make_optimizer("adam", schedule, masked=False)
    build_method = partial(METHODS[method], setup.model, source_shape=setup.data.input_shape,
                           num_classes=setup.data.num_classes, head=config.head)

    def one_seed(params, model_state, key, x_train, y_train, x_test, y_test):
        state, history = fit(build_method(params, model_state), key, x_train, y_train, x_test, y_test,
                             optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                             eval_every=max(1, epochs // config.reprogram_evaluations))
        return dict(trainable=state.trainable, mapping=state.mapping, history=history._asdict())

    return over_seeds(config, one_seed, (0, 0, 0, 0, 0, None, None))


def _flat(tree, prefix: str) -> dict:
    """A pytree as flat ``{prefix/path: array}`` (what a unit file holds)."""
    return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@exclusive("reprogram")
def run_reprogram(config: ReprogramConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "reprogram", config) as workdir:
        setup = build(config)
        target = target_task(config, setup.data)
        if target.num_classes > setup.data.num_classes:
            raise ConfigError("dataset", f"the target has {target.num_classes} classes but the source only "
                                         f"{setup.data.num_classes}: visual prompting maps each to a source class")
        for shots in config.shots:
            if shots:
                n_shot_indices(jax.random.key(0), target.y_train, shots)  # too few examples: fail before any work
        imp = run_imp(setup.trainer, setup.data, seeds=config.seeds, rounds=max(config.levels),
                      fraction=config.imp_rate, scope=config.scope, num_steps=config.num_steps, controls=(),
                      seed_strategy=config.seed_strategy, devices=config.devices,
                      checkpoint_dir=os.path.join(workdir, "imp"), progress=progress,
                      on_level=partial(log_imp_level, workdir, prefix="imp-"))
        n = len(config.seeds)
        pad = partial(put_seed_slots, config)
        init_keys, data_keys, control_keys = stream_keys(config, "init", "data", "control")
        fit_keys = jax.vmap(jax.random.fold_in, (0, None))(data_keys, FIT)
        data = put_seeded(setup.data, config.devices, stacked=False)
        template = jax.eval_shape(setup.model.init, jax.random.key(0))
        source_program, programs, units = _source_program(config, setup), {}, {}
        sources, few_shot = {}, {}
        for shots in config.shots:
            if shots:
                keys = gather(jax.vmap(jax.random.fold_in, (0, None))(control_keys, FEW_SHOT + shots))
                idx = np.stack([n_shot_indices(k, target.y_train, shots) for k in keys])
                few_shot[shots] = (target.x_train[idx], target.y_train[idx])
        for level in sorted(config.levels):
            def train_source(level=level):
                start = time.perf_counter()
                out = gather(source_program(init_keys, data_keys, pad(imp.masks[level]), data))
                out = jax.tree.map(lambda x: np.asarray(x)[:n], out)
                return dict(params=out["params"], model_state=out["model_state"],
                            test_accuracy=out["history"].test_accuracy[:, -1],
                            diverged=diverged_runs(out["history"].train_loss, out["history"].val_loss),
                            seconds=np.asarray(time.perf_counter() - start))

            like = dict(params=template[0], model_state=template[1], test_accuracy=0, diverged=0, seconds=0)
            source, fresh = load_or_run(os.path.join(workdir, "sources", f"level-{level:02d}.npz"), train_source,
                                        save=save_arrays, load=lambda path: load_arrays(path, like))
            sources[level] = source
            if progress and fresh:
                print(f"source ticket, level {level} ({100 * imp.density[level].mean():.1f}% of weights): "
                      f"{100 * np.mean(source['test_accuracy']):.1f}% source test accuracy", flush=True)
            params, model_state = pad(source["params"]), pad(source["model_state"])
            for method in config.methods:
                for shots in config.shots:
                    x_train, y_train = few_shot[shots] if shots else (
                        np.broadcast_to(target.x_train, (n, *target.x_train.shape)),
                        np.broadcast_to(target.y_train, (n, *target.y_train.shape)))
                    key = (method, shots)
                    if key not in programs:
                        programs[key] = _fit_program(config, setup, method, train_size=x_train.shape[1])
                    name = f"{method}-{shots_tag(shots)}-level-{level:02d}"

                    def reprogram(program=programs[key], x_train=x_train, y_train=y_train):
                        start = time.perf_counter()
                        out = gather(program(params, model_state, fit_keys, pad(x_train), pad(y_train),
                                             jnp.asarray(target.x_test), jnp.asarray(target.y_test)))
                        out = jax.tree.map(lambda x: np.asarray(x)[:n], out)
                        return {**_flat(out["history"], "history"), **_flat(out["trainable"], "trainable"),
                                "mapping": out["mapping"], "seconds": np.asarray(time.perf_counter() - start)}

                    record, fresh = load_or_run(os.path.join(workdir, "units", f"{name}.npz"), reprogram)
                    units[(level, method, shots)] = record
                    if fresh:
                        history = {k.removeprefix("history/['").removesuffix("']"): v
                                   for k, v in record.items() if k.startswith("history/")}
                        log_history(workdir, name, history, {"seed": config.seeds},
                                    density=float(imp.density[level].mean()))
                        if progress:
                            print(f"  {method} {shots_tag(shots):>6}: {100 * np.mean(history['test_accuracy'][:, -1]):.1f}% "
                                  f"target accuracy, ECE {np.mean(history['test_ece'][:, -1]):.3f} "
                                  f"({float(record['seconds']):.0f} s)", flush=True)
    summary = summarize(config, imp, sources, units)
    if jax.process_index() == 0:
        write_results(workdir, summary, {f"{m}/{shots_tag(s)}/level-{l:02d}/{k}": v
                                         for (l, m, s), r in units.items() for k, v in r.items()})
        with open(os.path.join(workdir, "table.txt"), "w") as f:
            f.write(reprogram_table(summary) + "\n")
        plot_reprogram(summary, os.path.join(workdir, "reprogram.png"),
                       title=f"Reprogramming IMP tickets: {config.dataset} ({config.model}) -> "
                             f"{config.target_transform}, length {config.target_length}")
    return summary, workdir


def history_of(record: dict) -> dict:
    """The per-evaluation curves of a unit record: ``{field: (seeds, evaluations)}``."""
    return {k.removeprefix("history/['").removesuffix("']"): v for k, v in record.items() if k.startswith("history/")}


def summarize(config: ReprogramConfig, imp, sources: dict, units: dict) -> dict:
    """The JSON summary: per level its density and the source ticket's test accuracy (and
    IMP's, which it reproduces), then per method and shots the final target test accuracy
    and ECE (mean, std, n, per seed; a seed whose training or test loss became non-finite
    is left out and counted as diverged) and the curves' means."""
    levels = []
    for level in sorted(config.levels):
        source = sources[level]
        entry = {"level": level, "density": float(imp.density[level].mean()),
                 "source_accuracy": stats(source["test_accuracy"], diverged=source["diverged"]),
                 "imp_accuracy": stats(imp.final_accuracy[level, :, 0]), "methods": {}}
        for method in config.methods:
            for shots in config.shots:
                h = history_of(units[(level, method, shots)])
                diverged = diverged_runs(h["train_loss"], h["test_loss"])
                entry["methods"][f"{method}-{shots_tag(shots)}"] = {
                    "method": method, "shots": shots,
                    "accuracy": stats(h["test_accuracy"][:, -1], diverged=diverged),
                    "ece": stats(h["test_ece"][:, -1], diverged=diverged),
                    "test_loss": stats(h["test_loss"][:, -1], diverged=diverged),
                    "curve": {"step": np.asarray(h["step"][0]).tolist(),
                              "test_accuracy": np.nanmean(h["test_accuracy"], 0).tolist(),
                              "test_ece": np.nanmean(h["test_ece"], 0).tolist()},
                    "seconds": float(units[(level, method, shots)]["seconds"]),
                }
        levels.append(entry)
    return {"config": dataclasses.asdict(config), "levels": levels}


def reprogram_table(summary: dict) -> str:
    """Per level (weights remaining): the source ticket's accuracy, then per method and shots
    the target test accuracy and ECE (both in %, mean ± std over seeds; diverged seeds left
    out and counted).

    Examples:
      >>> s = lambda m, d=0: {'mean': m, 'std': 0.01, 'n': 3, 'diverged': d}
      >>> summary = {'levels': [{'level': 0, 'density': 1.0, 'source_accuracy': s(0.66),
      ...     'methods': {'lp-full': {'accuracy': s(0.55), 'ece': s(0.04)}}},
      ...     {'level': 15, 'density': 0.0352, 'source_accuracy': s(0.6),
      ...     'methods': {'lp-full': {'accuracy': s(0.5, 1), 'ece': s(0.05, 1)}}}]}
      >>> print(reprogram_table(summary))
      weights  source acc.  lp-full acc.          lp-full ECE
      100.0%   66.0 ± 1.0   55.0 ± 1.0            4.0 ± 1.0
      3.5%     60.0 ± 1.0   50.0 ± 1.0 (1 div.)   5.0 ± 1.0 (1 div.)
      (n = 3 seeds; accuracy and ECE in %)
    """
    cell = lambda s: "diverged" if s["mean"] is None else (
        f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" + (f" ({s['diverged']} div.)" if s.get("diverged") else ""))
    names = list(summary["levels"][0]["methods"])
    rows = [["weights", "source acc."] + [f"{name} {what}" for name in names for what in ("acc.", "ECE")]]
    for entry in summary["levels"]:
        rows.append([f"{100 * entry['density']:.1f}%", cell(entry["source_accuracy"])]
                    + [cell(entry["methods"][name][key]) for name in names for key in ("accuracy", "ece")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    n = max(entry["source_accuracy"]["n"] + entry["source_accuracy"].get("diverged", 0)
            for entry in summary["levels"])
    lines.append(f"(n = {plural(n, 'seed')}; accuracy and ECE in %)")
    return "\n".join(lines)


def plot_reprogram(summary: dict, path: str, *, title: str = "") -> None:
    """Two panels: target test accuracy and ECE vs weights remaining (log axis), one line
    per method and shots, bands = std over seeds (n in the legend); the source ticket's own
    accuracy dashed."""
    fig, (acc_ax, ece_ax) = figure(2)
    density = 100 * np.array([e["density"] for e in summary["levels"]])
    names = list(summary["levels"][0]["methods"])
    for i, name in enumerate(names):
        method = summary["levels"][0]["methods"][name]
        style = "-" if method["method"] == "lp" else "--"
        marker = "o" if method["shots"] == 0 else "s"
        label = f"{NAMES.get(method['method'], method['method'])}, " \
                f"{'full data' if method['shots'] == 0 else str(method['shots']) + '-shot'}"
        for ax, key in ((acc_ax, "accuracy"), (ece_ax, "ece")):
            values = [e["methods"][name][key] for e in summary["levels"]]
            mean = 100 * np.array([np.nan if v["mean"] is None else v["mean"] for v in values])
            std = 100 * np.array([np.nan if v["std"] is None else v["std"] for v in values])
            n = min(v["n"] for v in values)
            ax.plot(density, mean, linestyle=style, marker=marker, markersize=4, color=f"C{i}",
                    label=f"{label} (n={n})")
            ax.fill_between(density, mean - std, mean + std, color=f"C{i}", alpha=0.15, linewidth=0)
    source = [e["source_accuracy"] for e in summary["levels"]]
    acc_ax.plot(density, [100 * s["mean"] if s["mean"] is not None else np.nan for s in source], color="gray",
                linestyle=":", marker=".", label=f"source task, the ticket itself (n={min(s['n'] for s in source)})")
    for ax, label in ((acc_ax, "target test accuracy (%)"), (ece_ax, "target expected calibration error (%)")):
        density_axis(ax, density)
        ax.set_ylabel(label)
    low, high = acc_ax.get_ylim()
    acc_ax.set_ylim(low, high + 0.4 * (high - low))  # room for the legend above the curves
    acc_ax.legend(fontsize=7, loc="upper center", ncol=2)
    save(fig, path, title=title, note=spread_note(summary["levels"][0]["source_accuracy"]["n"]) + " (bands)")
