"""Dynamic sparse training and gradual pruning as one optax transform.

:func:`sparse_training` wraps an inner optax optimizer (it replaces
:func:`lottojax.masked_updates` for these methods) and changes the mask *during* training:

- a :class:`SparsitySchedule` says, as pure functions of the step, **when** the mask
  changes (``is_update``) and the target global **sparsity** after the change
  (:func:`one_shot`, :func:`periodic`, :func:`cubic` for Zhu & Gupta's gradual pruning);
- a :class:`SparseMethod` says **how** (``update(mask, params, grads, ...) -> mask``,
  pure): :func:`gmp` (gradual magnitude pruning, starts dense, masks only shrink),
  :func:`static` (a fixed random mask), :func:`set_` (SET: drop the smallest weights and
  regrow at random) and :func:`rigl` (RigL: regrow where the gradient is largest).
  :data:`SPARSE_METHODS` is the registry (``get_sparse_method('rigl', drop_fraction=...)``).

The step's mask change runs inside the compiled train step: ``lax.cond`` on
``schedule.is_update(count)``, no Python branching on traced values, no host round trip,
and the mask keeps its shapes and dtype, so nothing is retraced when it changes. Under
``jax.vmap`` over seeds the step count is batched, which would turn that ``cond`` into a
``select`` computing the mask update at every step; the predicate is reduced to one
``any`` over the seeds first (a ``custom_vmap`` rule), so steps without an event skip it
for all seeds. The mask lives in a :class:`~lottojax.optim.MaskedUpdatesState` inside :class:`SparseTrainingState`,
so :func:`lottojax.get_mask`, :func:`lottojax.set_mask` and :func:`lottojax.mask_state`
work as for ``masked_updates``.

At a step with an event, the new mask is computed from the parameters *before* the step
and this step's gradients. Then, leaf by leaf:

- weights active in both the old and the new mask get the inner optimizer's update;
- every other weight gets the update ``-params``, so it is exactly 0.0 after the step:
  dropped weights are zeroed, grown weights start at 0 (they were 0 already), and
  inactive weights stay 0;
- the inner optimizer's state entries of **grown** weights (Adam's ``mu`` and ``nu``,
  momentum traces, ``MultiSteps``' accumulated gradients: every state leaf laid out and
  shaped like the parameters, found with ``optax.tree_utils.tree_map_params``) are reset
  to 0, so a grown weight starts from a fresh optimizer state (RigL's reset). State that
  is not shaped like the weights (step counts, hyperparameters, Adafactor's factored
  row/column statistics) is left as it is.

The inner optimizer sees the gradients as given, for all weights, as under
``masked_updates`` (a global-norm clip counts every gradient, and ``sparse_training`` with
:func:`static` and a fixed mask trains exactly like ``chain(inner, masked_updates(mask))``);
what it computes for inactive weights is discarded, and reset when they grow.
Non-prunable leaves (biases, norms: by default every leaf with ``ndim < 2``) are always dense.

Random choices (the initial mask of static/SET/RigL, SET's regrowth) use
``jax.random.fold_in(state.key, count)``. ``init`` sets the key to ``jax.random.key(0)``;
:func:`seed` replaces it, and :func:`lottojax.train.make_trainer`'s ``init(key)`` calls
``seed(opt_state, jax.random.fold_in(key, 1))``, so each seed of a vmapped run draws its
own masks.

Choices where the papers and the reference code differ:

- **Regrowing just-dropped weights.** RigL's paper (Algorithm 1) grows among the weights
  inactive *before* the update (``i ∉ I_active``), so a just-dropped weight cannot come
  back in the same event; its reference code (``google-research/rigl``,
  ``_get_update_op``) grows among all weights not kept after the drop, so a just-dropped
  weight can be regrown, and then keeps its value and optimizer state (it is not a "new
  connection"). The default follows the paper; ``rigl(regrow_dropped=True)`` (and the same
  for :func:`set_`) follows the reference: such a weight is active in both masks here, so
  it keeps its value and moments, as there.
- **Counts.** Per layer, ``k = round(α_t · active)`` (float32, halves to even) weights
  are dropped and as many grown; the reference truncates (``int(α · active)``). When fewer
  than ``k`` weights are inactive (density above ``1 / (1 + α)``) and
  ``regrow_dropped=False``, ``k`` is lowered to the inactive count, so per-layer counts
  are always preserved exactly.
- **Ties** go to the lower flat index (the reference adds 1e-5 noise to the drop scores).
"""
from __future__ import annotations

