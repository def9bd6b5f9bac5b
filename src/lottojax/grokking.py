"""Grokking measures (Minegishi et al., Grokking Tickets; PAPERS.md §6).

- :func:`train_curves`: full-batch (or any) training with the training- and test-set loss
  and accuracy measured at step 0 and every ``eval_every`` steps, all in one compiled
  ``lax.scan``; it can also keep the weights of the first evaluation at which a metric
  crosses a threshold (the *memorisation* and *transition* checkpoints).
- :func:`steps_to_threshold`: the first evaluated step at which a metric is at or above a
  threshold, or :data:`NEVER` (``-1``).
- :func:`precise_cross_entropy`: the cross-entropy, accurate in float32 as it nears 0 (the
  reference code computes it in float64 for that reason).
- :func:`params_norm` and :func:`scale_to_norm`: the norm of a set of weights, and dense
  weights rescaled to a given norm (the *equal-norm* control: θ0 scaled to the norm of a
  ticket θ0 ⊙ m). ``mode='global'`` is the L2 norm of all the weights together;
  ``mode='per_matrix'`` is the sum of the per-matrix (Frobenius) norms, the ratio the
  Grokking-Tickets reference code uses.

Norms run over every leaf of the pytree (the grokking nets are bias-free, so every leaf
is a weight matrix); pass a sub-tree to measure or scale only part of a network.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax  # noqa: F401  (the doctest of precise_cross_entropy compares with optax)

from lottojax.masks import PyTree

NEVER = -1
"""What :func:`steps_to_threshold` returns for a run that never reached the threshold."""

NORM_MODES = ("global", "per_matrix")


class Curves(NamedTuple):
    """One row per evaluation: at the starting step, then every ``eval_every`` steps.

    Metrics are measured in evaluation mode after the step, on the whole training split
    and the whole test split. Leading axes (seeds) may precede the row axis.
    """

    step: jax.Array
    train_loss: jax.Array
    train_accuracy: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array


class Captured(NamedTuple):
    """The weights of the first evaluation at which a capture condition held (``step``);
    when it never held, ``step`` is :data:`NEVER` and ``params`` are the final weights."""

    params: PyTree
    step: jax.Array


def _check_number(value, name: str, low: float, high: Optional[float] = None) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    try:
        number = float(np.asarray(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    if not (low <= number and (high is None or number <= high)) or np.isnan(number):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"{name}={value!r} must be {bounds}")


def steps_to_threshold(history, threshold, *, metric: str = "test_accuracy") -> jax.Array:
    """The first evaluated step at which ``metric`` is at or above ``threshold``, else
    :data:`NEVER` (``-1``).

    Works on the last (row) axis, so stacked histories of many seeds give one step per
    seed; jittable and vmappable. ``history`` is anything with a ``step`` field and the
    ``metric`` field: :class:`Curves` (whose first row is the starting step, so a run can
    reach the threshold "at step 0") or :class:`lottojax.train.History` (first row after
    ``eval_every`` steps; its ``val_accuracy`` is the training accuracy on
    :func:`lottojax.data.modular.modular_arithmetic` data with the default validation).

    Args:
      history: the evaluations.
      threshold: a number in ``[0, 1]`` (accuracies).
      metric: the field compared.

    Returns:
      An int32 array of the steps, shape of the leading axes.

    Examples:
      >>> c = Curves(jnp.array([0, 100, 200]), *(jnp.zeros(3),) * 3, jnp.array([.1, .96, .99]))
      >>> int(steps_to_threshold(c, 0.95)), int(steps_to_threshold(c, 0.999)), int(steps_to_threshold(c, 0.1))
      (100, -1, 0)
      >>> steps_to_threshold(c, 1.5)
      Traceback (most recent call last):
      ...
      ValueError: threshold=1.5 must be in [0, 1]
    """
    if not hasattr(history, metric) or not hasattr(history, "step"):
        fields = getattr(history, "_fields", None)
        raise ValueError(f"metric={metric!r}: history has no such field (fields: {fields})")
    _check_number(threshold, "threshold", 0.0, 1.0)
    values = jnp.asarray(getattr(history, metric))
    steps = jnp.broadcast_to(jnp.asarray(history.step), values.shape)
    reached = values >= threshold
    first = jnp.argmax(reached, axis=-1)[..., None]
    step = jnp.take_along_axis(steps, first, axis=-1)[..., 0]
    return jnp.where(jnp.any(reached, axis=-1), step, NEVER).astype(jnp.int32)


def precise_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy that stays accurate as it approaches 0.

    ``-log p_c = softplus(L)`` with ``L = logsumexp_{j != c}(z_j - z_c)``. The usual
    ``logsumexp(z) - z_c`` in float32 rounds to exactly 0 once ``p_c`` is within 1.2e-7 of
    1, and its gradient on the correct logit (``p_c - 1``) then vanishes while the others do
    not: training near zero loss, where grokking happens under weight decay, follows
    rounding noise ("softmax collapse"). This form keeps float32's *relative* precision
    down to the smallest floats, in value and gradient (``∂/∂z_c = -sigmoid(L)``), which is
    what the Grokking-Tickets reference gets by computing the loss in float64. A drop-in
    ``loss`` for :func:`lottojax.train.make_trainer`.

    Examples:
      >>> z = jnp.array([[30., 0., 0.], [0., 1., 2.]])
      >>> [f'{v:.5g}' for v in precise_cross_entropy(z, jnp.array([0, 2])).tolist()]  # 2 e^-30; log(1 + e^-1 + e^-2)
      ['1.8715e-13', '0.40761']
      >>> float(optax.softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 2]))[0])  # float32 rounds to 0
      0.0
    """
    z = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    correct = jnp.take_along_axis(z, labels[..., None].astype(jnp.int32), axis=-1)
    is_label = jnp.arange(z.shape[-1]) == labels[..., None]
    others = jnp.where(is_label, -jnp.inf, z - correct)
    return jax.nn.softplus(jax.nn.logsumexp(others, axis=-1))


