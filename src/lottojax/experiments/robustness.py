"""The robustness lottery (Li et al.): tickets of equal density under common corruptions.

:func:`run_robustness` is what ``python experiments/robustness.py`` runs. For every seed
(``seed_strategy`` over ``devices``) it

1. runs global IMP (ticket arm only, ``rounds`` rounds of ``imp_rate``): its last level's
   mask is the ``imp`` ticket and its kept count ``K`` is every method's (equal density);
2. for every arm of :data:`ARMS` draws a mask with exactly ``K`` kept prunable weights (the
   dense arm keeps all), trains it from the seed's ``θ0`` for ``num_steps`` steps (the same
   trainer, data order and ``θ0`` for every arm), and
3. evaluates the trained network on the clean test split and on every corruption of
   :mod:`lottojax.robustness` for the input type at severities 1-5 (the same corrupted
   inputs for every arm of a seed): accuracy, and the last-layer geometry (mean angle to the
   true class, mean feature norm, mean margin).

Tables give the accuracy drop (clean minus corrupted, points) per arm and corruption
(mean over severities) and the rank correlation (Spearman) across every (arm, corruption,
severity) cell between the rise in angle and the accuracy drop. The Early-Bird ticket is a
weight ticket (global magnitude, ``K`` weights) drawn at the first epoch where the mask
stops changing (:func:`early_bird_ticket`), rewound to ``θ0`` like the others.

It writes into ``<root>/robustness-<config hash>/``: ``config.json``, ``imp/`` (IMP's
checkpoint), ``arms/<arm>.npz`` (each arm's measurements once done: a killed run resumes
after the last finished arm), ``dense-params.npz``, ``metrics.csv``, ``results.json``,
``results.npz`` and ``robustness.png`` (angle rise vs accuracy drop).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from types import MappingProxyType
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import load_arrays, load_npz, save_arrays, save_npz
from lottojax.experiments.base import (ConfigError, ExperimentConfig, build, option, over_seeds, put_seed_slots,
                                       seed_slots, stream_keys)
from lottojax.experiments.metrics import log_history, log_imp_level
from lottojax.experiments.plots import figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.early_bird import detect_early_bird
from lottojax.imp import run_imp
from lottojax.masks import PyTree, ones_like, prunable_flags, prunable_size
from lottojax.methods import ScoreContext, get_method, prune_with
from lottojax.robustness import corrupt, corruptions_for, head_features, last_layer_geometry
from lottojax.seeds import gather, put_seeded
from lottojax.train import TrainState

SEVERITIES = (1, 2, 3, 4, 5)
MEASURES = ("accuracy", "angle", "feature_norm", "margin")


class ArmInputs(NamedTuple):
    """What an arm's mask may use, for one seed."""

    params: PyTree  # θ0
    key: jax.Array  # the seed's 'mask' stream key
    context: ScoreContext  # training data and the model, for data-driven scores
    keep: jax.Array  # K, the prunable weights every ticket keeps
    imp_mask: PyTree  # IMP's last-level mask
    dense_params: PyTree  # the seed's trained dense network (zeros while it is being trained)
    dense_state: TrainState  # the dense network at θ0, ready to train
    run_steps: Callable[[TrainState, int, int], TrainState]  # (state, start, steps) -> state, the seed's data order
    epochs: tuple[int, int]  # (steps per epoch, epochs in num_steps)


def _keep_largest(params: PyTree, keep) -> PyTree:
    return prune_with(get_method("magnitude"), params, ones_like(params), key=jax.random.key(0), keep=keep)


def early_bird_ticket(a: ArmInputs, *, window: int = 5, eps: float = 0.1) -> PyTree:
    """The Early-Bird weight ticket: trains the dense net epoch by epoch, drawing after each
    epoch the global magnitude mask with ``K`` weights; the first mask whose Hamming distance
    to the previous ``window - 1`` is below ``eps`` is the ticket (the last epoch's if none
    is, which the run reports as never detected)."""
    steps_per_epoch, epochs = a.epochs

    def epoch(state, e):
        state = a.run_steps(state, e * steps_per_epoch, steps_per_epoch)
        return state, _keep_largest(state.params, a.keep)

    _, history = jax.lax.scan(epoch, a.dense_state, jnp.arange(epochs))
    drawn, _ = detect_early_bird(history, window=window, eps=eps)
    return jax.tree.map(lambda h: h[jnp.where(drawn >= 0, drawn, epochs - 1)], history)