import math
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree, Spec, check_mask, check_same_shapes, ones_like, prunable_leaves
from lottojax.methods import from_registry, prune_with
from lottojax.optim import MaskedUpdatesState
from lottojax.prune import lowest_alive

SCOPES = ("global", "uniform", "erk", "er")
"""The ``scope=`` values of :func:`sparse_training` (how a global count is split over layers,
as in :func:`lottojax.prune_with`)."""

StepFn = Callable[[jax.Array], jax.Array]
DropFraction = Union[float, StepFn]


# ---------------------------------------------------------------------------------------
# Argument checks (errors name the argument).


def _int_arg(value, name: str, where: str, minimum: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where}: {name}={value!r} must be an int >= {minimum}")
    return int(value)


def _sparsity_arg(value, name: str, where: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {name}={value!r} must be a number in [0, 1) (the fraction of prunable weights removed)")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where}: {name}={float(value)} is outside [0, 1): it is the fraction of prunable "
                         "weights removed (0.9 keeps 10%)")
    return float(value)


def _fraction_arg(value, name: str, where: str) -> DropFraction:
    if callable(value):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {name}={value!r} must be a number in [0, 1] or a callable step -> fraction "
                         "(e.g. cosine_drop_fraction(0.3, end_step=...))")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: {name}={float(value)} is outside [0, 1]: it is the fraction of each layer's "
                         "active weights dropped (and regrown) per update")
    return float(value)


def _step(step) -> jax.Array:
    return jnp.asarray(step, jnp.int32)


# ---------------------------------------------------------------------------------------
# Schedules.


class SparsitySchedule(NamedTuple):
    """When the mask changes and the target sparsity after each change.

    Attributes:
      name: a short description.
      is_update: ``step -> bool array``: does the mask change at ``step`` (the optimizer's
        update count: 0 for the first step)?
      sparsity: ``step -> float32 array``: the global fraction of prunable weights pruned
        after an update at ``step`` (read by :func:`gmp` and by the initial random mask of
        static/SET/RigL; SET and RigL keep their counts).

    Both are pure and jittable with a traced int32 ``step``. Build one with
    :func:`one_shot`, :func:`periodic` or :func:`cubic`, or directly.

    Examples:
      >>> every_other = SparsitySchedule('mine', lambda t: t % 2 == 0, lambda t: jnp.float32(0.5))
      >>> bool(every_other.is_update(jnp.int32(4)))
      True
    """

    name: str
    is_update: StepFn
    sparsity: StepFn


def one_shot(sparsity: float, *, at_step: int) -> SparsitySchedule:
    """One mask update, at ``at_step``, to ``sparsity``.

    Examples:
      >>> s = one_shot(0.8, at_step=10)
      >>> [bool(s.is_update(t)) for t in (9, 10, 11)], float(s.sparsity(10))
      ([False, True, False], 0.8...)
    """
    sparsity = _sparsity_arg(sparsity, "sparsity", "one_shot")
    at_step = _int_arg(at_step, "at_step", "one_shot")
    return SparsitySchedule(
        f"one_shot({sparsity}, at_step={at_step})",
        lambda step: _step(step) == at_step,
        lambda step: jnp.full((), sparsity, jnp.float32),
    )