def _check_mode(mode: str) -> None:
    if mode not in NORM_MODES:
        raise ValueError(f"mode={mode!r} unknown; choose from {NORM_MODES}")


def params_norm(params: PyTree, *, mode: str = "global") -> jax.Array:
    """``'global'``: the L2 norm of all the weights together; ``'per_matrix'``: the sum of
    the Frobenius norms of the leaves.

    Examples:
      >>> p = {'a': jnp.array([[3., 4.]]), 'b': jnp.array([[0., 12.]])}
      >>> float(params_norm(p)), float(params_norm(p, mode='per_matrix'))
      (13.0, 17.0)
    """
    _check_mode(mode)
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
    if not leaves:
        raise ValueError("params has no leaves: there is no norm to take")
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
    if mode == "global":
        return jnp.sqrt(sum(squares))
    return sum(jnp.sqrt(s) for s in squares)


def scale_to_norm(params: PyTree, target: Any, *, mode: str = "global") -> PyTree:
    """``params`` times one scalar, so that their norm (:func:`params_norm` in ``mode``) is
    ``target``'s: a number, or a pytree whose norm in ``mode`` is taken (e.g. the ticket
    ``apply_mask(θ0, m)``).

    The equal-norm control of Grokking Tickets: dense θ0 with the norm of the ticket.
    ``'global'`` scales by ``‖θ0 ⊙ m‖ / ‖θ0‖``; ``'per_matrix'`` by ``Σ_l ‖θ0_l ⊙ m_l‖ /
    Σ_l ‖θ0_l‖``, the reference code's ratio. Weights whose norm is 0 are returned
    unchanged. Jittable and vmappable.

    Examples:
      >>> p = {'a': jnp.array([[3., 4.]]), 'b': jnp.array([[0., 12.]])}
      >>> ticket = {'a': jnp.array([[3., 4.]]), 'b': jnp.array([[0., 0.]])}
      >>> float(params_norm(scale_to_norm(p, ticket)))  # ‖ticket‖ = 5
      5.0
      >>> scale_to_norm(p, ticket, mode='per_matrix')['b'].tolist()  # times 5 / 17
      [[0.0, 3.529411792755127]]
      >>> scale_to_norm(p, 26.0)['a'].tolist()
      [[6.0, 8.0]]
    """
    _check_mode(mode)
    if isinstance(target, (int, float, np.number)) or (hasattr(target, "shape") and jnp.ndim(target) == 0):
        _check_number(target, "target", 0.0)
        goal = jnp.asarray(target, jnp.float32)
    else:
        goal = params_norm(target, mode=mode)
    current = params_norm(params, mode=mode)
    ratio = jnp.where(current > 0, goal / jnp.where(current > 0, current, 1.0), 1.0)
    return jax.tree.map(lambda x: (x * ratio).astype(jnp.result_type(x)), params)


