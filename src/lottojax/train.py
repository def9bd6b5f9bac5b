"""Compiled training: a ``lax.scan`` over steps with the data resident on the device.

A :class:`Trainer` is a set of pure functions for one (model, optimizer, batch size):

- ``init(key, mask=None)`` → :class:`TrainState` (params, model state, optimizer state, step);
- ``run_steps(state, data, key, start, num_steps, until=None)`` trains global steps
  ``[start, start + num_steps)`` in one ``lax.scan``; with ``until`` (may be traced),
  steps at or past ``until`` leave the state unchanged, so runs of different lengths
  share one compiled program. Step ``s`` takes minibatch
  ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, whose order is
  ``jax.random.permutation(fold_in(key, epoch), n_train)``: the data order depends only
  on the key and the global step, so a run split into pieces (rewinding, resuming) sees
  exactly the batches of an unsplit one. The last ``n_train % batch_size`` examples of
  each epoch's order are dropped.
- ``evaluate(params, model_state, x, y)`` → :class:`Metrics` in fixed-size chunks;
- ``train(state, data, key, start, num_steps, on_evaluation=None)`` → ``(state, History)``:
  ``run_steps`` with an evaluation on the validation and test sets every ``eval_every``
  steps and at the end, as one compiled program. ``on_evaluation(step)``, a host
  function, is called at each evaluation through ``jax.debug.callback`` (once per run
  under ``jax.vmap``; progress bars use it); without it the program has no host call.

``start`` may be traced (it is the same for every seed, so under ``jax.vmap`` pass it
with ``in_axes=None``); ``num_steps`` is static. Everything vmaps over a leading seed
axis of ``state`` and ``key``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lottojax.masks import PyTree, apply_mask
from lottojax.models.core import Model
from lottojax.optim import set_mask
from lottojax.sparse_training import seed


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (``step``: steps applied so far)."""

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    step: jax.Array


class Metrics(NamedTuple):
    """Mean loss and accuracy over an evaluation set."""

    loss: jax.Array
    accuracy: jax.Array


class History(NamedTuple):
    """One row per evaluation (every ``eval_every`` steps and at the end of the call)."""

    step: jax.Array  # the global step (``start`` + steps trained in this call) of the row
    train_loss: jax.Array  # mean training loss over the steps since the previous row
    val_loss: jax.Array
    val_accuracy: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def early_stop(history: History) -> tuple[jax.Array, jax.Array]:
    """The LTH early-stopping criterion: (step of minimum validation loss, test accuracy there).

    Works on the last axis, so it applies to stacked histories of many runs.

    Examples:
      >>> h = History(*(jnp.array(v) for v in ([100, 200, 300], [1., .5, .4], [.9, .6, .7],
      ...                                        [.5, .7, .6], [.9, .6, .7], [.4, .8, .75])))
      >>> [int(x * 100) for x in early_stop(h)]
      [20000, 80]
    """
    best = jnp.argmin(history.val_loss, axis=-1)[..., None]
    take = lambda a: jnp.take_along_axis(a, best, axis=-1)[..., 0]
    return take(history.step), take(history.test_accuracy)


class Trainer(NamedTuple):
    """Pure training functions for one model, optimizer and batch size (see the module doc)."""

    init: Callable[..., TrainState]
    step: Callable[..., tuple[TrainState, jax.Array]]
    run_steps: Callable[..., tuple[TrainState, jax.Array]]
    evaluate: Callable[..., Metrics]
    train: Callable[..., tuple[TrainState, History]]
    apply: Callable[..., tuple[jax.Array, PyTree]]  # the model's ``(params, model_state, x, train)``