def periodic(sparsity: float, *, every: int, begin_step: int = 0, end_step: Optional[int] = None) -> SparsitySchedule:
    """Updates at ``begin_step, begin_step + every, ...`` while ``step < end_step``
    (``None``: forever), at a fixed ``sparsity``: the schedule of SET and RigL
    (``every=100``; RigL stops at ``end_step`` = 75% of training).

    Examples:
      >>> s = periodic(0.9, every=100, end_step=750)
      >>> [t for t in range(0, 1000, 50) if s.is_update(t)]
      [0, 100, 200, 300, 400, 500, 600, 700]
    """
    sparsity = _sparsity_arg(sparsity, "sparsity", "periodic")
    every = _int_arg(every, "every", "periodic", 1)
    begin_step = _int_arg(begin_step, "begin_step", "periodic")
    if end_step is not None:
        end_step = _int_arg(end_step, "end_step", "periodic")
        if end_step <= begin_step:
            raise ValueError(f"periodic: end_step={end_step} must be > begin_step={begin_step} (or None: no end)")

    def is_update(step):
        step = _step(step)
        due = (step >= begin_step) & ((step - begin_step) % every == 0)
        return due if end_step is None else due & (step < end_step)

    return SparsitySchedule(
        f"periodic({sparsity}, every={every}, begin_step={begin_step}, end_step={end_step})",
        is_update,
        lambda step: jnp.full((), sparsity, jnp.float32),
    )


def cubic(final_sparsity: float, *, begin_step: int, end_step: int, every: int,
          initial_sparsity: float = 0.0) -> SparsitySchedule:
    """Zhu & Gupta's gradual pruning schedule.

    ``s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n Δt))³`` at ``t = t0, t0 + Δt, ..., t0 + n Δt``
    with ``t0 = begin_step``, ``Δt = every`` and ``t0 + n Δt = end_step`` (both ends are
    events; ``end_step - begin_step`` must be a positive multiple of ``every``). Before
    ``t0`` the value is ``s_i``, after ``end_step`` it is ``s_f``.

    Examples:
      >>> s = cubic(0.9, begin_step=0, end_step=400, every=100)
      >>> [round(float(s.sparsity(t)), 4) for t in (0, 100, 200, 400)]  # 0.9 (1 - 0.75³), 0.9 (1 - 0.5³)
      [0.0, 0.5203, 0.7875, 0.9]
      >>> [t for t in range(0, 600, 50) if s.is_update(t)]
      [0, 100, 200, 300, 400]
    """
    final_sparsity = _sparsity_arg(final_sparsity, "final_sparsity", "cubic")
    initial_sparsity = _sparsity_arg(initial_sparsity, "initial_sparsity", "cubic")
    if initial_sparsity > final_sparsity:
        raise ValueError(f"cubic: initial_sparsity={initial_sparsity} must be <= final_sparsity={final_sparsity} "
                         "(gradual pruning only removes weights)")
    every = _int_arg(every, "every", "cubic", 1)
    begin_step = _int_arg(begin_step, "begin_step", "cubic")
    end_step = _int_arg(end_step, "end_step", "cubic")
    span = end_step - begin_step
    if span <= 0 or span % every:
        raise ValueError(
            f"cubic: end_step - begin_step = {end_step} - {begin_step} = {span} must be a positive multiple of "
            f"every={every} (end_step = begin_step + n * every is the last pruning step)"
        )

    def is_update(step):
        step = _step(step)
        return (step >= begin_step) & (step <= end_step) & ((step - begin_step) % every == 0)

    def sparsity(step):
        progress = jnp.clip((_step(step) - begin_step).astype(jnp.float32) / span, 0.0, 1.0)
        return jnp.float32(final_sparsity) + jnp.float32(initial_sparsity - final_sparsity) * (1.0 - progress) ** 3

    return SparsitySchedule(
        f"cubic({final_sparsity}, begin_step={begin_step}, end_step={end_step}, every={every}, "
        f"initial_sparsity={initial_sparsity})",
        is_update,
        sparsity,
    )


def cosine_drop_fraction(alpha: float = 0.3, *, end_step: int) -> StepFn:
    """RigL's drop-fraction decay: ``step -> α/2 (1 + cos(π t / T_end))`` (float32), ``t``
    clipped to ``[0, T_end]``. Pass it as the ``drop_fraction`` of :func:`rigl` or :func:`set_`.

    Examples:
      >>> f = cosine_drop_fraction(0.3, end_step=1000)
      >>> [round(float(f(t)), 4) for t in (0, 500, 1000, 2000)]
      [0.3, 0.15, 0.0, 0.0]
    """
    alpha = _fraction_arg(alpha, "alpha", "cosine_drop_fraction")
    if callable(alpha):
        raise ValueError("cosine_drop_fraction: alpha must be a number in [0, 1]")
    end_step = _int_arg(end_step, "end_step", "cosine_drop_fraction", 1)

    def drop_fraction(step):
        t = jnp.clip(_step(step), 0, end_step).astype(jnp.float32)
        return jnp.float32(alpha / 2) * (1.0 + jnp.cos(jnp.float32(math.pi) * t / end_step))

    return drop_fraction