def train_curves(trainer, state, data, key: jax.Array, *, num_steps: int, eval_every: int,
                 capture: Optional[Mapping[str, tuple[str, float]]] = None):
    """Trains ``num_steps`` steps from ``state`` and measures the curves.

    The steps are :func:`lottojax.train.make_trainer`'s ``run_steps`` (with ``batch_size``
    the number of training examples, every step is full-batch), in pieces of
    ``eval_every``; after each piece, and once before the first, the training and test
    splits are evaluated in full (``trainer.evaluate``). The whole run is one
    ``lax.scan``: jit it (``num_steps``, ``eval_every`` and ``capture`` static) and vmap it
    over seeds (a leading axis of ``state`` and ``key``).

    Args:
      trainer: a :class:`lottojax.train.Trainer`.
      state: the :class:`lottojax.train.TrainState` to start from; its ``step`` is the
        first global step (the data order of ``run_steps`` follows it).
      data: a :class:`lottojax.data.Dataset`.
      key: the data-order key of ``run_steps``.
      num_steps: steps to train, a multiple of ``eval_every`` (0: only the first row).
      eval_every: steps between evaluations.
      capture: ``{name: (metric, threshold)}``: keep the weights of the first evaluation
        (step 0 included) at which the :class:`Curves` field ``metric`` is at or above
        ``threshold`` (e.g. ``{'memorisation': ('train_accuracy', 0.99)}``).

    Returns:
      ``(state, curves, captured)``: the final state, :class:`Curves` with
      ``num_steps // eval_every + 1`` rows, and ``{name: Captured}``.

    Examples:
      >>> import optax, lottojax as lj
      >>> from lottojax.models import create
      >>> from lottojax.data.modular import modular_arithmetic
      >>> from lottojax.train import make_trainer
      >>> data = modular_arithmetic(5, '+', 0.6, seed=0)
      >>> trainer = make_trainer(create('grok-mlp', input_shape=(2,), num_classes=5, embed=16, hidden=8),
      ...                        optax.chain(optax.adamw(1e-2), lj.masked_updates()), batch_size=15, eval_every=1)
      >>> state = trainer.init(jax.random.key(0))
      >>> run = jax.jit(lambda state, key: train_curves(trainer, state, data, key, num_steps=20, eval_every=10,
      ...                                                 capture={'fit': ('train_accuracy', 0.5)}))
      >>> state, curves, kept = run(state, jax.random.key(1))
      >>> curves.step.tolist(), int(state.step), kept['fit'].step.shape
      ([0, 10, 20], 20, ())
    """
    if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 1:
        raise ValueError(f"eval_every={eval_every!r} must be an int >= 1")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 0")
    if num_steps % eval_every:
        raise ValueError(f"num_steps={num_steps} must be a multiple of eval_every={eval_every}")
    capture = dict(capture or {})
    data = jax.tree.map(jnp.asarray, data)  # NumPy arrays cannot be indexed by traced steps
    for name, rule in capture.items():
        if not (isinstance(rule, tuple) and len(rule) == 2 and rule[0] in Curves._fields[1:]):
            raise ValueError(f"capture[{name!r}]={rule!r} must be (metric, threshold) with metric one of "
                             f"{Curves._fields[1:]}")
        _check_number(rule[1], f"capture[{name!r}] threshold", -np.inf)

    def measure(state) -> Curves:
        train = trainer.evaluate(state.params, state.model_state, data.x_train, data.y_train)
        test = trainer.evaluate(state.params, state.model_state, data.x_test, data.y_test)
        return Curves(jnp.asarray(state.step, jnp.int32), train.loss, train.accuracy, test.loss, test.accuracy)

    def update(captured, row: Curves, params):
        new = {}
        for name, (metric, threshold) in capture.items():
            hit = (captured[name].step == NEVER) & (getattr(row, metric) >= threshold)
            new[name] = Captured(jax.tree.map(lambda a, b: jnp.where(hit, a, b), params, captured[name].params),
                                 jnp.where(hit, row.step, captured[name].step))
        return new

    first = measure(state)
    captured = update({name: Captured(state.params, jnp.asarray(NEVER, jnp.int32)) for name in capture},
                      first, state.params)

    def period(carry, period_start):
        state, captured = carry
        state, _ = trainer.run_steps(state, data, key, period_start, eval_every)
        row = measure(state)
        return (state, update(captured, row, state.params)), row

    starts = jnp.asarray(state.step, jnp.int32) + eval_every * jnp.arange(num_steps // eval_every, dtype=jnp.int32)
    (state, captured), rows = jax.lax.scan(period, (state, captured), starts)
    curves = jax.tree.map(lambda a, rest: jnp.concatenate([a[None], rest]), first, rows)
    captured = {name: Captured(jax.tree.map(lambda a, b: jnp.where(c.step == NEVER, b, a), c.params, state.params),
                               c.step) for name, c in captured.items()}
    return state, curves, captured
