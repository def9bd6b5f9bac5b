"""Linear mode connectivity: interpolation, error barriers and instability to SGD noise.

Frankle et al. ("Linear Mode Connectivity and the Lottery Ticket Hypothesis", 2020) call a
network *stable* at step ``k`` when two copies trained from ``θ_k`` with different data
orders end in the same linearly connected minimum: the test error along the segment
between them does not rise. The tools, all pure and jittable:

- :func:`interpolate`: ``(1 - α) θ_a + α θ_b`` over whole pytrees (exact at α = 0 and 1);
- :func:`recompute_batch_stats`: BatchNorm running statistics re-estimated for given
  parameters (interpolated running statistics mean nothing);
- :func:`error_barrier`: loss and error at ``num_points`` evenly spaced α, all in one
  vmapped evaluation, and the barrier ``max_α E(α) − (E(0) + E(1)) / 2``;
- :func:`instability`: train two copies of a :class:`lottojax.train.TrainState` with
  different data orders (together, under ``jax.vmap``) and return the barrier between
  them. A sparse network is a state whose params and optimizer carry its mask.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lottojax.masks import PyTree, apply_mask, check_same_shapes
from lottojax.optim import set_mask

if TYPE_CHECKING:  # annotations only: importing this module does not import Flax
    from lottojax.models.core import Model
    from lottojax.train import Trainer, TrainState

#: ``(params, model_state, x, y) -> Metrics`` (anything with ``.loss`` and ``.accuracy``).
Evaluate = Callable[[PyTree, PyTree, jax.Array, jax.Array], Any]
#: ``(params, model_state) -> model_state``.
Recompute = Callable[[PyTree, PyTree], PyTree]


class LinearPath(NamedTuple):
    """Metrics along the segment from ``θ_a`` (α = 0) to ``θ_b`` (α = 1).

    Attributes:
      alpha: ``(num_points,)`` the interpolation weights, ``linspace(0, 1, num_points)``.
      loss: ``(num_points,)`` mean loss at each α.
      error: ``(num_points,)`` classification error (1 − accuracy) at each α.
      barrier: ``max_α error(α) − (error(0) + error(1)) / 2``, the error barrier height of
        Frankle et al.; never negative, since the endpoints are on the path. Stable: < 0.02.
      loss_barrier: the same for the loss.
    """

    alpha: jax.Array
    loss: jax.Array
    error: jax.Array
    barrier: jax.Array
    loss_barrier: jax.Array


def interpolate(params_a: PyTree, params_b: PyTree, alpha) -> PyTree:
    """The point ``(1 - α) · a + α · b`` of the segment between two pytrees.

    The result equals ``params_a`` exactly at ``α = 0`` and ``params_b`` at ``α = 1``;
    every leaf keeps its dtype. ``alpha`` may be traced (vmap over it to get a path).

    Args:
      params_a: the pytree at α = 0.
      params_b: the pytree at α = 1; same structure and leaf shapes as ``params_a``.
      alpha: a scalar.

    Raises:
      ValueError: the trees differ in structure or in a leaf's shape (the error names
        the path), or a leaf is not floating point.

    Examples:
      >>> a, b = {'w': jnp.array([0., 2.])}, {'w': jnp.array([4., 6.])}
      >>> interpolate(a, b, 0.25)
      {'w': Array([1., 3.], dtype=float32)}
      >>> interpolate(a, {'w': jnp.zeros(3)}, 0.5)
      Traceback (most recent call last):
      ...
      ValueError: params_b leaf w has shape (3,) but the params_a leaf has (2,)
    """
    paths = check_same_shapes(params_a, params_b, a_name="params_a", b_name="params_b")
    for path, leaf in zip(paths, jax.tree.leaves(params_a)):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params_a leaf {path} has dtype {jnp.result_type(leaf)}; only floating-point "
                "leaves can be interpolated"
            )

    def lerp(a, b):
        weight = jnp.asarray(alpha, jnp.result_type(a))
        return (1 - weight) * a + weight * b

    return jax.tree.map(lerp, params_a, params_b)


def recompute_batch_stats(model: Model, params: PyTree, model_state: PyTree, batches: jax.Array) -> PyTree:
    """BatchNorm running statistics re-estimated for ``params`` from ``batches``.

    Each floating-point leaf of the model state is replaced by the equal-weight average,
    over the batches, of the batch statistic that a train-mode forward pass feeds into
    it (per-batch mean and variance, as the model computes them, for BatchNorm): what
    PyTorch's ``update_bn`` does. The statistic is read through the running-average
    update ``s' = μ s + (1 − μ) b`` whatever the momentum μ: a pass from state 0 gives
    ``(1 − μ) b``; one from a large power of two ``S`` gives ``μ S + (1 − μ) b``, hence μ
    to float precision. Leaves a train-mode pass does not average this way (integers,
    counters, constants) keep their value from ``model_state``; models without state
    return it unchanged. Costs one train-mode forward pass per batch, plus one.

    Args:
      model: a :class:`lottojax.models.Model`.
      params: the parameters to estimate statistics for (e.g. an interpolated point).
      model_state: a state of the right structure (its float values are not used).
      batches: ``(num_batches, batch_size, *input_shape)`` training inputs.

    Examples:
      >>> from flax import linen as nn
      >>> from lottojax.models import from_linen
      >>> class Norm(nn.Module):  # Flax's default momentum 0.99
      ...   @nn.compact
      ...   def __call__(self, x, train=False):
      ...     return nn.BatchNorm(use_running_average=not train)(x)
      >>> model = from_linen(Norm(), input_shape=(1,))
      >>> params, state = model.init(jax.random.key(0))
      >>> batches = jnp.array([[[1.], [3.]], [[5.], [11.]]])  # means 2, 8; variances 1, 9
      >>> stats = recompute_batch_stats(model, params, state, batches)['batch_stats']['BatchNorm_0']
      >>> [round(float(stats[k][0]), 4) for k in ('mean', 'var')]
      [5.0, 5.0]
    """
    if not jax.tree.leaves(model_state):
        return model_state
    if jnp.ndim(batches) < 2:
        raise ValueError(f"batches has shape {jnp.shape(batches)}; expected (num_batches, batch_size, ...)")

    floating = lambda leaf: jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    # S = 2^(maxexp/4) (2^32 for float32): μ S is exact and swamps (1 - μ) b.
    large = jax.tree.map(lambda s: 2.0 ** (jnp.finfo(s.dtype).maxexp // 4) if floating(s) else 0, model_state)

    def updated_from(fill, x):
        start = jax.tree.map(lambda s, f: jnp.full_like(s, f), model_state, fill)
        return model.apply(params, start, x, True)[1]

    zeros = jax.tree.map(lambda _: 0, model_state)
    from_zero = jax.lax.map(partial(updated_from, zeros), batches)  # (1 - μ) b, per batch
    from_large = updated_from(large, batches[0])  # μ S + (1 - μ) b

    def estimate(old, zero, big, scale):
        if not floating(old):
            return old
        weight = 1 - (big - zero[0]) / scale  # 1 - μ: 0 where training leaves the entry at its start
        averaged = jnp.mean(zero, axis=0) / jnp.where(weight > 0, weight, 1)
        return jnp.where(weight > 1e-6, averaged, old)

    return jax.tree.map(estimate, model_state, from_zero, from_large, large)


def _path_metrics(evaluate, recompute, params_a, params_b, state_a, state_b, x, y, alpha):
    params = interpolate(params_a, params_b, alpha)
    state = jax.tree.map(lambda a, b: jnp.where(alpha < 0.5, a, b), state_a, state_b)  # nearer endpoint
    if recompute is not None:
        state = recompute(params, state)
    return evaluate(params, state, x, y)


@partial(jax.jit, static_argnames=("evaluate", "num_points", "recompute_stats"))
def error_barrier(
    evaluate: Evaluate,
    params_a: PyTree,
    params_b: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    model_state_a: Optional[PyTree] = None,
    model_state_b: Optional[PyTree] = None,
    num_points: int = 30,
    recompute_stats: Optional[Recompute] = None,
) -> LinearPath:
    """Loss and error along the segment ``θ_a → θ_b`` and the error barrier between them.

    All ``num_points`` points (α = linspace(0, 1)) are evaluated in one ``jax.vmap``-ed,
    compiled program. A model whose state holds floating-point leaves (BatchNorm
    running statistics) needs ``recompute_stats``: every point, the endpoints included,
    is then evaluated with statistics recomputed for its own parameters, so the curve is
    measured one way throughout (interpolated running statistics belong to no network).
    Other state leaves (counters) take the nearer endpoint's value.

    Args:
      evaluate: ``(params, model_state, x, y) -> Metrics`` with ``.loss`` and ``.accuracy``,
        e.g. :attr:`lottojax.train.Trainer.evaluate`. It is a static argument: pass the
        same function object each call to reuse the compiled program.
      params_a, params_b: the endpoints (same structure and shapes).
      x, y: the evaluation set (Frankle et al. use the test set).
      model_state_a, model_state_b: the endpoints' model states (default: ``{}``).
      num_points: number of α values, endpoints included (Frankle et al.: 30).
      recompute_stats: ``(params, model_state) -> model_state`` applied at every point,
        e.g. ``functools.partial(recompute_batch_stats, model, batches=xs)``. Static,
        like ``evaluate``; required when the model state has floating-point leaves.

    Raises:
      ValueError: the endpoints differ in structure or shapes (naming the path),
        ``num_points < 2``, or a floating-point model state comes without ``recompute_stats``.

    Returns:
      A :class:`LinearPath`.

    Examples:
      >>> from lottojax.train import Metrics
      >>> def evaluate(params, state, x, y):  # a 1-parameter "net": loss w², error |w| > 1
      ...   return Metrics(params['w'] ** 2, (jnp.abs(params['w']) <= 1).astype(jnp.float32))
      >>> path = error_barrier(evaluate, {'w': jnp.array(-2.)}, {'w': jnp.array(2.)}, None, None,
      ...                      num_points=5)
      >>> path.alpha.tolist(), path.loss.tolist()
      ([0.0, 0.25, 0.5, 0.75, 1.0], [4.0, 1.0, 0.0, 1.0, 4.0])
      >>> float(path.barrier), float(path.loss_barrier)   # both ends wrong, the middle right
      (0.0, 0.0)
    """
    if num_points < 2:
        raise ValueError(f"num_points={num_points} must be at least 2 (the two endpoints)")
    if (model_state_a is None) != (model_state_b is None):
        raise ValueError("pass both model_state_a and model_state_b, or neither")
    state_a = {} if model_state_a is None else model_state_a
    state_b = {} if model_state_b is None else model_state_b
    paths = check_same_shapes(state_a, state_b, a_name="model_state_a", b_name="model_state_b")
    floating = [p for p, s in zip(paths, jax.tree.leaves(state_a)) if jnp.issubdtype(jnp.result_type(s), jnp.floating)]
    if floating and recompute_stats is None:
        raise ValueError(
            f"the model state has floating-point leaves ({floating[0]}, ...), e.g. BatchNorm statistics, "
            "which mean nothing at interpolated points: pass recompute_stats=functools.partial("
            "lottojax.stability.recompute_batch_stats, model, batches=training_batches)"
        )
    alpha = jnp.linspace(0.0, 1.0, num_points)
    point = partial(_path_metrics, evaluate, recompute_stats, params_a, params_b, state_a, state_b, x, y)
    metrics = jax.vmap(point)(alpha)
    error = 1.0 - metrics.accuracy
    return LinearPath(alpha, metrics.loss, error, _barrier(error), _barrier(metrics.loss))


def _barrier(values: jax.Array) -> jax.Array:
    return jnp.max(values) - 0.5 * (values[0] + values[-1])


@partial(jax.jit, static_argnames=("trainer", "num_steps", "num_points", "recompute_stats", "split"))
def instability(
    trainer: Trainer,
    state: TrainState,
    data,
    *,
    key: jax.Array,
    start,
    num_steps: int,
    mask: Optional[PyTree] = None,
    num_points: int = 30,
    recompute_stats: Optional[Recompute] = None,
    split: str = "test",
    until=None,
) -> tuple[LinearPath, TrainState]:
    """Instability of ``state`` to SGD noise: the error barrier between two copies of it
    trained with different data orders.

    Both copies train global steps ``[start, start + num_steps)`` (so they end where a run
    from step 0 would) together under ``jax.vmap``, with data orders from
    ``jax.random.split(key)``; everything else (parameters, optimizer and model state)
    they share. ``mask`` makes it the instability of a subnetwork: it is applied to the
    parameters and set in the optimizer, so pruned weights stay 0 in both copies.

    Args:
      trainer: from :func:`lottojax.train.make_trainer` (static: reuse the same one).
      state: ``θ_k`` as a :class:`lottojax.train.TrainState`, e.g. after
        ``trainer.run_steps(..., start=0, num_steps=k)``.
      data: a :class:`lottojax.data.Dataset`.
      key: the copies' data orders are ``jax.random.split(key)``.
      start: the global step of ``state`` (``k``); may be traced, but must be the same
        for every run when vmapped (pass it with ``in_axes=None``).
      num_steps: steps each copy trains (``T - k``).
      mask: optional bool pytree shaped like the params (a subnetwork).
      num_points: α values on the path (Frankle et al.: 30).
      recompute_stats: see :func:`error_barrier`; needed for BatchNorm models.
      split: evaluate on ``'test'`` (Frankle et al.), ``'val'`` or ``'train'``.
      until: optional global step (may be traced) from which the copies stop changing:
        with ``num_steps = T - min(k)`` and ``until = T``, one compiled program serves
        every ``start = k`` (see :meth:`lottojax.train.Trainer.run_steps`).

    Returns:
      ``(path, copies)``: the :class:`LinearPath` between the two trained copies and
      their final states stacked on a leading axis of 2.

    Examples:
      >>> import optax, lottojax as lj
      >>> from lottojax.models import create
      >>> from lottojax.data import Dataset
      >>> from lottojax.train import make_trainer
      >>> x = jax.random.normal(jax.random.key(0), (64, 8)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> data = Dataset(x, y, x[:16], y[:16], x[:16], y[:16])
      >>> trainer = make_trainer(create('mlp', input_shape=(8,), hidden=(16,), num_classes=2),
      ...                        optax.chain(optax.adam(1e-2), lj.masked_updates()),
      ...                        batch_size=16, eval_every=10)
      >>> state = trainer.init(jax.random.key(1))
      >>> path, copies = instability(trainer, state, data, key=jax.random.key(2), start=0,
      ...                            num_steps=20, num_points=5)
      >>> path.error.shape, copies.step.tolist(), bool(path.barrier >= 0)
      ((5,), [20, 20], True)
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}: use 'test', 'val' or 'train'")
    if mask is not None:
        state = state._replace(params=apply_mask(state.params, mask), opt_state=set_mask(state.opt_state, mask))
    train_copy = lambda copy_key: trainer.run_steps(state, data, copy_key, start, num_steps, until)[0]
    copies = jax.vmap(train_copy)(jax.random.split(key))
    a, b = (jax.tree.map(lambda leaf: leaf[i], copies) for i in (0, 1))
    path = error_barrier(
        trainer.evaluate, a.params, b.params, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"),
        model_state_a=a.model_state, model_state_b=b.model_state, num_points=num_points,
        recompute_stats=recompute_stats,
    )
    return path, copies