# ---------------------------------------------------------------------------------------
# Methods.


class SparseMethod(NamedTuple):
    """A sparse-training method as a value.

    Attributes:
      name: a short name (the registry key for registered methods).
      starts_sparse: ``True`` for methods that train sparse from the first step (static,
        SET, RigL): :func:`sparse_training` draws a random mask at the schedule's sparsity
        at the first step. ``False`` (GMP) starts dense.
      update: ``(mask, params, grads, *, key, step, sparsity, scope, prunable) -> mask``,
        pure and jittable: the new bool mask at an event, from the current mask, the
        parameters before the step, this step's (dense) gradients, a key, the step, the
        schedule's target sparsity, the scope (how a global count is split over layers)
        and the prunable spec. Non-prunable leaves must be returned unchanged.

    Examples:
      >>> keep_all = SparseMethod('dense', False, lambda mask, params, grads, **unused: mask)
      >>> keep_all.update({'w': jnp.ones((2, 2), bool)}, None, None, key=None)['w'].all().item()
      True
    """

    name: str
    starts_sparse: bool
    update: Callable[..., PyTree]


def _prunable_total(params: PyTree, prunable: Spec) -> int:
    _, leaves, _, flags = prunable_leaves(params, prunable, name="params")
    return sum(int(np.prod(jnp.shape(x))) for x, f in zip(leaves, flags) if f)


def _keep_count(sparsity, total: int) -> jax.Array:
    """``round((1 - sparsity) * total)`` in float32 (halves to even), clipped to ``[0, total]``."""
    density = jnp.float32(1.0) - jnp.asarray(sparsity, jnp.float32)
    return jnp.clip(jnp.round(density * jnp.float32(total)).astype(jnp.int32), 0, total)


def _round_count(fraction, count: jax.Array) -> jax.Array:
    product = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0) * count.astype(jnp.float32)
    return jnp.clip(jnp.round(product).astype(jnp.int32), 0, count)


def gmp() -> SparseMethod:
    """Gradual magnitude pruning (Zhu & Gupta 2017): each event prunes by ``|θ|`` to exactly
    ``round((1 - s_t) * N)`` kept prunable weights (``N`` prunable weights, float32 product,
    halves to even) split over layers by the transform's ``scope`` (``'global'``: one
    threshold; ``'uniform'``: the same density per layer; ``'erk'``, ``'er'``), via
    :func:`lottojax.prune_with`. Masks only shrink. Starts dense.

    Examples:
      >>> params = {'w': jnp.array([[.1, -2., .3, 4.]])}
      >>> gmp().update({'w': jnp.ones((1, 4), bool)}, params, None, key=jax.random.key(0), step=0,
      ...              sparsity=0.5, scope='global', prunable=None)['w']
      Array([[False,  True, False,  True]], dtype=bool)
    """

    def update(mask, params, grads, *, key, step, sparsity, scope, prunable):
        del grads, step
        keep = _keep_count(sparsity, _prunable_total(params, prunable))
        return prune_with("magnitude", params, mask, key=key, keep=keep, scope=scope, prunable=prunable)

    return SparseMethod("gmp", False, update)


def static() -> SparseMethod:
    """Static sparse training: the random initial mask (drawn at the first step at the
    schedule's sparsity with the transform's ``scope``, e.g. ``'erk'``) is never changed.

    Examples:
      >>> mask = {'w': jnp.array([True, False])}
      >>> static().update(mask, None, None, key=None, step=5, sparsity=0.5, scope='erk', prunable=None) is mask
      True
    """

    def update(mask, params, grads, **unused):
        del params, grads, unused
        return mask

    return SparseMethod("static", True, update)