def _at_init(method: str) -> Callable[[ArmInputs], PyTree]:
    """Pruning at initialisation with a registered method, to exactly ``K`` weights."""
    return lambda a: prune_with(get_method(method), a.params, ones_like(a.params), key=a.key, context=a.context,
                                keep=a.keep)


#: The compared tickets, by name: ``ArmInputs -> mask``. ``dense`` comes first (the
#: one-shot magnitude arm prunes its trained weights). A new method is one line here.
ARMS = MappingProxyType({
    "dense": lambda a: ones_like(a.params),
    "imp": lambda a: a.imp_mask,
    "magnitude": lambda a: _keep_largest(a.dense_params, a.keep),  # one-shot: trained weights, rewound to θ0
    "early-bird": early_bird_ticket,  # the mask drawn early (magnitude, K weights), rewound to θ0
    "random": _at_init("random"),
    "snip": _at_init("snip"),
    "synflow": _at_init("synflow"),
})


@dataclasses.dataclass(frozen=True)
class RobustnessConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D MLP (the base config's
    Adam 1.2e-3, batch 60, 3000 steps per training) at IMP's density after 10 rounds of 20%
    (10.7% of the prunable weights)."""

    arms: tuple[str, ...] = option(tuple(ARMS), "compared tickets (lottojax.experiments.robustness.ARMS)",
                                   choices=tuple(ARMS), extends=True)
    rounds: int = option(10, "global IMP rounds; the last level's kept count is every ticket's")
    imp_rate: float = option(0.2, "fraction of the remaining weights IMP prunes per round")
    corruptions: tuple[str, ...] = option((), "corruptions to apply (default: every one for the input type)")
    head: str = option("output", "the name of the last Dense layer (its input is the feature f)")

    def check(self) -> None:
        super().check()
        if "dense" in self.arms and self.arms[0] != "dense" or "magnitude" in self.arms and "dense" not in self.arms:
            raise ConfigError("arms", f"{self.arms}: 'dense' must come first, and 'magnitude' needs it")
        if self.rounds < 1:
            raise ConfigError("rounds", f"{self.rounds} must be >= 1")
        if not 0 < self.imp_rate < 1:
            raise ConfigError("imp_rate", f"{self.imp_rate} must be in (0, 1)")


def evaluate(model, params, model_state, x, y, key, corruptions, *, head: str = "output") -> dict:
    """Clean and corrupted measurements of one trained network: ``{measure: clean scalar}``
    under ``'clean'`` and ``{measure: (corruptions, severities)}`` under ``'corrupted'``.
    Corruption ``i`` draws with ``fold_in(key, i)`` at every severity."""

    def measure(inputs):
        features, logits = head_features(model, params, model_state, inputs, head=head)
        geometry = last_layer_geometry(features, params[head]["kernel"], params[head]["bias"], y)
        return dict(accuracy=jnp.mean(jnp.argmax(logits, -1) == y), angle=jnp.mean(geometry.angle),
                    feature_norm=jnp.mean(geometry.feature_norm), margin=jnp.mean(geometry.margin))

    per_corruption = [jax.vmap(lambda s, i=i, name=name: measure(corrupt(name, jax.random.fold_in(key, i), x, s)))(
        jnp.asarray(SEVERITIES)) for i, name in enumerate(corruptions)]
    corrupted = {m: jnp.stack([c[m] for c in per_corruption]) for m in MEASURES}
    return {"clean": measure(x), "corrupted": corrupted}


def _arm_program(config: RobustnessConfig, setup, mask_fn, corruptions) -> Callable:
    model, trainer = setup.model, setup.trainer
    input_shape, num_classes = setup.data.input_shape, setup.data.num_classes

    def one_seed(init_key, data_key, mask_key, corrupt_key, imp_mask, dense_params, keep, data):
        params, state = model.init(init_key)
        context = ScoreContext(apply_fn=lambda p, x: model.apply(p, state, x, True)[0],
                               eval_apply_fn=lambda p, x: model.apply(p, state, x, False)[0],
                               x=data.x_train, y=data.y_train, input_shape=input_shape, num_classes=num_classes)
        dense_state = trainer.init(init_key)
        run_steps = lambda state, start, steps: trainer.run_steps(state, data, data_key, start, steps)[0]
        mask = mask_fn(ArmInputs(params, mask_key, context, keep, imp_mask, dense_params, dense_state, run_steps,
                                 (setup.steps_per_epoch, config.num_steps // setup.steps_per_epoch)))
        trained, history = trainer.train(trainer.init(init_key, mask), data, data_key, start=0,
                                         num_steps=config.num_steps)
        measured = evaluate(model, trained.params, trained.model_state, data.x_test, data.y_test, corrupt_key,
                            corruptions, head=config.head)
        return dict(measured=measured, history=history, params=trained.params, mask=mask)

    return over_seeds(config, one_seed, (0, 0, 0, 0, 0, 0, None, None))


def _kept(mask: PyTree, flags) -> np.ndarray:
    """Kept prunable weights per seed (leaves ``(seeds, ...)``)."""
    leaves = [np.asarray(m) for m, f in zip(jax.tree.leaves(mask), flags) if f]
    return sum(m.reshape(m.shape[0], -1).sum(1) for m in leaves)


@exclusive("robustness")
def run_robustness(config: RobustnessConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "robustness", config) as workdir:
        setup = build(config)
        if "early-bird" in config.arms and config.num_steps // setup.steps_per_epoch < 5:
            raise ConfigError("num_steps", f"{config.num_steps} steps are {config.num_steps // setup.steps_per_epoch} "
                                           "epochs; the early-bird arm needs at least 5 (its detection window)")
        corruptions = config.corruptions or corruptions_for((1, *setup.data.input_shape))
        for name in corruptions:
            corrupt(name, jax.random.key(0), jnp.zeros((1, *setup.data.input_shape)), 1)  # a wrong name or input fails now
        imp = run_imp(setup.trainer, setup.data, seeds=config.seeds, rounds=config.rounds, fraction=config.imp_rate,
                      scope="global", num_steps=config.num_steps, controls=(), seed_strategy=config.seed_strategy,
                      devices=config.devices, checkpoint_dir=os.path.join(workdir, "imp"), progress=progress,
                      on_level=partial(log_imp_level, workdir, prefix="imp-"))
        n = len(config.seeds)
        one_params = jax.eval_shape(setup.model.init, jax.random.key(0))[0]
        flags = prunable_flags(one_params)
        keep = int(_kept(imp.masks[-1], flags)[0])
        slots = len(seed_slots(config))
        pad = partial(put_seed_slots, config)
        keys = stream_keys(config, "init", "data", "mask", "corrupt")
        data = put_seeded(setup.data, config.devices, stacked=False)
        imp_mask = pad(imp.masks[-1])
        dense_path = os.path.join(workdir, "dense-params.npz")
        dense_params = pad(load_arrays(dense_path, one_params)) if os.path.exists(dense_path) else \
            jax.tree.map(lambda x: jnp.zeros((slots, *x.shape), x.dtype), one_params)
        measured = {}
        for name in config.arms:
            out = {}  # the fresh run's outputs: its history and params too

            def train():  # called at once, in this iteration
                start = time.perf_counter()
                program = _arm_program(config, setup, ARMS[name], corruptions)
                out.update(jax.tree.map(lambda x: np.asarray(x)[:n],
                                        gather(program(*keys, imp_mask, dense_params, jnp.int32(keep), data))))
                diverged = diverged_runs(out["history"].train_loss, out["history"].val_loss)
                out["measured"] = jax.tree.map(  # a diverged seed is flagged (NaN), never averaged in
                    lambda v: np.where(diverged.reshape(-1, *[1] * (v.ndim - 1)), np.nan, v), out["measured"])
                record = dict(measured=out["measured"], kept=_kept(out["mask"], flags),
                              seconds=time.perf_counter() - start)
                if name == "dense" and jax.process_index() == 0:
                    save_arrays(dense_path, out["params"])
                return record

            measured[name], fresh = load_or_run(os.path.join(workdir, "arms", f"{name}.npz"), train, save=_save,
                                                load=_load)
            if not fresh:  # finished in an earlier call
                continue
            if jax.process_index() == 0:
                log_history(workdir, name, out["history"], {"seed": config.seeds})
            if name == "dense":
                dense_params = pad(out["params"])
            if progress:
                drop = 100 * (out["measured"]["clean"]["accuracy"][:, None, None] - out["measured"]["corrupted"]["accuracy"])
                print(f"{name:>10}: clean {100 * out['measured']['clean']['accuracy'].mean():.1f}%, "
                      f"mean drop {drop.mean():.1f} pts ({measured[name]['seconds']:.0f} s)", flush=True)
    summary = summarize(config, corruptions, keep, one_params, measured)
    if jax.process_index() == 0:
        arrays = {f"{arm}/{kind}/{m}": np.asarray(v) for arm, r in measured.items()
                  for kind in ("clean", "corrupted") for m, v in r["measured"][kind].items()}
        write_results(workdir, summary, {k.replace("/", "__"): v for k, v in arrays.items()})
        plot_robustness(summary, measured, os.path.join(workdir, "robustness.png"),
                        title=f"Robustness of tickets at {100 * summary['density']:.1f}% density, {config.dataset} "
                              f"({config.model}), {plural(n, 'seed')}")
    return summary, workdir


def _save(path: str, record: dict) -> None:
    flat = {f"{kind}/{m}": v for kind in ("clean", "corrupted") for m, v in record["measured"][kind].items()}
    save_npz(path, dict(kept=record["kept"], seconds=np.asarray(record["seconds"]), **flat))


def _load(path: str) -> dict:
    saved = load_npz(path)
    measured = {kind: {m: saved[f"{kind}/{m}"] for m in MEASURES} for kind in ("clean", "corrupted")}
    return {"measured": measured, "kept": saved["kept"], "seconds": float(saved["seconds"])}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties).

    Examples:
      >>> spearman(np.array([1., 2., 3., 4.]), np.array([10., 20., 25., 100.]))
      1.0
      >>> round(spearman(np.array([1., 2., 3.]), np.array([3., 1., 2.])), 3)
      -0.5
    """
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # ties share their average rank
            r[x == value] = r[x == value].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def summarize(config: RobustnessConfig, corruptions, keep: int, one_params, measured: dict) -> dict:
    """Per arm: clean accuracy, per corruption and severity the accuracy drop and the
    geometry shifts (corrupted minus clean; seeds' mean, std, n); the rank correlation of
    angle rise and accuracy drop over every cell."""
    total = prunable_size(one_params)
    arms, cells = {}, []
    for arm, record in measured.items():
        clean, corrupted = record["measured"]["clean"], record["measured"]["corrupted"]
        shift = {m: corrupted[m] - clean[m][:, None, None] for m in MEASURES}  # (seeds, corruptions, severities)
        rows = {}
        for c, name in enumerate(corruptions):
            rows[name] = {"accuracy_drop": [stats(-shift["accuracy"][:, c, s]) for s in range(len(SEVERITIES))],
                          "mean_accuracy_drop": stats(-shift["accuracy"][:, c].mean(1)),
                          **{f"{m}_shift": [float(np.nanmean(shift[m][:, c, s])) for s in range(len(SEVERITIES))]
                             for m in ("angle", "feature_norm", "margin")}}
            cells += [(arm, name, s, float(np.nanmean(shift["angle"][:, c, s])),
                       float(-np.nanmean(shift["accuracy"][:, c, s]))) for s in range(len(SEVERITIES))]
        arms[arm] = {"clean_accuracy": stats(clean["accuracy"]), "density": float(np.mean(record["kept"])) / total,
                     "mean_accuracy_drop": stats(-shift["accuracy"].mean((1, 2))), "corruptions": rows,
                     "clean_geometry": {m: stats(clean[m]) for m in ("angle", "feature_norm", "margin")},
                     "seconds": record["seconds"]}
    angle, drop = np.array([c[3] for c in cells]), np.array([c[4] for c in cells])
    return {"config": dataclasses.asdict(config), "density": keep / total, "kept": keep, "corruptions": list(corruptions),
            "severities": list(SEVERITIES), "arms": arms,
            "angle_drop_spearman": spearman(angle, drop) if len(cells) > 2 else None,
            "angle_drop_spearman_per_arm": {a: spearman(angle[[c[0] == a for c in cells]], drop[[c[0] == a for c in cells]])
                                            for a in arms}}