def minibatch_scan(step: Callable, state, data, key: jax.Array, start, num_steps: int, *, batch_size: int,
                   until=None):
    """``num_steps`` calls of ``step(state, x, y) -> (state, loss)`` on minibatches of the
    training split, as one ``lax.scan``, from global step ``start``: every epoch is a fresh
    permutation keyed by ``fold_in(key, epoch)``, so the order depends only on the global
    step. Steps at or past ``until`` (if given) leave the state as it is. Returns the final
    state and the losses. Every training loop of lottojax (the trainer's, the Jackpot
    search's) runs on it.
    """
    n_train = data.x_train.shape[0]
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_train} training examples")

    def epoch_order(global_step):
        return jax.random.permutation(jax.random.fold_in(key, global_step // steps_per_epoch), n_train)

    def body(carry, global_step):
        state, order = carry
        position = global_step % steps_per_epoch
        order = jax.lax.cond(
            (position == 0) | (global_step == start), epoch_order, lambda _: order, global_step
        )
        idx = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
        new_state, value = step(state, jnp.asarray(data.x_train)[idx], jnp.asarray(data.y_train)[idx])
        if until is not None:
            new_state = jax.tree.map(lambda n, o: jnp.where(global_step < until, n, o), new_state, state)
        return (new_state, order), value

    steps = start + jnp.arange(num_steps, dtype=jnp.int32)
    first_order = jnp.zeros(n_train, jnp.int32)  # filled at the first step
    (state, _), losses = jax.lax.scan(body, (state, first_order), steps)
    return state, losses


def scan_periods(period: Callable, state, start, num_steps: int, *, eval_every: int):
    """Steps ``[start, start + num_steps)`` in periods of ``eval_every`` (the last one may be
    shorter): ``period(state, period_start, length) -> (state, row)``, one ``lax.scan`` over
    the full periods. Returns the final state and the rows stacked (one per evaluation).
    """
    full, rest = divmod(num_steps, eval_every)
    starts = start + eval_every * jnp.arange(full, dtype=jnp.int32)
    state, history = jax.lax.scan(lambda s, p: period(s, p, eval_every), state, starts)
    if rest:
        state, last = period(state, start + full * eval_every, rest)
        history = jax.tree.map(lambda rows, row: jnp.concatenate([rows, row[None]]), history, last)
    return state, history


def make_trainer(
    model: Model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    eval_every: int,
    eval_batch_size: int = 1000,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> Trainer:
    """Builds the training functions.

    Args:
      model: a :class:`lottojax.models.Model`.
      optimizer: an optax transform; end it with :func:`lottojax.masked_updates` to train
        sparse networks (``init(key, mask)`` then sets the mask in its state), or wrap it
        in :func:`lottojax.sparse_training.sparse_training` (``init(key)`` seeds its mask
        draws with ``jax.random.fold_in(key, 1)``).
      batch_size: training minibatch size.
      eval_every: steps between evaluations in ``train``.
      eval_batch_size: chunk size for evaluation (bounds memory on large test sets).
      loss: per-example loss ``(logits, labels) -> (batch,)``.

    Examples:
      >>> import optax, lottojax as lj
      >>> from lottojax.models import create
      >>> from lottojax.data import Dataset
      >>> x = jax.random.normal(jax.random.key(0), (64, 40)); y = jnp.arange(64) % 10
      >>> data = Dataset(x, y, x[:16], y[:16], x[:16], y[:16])
      >>> trainer = make_trainer(create('mlp', input_shape=(40,)),
      ...                        optax.chain(optax.adam(1e-3), lj.masked_updates()),
      ...                        batch_size=16, eval_every=4)
      >>> state = trainer.init(jax.random.key(1))
      >>> state, history = jax.jit(trainer.train, static_argnames='num_steps')(
      ...     state, data, jax.random.key(2), start=0, num_steps=10)
      >>> history.step.tolist(), int(state.step)
      ([4, 8, 10], 10)
    """
    if batch_size < 1 or eval_every < 1 or eval_batch_size < 1:
        raise ValueError(
            f"batch_size ({batch_size}), eval_every ({eval_every}) and eval_batch_size "
            f"({eval_batch_size}) must be positive"
        )

    def init(key: jax.Array, mask: Optional[PyTree] = None) -> TrainState:
        params, model_state = model.init(key)
        if mask is not None:
            params = apply_mask(params, mask)
        opt_state = optimizer.init(params)
        opt_state = seed(opt_state, jax.random.fold_in(key, 1))  # no-op without sparse training
        if mask is not None:
            opt_state = set_mask(opt_state, mask)
        return TrainState(params, model_state, opt_state, jnp.zeros((), jnp.int32))

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
        def objective(params):
            logits, model_state = model.apply(params, state.model_state, x, True)
            return jnp.mean(loss(logits, y)), model_state

        (value, model_state), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, model_state, opt_state, state.step + 1), value

    def run_steps(state: TrainState, data, key: jax.Array, start, num_steps: int, until=None):
        return minibatch_scan(step, state, data, key, start, num_steps, batch_size=batch_size, until=until)

    def evaluate(params: PyTree, model_state: PyTree, x: jax.Array, y: jax.Array) -> Metrics:
        n = x.shape[0]
        chunk = min(eval_batch_size, n)
        pad = -n % chunk
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(-1, chunk, *x.shape[1:])
        ys = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]).reshape(-1, chunk)

        def one_chunk(batch):
            logits, _ = model.apply(params, model_state, batch[0], False)
            return loss(logits, batch[1]), jnp.argmax(logits, -1) == batch[1]

        losses, correct = jax.lax.map(one_chunk, (xs, ys))
        valid = jnp.arange(xs.shape[0] * chunk) < n
        return Metrics(
            jnp.sum(jnp.where(valid, losses.reshape(-1), 0.0)) / n,
            jnp.sum(valid & correct.reshape(-1)) / n,
        )

    def train(state: TrainState, data, key: jax.Array, start, num_steps: int, on_evaluation=None):
        def period(state, period_start, length):
            state, losses = run_steps(state, data, key, period_start, length)
            if on_evaluation is not None:  # a host call per evaluation (and per vmapped run)
                jax.debug.callback(on_evaluation, state.step)
            val = evaluate(state.params, state.model_state, data.x_val, data.y_val)
            test = evaluate(state.params, state.model_state, data.x_test, data.y_test)
            end = jnp.asarray(period_start + length, jnp.int32)
            row = History(end, jnp.mean(losses), val.loss, val.accuracy, test.loss, test.accuracy)
            return state, row

        return scan_periods(period, state, start, num_steps, eval_every=eval_every)

    return Trainer(init, step, run_steps, evaluate, train, model.apply)