def _drop_and_grow(mask, params, grow_scores: Callable[[int, Any], jax.Array], fraction, *, prunable,
                   regrow_dropped: bool):
    """Per prunable leaf: drop the ``k = round(fraction * active)`` active entries with the
    smallest ``|θ|`` and grow the ``k`` highest-scoring candidates (inactive entries, or
    with ``regrow_dropped`` every entry not kept); ties to the lower index."""
    check_mask(params, mask)
    _, param_leaves, _, flags = prunable_leaves(params, prunable, name="params")
    mask_leaves, treedef = jax.tree.flatten(mask)
    new = list(mask_leaves)
    for i, (m, p, flag) in enumerate(zip(mask_leaves, param_leaves, flags)):
        if not flag:
            continue
        active = m.reshape(-1)
        n_active = jnp.sum(active, dtype=jnp.int32)
        k = _round_count(fraction, n_active)
        if not regrow_dropped:
            k = jnp.minimum(k, active.size - n_active)
        drop = lowest_alive(jnp.abs(jnp.asarray(p, jnp.float32)).reshape(-1), active, k)
        kept = active & ~drop
        candidates = ~kept if regrow_dropped else ~active
        scores = jnp.asarray(grow_scores(i, p), jnp.float32).reshape(-1)
        scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)  # NaN scores are grown last
        grow = lowest_alive(-scores, candidates, k)
        new[i] = (kept | grow).reshape(m.shape)
    return jax.tree.unflatten(treedef, new)


def _fraction_at(drop_fraction: DropFraction, step) -> jax.Array:
    value = drop_fraction(_step(step)) if callable(drop_fraction) else drop_fraction
    return jnp.asarray(value, jnp.float32)


def set_(drop_fraction: DropFraction = 0.3, regrow_dropped: bool = False) -> SparseMethod:
    """SET (Mocanu et al. 2018), registry name ``'set'``: at each event, per prunable
    layer, drop the ``round(α · active)`` active weights with the smallest ``|θ|`` and grow
    as many uniformly at random among the inactive ones (new weights start at 0); per-layer
    counts are preserved exactly. Starts from a random mask.

    Args:
      drop_fraction: ``α``, a float in ``[0, 1]`` or a callable ``step -> α``
        (e.g. :func:`cosine_drop_fraction`).
      regrow_dropped: ``False`` (default): grow only among weights inactive before the
        event; ``True``: also among the just-dropped ones (as RigL's reference code; see
        the module doc).

    Examples:
      >>> params = {'w': jnp.array([[.5, -.1, 2., 0., 0., 0.]])}
      >>> mask = {'w': jnp.array([[True, True, True, False, False, False]])}
      >>> new = set_(1 / 3).update(mask, params, None, key=jax.random.key(0), step=0,
      ...                          sparsity=.5, scope='uniform', prunable=None)['w']
      >>> new[0, :3].tolist(), int(new.sum())  # -0.1 dropped, one random inactive weight grown
      ([True, False, True], 3)
    """
    drop_fraction = _fraction_arg(drop_fraction, "drop_fraction", "set")

    def update(mask, params, grads, *, key, step, sparsity, scope, prunable):
        del grads, sparsity, scope
        return _drop_and_grow(
            mask, params, lambda i, p: jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(p)),
            _fraction_at(drop_fraction, step), prunable=prunable, regrow_dropped=bool(regrow_dropped),
        )

    return SparseMethod("set", True, update)