def robustness_table(summary: dict) -> str:
    """Clean accuracy and, per corruption, the accuracy drop (points, mean over severities
    and seeds ± std over seeds; ``(k diverged)``: seeds left out) per arm; then the
    angle/drop rank correlation.

    Examples:
      >>> s = {'corruptions': ['shift'], 'angle_drop_spearman': 0.5, 'density': 0.1, 'arms': {'imp': {
      ...     'clean_accuracy': {'mean': .6, 'std': .01, 'n': 3}, 'mean_accuracy_drop': {'mean': .1, 'std': .0, 'n': 3},
      ...     'corruptions': {'shift': {'mean_accuracy_drop': {'mean': .1, 'std': .02, 'n': 3}}}}}}
      >>> print(robustness_table(s))
      arm         | clean          | shift        | mean drop
      imp         | 60.0 ± 1.0     | 10.0 ± 2.0   | 10.0 ± 0.0
      angle rise vs accuracy drop, Spearman over every (arm, corruption, severity): 0.50
    """
    cell = lambda s: ("diverged" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
                      + (f" ({s['diverged']} diverged)" if s.get("diverged") else ""))
    lines = [f"{'arm':<11} | {'clean':<14} | " + " | ".join(f"{c:<12}" for c in summary["corruptions"]) + " | mean drop"]
    for arm, entry in summary["arms"].items():
        drops = " | ".join(f"{cell(entry['corruptions'][c]['mean_accuracy_drop']):<12}" for c in summary["corruptions"])
        lines.append(f"{arm:<11} | {cell(entry['clean_accuracy']):<14} | {drops} | {cell(entry['mean_accuracy_drop'])}")
    rho = summary["angle_drop_spearman"]
    lines.append("angle rise vs accuracy drop, Spearman over every (arm, corruption, severity): "
                 + ("n/a" if rho is None else f"{rho:.2f}"))
    return "\n".join(lines)


