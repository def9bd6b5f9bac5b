"""The Early-Bird experiment (You et al., ICLR 2020) from one config.

:func:`run_early_bird` is what ``python experiments/early_bird.py`` runs; a notebook can call
it the same way. For all seeds at once (one compiled program: the seeds by ``seed_strategy``,
split across ``devices``) it

1. trains the dense baseline for the whole schedule (SGD with momentum, weight decay, the
   network-slimming penalty and a piecewise-constant learning rate), recording every epoch's
   masks for each pruning ratio: the epoch x epoch mask-distance heatmap;
2. runs the Early-Bird search: the same training, with a detector per seed and ratio in the
   compiled loop; each seed stops once all its ratios have drawn their ticket (optionally
   with 8-bit weights, activations and gradients, ``search_bits=8``);
3. for every ratio and seed, cuts the ticket down to a physically smaller network
   (channel masks) or masks it (weight masks), and retrains it in full precision, either
   continuing from the Early-Bird weights and optimizer state to the end of the schedule
   (``'continue'``) or from a fresh initialisation for the whole schedule (``'reinit'``);
4. counts training FLOPs (XLA's cost analysis of the compiled steps) and wall time of the
   Early-Bird pipeline against dense training.

It writes into ``<root>/early_bird-<config hash>/``: ``config.json``, ``results.json``
(per ratio: EB epochs per seed, retrained accuracy mean/std/n/per seed, FLOPs and time
savings; the dense baseline), ``results.npz`` (every per-epoch array), ``heatmap.png``
and ``checkpoint/`` (``dense/`` and ``search/``: a :class:`~lottojax.checkpoint.Checkpointer`
each, saved after every chunk of ``epochs_per_call`` epochs; ``retrain.json`` after every
ticket: a killed run resumes from the last chunk of epochs or retraining).

Divergence: a run whose training (or validation) loss became NaN or inf in an epoch it
trained is NaN in the accuracies, left out of every mean and counted (the table says
``(k diverged)``, ``results.json`` lists it); the tickets of a seed whose search diverged
are flagged with it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.checkpoint import Checkpointer, read_json, write_json
from lottojax.early_bird import channel_mask, mask_distance_matrix, slimming_penalty, weight_mask
from lottojax.eb_train import EpochLoop, EpochLoopState, compiled_step, detection_flops, make_epoch_loop
from lottojax.experiments.base import (
    ConfigError,
    ExperimentConfig,
    build,
    learning_rate_schedule,
    load_dataset,
    make_optimizer,
    model_kwargs,
    option,
    override,
    stream_keys,
)
from lottojax.experiments.metrics import log_history
from lottojax.experiments.plots import colorbar, figure, plural, save
from lottojax.experiments.store import (diverged_runs, exclusive, load_or_run, mean_std, open_run, stats,
                                        write_results)
from lottojax.masks import apply_mask, ones_like
from lottojax.optim import set_mask
from lottojax.prune import prune_global, prune_layerwise
from lottojax.scores import magnitude
from lottojax.seeds import gather, put_seeded
from lottojax.timing import interleaved
from lottojax.train import History, TrainState, make_trainer

MASKS = ("channel", "weight")
RETRAIN_MODES = ("continue", "reinit")


@dataclasses.dataclass(frozen=True)
class EarlyBirdConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D reproduction.

    The paper's CIFAR recipe (SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr x0.1 at 50%
    and 75% of the epochs, slimming penalty 1e-4, ratios 0.3/0.5/0.7, window 5, eps 0.1)
    on the 1D-CNN with BatchNorm (3 x 32 channels) for 30 epochs of batch 128.
    ``--dataset tfds:cifar10 --model vgg16 --epochs 160 --batch-size 64`` is the paper's
    CIFAR-10 setting (without its data augmentation, which lottojax's trainer lacks).
    Training counts epochs (``epochs``); ``num_steps`` and ``eval_every`` are unused.
    """

    model: str = override(ExperimentConfig, "model", "cnn1d")
    optimizer: str = override(ExperimentConfig, "optimizer", "momentum")
    learning_rate: float = override(ExperimentConfig, "learning_rate", 0.1)
    lr_drops: tuple[float, ...] = override(ExperimentConfig, "lr_drops", (0.5, 0.75))
    weight_decay: float = override(ExperimentConfig, "weight_decay", 1e-4)
    batch_size: int = override(ExperimentConfig, "batch_size", 128)
    num_steps: int = option(3000, "unused: Early-Bird counts --epochs")
    eval_every: int = option(100, "unused: Early-Bird evaluates once per epoch")
    epochs: int = option(30, "training epochs of the dense run, the search and each retraining")
    penalty: float = option(1e-4, "network-slimming penalty on the BatchNorm scales during the dense run and the "
                                  "search (retraining uses none)")
    mask: str = option("channel", "ticket mask: channel (BatchNorm scales; the net is physically shrunk) or "
                                  "weight (per-weight magnitude; masked)", choices=MASKS)
    weight_scope: str = option("global", "with --mask weight: one global threshold or one per layer",
                               choices=("global", "layerwise"))
    ratios: tuple[float, ...] = option((0.3, 0.5, 0.7), "pruning ratios, each with its own detector and ticket")
    window: int = option(5, "epochs of mask distances the detector looks back over")
    eps: float = option(0.1, "a ticket is drawn once every mask distance in the window is below this")
    search_bits: int = option(0, "bits of weights, activations and gradients in the search: 0 (full precision) "
                                 "or 2..16 (the paper: 8)")
    retrain: tuple[str, ...] = option(RETRAIN_MODES, "retraining modes: continue from the Early-Bird weights and "
                                                     "optimizer, or reinit for the whole schedule",
                                      choices=RETRAIN_MODES)
    epochs_per_call: int = option(10, "epochs per compiled call (a checkpoint after each)")

    def check(self) -> None:
        """:meth:`ExperimentConfig.check`, then the Early-Bird fields.

        Examples:
          >>> EarlyBirdConfig(search_bits=1).check()
          Traceback (most recent call last):
          ...
          lottojax.experiments.base.ConfigError: search_bits: 1 must be 0 (full precision) or 2..16
        """
        super().check()
        for name in ("epochs", "epochs_per_call", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not self.ratios or not all(0 < r < 1 for r in self.ratios):
            raise ConfigError("ratios", f"{self.ratios} must be fractions in (0, 1)")
        if self.search_bits not in (0, *range(2, 17)):
            raise ConfigError("search_bits", f"{self.search_bits} must be 0 (full precision) or 2..16")
        if self.penalty < 0:
            raise ConfigError("penalty", f"{self.penalty} must be >= 0")


def lr_schedule(config: EarlyBirdConfig, steps_per_epoch: int):
    """The paper's piecewise-constant schedule: ``learning_rate``, times ``lr_factor`` at each
    fraction ``lr_drops`` of the epochs (epochs 80 and 120 of 160 in the paper);
    :func:`~lottojax.experiments.base.learning_rate_schedule` over whole epochs.

    Examples:
      >>> schedule = lr_schedule(EarlyBirdConfig(epochs=8, learning_rate=1.0), steps_per_epoch=10)
      >>> [round(float(schedule(s)), 4) for s in (0, 39, 40, 59, 60)]
      [1.0, 1.0, 0.1, 0.1, 0.01]
    """
    return learning_rate_schedule(config, config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)


def make_eb_optimizer(config: EarlyBirdConfig, steps_per_epoch: int, penalty: float) -> optax.GradientTransformation:
    """The slimming penalty, then the config's optimizer (SGD with momentum and L2 weight
    decay by default) on :func:`lr_schedule`, ending in :func:`lottojax.masked_updates`
    (whatever ``penalty``, the state has the same structure, so a retraining optimizer
    without the penalty takes over the search's momentum)."""
    inner = make_optimizer(config.optimizer, lr_schedule(config, steps_per_epoch), momentum=config.momentum,
                           weight_decay=config.weight_decay)
    return optax.chain(slimming_penalty(penalty), inner)


def _mask_fn(config: EarlyBirdConfig, params):
    if config.mask == "channel":
        from lottojax.slimming import channel_select

        select = channel_select(config.model, params)
        return lambda p, r: channel_mask(p, r, select=select)
    return lambda p, r: weight_mask(p, r, scope=config.weight_scope)


def epochs_diverged(record: History, *, evaluated: bool = True) -> np.ndarray:
    """Per run (leading axes): did the training loss of an epoch it trained (``step >= 0``),
    or its validation loss when ``evaluated``, become NaN or inf?

    Examples:
      >>> nan = float('nan')
      >>> record = History(np.array([[10, 20, -1], [10, 20, 30]]), np.array([[.5, .4, nan], [.5, nan, .3]]),
      ...                  *[np.zeros((2, 3))] * 4)
      >>> epochs_diverged(record)
      array([False,  True])
    """
    trained = np.asarray(record.step) >= 0
    losses = (record.train_loss, record.val_loss) if evaluated else (record.train_loss,)
    return diverged_runs(*(np.where(trained, np.asarray(loss, np.float64), 0.0) for loss in losses))


def _take(tree, *index):
    return jax.tree.map(lambda x: x[index], tree)


class _Phase:
    """A chunked run of an epoch loop, saved to ``checkpointer`` after every chunk (a killed
    run resumes after the last saved chunk).

    ``make_initial()`` builds the starting state; a resumed run restores into its shapes and
    shardings. ``on_chunk(state)`` runs after each saved chunk (metrics logging).
    """

    def __init__(self, checkpointer: Checkpointer, loop: EpochLoop, make_initial: Callable[[], EpochLoopState],
                 on_chunk: Callable[[EpochLoopState], None] = lambda state: None):
        self.loop = loop
        self.on_chunk = on_chunk
        self.checkpointer = checkpointer
        self.carry = checkpointer.restore({"state": make_initial(), "seconds": np.float64(0.0)})[1]

    def finished(self, num_epochs: int) -> bool:
        state = self.carry["state"]
        return int(state.epoch) >= num_epochs or bool(np.all(np.asarray(state.stopped) >= 0))

    def run(self, data, keys, *, num_epochs: int, chunk: int, seeds: int) -> tuple[EpochLoopState, float]:
        """Trains to ``num_epochs`` in chunks; returns the first ``seeds`` seeds' final state
        (host arrays) and the wall time."""
        if not self.finished(num_epochs):
            state = self.carry["state"]
            compiled = jax.jit(self.loop.run).lower(state, data, keys, jnp.int32(0)).compile()
            while not self.finished(num_epochs):
                until = jnp.int32(min(int(state.epoch) + chunk, num_epochs))
                start = time.perf_counter()
                state = jax.block_until_ready(compiled(state, data, keys, until))
                self.carry = {"state": state, "seconds": np.float64(self.carry["seconds"] + time.perf_counter() - start)}
                self.checkpointer.save(int(state.epoch), self.carry)
                self.on_chunk(state)
        state = gather(self.carry["state"])
        own = lambda tree: jax.tree.map(lambda x: x[:seeds], tree)  # drops the padding seeds
        state = state._replace(**{name: own(v) for name, v in state._asdict().items() if name != "epoch"})
        return state, float(self.carry["seconds"])


@exclusive("early_bird")
def run_early_bird(config: EarlyBirdConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and the
    run directory.

    Examples:
      >>> import tempfile
      >>> config = EarlyBirdConfig(seeds=(0,), epochs=3, ratios=(0.5,), window=2)
      >>> summary, workdir = run_early_bird(config, tempfile.mkdtemp(), progress=False)  # doctest: +SKIP
    """
    from lottojax.quantize import low_precision

    config.check()
    say = print if progress else (lambda *a, **k: None)
    with open_run(root, "early_bird", config) as workdir:
        checkpoints = os.path.join(workdir, "checkpoint")
        phase = lambda name, loop, initial, **kw: _Phase(
            Checkpointer(os.path.join(checkpoints, name), dataclasses.asdict(config)), loop, initial, **kw)
        data = load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation)
        setup = build(config, data=put_seeded(data, config.devices, stacked=False))  # the trainers are below
        data, model, steps_per_epoch = setup.data, setup.model, setup.steps_per_epoch
        trainer_for = lambda m, penalty: make_trainer(
            m, make_eb_optimizer(config, steps_per_epoch, penalty), batch_size=config.batch_size,
            eval_every=steps_per_epoch)
        trainer = trainer_for(model, config.penalty)
        search_model = low_precision(model, bits=config.search_bits) if config.search_bits else model
        search_trainer = trainer_for(search_model, config.penalty)

        n = len(config.seeds)
        init_keys, data_keys, reinit_keys = stream_keys(config, "init", "data", "control")
        one_params = jax.eval_shape(model.init, init_keys[0])[0]
        mask_fn = _mask_fn(config, one_params)
        detection = dict(mask_fn=mask_fn, ratios=config.ratios, window=config.window, eps=config.eps)
        loop_args = dict(batch_size=config.batch_size, num_epochs=config.epochs,
                         seed_strategy=config.seed_strategy, devices=config.devices)

        # 1. The dense baseline, with the masks of every epoch (heatmap) and its own detections.
        dense_loop = make_epoch_loop(trainer, **loop_args, **detection, record_masks=True, evaluate=True)
        init_states = functools.cache(lambda: jax.jit(jax.vmap(trainer.init))(init_keys))  # shared by both phases
        initial = lambda: jax.jit(dense_loop.init)(init_states())
        say(f"[1/3] dense baseline: {plural(n, 'seed')} x {config.epochs} epochs")
        log_dense = lambda state: log_history(workdir, "dense", _take(gather(state.record), slice(0, n)),
                                              {"seed": config.seeds}) if jax.process_index() == 0 else None
        dense, dense_seconds = phase("dense", dense_loop, initial, on_chunk=log_dense).run(
            data, data_keys, num_epochs=config.epochs, chunk=config.epochs_per_call, seeds=n)

        # 2. The Early-Bird search: stops each seed when all its ratios have fired.
        search_loop = make_epoch_loop(search_trainer, **loop_args, **detection, stop_at_eb=True, evaluate=False)
        if config.search_bits:
            initial = lambda: jax.jit(lambda k: search_loop.init(jax.vmap(search_trainer.init)(k)))(init_keys)
        else:
            initial = lambda: jax.jit(search_loop.init)(init_states())
        say(f"[2/3] Early-Bird search{f' ({config.search_bits}-bit)' if config.search_bits else ''}")
        search, search_seconds = phase("search", search_loop, initial).run(
            data, data_keys, num_epochs=config.epochs, chunk=config.epochs_per_call, seeds=n)

        # 3. Retrain every ticket; time its training step side by side with the dense one.
        dense_step = functools.cache(
            lambda: compiled_step(trainer, _take(jax.device_get(dense.train), 0), data, config.batch_size))
        retrain_path = os.path.join(checkpoints, "retrain.json")
        retrained = read_json(retrain_path) if os.path.exists(retrain_path) else {}
        eb_epochs = np.asarray(search.detector.epoch)  # (seeds, ratios)
        tickets = jax.device_get(search.ticket)
        say(f"[3/3] retraining {int((eb_epochs >= 0).sum())} tickets x {len(config.retrain)} modes")
        for r, ratio in enumerate(config.ratios):
            for s, seed in enumerate(config.seeds):
                key = f"{ratio}/{seed}"
                if eb_epochs[s, r] < 0 or all(f"{key}/{m}" in retrained for m in config.retrain):
                    continue
                ticket = _take(tickets, s, r)
                if config.search_bits:  # the ticket is retrained in full precision
                    ticket = ticket._replace(model_state=ticket.model_state.model_state)
                log = lambda mode, record: log_history(workdir, f"retrain-{ratio}-seed{seed}-{mode}", record, {})
                runs = _retrain_ticket(config, ticket, int(eb_epochs[s, r]), ratio, data, data_keys[s],
                                       reinit_keys[s], model, steps_per_epoch, mask_fn, dense_step()[1], log)
                retrained.update({f"{key}/{mode}": run for mode, run in runs.items()})
                write_json(retrain_path, retrained)
                outcome = ", ".join(f"{m} {100 * v['test_accuracy']:.2f}%" for m, v in runs.items() if "test_accuracy" in v)
                say(f"  ratio {ratio} seed {seed}: EB epoch {int(eb_epochs[s, r])}, " + (outcome or "collapsed"))

        costs, _ = load_or_run(os.path.join(checkpoints, "costs.json"), lambda: dict(
            step_flops=dense_step()[0], detection_flops=detection_flops(search_loop, search)), save=write_json,
            load=read_json)
    summary = _summarise(config, dense, search, retrained, steps_per_epoch, costs, dense_seconds, search_seconds)
    if jax.process_index() == 0:
        _write(config, summary, dense, search, workdir)
    return summary, workdir


def _write(config: EarlyBirdConfig, summary: dict, dense: EpochLoopState, search: EpochLoopState, workdir: str) -> None:
    distances = _distance_matrices(dense)
    write_results(workdir, summary, dict(
        ratios=np.array(config.ratios), eb_epoch=np.asarray(search.detector.epoch),
        dense_eb_epoch=np.asarray(dense.detector.epoch), search_stopped=np.asarray(search.stopped),
        distance_matrix=distances, **{f"dense_{k}": np.asarray(v) for k, v in dense.record._asdict().items()},
    ))
    plot_heatmap(distances[0], config.ratios, np.asarray(dense.detector.epoch)[0], os.path.join(workdir, "heatmap.png"),
                 title=f"mask distances between epochs, {config.model} on {config.dataset} (seed {config.seeds[0]})")


def _retrain_ticket(config, ticket: TrainState, eb_epoch: int, ratio: float, data, data_key, reinit_key,
                    model, steps_per_epoch: int, mask_fn, dense_step, log: Callable[[str, object], None]) -> dict[str, dict]:
    """Retrains one ticket in each mode; returns per mode the accuracy, and the FLOPs and time
    of one training step of the ticket and (measured alongside) of the dense network;
    ``log(mode, record)`` gets each mode's per-epoch record."""
    from lottojax.models import create
    from lottojax.slimming import channel_plan, shrink_train_state

    mask = jax.device_get(jax.jit(mask_fn)(ticket.params, ratio))
    kept = sum(int(np.sum(m)) for m in mask.values()) / sum(m.size for m in mask.values())
    collapsed = [path for path, m in mask.items() if not np.any(m)]
    if collapsed and config.mask == "channel":  # a layer without channels: the net computes a constant
        return {mode: dict(eb_epoch=eb_epoch, kept_fraction=kept, collapsed=collapsed) for mode in config.retrain}
    optimizer = make_eb_optimizer(config, steps_per_epoch, 0.0)
    widths: dict[str, list] = {}
    if config.mask == "channel":
        plan = channel_plan(config.model, mask, ticket.params)
        model = create(config.model, input_shape=data.input_shape, num_classes=data.num_classes,
                       **{**model_kwargs(config), **plan.model_kwargs})
        trainer = make_trainer(model, optimizer, batch_size=config.batch_size, eval_every=steps_per_epoch)
        starts = {"continue": jax.jit(functools.partial(shrink_train_state, plan))(ticket), "reinit": jax.jit(trainer.init)(reinit_key)}
        widths = {k: list(v) for k, v in plan.model_kwargs.items()}
    else:
        trainer = make_trainer(model, optimizer, batch_size=config.batch_size, eval_every=steps_per_epoch)
        prune = prune_global if config.weight_scope == "global" else prune_layerwise
        full = jax.jit(lambda p: prune(magnitude(p), ones_like(p), ratio))(ticket.params)
        starts = {
            "continue": jax.jit(lambda t: t._replace(params=apply_mask(t.params, full), opt_state=set_mask(t.opt_state, full)))(ticket),
            "reinit": jax.jit(trainer.init)(reinit_key, full),
        }
    loop = make_epoch_loop(trainer, batch_size=config.batch_size, num_epochs=config.epochs, evaluate=True)
    flops, ticket_step = compiled_step(trainer, starts["continue"], data, config.batch_size)
    times = interleaved({"dense": dense_step, "ticket": ticket_step}, repeats=7)
    dense_seconds, ticket_seconds = times["dense"].median, times["ticket"].median
    first = {"continue": eb_epoch, "reinit": 0}
    start_loop = jax.jit(lambda state, epoch: loop.init(jax.tree.map(lambda x: x[None], state), epoch))
    compiled, runs = None, {}
    for mode in config.retrain:
        state = start_loop(starts[mode], first[mode])
        if compiled is None:  # both modes share the program: the epoch is traced
            compiled = jax.jit(loop.run).lower(state, data, data_key[None], jnp.int32(0)).compile()
        begin = time.perf_counter()
        state = jax.block_until_ready(compiled(state, data, data_key[None], jnp.int32(config.epochs)))
        seconds = time.perf_counter() - begin
        record = jax.tree.map(lambda x: np.asarray(x[0]), state.record)
        log(mode, record)
        final = lambda values: float("nan") if epochs_diverged(record) else float(values[-1])  # flagged: NaN
        runs[mode] = dict(
            eb_epoch=eb_epoch, first_epoch=first[mode], epochs=config.epochs - first[mode], seconds=seconds,
            step_flops=flops, step_seconds=ticket_seconds, dense_step_seconds=dense_seconds,
            kept_fraction=kept, widths=widths, collapsed=[],
            test_accuracy=final(record.test_accuracy), val_accuracy=final(record.val_accuracy),
            test_accuracy_curve=record.test_accuracy.tolist(),
        )
    return runs


def _distance_matrices(dense: EpochLoopState) -> np.ndarray:
    """``(seeds, ratios, epochs, epochs)`` mask distances of the dense run."""
    per_ratio = lambda masks: mask_distance_matrix(masks)  # masks: (epochs, ...)
    matrices = jax.jit(jax.vmap(jax.vmap(per_ratio, in_axes=1)))(dense.masks)
    return np.asarray(matrices)


def _summarise(config, dense, search, retrained, steps_per_epoch, costs, dense_seconds, search_seconds) -> dict:
    """Per ratio and retraining mode: accuracy, and training FLOPs and compute time of the
    Early-Bird pipeline (the search's dense epochs with detection, then the retraining) against
    the dense schedule. Compute time is steps times the one-seed step time, the ticket's and the
    dense network's step timed side by side; the phases' wall times are reported as measured.
    Divergence (:func:`epochs_diverged`) is flagged, never averaged in: a seed whose dense run
    diverged is NaN in the dense accuracy; a retrained ticket that diverged, or any ticket of
    a seed whose search diverged, is NaN in its mode's accuracy (its costs still count)."""
    T = config.epochs
    dense_acc = stats(np.asarray(dense.record.test_accuracy)[:, -1], diverged=epochs_diverged(dense.record))
    search_diverged = epochs_diverged(search.record, evaluated=False)  # its tickets are flagged too
    dense_flops = T * steps_per_epoch * costs["step_flops"]
    summary = {
        "config": dataclasses.asdict(config),
        "steps_per_epoch": steps_per_epoch,
        "dense": {
            "test_accuracy": dense_acc,
            "train_flops": dense_flops,
            "step_flops": costs["step_flops"],
            "wall_seconds_all_seeds": dense_seconds,
        },
        "search": {
            "wall_seconds_all_seeds": search_seconds,
            "epochs_run": int(search.epoch),
            "stopped": np.asarray(search.stopped).tolist(),
            "detection_flops_per_epoch": costs["detection_flops"],
        },
        "ratios": {},
    }
    eb = np.asarray(search.detector.epoch)
    dense_eb = np.asarray(dense.detector.epoch)
    for r, ratio in enumerate(config.ratios):
        found = eb[:, r] >= 0
        row = {
            "eb_epoch": eb[:, r].tolist(),
            "eb_epoch_dense_run": dense_eb[:, r].tolist(),
            "eb_fraction_of_training": stats(eb[found, r] / T, diverged=search_diverged[found]),
            "found": int(found.sum()),
            "modes": {},
        }
        for mode in config.retrain:
            drawn = [dict(retrained[f"{ratio}/{s}/{mode}"], search_diverged=bool(search_diverged[i]))
                     for i, s in enumerate(config.seeds) if f"{ratio}/{s}/{mode}" in retrained]
            runs = [run for run in drawn if not run.get("collapsed")]
            if not runs:
                row["modes"][mode] = {"collapsed": len(drawn)}
                continue
            search_flops = [run["eb_epoch"] * (steps_per_epoch * costs["step_flops"] + costs["detection_flops"]) for run in runs]
            flops = [f + run["epochs"] * steps_per_epoch * run["step_flops"] for f, run in zip(search_flops, runs)]
            seconds = [(run["eb_epoch"] * run["dense_step_seconds"] + run["epochs"] * run["step_seconds"]) * steps_per_epoch
                       for run in runs]
            dense_time = [T * steps_per_epoch * run["dense_step_seconds"] for run in runs]
            acc = stats([run["test_accuracy"] for run in runs], diverged=[run["search_diverged"] for run in runs])
            row["modes"][mode] = {
                "collapsed": len(drawn) - len(runs),
                "test_accuracy": acc,
                "accuracy_minus_dense": (None if None in (acc["mean"], dense_acc["mean"])
                                         else acc["mean"] - dense_acc["mean"]),
                "kept_fraction": stats([run["kept_fraction"] for run in runs]),
                "train_flops": stats(flops),
                "flops_saving": float(dense_flops / np.mean(flops)),
                "train_seconds": stats(seconds),
                "time_saving": float(np.mean(dense_time) / np.mean(seconds)),
                "step_time_ratio": stats([run["step_seconds"] / run["dense_step_seconds"] for run in runs]),
                "retrain_wall_seconds": stats([run["seconds"] for run in runs]),
                "widths": [run["widths"] for run in runs],
            }
        summary["ratios"][str(ratio)] = row
    return summary


def eb_table(summary: dict) -> str:
    """Per ratio: EB epochs (per seed), then per retraining mode the test accuracy
    (mean ± std over the seeds whose ticket could be retrained) and the FLOPs and wall-time
    savings against dense training; tickets that pruned a whole layer are counted as collapsed.

    Examples:
      >>> s = {'config': {'epochs': 30}, 'dense': {'test_accuracy': stats([.89, .91])},
      ...      'ratios': {'0.3': {'eb_epoch': [6, 7], 'found': 2, 'modes': {'continue': {'collapsed': 0,
      ...          'test_accuracy': stats([.903, .907]), 'flops_saving': 1.5, 'time_saving': 1.2}}},
      ...                 '0.7': {'eb_epoch': [5, -1], 'found': 1, 'modes': {'continue': {'collapsed': 1}}}}}
      >>> print(eb_table(s))
      dense: 90.00 ± 1.00 (30 epochs)
      ratio  EB epochs (found)  mode      accuracy       FLOPs saved  time saved
        0.3  6 7 (2/2)          continue  90.50 ± 0.20   1.50x        1.20x
        0.7  5 - (1/2)          continue  1 collapsed (a layer lost all its channels)
    """
    found = {}
    for ratio, row in summary["ratios"].items():
        epochs = " ".join(str(e) if e >= 0 else "-" for e in row["eb_epoch"])
        found[ratio] = f"{epochs} ({row['found']}/{len(row['eb_epoch'])})"
    width = max(len("EB epochs (found)"), *(len(f) for f in found.values()))
    lines = [f"dense: {mean_std(summary['dense']['test_accuracy']['per_seed'])} ({summary['config']['epochs']} epochs)",
             f"{'ratio':>5}  {'EB epochs (found)':<{width}}  {'mode':<8}  {'accuracy':<13}  {'FLOPs saved':<11}  time saved"]
    for ratio, row in summary["ratios"].items():
        epochs = found[ratio]
        if not row["modes"]:
            lines.append(f"{ratio:>5}  {epochs:<{width}}  no ticket drawn")
        for mode, m in row["modes"].items():
            if "test_accuracy" not in m:
                lines.append(f"{ratio:>5}  {epochs:<{width}}  {mode:<8}  {m['collapsed']} collapsed (a layer lost all its channels)")
            else:
                acc = mean_std(m["test_accuracy"]["per_seed"])
                note = f"  ({m['collapsed']} collapsed)" if m["collapsed"] else ""
                lines.append(f"{ratio:>5}  {epochs:<{width}}  {mode:<8}  {acc:<13}  {m['flops_saving']:.2f}x{'':<6}  "
                             f"{m['time_saving']:.2f}x{note}")
            ratio, epochs = "", ""
    return "\n".join(lines)


def plot_heatmap(matrices: np.ndarray, ratios, eb_epochs, path: str, *, title: str = "") -> None:
    """Saves the paper's figure: one epoch x epoch mask-distance heatmap per pruning ratio,
    with the Early-Bird epoch marked (``matrices``: ``(ratios, epochs, epochs)``; row ``i`` is
    the mask after epoch ``i + 1``)."""
    fig, axes = figure(len(ratios), width=4.2, height=3.8)
    epochs = matrices.shape[-1]
    for ax, matrix, ratio, eb in zip(axes, matrices, ratios, eb_epochs):
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(float(matrices.max()), 1e-6),
                          origin="upper", extent=(0.5, epochs + 0.5, epochs + 0.5, 0.5))
        if eb > 0:
            ax.axhline(eb, color="red", lw=0.8)
            ax.axvline(eb, color="red", lw=0.8)
        ax.set_title(f"p = {ratio}" + (f", EB at epoch {eb}" if eb > 0 else ", no EB"))
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        colorbar(fig, image, ax, "mask distance (normalised Hamming)")
    save(fig, path, title=title)