def rigl(drop_fraction: DropFraction = 0.3, regrow_dropped: bool = False) -> SparseMethod:
    """RigL (Evci et al. 2020): at each event, per prunable layer, drop the
    ``round(α_t · active)`` active weights with the smallest ``|θ|`` and grow as many
    inactive weights with the largest ``|gradient|`` (new weights start at 0, their
    optimizer state is reset). Starts from a random mask (the paper: ``scope='erk'``).

    The gradient is the one given to the transform, which is already dense: JAX
    differentiates the dense weight arrays (pruned entries are zeros in them), so it
    computes the gradient of every weight, inactive ones included, at every step; RigL's
    "dense gradient on this step's batch" costs nothing extra.

    Args:
      drop_fraction: ``α``, a float in ``[0, 1]`` or a callable ``step -> α_t``; the
        paper: ``cosine_drop_fraction(0.3, end_step=T_end)``, with
        ``periodic(s, every=100, end_step=T_end)``, ``T_end`` = 75% of training.
      regrow_dropped: ``False`` (default, the paper): grow only among weights inactive
        before the event; ``True`` (the reference code): also among the just-dropped
        ones, which then keep their value and optimizer state (see the module doc).

    Examples:
      >>> params = {'w': jnp.array([[.5, -.1, 2., 0., 0., 0.]])}
      >>> grads = {'w': jnp.array([[9., 9., 9., .1, -3., 2.]])}
      >>> mask = {'w': jnp.array([[True, True, True, False, False, False]])}
      >>> rigl(1 / 3).update(mask, params, grads, key=jax.random.key(0), step=0,
      ...                    sparsity=.5, scope='erk', prunable=None)['w']  # -0.1 out, |-3| in
      Array([[ True, False,  True, False,  True, False]], dtype=bool)
    """
    drop_fraction = _fraction_arg(drop_fraction, "drop_fraction", "rigl")

    def update(mask, params, grads, *, key, step, sparsity, scope, prunable):
        del key, sparsity, scope
        check_same_shapes(params, grads, a_name="params", b_name="grads")
        grad_leaves = jax.tree.leaves(grads)
        return _drop_and_grow(
            mask, params, lambda i, p: jnp.abs(grad_leaves[i]),
            _fraction_at(drop_fraction, step), prunable=prunable, regrow_dropped=bool(regrow_dropped),
        )

    return SparseMethod("rigl", True, update)


SPARSE_METHODS: Mapping[str, Callable[..., SparseMethod]] = types.MappingProxyType({
    "gmp": gmp,
    "static": static,
    "set": set_,
    "rigl": rigl,
})
"""The registry: name -> factory. Read-only; pass a :class:`SparseMethod` value for a
method that is not registered."""


def get_sparse_method(name: str, **hparams) -> SparseMethod:
    """The registered sparse-training method ``name`` built with ``hparams``.

    Examples:
      >>> get_sparse_method('rigl', drop_fraction=0.5).name
      'rigl'
      >>> get_sparse_method('rig')
      Traceback (most recent call last):
      ...
      ValueError: sparse-training method 'rig' is not registered; registered: 'gmp', 'static', 'set', 'rigl' (or pass a SparseMethod value)
      >>> get_sparse_method('set', alpha=0.1)
      Traceback (most recent call last):
      ...
      ValueError: sparse-training method 'set' has no hyperparameter 'alpha'; it takes: drop_fraction, regrow_dropped
    """
    return from_registry(SPARSE_METHODS, name, hparams, kind="sparse-training method", value_type="SparseMethod")


# ---------------------------------------------------------------------------------------
# The transform.


class SparseTrainingState(NamedTuple):
    """State of :func:`sparse_training`.

    Attributes:
      inner: the inner optimizer's state.
      masked: the current mask, as a :class:`~lottojax.optim.MaskedUpdatesState` (so
        ``get_mask``/``set_mask``/``mask_state`` find it).
      count: int32, the number of updates applied so far (the schedule's step).
      key: the typed random key of the mask draws (see :func:`seed`).
    """

    inner: optax.OptState
    masked: MaskedUpdatesState
    count: jax.Array
    key: jax.Array


def _is_sparse_state(node) -> bool:
    return isinstance(node, SparseTrainingState)


def _reset_where(inner: optax.GradientTransformation, inner_state, grown: PyTree, params: PyTree):
    """Zeroes the entries of ``grown`` in every state leaf shaped like its weight."""

    def reset(s, g):
        if jnp.shape(s) != jnp.shape(g):  # e.g. Adafactor's factored statistics
            return s
        return jnp.where(g, jnp.zeros_like(s), s)

    try:
        return optax.tree_utils.tree_map_params(inner, reset, inner_state, grown)
    except (TypeError, ValueError, AttributeError):
        # An init that reads the params' leaves cannot run on tree_map_params' placeholder:
        # reset every subtree of the state that has the params' structure instead.
        treedef = jax.tree.structure(params)
        is_params_like = lambda node: jax.tree.structure(node) == treedef
        return jax.tree.map(lambda node: jax.tree.map(reset, node, grown) if is_params_like(node) else node,
                            inner_state, is_leaf=is_params_like)


