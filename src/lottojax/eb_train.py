"""Training epochs in one compiled loop, with Early-Bird detection in the carry.

:func:`make_epoch_loop` builds the functions of a ``lax.while_loop`` over epochs for many
seeds at once (a leading seed axis; the vmap over seeds is inside the loop body, so the
epoch counter stays a scalar and the per-epoch reshuffle stays a real ``lax.cond``). After
every epoch it can

- draw a mask per seed and pruning ratio (``mask_fn(params, ratio)``, e.g.
  :func:`lottojax.early_bird.channel_mask`) and push it into an Early-Bird detector per
  seed and ratio (:func:`lottojax.early_bird.early_bird_detector`); when a detector fires, the
  seed's whole :class:`lottojax.train.TrainState` is kept as that ratio's ticket;
- stop a seed once all its ratios have fired (``stop_at_eb``): its state is frozen with
  ``jnp.where`` and the loop ends when every seed has stopped, with no host round trip;
- evaluate on the validation and test sets and record the mask history.

The same loop trains the dense baseline (no stopping), runs the search, and retrains a
ticket (no detection), so all three count epochs and data order identically.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lottojax.early_bird import EarlyBirdState, early_bird_detector
from lottojax.masks import PyTree
from lottojax.seeds import AXIS, Devices, map_seeds, seed_mesh
from lottojax.train import History, Trainer, TrainState


class EpochLoopState(NamedTuple):
    """The carry of :func:`make_epoch_loop`'s loop (a pytree of arrays; checkpoint it whole).

    Attributes:
      epoch: int32 scalar, epochs trained so far by the seeds still running.
      train: the :class:`lottojax.train.TrainState` of every seed (leading seed axis).
      stopped: ``(seeds,)`` int32, the epoch at which a seed stopped; -1 while it runs.
      record: a :class:`lottojax.train.History` of ``(seeds, num_epochs)`` arrays, one row
        per epoch: the same record type as the step loop's ``Trainer.train`` (``step``: the
        global step at the end of the epoch; -1 and NaN where the epoch was not trained or
        not evaluated).
      detector: an :class:`lottojax.early_bird.EarlyBirdState` per seed and ratio
        (leading axes ``(seeds, ratios)``); ``None`` without detection. Its ``epoch`` is
        the number of epochs trained when the ticket was drawn.
      ticket: the ``TrainState`` of each seed when each ratio's ticket was drawn
        (``(seeds, ratios, ...)``; the initial state where none was drawn); ``None``
        without detection.
      masks: the mask after every epoch, ``(seeds, num_epochs, ratios, ...)`` (all-False
        where not trained); ``None`` unless ``record_masks``.
    """

    epoch: jax.Array
    train: TrainState
    stopped: jax.Array
    record: History
    detector: Optional[EarlyBirdState]
    ticket: Optional[TrainState]
    masks: Optional[PyTree]


class EpochLoop(NamedTuple):
    """Pure functions of the epoch loop (see :func:`make_epoch_loop`).

    Attributes:
      init: ``(train_states, epoch=0) -> EpochLoopState`` for seed-stacked train states that
        have trained ``epoch`` epochs.
      run: ``(state, data, keys, until) -> EpochLoopState``: trains epochs until ``until``
        (may be traced: one compile serves every chunk) or until every seed has stopped.
        ``keys`` are the per-seed data-order keys (leading seed axis).
      detect: ``(params, detectors, epoch) -> (detectors, masks)`` for one seed: the masks of
        every ratio pushed into that seed's detectors (``None`` without detection).
    """

    init: Callable[..., EpochLoopState]
    run: Callable[..., EpochLoopState]
    detect: Optional[Callable]


def _where(condition: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``condition`` (broadcast over the leading axes of each leaf), else ``old``."""

    def pick(a, b):
        c = condition.reshape(condition.shape + (1,) * (jnp.ndim(a) - condition.ndim))
        return jnp.where(c, a, b)

    return jax.tree.map(pick, new, old)


