"""SuperTickets (You et al., ECCV 2022): joint channel search and weight pruning in one run,
against the pipeline that searches first and prunes afterwards.

:func:`run_supertickets` is what ``python experiments/supertickets.py`` runs; a notebook can
call it the same way. On a BatchNorm network (default: the 1-D CNN 64-64-64 on MNIST-1D,
SGD with momentum 0.9, learning rate 0.1 (x0.1 at 50% and 75%), weight decay 1e-4, batch
128, 42 epochs) every arm of :data:`ARMS` trains each seed:

- ``joint`` / ``joint-keep``: the SuperTickets search. The FLOPs-weighted slimming penalty
  ``ρ(t) Σ_l π_l Σ|γ_l|`` (``ρ`` ramped up linearly over ``warmup_epochs``; ``π_l`` of the
  current architecture, :func:`lottojax.supertickets.flops_weights`); after epochs
  ``remove_start, remove_start + remove_every, ... <= remove_stop`` the channels whose
  ``|γ|`` and its running average are both ``<= threshold`` are physically removed (the
  net is rebuilt smaller, optimizer state and BatchNorm statistics cut with it); after
  every ``prune_every`` epochs global magnitude pruning to
  ``min(prune_step * ⌊epochs / prune_every⌋, target_sparsity)`` of the current net's
  kernels. ``joint`` gives a rebuilt layer an all-ones mask (the reference code: pruned
  weights of surviving channels come back, from 0 here), ``joint-keep`` keeps its mask.
- ``pipeline``: slim (the same penalty, ``pipeline_epochs[0]`` epochs), shrink (the same
  removal rule once), train the smaller net (``pipeline_epochs[1]``), prune one-shot to the
  joint arms' final sparsity, retrain with the mask (``pipeline_epochs[2]``; each stage with
  a fresh optimizer and learning-rate schedule).
- ``dense``: the supernet without penalty or pruning, the reference for accuracy and cost.

Seeds run one after the other: after the first removal event each seed has its own widths,
so their states no longer stack into one vmapped array (padding them to the widest would
compute the FLOPs the removal saves). Each epoch is one compiled program
(:meth:`lottojax.train.Trainer.train`), cached per architecture, so only a removal event
that changes the widths compiles anew; masks change without recompiling (``set_mask``).

Cost: forward FLOPs per example of the convolution and dense kernels (2 per nonzero
multiply-add at each output position, :func:`lottojax.compact.count`) of the network as it
is during the epoch (its widths and mask); a training step costs 3x the forward pass per
example (forward, input and weight gradients), an epoch ``steps_per_epoch * batch_size``
examples. Final FLOPs are the last network's.

It writes into ``<root>/supertickets-<config hash>/``: ``config.json``, ``arms/<arm>/seed<k>.npz``
once an arm's seed is trained (a killed run resumes with every finished seed),
``results.json``/``results.npz`` (per arm: accuracy, density, widths, final and training FLOPs;
per seed and epoch: widths, density, FLOPs, test accuracy; every pruning and removal event),
``supertickets.png`` (accuracy vs training FLOPs; channels and density over epochs) and the
metrics of every arm and seed.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from types import MappingProxyType
from typing import Callable, NamedTuple

import jax
import numpy as np
import optax

from lottojax.compact import count
from lottojax.early_bird import slimming_penalty
from lottojax.experiments.base import (ConfigError, ExperimentConfig, build, learning_rate_schedule, make_optimizer,
                                       option, override, stream_keys)
from lottojax.experiments.metrics import log_history
from lottojax.experiments.plots import figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, mean_std, open_run, stats, write_results
from lottojax.masks import PyTree, apply_mask, leaves_with_paths, prunable_flags
from lottojax.models import create
from lottojax.optim import get_mask, set_mask
from lottojax.slimming import channel_plan, shrink, shrink_train_state
from lottojax.supertickets import (event_due, flops_weights, prune_to_sparsity, pruning_sparsity, rebuilt_mask,
                                   removable_channels, shrink_averages, update_scale_averages)
from lottojax.train import History, TrainState, make_trainer

CHANNEL_MODELS = ("cnn1d", "vgg11", "vgg16")
ARM_NAMES = ("dense", "joint", "joint-keep", "pipeline")


@dataclasses.dataclass(frozen=True)
class SuperTicketsConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are PAPERS.md's small configuration
    (CNN1D 64-64-64 with BatchNorm on MNIST-1D, 42 epochs, pruning every 3 epochs to 90%).
    Training counts epochs (``epochs``); ``num_steps`` and ``eval_every`` are unused."""

    model: str = override(ExperimentConfig, "model", "cnn1d")
    widths: tuple[int, ...] = override(ExperimentConfig, "widths", (64, 64, 64))
    optimizer: str = override(ExperimentConfig, "optimizer", "momentum")
    learning_rate: float = override(ExperimentConfig, "learning_rate", 0.1)
    lr_drops: tuple[float, ...] = override(ExperimentConfig, "lr_drops", (0.5, 0.75))
    weight_decay: float = override(ExperimentConfig, "weight_decay", 1e-4)
    batch_size: int = override(ExperimentConfig, "batch_size", 128)
    seeds: tuple[int, ...] = override(ExperimentConfig, "seeds", (0, 1, 2))
    num_steps: int = option(3000, "unused: SuperTickets counts --epochs")
    eval_every: int = option(100, "unused: every epoch is evaluated")
    arms: tuple[str, ...] = option(ARM_NAMES, "arms compared (lottojax.experiments.supertickets.ARMS)",
                                   choices=ARM_NAMES)
    epochs: int = option(42, "epochs of the joint search (and of the dense arm)")
    penalty: float = option(2.0, "ρ: strength of the FLOPs-weighted slimming penalty ρ Σ_l π_l Σ|γ_l| after warm-up "
                                 "(π_l sums to about 1 over the channels, so ρ is spread over the whole net)")
    warmup_epochs: int = option(6, "epochs over which ρ ramps up linearly from 0")
    ema_decay: float = option(0.5, "decay of the running average of |γ| (updated once per epoch)")
    threshold: float = option(1e-3, "a channel is removed once |γ| and its running average are both <= this")
    remove_every: int = option(6, "epochs between channel-removal events")
    remove_start: int = option(4, "epochs done at the first removal event")
    remove_stop: int = option(22, "no removal event after this many epochs (the architecture is then fixed while "
                                  "pruning reaches its target and the net fine-tunes)")
    prune_every: int = option(3, "epochs between pruning events")
    prune_step: float = option(0.1, "sparsity added at each pruning event (the reference code's 10%)")
    target_sparsity: float = option(0.9, "final global sparsity of the kernels")
    pipeline_epochs: tuple[int, ...] = option((42, 42, 42), "pipeline: epochs to slim, to train the shrunk net and to "
                                                            "retrain after pruning")

    def check(self) -> None:
        """:meth:`ExperimentConfig.check`, then the SuperTickets fields.

        Examples:
          >>> SuperTicketsConfig(pipeline_epochs=(10, 10)).check()
          Traceback (most recent call last):
          ...
          lottojax.experiments.base.ConfigError: pipeline_epochs: (10, 10) must be three epoch counts >= 1 (slim, train, retrain)
        """
        super().check()
        if self.model not in CHANNEL_MODELS:
            raise ConfigError("model", f"{self.model!r}: channel removal needs a BatchNorm chain, one of {CHANNEL_MODELS}")
        for name in ("epochs", "remove_every", "prune_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        for name in ("warmup_epochs", "remove_start", "remove_stop"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 0")
        if self.penalty < 0 or self.threshold < 0:
            raise ConfigError("penalty" if self.penalty < 0 else "threshold", "must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"{self.ema_decay} must be in [0, 1)")
        if not 0 < self.prune_step <= 1 or not 0 <= self.target_sparsity < 1:
            raise ConfigError("target_sparsity", f"need 0 < prune_step ({self.prune_step}) <= 1 and "
                                                 f"0 <= target_sparsity ({self.target_sparsity}) < 1")
        if len(self.pipeline_epochs) != 3 or min(self.pipeline_epochs) < 1:
            raise ConfigError("pipeline_epochs", f"{self.pipeline_epochs} must be three epoch counts >= 1 "
                                                 "(slim, train, retrain)")

    def final_sparsity(self) -> float:
        """The joint arms' sparsity after the last epoch (what the pipeline prunes to)."""
        return pruning_sparsity(self.epochs - 1, every=self.prune_every, step=self.prune_step,
                                target=self.target_sparsity)


class Context(NamedTuple):
    """What every arm gets: the config, the data (on the device), the steps per epoch and
    ``stage(widths, penalty, epochs)``, the cached ``(trainer, compiled epoch)`` of one
    architecture and optimizer (penalty strength and learning-rate schedule length)."""

    config: SuperTicketsConfig
    data: object
    steps_per_epoch: int
    stage: Callable


def network_flops(config: SuperTicketsConfig, params: PyTree, mask: PyTree, input_shape: tuple) -> tuple[float, float]:
    """``(masked, dense)`` forward FLOPs per example of the kernels of one network."""
    widths = _widths(config, params)
    total = count(jax.device_get(params), jax.device_get(mask), name=config.model, input_shape=tuple(input_shape),
                  xla=False, **{_width_argument(config): widths}).total
    return float(total.flops_masked), float(total.flops_dense)


def _width_argument(config: SuperTicketsConfig) -> str:
    return "channels" if config.model == "cnn1d" else "widths"


def _make_stage(config: SuperTicketsConfig, data, steps_per_epoch: int) -> Callable:
    @functools.lru_cache(maxsize=None)
    def stage(widths: tuple, penalty: float, epochs: int):
        model = create(config.model, input_shape=data.input_shape, num_classes=data.num_classes,
                       **{_width_argument(config): widths})
        schedule = learning_rate_schedule(config, epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
        inner = make_optimizer(config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay)
        if penalty:
            shapes = jax.eval_shape(model.init, jax.random.key(0))[0]
            weights = flops_weights(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), config.model,
                                    input_shape=data.input_shape, **{_width_argument(config): widths})
            strength = optax.linear_schedule(0.0, penalty, max(config.warmup_epochs * steps_per_epoch, 1))
            first = slimming_penalty(strength, layer_weights=weights)
        else:  # the same state structure, so a state moves between stages
            first = slimming_penalty(0.0)
        trainer = make_trainer(model, optax.chain(first, inner), batch_size=config.batch_size,
                               eval_every=steps_per_epoch)
        epoch = jax.jit(lambda state, data, key, start: trainer.train(state, data, key, start, steps_per_epoch))
        return trainer, epoch

    return stage


def _widths(config: SuperTicketsConfig, params: PyTree) -> tuple[int, ...]:
    return tuple(int(params[f"bn{i}"]["scale"].shape[0]) for i in range(len(config.widths)))


def _density(mask: PyTree) -> tuple[int, int]:
    """``(kept, total)`` prunable (kernel) entries of a mask."""
    leaves = leaves_with_paths(mask)[1]
    flags = prunable_flags(mask)
    return (sum(int(np.sum(np.asarray(m))) for m, f in zip(leaves, flags) if f),
            sum(int(np.size(m)) for m, f in zip(leaves, flags) if f))


def _prune(state: TrainState, sparsity: float) -> TrainState:
    mask = prune_to_sparsity(state.params, get_mask(state.opt_state), float(sparsity))
    return state._replace(params=apply_mask(state.params, mask), opt_state=set_mask(state.opt_state, mask))


class _Recorder:
    """Collects a seed's per-epoch rows and events while it trains."""

    def __init__(self, context: Context):
        self.context = context
        self.rows: list[History] = []
        self.epoch_flops: list[float] = []
        self.widths: list[tuple] = []
        self.density: list[float] = []
        self.dense_flops: list[float] = []
        self.prunes: list[tuple] = []  # (epoch index, target sparsity, kept before, kept after, total)
        self.removals: list[tuple] = []  # (epoch index, dense FLOPs before, dense FLOPs after)
        self.diverged = False

    def flops(self, state: TrainState) -> tuple[float, float]:
        return network_flops(self.context.config, state.params, get_mask(state.opt_state),
                             self.context.data.input_shape)

    def epoch(self, stage, state: TrainState, key, start_epoch: int) -> TrainState:
        """Trains one epoch (global epoch ``len(rows)``, stage epoch ``start_epoch``)."""
        config, spe = self.context.config, self.context.steps_per_epoch
        masked, _ = self.flops(state)
        state, history = stage[1](state, self.context.data, key, start_epoch * spe)
        history = jax.tree.map(lambda x: np.asarray(x)[-1], history)
        self.rows.append(history)
        self.epoch_flops.append(3.0 * masked * spe * config.batch_size)
        self.diverged |= not np.isfinite([history.train_loss, history.val_loss]).all()
        return state

    def end_epoch(self, state: TrainState) -> None:
        """Records the network as it stands after the epoch's events."""
        kept, total = _density(get_mask(state.opt_state))
        self.widths.append(_widths(self.context.config, state.params))
        self.density.append(kept / total)
        self.dense_flops.append(self.flops(state)[1])

    def prune(self, state: TrainState, sparsity: float) -> TrainState:
        before = _density(get_mask(state.opt_state))[0]
        state = _prune(state, sparsity)
        kept, total = _density(get_mask(state.opt_state))
        self.prunes.append((len(self.rows) - 1, sparsity, before, kept, total))
        return state

    def arrays(self, final: TrainState) -> dict:
        masked, _ = self.flops(final)
        rows = jax.tree.map(lambda *x: np.array(x), *self.rows)
        diverged = bool(diverged_runs(rows.train_loss, rows.val_loss))  # flagged, never averaged in
        accuracy = np.nan if diverged else float(rows.test_accuracy[-1])
        return dict(
            accuracy=np.float64(accuracy), diverged=np.bool_(diverged), final_flops=np.float64(masked),
            train_flops=np.float64(sum(self.epoch_flops)), density=np.float64(self.density[-1]),
            widths=np.array(self.widths[-1]), epoch_widths=np.array(self.widths), epoch_density=np.array(self.density),
            epoch_dense_flops=np.array(self.dense_flops), epoch_train_flops=np.array(self.epoch_flops),
            **{f"epoch_{name}": np.asarray(value) for name, value in rows._asdict().items()},
            prune_events=np.array(self.prunes, np.float64).reshape(-1, 5),
            removal_events=np.array(self.removals, np.float64).reshape(-1, 3),
        )


def _remove_channels(config: SuperTicketsConfig, state: TrainState, averages: dict, *, reactivate: bool):
    """Removes the channels of :func:`removable_channels`; returns ``(state, averages,
    removed)``."""
    keep = removable_channels(jax.device_get(state.params), averages, threshold=config.threshold)
    if all(m.all() for m in keep.values()):
        return state, averages, False
    plan = channel_plan(config.model, keep, state.params)
    old_mask = get_mask(state.opt_state)
    state = shrink_train_state(plan, state)
    mask = rebuilt_mask(old_mask, shrink(plan, old_mask), reactivate=reactivate)
    state = state._replace(params=apply_mask(state.params, mask), opt_state=set_mask(state.opt_state, mask))
    return state, shrink_averages(plan.kept, averages), True


def _keys(config: SuperTicketsConfig, seed_index: int):
    init, data = stream_keys(config, "init", "data")
    return init[seed_index], data[seed_index]


def dense_arm(context: Context, seed_index: int) -> dict:
    """The supernet trained ``epochs`` epochs without penalty or pruning."""
    config = context.config
    init_key, data_key = _keys(config, seed_index)
    stage = context.stage(tuple(config.widths), 0.0, config.epochs)
    state, record = stage[0].init(init_key), _Recorder(context)
    for epoch in range(config.epochs):
        state = record.epoch(stage, state, data_key, epoch)
        record.end_epoch(state)
    return record.arrays(state)


def joint_arm(reactivate: bool) -> Callable[[Context, int], dict]:
    """The SuperTickets search (module doc); ``reactivate``: rebuilt layers get all-ones masks."""

    def run(context: Context, seed_index: int) -> dict:
        config = context.config
        init_key, data_key = _keys(config, seed_index)
        widths = tuple(config.widths)
        state, record, averages = context.stage(widths, config.penalty, config.epochs)[0].init(init_key), _Recorder(context), None
        for epoch in range(config.epochs):
            state = record.epoch(context.stage(widths, config.penalty, config.epochs), state, data_key, epoch)
            if record.diverged:
                record.end_epoch(state)
                break
            averages = update_scale_averages(averages, state.params, decay=config.ema_decay)
            done = epoch + 1
            if event_due(done, every=config.remove_every, start=config.remove_start, stop=config.remove_stop):
                before = record.flops(state)[1]
                state, averages, removed = _remove_channels(config, state, averages, reactivate=reactivate)
                if removed:
                    widths = _widths(config, state.params)
                    record.removals.append((epoch, before, record.flops(state)[1]))
            if done % config.prune_every == 0:
                state = record.prune(state, pruning_sparsity(epoch, every=config.prune_every, step=config.prune_step,
                                                             target=config.target_sparsity))
            record.end_epoch(state)
        return record.arrays(state)

    return run


def pipeline_arm(context: Context, seed_index: int) -> dict:
    """Slim -> shrink -> train -> prune (one shot, to the joint arms' final sparsity) ->
    retrain; each stage a fresh optimizer and learning-rate schedule, the weights carried over."""
    config = context.config
    init_key, data_key = _keys(config, seed_index)
    slim_epochs, train_epochs, retrain_epochs = config.pipeline_epochs
    stage = context.stage(tuple(config.widths), config.penalty, slim_epochs)
    state, record, averages = stage[0].init(init_key), _Recorder(context), None
    for phase, epochs in enumerate(config.pipeline_epochs):
        if phase:  # a fresh optimizer state (and schedule) for the stage, on the current net and mask
            stage = context.stage(_widths(config, state.params), 0.0, epochs)
            fresh = stage[0].init(init_key, get_mask(state.opt_state))
            state = state._replace(opt_state=fresh.opt_state, step=fresh.step)
        for epoch in range(epochs):
            state = record.epoch(stage, state, jax.random.fold_in(data_key, phase), epoch)
            if record.diverged:
                record.end_epoch(state)
                return record.arrays(state)
            last = epoch == epochs - 1
            if phase == 0:
                averages = update_scale_averages(averages, state.params, decay=config.ema_decay)
                if last:
                    before = record.flops(state)[1]
                    state, averages, removed = _remove_channels(config, state, averages, reactivate=False)
                    if removed:
                        record.removals.append((len(record.rows) - 1, before, record.flops(state)[1]))
            if phase == 1 and last:
                state = record.prune(state, config.final_sparsity())
            record.end_epoch(state)
    return record.arrays(state)


#: The compared arms, by name: ``(Context, seed index) -> per-seed arrays``. A new arm is one
#: function (or one call of a factory) and one entry here.
ARMS = MappingProxyType({
    "dense": dense_arm,
    "joint": joint_arm(reactivate=True),
    "joint-keep": joint_arm(reactivate=False),
    "pipeline": pipeline_arm,
})


def _summarise(config: SuperTicketsConfig, runs: dict[str, list[dict]]) -> dict:
    arms = {}
    dense_cost = None
    if "dense" in runs:
        dense_cost = float(np.mean([r["train_flops"] for r in runs["dense"]]))
    for name, seeds in runs.items():
        diverged = np.array([bool(r["diverged"]) for r in seeds])
        field = lambda key: stats([float(r[key]) for r in seeds], diverged=diverged)
        arms[name] = dict(
            accuracy=field("accuracy"), density=field("density"), final_flops=field("final_flops"),
            train_flops=field("train_flops"), widths=[np.asarray(r["widths"]).tolist() for r in seeds],
            epochs=[int(len(r["epoch_test_accuracy"])) for r in seeds],
            train_flops_vs_dense=(None if dense_cost is None else
                                  float(np.mean([r["train_flops"] for r in seeds]) / dense_cost)),
            prune_events=[np.asarray(r["prune_events"]).tolist() for r in seeds],
            removal_events=[np.asarray(r["removal_events"]).tolist() for r in seeds],
        )
    return {"config": dataclasses.asdict(config), "final_sparsity": config.final_sparsity(), "arms": arms}


@exclusive("supertickets")
def run_supertickets(config: SuperTicketsConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    say = print if progress else (lambda *a, **k: None)
    with open_run(root, "supertickets", config) as workdir:
        setup = build(config, total_steps=1, eval_every=1)  # the data; trainers are built per architecture
        context = Context(config, setup.data, setup.steps_per_epoch,
                          _make_stage(config, setup.data, setup.steps_per_epoch))
        runs: dict[str, list[dict]] = {}
        for name in config.arms:
            runs[name] = []
            for index, seed in enumerate(config.seeds):
                start = time.perf_counter()
                path = os.path.join(workdir, "arms", name, f"seed{seed}.npz")
                arrays, fresh = load_or_run(path, lambda: ARMS[name](context, index))
                runs[name].append(arrays)
                if fresh:
                    history = History(*(np.asarray(arrays[f"epoch_{f}"])[None] for f in History._fields))
                    if jax.process_index() == 0:
                        log_history(workdir, f"{name}-seed{seed}", history, {"seed": [seed]})
                    say(f"{name:>10} seed {seed}: {100 * float(arrays['accuracy']):.2f}%  widths "
                        f"{np.asarray(arrays['widths']).tolist()}  density {float(arrays['density']):.3f}  "
                        f"({time.perf_counter() - start:.0f} s)", flush=True)
    summary = _summarise(config, runs)
    if jax.process_index() == 0:
        arrays = {f"{name}/{key}": np.stack([np.asarray(r[key]) for r in seeds]) for name, seeds in runs.items()
                  for key in ("accuracy", "final_flops", "train_flops", "density", "widths")}
        arrays.update({f"{name}/seed{seed}/{key}": value for name, seeds in runs.items()
                       for seed, r in zip(config.seeds, seeds) for key, value in r.items() if key.startswith("epoch_")})
        write_results(workdir, summary, arrays)
        plot_supertickets(summary, runs, os.path.join(workdir, "supertickets.png"),
                          title=f"SuperTickets on {config.dataset} ({config.model} {'-'.join(map(str, config.widths))}), "
                                f"{plural(len(config.seeds), 'seed')}")
    return summary, workdir


def supertickets_table(summary: dict) -> str:
    """Per arm: test accuracy (%) mean ± std over seeds, final density of the kernels, the
    final widths, final forward FLOPs per example and total training FLOPs (and as a
    multiple of dense training).

    Examples:
      >>> arm = lambda a, f, t, v: {'accuracy': stats(a), 'density': stats([0.1, 0.1]), 'widths': [[4, 3], [4, 2]],
      ...                           'final_flops': stats([f, f]), 'train_flops': stats([t, t]), 'train_flops_vs_dense': v}
      >>> print(supertickets_table({'arms': {'dense': arm([.9, .92], 2e5, 4e9, 1.0), 'joint': arm([.88, .9], 1e4, 1e9, .25)}}))
      arm         accuracy (%)    density  widths (per seed)    final MFLOPs  training GFLOPs
      dense       91.00 ± 1.00      0.100  4-3 4-2                    0.200      4.0 (1.00x)
      joint       89.00 ± 1.00      0.100  4-3 4-2                    0.010      1.0 (0.25x)
    """
    lines = [f"{'arm':<10}  {'accuracy (%)':<14}  {'density':>7}  {'widths (per seed)':<19}  {'final MFLOPs':>12}  "
             "training GFLOPs"]
    for name, arm in summary["arms"].items():
        widths = " ".join("-".join(str(w) for w in seed) for seed in arm["widths"])
        ratio = "" if arm["train_flops_vs_dense"] is None else f" ({arm['train_flops_vs_dense']:.2f}x)"
        density = arm["density"]["mean"]
        lines.append(f"{name:<10}  {mean_std(arm['accuracy']['per_seed']):<14}  "
                     f"{'nan' if density is None else f'{density:.3f}':>7}  {widths:<19}  "
                     f"{arm['final_flops']['mean'] / 1e6:>12.3f}  {arm['train_flops']['mean'] / 1e9:8.1f}{ratio}")
    return "\n".join(lines)


def plot_supertickets(summary: dict, runs: dict, path: str, *, title: str = "") -> None:
    """Left: final test accuracy vs training FLOPs (± std), marker area ~ final FLOPs.
    Right: the first seed's total channels and kernel density over the epochs."""
    fig, (left, right) = figure(2, width=6.0, height=4.4)
    for name, arm in summary["arms"].items():
        left.errorbar([arm["train_flops"]["mean"] / 1e9], [100 * (arm["accuracy"]["mean"] or np.nan)],
                      xerr=[arm["train_flops"]["std"] / 1e9], yerr=[100 * (arm["accuracy"]["std"] or 0.0)],
                      marker="o", capsize=3, label=f"{name} ({arm['final_flops']['mean'] / 1e6:.3f} MFLOPs)")
    left.set_xlabel("total training FLOPs (G)")
    left.set_ylabel("final test accuracy (%)")
    left.legend(fontsize=8)
    twin = right.twinx()
    for name, seeds in runs.items():
        first = seeds[0]
        epochs = np.arange(1, len(first["epoch_density"]) + 1)
        line, = right.plot(epochs, np.asarray(first["epoch_widths"]).sum(-1), label=name)
        twin.plot(epochs, np.asarray(first["epoch_density"]), linestyle=":", color=line.get_color())
    right.set_xlabel("epoch (pipeline: all stages)")
    right.set_ylabel("channels (solid)")
    twin.set_ylabel("kernel density (dotted)")
    right.legend(fontsize=8)
    save(fig, path, title=title, note=spread_note(len(summary["config"]["seeds"])))