@jax.custom_batching.custom_vmap
def _any_in_batch(pred: jax.Array) -> jax.Array:
    """``pred`` itself; under ``vmap``, one unbatched ``any`` over the mapped axis."""
    return pred


@_any_in_batch.def_vmap
def _any_in_batch_rule(axis_size, in_batched, pred):
    del axis_size
    (batched,) = in_batched
    return (jnp.any(pred) if batched else pred), False


def sparse_training(
    optimizer: optax.GradientTransformation,
    method: Union[str, SparseMethod],
    schedule: SparsitySchedule,
    *,
    scope: str = "uniform",
    prunable: Spec = None,
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that ``method`` changes the mask at ``schedule``'s events.

    Use it instead of ``optax.chain(optimizer, masked_updates())`` (not together with
    it). ``update(grads, state, params)`` needs ``params``. See the module doc for what
    happens at an event.

    Args:
      optimizer: the inner optax optimizer (its updates are applied to the weights active
        in both the old and the new mask).
      method: a registered name (default hyperparameters; use :func:`get_sparse_method`
        for others) or a :class:`SparseMethod`.
      schedule: a :class:`SparsitySchedule`.
      scope: how a global count is split over the prunable leaves, for :func:`gmp` and for
        the initial random mask of static/SET/RigL: ``'global'`` (one threshold; random:
        each layer at the target density in expectation), ``'uniform'`` (the same density
        in every layer), ``'erk'`` or ``'er'`` (see :func:`lottojax.layer_densities`).
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``); the others
        are always dense.

    A method with ``starts_sparse`` draws its initial mask at the first update (count 0):
    ``prune_with('random', ..., keep=round((1 - schedule.sparsity(0)) * N), scope=scope)``
    with key ``fold_in(state.key, 0)``, and applies no other change at that step. A mask
    that is already sparse at count 0 (set with ``set_mask``, ``mask_state`` or
    ``make_trainer(...).init(key, mask)``) is kept instead.

    Examples:
      >>> params = {'w': jnp.arange(1., 9.).reshape(2, 4), 'b': jnp.ones(4)}
      >>> tx = sparse_training(optax.sgd(0.1), 'gmp', one_shot(0.75, at_step=1), scope='global')
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params['w']  # the two largest weights are kept; the bias stays dense
      Array([[0. , 0. , 0. , 0. ],
             [0. , 0. , 6.8, 7.8]], dtype=float32)
      >>> from lottojax.optim import get_mask
      >>> int(get_mask(state)['w'].sum()), int(state.count)
      (2, 2)
    """
    if isinstance(method, str):
        method = get_sparse_method(method)
    if not isinstance(method, SparseMethod):
        raise TypeError(f"sparse_training: method must be a registered name ({', '.join(SPARSE_METHODS)}) "
                        f"or a SparseMethod, got {type(method).__name__}")
    if not isinstance(schedule, SparsitySchedule):
        raise TypeError(f"sparse_training: schedule must be a SparsitySchedule (one_shot, periodic, cubic), "
                        f"got {type(schedule).__name__}")
    if scope not in SCOPES:
        raise ValueError(f"sparse_training: scope={scope!r} unknown; choose from {SCOPES}")
    if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
        raise TypeError(f"sparse_training: optimizer must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}")

    def init(params):
        _prunable_total(params, prunable)  # names the paths if nothing is prunable
        inner = optimizer.init(params)
        nested = [n for n in jax.tree.leaves(inner, is_leaf=lambda n: isinstance(n, (MaskedUpdatesState, SparseTrainingState)))
                  if isinstance(n, (MaskedUpdatesState, SparseTrainingState))]
        if nested:
            raise ValueError(
                f"sparse_training: the inner optimizer holds a {type(nested[0]).__name__}; sparse_training "
                "replaces masked_updates (it holds and enforces the mask itself): pass the optimizer "
                "without masked_updates/sparse_training inside"
            )
        return SparseTrainingState(inner, MaskedUpdatesState(ones_like(params)), jnp.zeros((), jnp.int32),
                                   jax.random.key(0))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("sparse_training: params is None; call update(grads, state, params): the mask "
                             "update reads the weights (and zeroes dropped ones)")
        if not isinstance(state, SparseTrainingState):
            raise TypeError(f"sparse_training: state must be a SparseTrainingState, got {type(state).__name__}")
        check_same_shapes(params, grads, a_name="params", b_name="grads")
        old = state.masked.mask
        check_mask(params, old, mask_name="mask (in the optimizer state)")
        inner_updates, inner_state = optimizer.update(grads, state.inner, params)
        count = state.count
        key = jax.random.fold_in(state.key, count)
        _, _, _, flags = prunable_leaves(params, prunable, name="params")

        def event_mask(_):
            return method.update(old, params, grads, key=key, step=count, sparsity=schedule.sparsity(count),
                                 scope=scope, prunable=prunable)

        event = jnp.asarray(schedule.is_update(count), bool)
        branches = [lambda _: old, event_mask]
        if method.starts_sparse:
            dense = jnp.all(jnp.stack([jnp.all(m) for m, f in zip(jax.tree.leaves(old), flags) if f]))

            def initial_mask(_):
                keep = _keep_count(schedule.sparsity(count), _prunable_total(params, prunable))
                return prune_with("random", params, old, key=key, keep=keep, scope=scope, prunable=prunable)

            first = count == 0
            which = jnp.where(first & dense, 2, jnp.where(event & ~first, 1, 0))
            branches.append(initial_mask)
        else:
            which = event.astype(jnp.int32)
        # Under vmap (seeds), `which` is batched and a cond on it would run every branch at
        # every step; _any_in_batch makes the outer predicate one bool for the batch, so
        # steps without an event skip the mask computation for all seeds.
        new = jax.lax.cond(_any_in_batch(which != 0), lambda _: jax.lax.switch(which, branches, None),
                           lambda _: old, None)
        check_mask(params, new, mask_name=f"mask returned by sparse-training method {method.name!r}")

        kept = jax.tree.map(jnp.logical_and, old, new)
        grown = jax.tree.map(lambda o, n: n & ~o, old, new)
        updates = jax.tree.map(lambda u, p, k: jnp.where(k, u, (-jnp.asarray(p)).astype(jnp.result_type(u))),
                               inner_updates, params, kept)
        inner_state = _reset_where(optimizer, inner_state, grown, params)
        return updates, SparseTrainingState(inner_state, MaskedUpdatesState(new),
                                            optax.safe_int32_increment(count), state.key)

    return optax.GradientTransformation(init, update)


def seed(opt_state, key: jax.Array):
    """``opt_state`` with the key of every :class:`SparseTrainingState` in it replaced:
    the ``i``-th (in flatten order) gets ``jax.random.fold_in(key, i)``. Returns
    ``opt_state`` itself when it holds none. Jittable and vmappable (a raw ``uint32`` key
    is wrapped into a typed one, so the state keeps its dtype).

    :func:`lottojax.train.make_trainer`'s ``init(key)`` calls it with
    ``jax.random.fold_in(key, 1)``.

    Examples:
      >>> tx = sparse_training(optax.sgd(0.1), 'static', periodic(0.5, every=10))
      >>> state = seed(tx.init({'w': jnp.zeros((2, 2))}), jax.random.key(3))
      >>> bool(jax.random.key_data(state.key).tolist() == jax.random.key_data(jax.random.fold_in(jax.random.key(3), 0)).tolist())
      True
      >>> seed((), jax.random.key(3))
      ()
    """
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_sparse_state) if _is_sparse_state(n)]
    if not found:
        return opt_state
    if not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    counter = iter(range(len(found)))

    def swap(node):
        if not _is_sparse_state(node):
            return node
        return node._replace(key=jax.random.fold_in(key, next(counter)))

    return jax.tree.map(swap, opt_state, is_leaf=_is_sparse_state)