def plot_robustness(summary: dict, measured: dict, path: str, *, title: str = "") -> None:
    """Left: accuracy vs severity per arm (mean over corruptions and seeds, severity 0 =
    clean). Right: angle rise vs accuracy drop, one point per (arm, corruption, severity)."""
    fig, (left, right) = figure(2)
    for arm, record in measured.items():
        clean = record["measured"]["clean"]["accuracy"]
        corrupted = record["measured"]["corrupted"]["accuracy"]  # (seeds, corruptions, severities)
        curve = np.concatenate([clean[:, None], corrupted.mean(1)], axis=1)
        left.errorbar(np.arange(len(SEVERITIES) + 1), 100 * curve.mean(0), yerr=100 * curve.std(0), marker="o",
                      capsize=2, label=arm)
        shift_angle = record["measured"]["corrupted"]["angle"] - record["measured"]["clean"]["angle"][:, None, None]
        drop = clean[:, None, None] - corrupted
        right.scatter(np.degrees(shift_angle.mean(0)).ravel(), 100 * drop.mean(0).ravel(), s=12, label=arm)
    n = len(summary["config"]["seeds"])
    left.set(xlabel="severity (0 = clean)", ylabel="test accuracy (%)",
             title="accuracy under corruption (mean over corruptions)")
    rho = summary["angle_drop_spearman"]
    right.set(xlabel="rise of the mean angle to the true class (degrees)", ylabel="accuracy drop (points)",
              title=f"geometry vs accuracy drop (Spearman {rho:.2f})" if rho is not None else "geometry vs drop")
    left.legend(fontsize=8)
    save(fig, path, title=title, note=spread_note(n) + " (left); right: seed means")