def make_epoch_loop(
    trainer: Trainer,
    *,
    batch_size: int,
    num_epochs: int,
    mask_fn: Optional[Callable[[PyTree, jax.Array], PyTree]] = None,
    ratios: Sequence[float] = (),
    window: int = 5,
    eps: float = 0.1,
    stop_at_eb: bool = False,
    evaluate: bool = True,
    record_masks: bool = False,
    seed_strategy: str = "auto",
    devices: Devices = None,
) -> EpochLoop:
    """Builds the compiled epoch loop with optional Early-Bird detection.

    Args:
      trainer: from :func:`lottojax.train.make_trainer`, built with the same ``batch_size``.
      batch_size: the trainer's minibatch size; an epoch is ``n_train // batch_size`` steps.
      num_epochs: the length of the schedule (the size of the per-epoch records).
      mask_fn: ``(params, ratio) -> mask`` drawn after every epoch (e.g.
        ``lambda p, r: channel_mask(p, r)``); ``None``: no detection.
      ratios: the pruning ratios tracked side by side (one detector per seed and ratio).
      window: the detector's FIFO length (see :func:`lottojax.early_bird.early_bird_detector`).
      eps: the detector's distance threshold.
      stop_at_eb: stop each seed once all its ratios have fired.
      evaluate: record validation and test metrics after every epoch.
      record_masks: keep every epoch's masks (for :func:`lottojax.early_bird.mask_distance_matrix`).
      seed_strategy: how each epoch runs the seeds: ``'auto'``, ``'vmap'`` or ``'map'`` (see
        :func:`lottojax.seeds.map_seeds`); the results do not depend on it beyond float rounding.
      devices: split the seeds across devices (``'all'``, a list, or a one-axis ``Mesh``; see
        :func:`lottojax.seeds.map_seeds`). Every device runs the loop over its own seeds and
        the devices stop together, so the results equal the unsharded run's. The number of
        seeds must be a multiple of the device count (:func:`lottojax.seeds.pad_seeds`).

    Returns:
      An :class:`EpochLoop`; jit ``run`` (``jax.jit(loop.run)``).

    Examples:
      >>> import optax, lottojax as lj
      >>> from lottojax.models import create
      >>> from lottojax.data import Dataset
      >>> from lottojax.early_bird import channel_mask
      >>> from lottojax.train import make_trainer
      >>> x = jax.random.normal(jax.random.key(0), (32, 12)); y = jnp.arange(32) % 3
      >>> data = Dataset(x, y, x[:8], y[:8], x[:8], y[:8])
      >>> trainer = make_trainer(create('cnn1d', input_shape=(12,), channels=(4,), num_classes=3),
      ...                        optax.sgd(0.1), batch_size=16, eval_every=2)
      >>> loop = make_epoch_loop(trainer, batch_size=16, num_epochs=6, mask_fn=channel_mask,
      ...                        ratios=(0.5,), window=2, eps=1.0, stop_at_eb=True, evaluate=False)
      >>> keys = jax.random.split(jax.random.key(1), 2)
      >>> state = jax.jit(lambda k: loop.init(jax.vmap(trainer.init)(k)))(keys)
      >>> state = jax.jit(loop.run)(state, data, keys, 6)  # eps=1: fires once the window is full
      >>> int(state.epoch), state.stopped.tolist(), state.detector.epoch.tolist()
      (2, [2, 2], [[2], [2]])
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1")
    ratios = tuple(float(r) for r in ratios)
    if mask_fn is None and (ratios or stop_at_eb or record_masks):
        raise ValueError("ratios, stop_at_eb and record_masks need a mask_fn to draw masks with")
    if mask_fn is not None and not ratios:
        raise ValueError("mask_fn needs at least one pruning ratio in ratios=")
    detector = early_bird_detector(window, eps) if mask_fn is not None else None
    ratio_array = np.asarray(ratios, np.float32)
    mesh = seed_mesh(devices)

    def masks_of(params):
        return jax.vmap(lambda r: mask_fn(params, r))(jnp.asarray(ratio_array))

    def detect(params, detectors, epoch):
        masks = masks_of(params)
        return jax.vmap(detector.update, (0, 0, None))(detectors, masks, epoch), masks

    def init_local(train_states: TrainState, epoch=0) -> EpochLoopState:
        seeds = jax.tree.leaves(train_states)[0].shape[0]
        nan = jnp.full((seeds, num_epochs), jnp.nan, jnp.float32)
        state = EpochLoopState(
            epoch=jnp.asarray(epoch, jnp.int32),
            train=train_states,
            stopped=jnp.full((seeds,), -1, jnp.int32),
            record=History(jnp.full((seeds, num_epochs), -1, jnp.int32), nan, nan, nan, nan, nan),
            detector=None,
            ticket=None,
            masks=None,
        )
        if detector is None:
            return state
        mask_shapes = jax.eval_shape(masks_of, jax.tree.map(lambda x: x[0], train_states.params))
        one = detector.init(jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), mask_shapes))
        detectors = jax.tree.map(lambda x: jnp.broadcast_to(x, (seeds, len(ratios), *x.shape)), one)
        tickets = jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], len(ratios), *x.shape[1:])), train_states)
        masks = None
        if record_masks:
            masks = jax.tree.map(lambda s: jnp.zeros((seeds, num_epochs, *s.shape), jnp.bool_), mask_shapes)
        return state._replace(detector=detectors, ticket=tickets, masks=masks)

    def run_local(state: EpochLoopState, data, keys: jax.Array, until) -> EpochLoopState:
        steps_per_epoch = data.x_train.shape[0] // batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {data.x_train.shape[0]} training examples")
        last = jnp.minimum(jnp.asarray(until, jnp.int32), num_epochs)

        def one_epoch(train, key, start):
            train, losses = trainer.run_steps(train, data, key, start, steps_per_epoch)
            end = jnp.asarray(start + steps_per_epoch, jnp.int32)
            if not evaluate:
                nan = jnp.full((), jnp.nan, jnp.float32)
                return train, History(end, jnp.mean(losses), nan, nan, nan, nan)
            val = trainer.evaluate(train.params, train.model_state, data.x_val, data.y_val)
            test = trainer.evaluate(train.params, train.model_state, data.x_test, data.y_test)
            return train, History(end, jnp.mean(losses), val.loss, val.accuracy, test.loss, test.accuracy)

        epoch_over_seeds = map_seeds(one_epoch, in_axes=(0, 0, None), strategy=seed_strategy)
        detect_over_seeds = map_seeds(detect, in_axes=(0, 0, None), strategy=seed_strategy)

        def body(state: EpochLoopState) -> EpochLoopState:
            epoch = state.epoch
            running = state.stopped < 0
            train, row = epoch_over_seeds(state.train, keys, epoch * steps_per_epoch)
            record = jax.tree.map(
                lambda rows, r: rows.at[:, epoch].set(jnp.where(running, r, rows[:, epoch])), state.record, row
            )
            new = state._replace(epoch=epoch + 1, train=_where(running, train, state.train), record=record)
            if detector is None:
                return new
            detectors, masks = detect_over_seeds(train.params, state.detector, epoch + 1)
            fired_now = running[:, None] & (detectors.epoch == epoch + 1)
            tickets = _where(fired_now, jax.tree.map(lambda x: x[:, None], train), state.ticket)
            stopped = state.stopped
            if stop_at_eb:
                stopped = jnp.where(running & jnp.all(detectors.epoch >= 0, axis=1), epoch + 1, stopped)
            new = new._replace(detector=_where(running, detectors, state.detector), ticket=tickets, stopped=stopped)
            if state.masks is not None:
                recorded = jax.tree.map(
                    lambda rows, m: rows.at[:, epoch].set(_where(running, m, rows[:, epoch])), state.masks, masks
                )
                new = new._replace(masks=recorded)
            return new

        def keep_going(state: EpochLoopState) -> jax.Array:
            any_running = jnp.any(state.stopped < 0)
            if mesh is not None:  # every device loops until the last seed of any device stops
                any_running = jax.lax.psum(any_running.astype(jnp.int32), AXIS) > 0
            return (state.epoch < last) & any_running

        return jax.lax.while_loop(keep_going, body, state)

    if mesh is None:
        return EpochLoop(init_local, run_local, detect if detector is not None else None)
    # Sharded: every function sees its device's seeds; the epoch counter is shared.
    seeded, shared = PartitionSpec(AXIS), PartitionSpec()
    with_detector = seeded if detector is not None else None
    specs = EpochLoopState(epoch=shared, train=seeded, stopped=seeded, record=seeded, detector=with_detector,
                           ticket=with_detector, masks=seeded if record_masks else None)
    shard = lambda fn, in_specs: jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=specs, check_vma=False)

    def init(train_states: TrainState, epoch=0) -> EpochLoopState:
        return shard(init_local, (seeded, shared))(train_states, jnp.asarray(epoch, jnp.int32))

    def run(state: EpochLoopState, data, keys: jax.Array, until) -> EpochLoopState:
        return shard(run_local, (specs, shared, seeded, shared))(state, data, keys, until)

    return EpochLoop(init, run, detect if detector is not None else None)


def compiled_step(trainer: Trainer, state: TrainState, data, batch_size: int) -> tuple[float, Callable[[], Any]]:
    """One training step of one network, compiled ahead of time.

    Returns:
      ``(flops, run)``: the step's FLOPs from XLA's cost analysis, and a zero-argument
      function that runs the compiled step on the first minibatch (for timing, e.g. with
      :func:`lottojax.timing.interleaved`).

    Examples:
      >>> import optax
      >>> from lottojax.models import create
      >>> from lottojax.data import Dataset
      >>> from lottojax.train import make_trainer
      >>> x = jnp.zeros((8, 40)); y = jnp.zeros(8, jnp.int32)
      >>> trainer = make_trainer(create('mlp', input_shape=(40,), hidden=(16,)), optax.sgd(0.1),
      ...                        batch_size=8, eval_every=1)
      >>> flops, run = compiled_step(trainer, trainer.init(jax.random.key(0)), Dataset(x, y, x, y, x, y), 8)
      >>> flops > 2 * 2 * 8 * (40 * 16 + 16 * 10)  # forward and weight gradients, at least
      True
    """
    batch = (data.x_train[:batch_size], data.y_train[:batch_size])
    compiled = jax.jit(trainer.step).lower(state, *batch).compile()
    return float(_cost(compiled)["flops"]), lambda: compiled(state, *batch)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis gave no FLOP count on this backend")
    return cost


def detection_flops(loop: EpochLoop, state: EpochLoopState) -> float:
    """FLOPs of one epoch's detection for one seed (every ratio's mask and detector update)."""
    if loop.detect is None:
        raise ValueError("this epoch loop has no detection (make_epoch_loop without mask_fn)")
    one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)  # shapes only
    args = (one(state.train.params), one(state.detector), jax.ShapeDtypeStruct((), jnp.int32))
    return float(_cost(jax.jit(loop.detect).lower(*args).compile())["flops"])
