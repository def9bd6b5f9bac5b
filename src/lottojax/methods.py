"""Pruning methods as values: one registry, one factory signature, one mask builder.

A :class:`PruningMethod` says how to *score* the parameters (higher = keep), in how many
rounds to reach the target, and (optionally) its own per-layer distribution. Every method
is built by a factory ``factory(**hparams) -> PruningMethod``; :data:`METHODS` maps names
to factories, so IMP, pruning at initialisation and new experiments select methods the
same way (``get_method('snip', batch_size=100)``), and :func:`prune_with` turns any method
into a mask. Adding a method is one factory and one line in :data:`METHODS`; a method that
is not registered is passed as a value (``PruningMethod('mine', my_scores)``) wherever a
name is accepted, with no global mutation.

Registered methods (names as in the pruning-at-init experiment):

- ``'magnitude'``: ``|θ|`` (:func:`lottojax.magnitude`);
- ``'random'``: i.i.d. uniform scores (:func:`lottojax.random_scores`);
- ``'random-erk'``: random scores, per-layer densities by ERK (its ``scope`` is ``'erk'``);
- ``'snip'``: :func:`lottojax.snip` on ``batch_size`` examples drawn with the key;
- ``'grasp'``: :func:`lottojax.grasp` on a class-balanced sample
  (:func:`lottojax.class_balanced_sample`), temperature ``T``;
- ``'synflow'``: :func:`lottojax.synflow`, data-free, ``rounds`` rounds (exponential schedule).

Data-driven methods read what they need from a :class:`ScoreContext`; a method that needs a
field that is ``None`` raises a ``ValueError`` naming the field and the method.

Every score is computed on the *masked* parameters (``apply_mask(params, mask)``), so a
pruned entry scores as if it were zero (SynFlow needs this; for the others it is the
natural choice when re-pruning a ticket).
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax import scores as _scores
from lottojax.masks import (
    PyTree,
    Spec,
    apply_mask,
    check_mask,
    check_same_shapes,
    leaves_with_paths,
    prunable_leaves,
    resolve_spec,
)
from lottojax.prune import remove_lowest_global

ScoreFn = Callable[..., PyTree]

SCOPES = ("global", "layerwise", "erk", "er", "uniform")
_DISTRIBUTIONS = {"erk": "erk", "er": "erdos_renyi", "uniform": "uniform"}


class ScoreContext(NamedTuple):
    """What data-driven scores may use. Every field defaults to ``None``.

    Attributes:
      apply_fn: ``(params, x) -> logits`` in training mode (model state, e.g. BatchNorm
        statistics, closed over), e.g. ``lambda p, x: model.apply(p, state, x, True)[0]``.
        SNIP and GraSP.
      eval_apply_fn: ``(params, x) -> logits`` in evaluation mode (BatchNorm on running
        statistics). SynFlow. For a network without BatchNorm, the same as ``apply_fn``.
      x: training inputs to sample batches from, examples on the first axis.
      y: integer labels of ``x``.
      input_shape: the shape of one example (no batch axis); default ``x.shape[1:]``.
      num_classes: number of classes (GraSP's class-balanced sample needs it under ``jit``
        when ``y`` is traced; default ``max(y) + 1``).
    """

    apply_fn: Optional[Callable[[PyTree, jax.Array], jax.Array]] = None
    eval_apply_fn: Optional[Callable[[PyTree, jax.Array], jax.Array]] = None
    x: Optional[jax.Array] = None
    y: Optional[jax.Array] = None
    input_shape: Optional[tuple[int, ...]] = None
    num_classes: Optional[int] = None


class PruningMethod(NamedTuple):
    """A pruning method as a value.

    Attributes:
      name: a short name (the registry key for registered methods).
      scores: ``(params, *, key, context, prunable) -> scores``, a pytree like ``params``
        (higher = keep). Pure: jittable and vmappable over a leading seed axis of
        ``params`` and ``key``. ``context`` is a :class:`ScoreContext`; ``prunable`` the
        caller's prunable spec (GraSP restricts its gradient to it). A method that needs
        neither may take ``**unused``.
      rounds: rounds to reach the target: round ``k`` of ``n`` keeps
        ``alive0 * (target / alive0) ** (k / n)`` entries (SynFlow's exponential
        schedule), rescoring the masked parameters each round; the last keeps exactly the
        target. ``1`` is one-shot.
      scope: the method's own distribution (``'erk'``, ``'er'``, ``'uniform'``,
        ``'global'``, ``'layerwise'``), which overrides the caller's; ``None`` uses the
        caller's.

    ``PruningMethod`` is a ``NamedTuple``: ``method._replace(rounds=10)`` is a variant.

    Examples:
      >>> mine = PruningMethod('neg-magnitude', lambda p, **unused: jax.tree.map(lambda w: -jnp.abs(w), p))
      >>> params = {'w': jnp.array([[1., -3., 2., .5]])}
      >>> prune_with(mine, params, {'w': jnp.ones((1, 4), bool)}, key=jax.random.key(0), keep=1)['w']  # keeps the smallest |w|
      Array([[False, False, False,  True]], dtype=bool)
    """

    name: str
    scores: ScoreFn
    rounds: int = 1
    scope: Optional[str] = None


def _need(context: ScoreContext, field: str, method: str, hint: str = "") -> Any:
    value = getattr(context, field)
    if value is None:
        raise ValueError(
            f"pruning method {method!r} needs context.{field}, which is None; pass "
            f"context=ScoreContext({field}=...){hint}"
        )
    return value


def _input_shape(context: ScoreContext, method: str) -> tuple[int, ...]:
    if context.input_shape is not None:
        return tuple(context.input_shape)
    if context.x is not None:
        return tuple(jnp.shape(context.x)[1:])
    _need(context, "input_shape", method, " (the shape of one example, no batch axis)")


def _positive_int(value, name: str, method: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{method}: hyperparameter {name}={value!r} must be an int >= 1")
    return int(value)


# ---------------------------------------------------------------------------------------
# Factories: one signature, factory(**hparams) -> PruningMethod.


def magnitude() -> PruningMethod:
    """Magnitude pruning: scores ``|θ|``.

    Examples:
      >>> params = {'w': jnp.array([[.1, -2., .3, 4.]])}
      >>> prune_with(magnitude(), params, {'w': jnp.ones((1, 4), bool)}, key=jax.random.key(0), fraction=.5)['w']
      Array([[False,  True, False,  True]], dtype=bool)
    """

    def scores(params, *, key, context, prunable):
        del key, context, prunable
        return _scores.magnitude(params)

    return PruningMethod("magnitude", scores)


def random() -> PruningMethod:
    """Random pruning: i.i.d. uniform scores from the key (one global threshold by default,
    so every layer keeps the target density in expectation).

    Examples:
      >>> params = {'w': jnp.zeros((4, 5))}
      >>> mask = prune_with(random(), params, {'w': jnp.ones((4, 5), bool)}, key=jax.random.key(0), keep=7)
      >>> int(mask['w'].sum())
      7
    """

    def scores(params, *, key, context, prunable):
        del context, prunable
        return _scores.random_scores(params, key=key)

    return PruningMethod("random", scores)


def random_erk() -> PruningMethod:
    """Random scores within each layer, per-layer densities by ERK (``scope='erk'``).

    Examples:
      >>> params = {'a': jnp.zeros((20, 20)), 'b': jnp.zeros((20, 4))}
      >>> mask = prune_with(random_erk(), params, jax.tree.map(lambda p: jnp.ones(p.shape, bool), params),
      ...                   key=jax.random.key(0), keep=48)
      >>> int(mask['a'].sum()), int(mask['b'].sum())  # densities 7.5% and 22.5%: the narrow layer keeps more
      (30, 18)
    """
    return random()._replace(name="random-erk", scope="erk")


def snip(batch_size: int = 100) -> PruningMethod:
    """SNIP (Lee et al. 2019): :func:`lottojax.snip` on ``batch_size`` examples of
    ``context.x, context.y`` drawn without replacement with the key
    (``jax.random.choice(key, len(x), (batch_size,), replace=False)``), the network as
    ``context.apply_fn`` (training mode).

    Examples:
      >>> get_method('snip', batch_size=32).name
      'snip'
    """
    batch_size = _positive_int(batch_size, "batch_size", "snip")

    def scores(params, *, key, context, prunable):
        apply_fn = _need(context, "apply_fn", "snip", " (training mode)")
        x, y = _need(context, "x", "snip"), _need(context, "y", "snip")
        n = jnp.shape(x)[0]
        if batch_size > n:
            raise ValueError(f"snip: batch_size={batch_size} is more than the {n} examples in context.x")
        index = jax.random.choice(key, n, (batch_size,), replace=False)
        return _scores.snip(params, apply_fn=apply_fn, batch=(x[index], y[index]), prunable=prunable)

    return PruningMethod("snip", scores)


def grasp(per_class: int = 10, temperature: float = 200.0) -> PruningMethod:
    """GraSP (Wang et al. 2020): :func:`lottojax.grasp` at ``temperature`` on
    :func:`lottojax.class_balanced_sample` of ``context.x, context.y`` (``per_class``
    examples of each class, drawn with the key), the network as ``context.apply_fn``.

    Examples:
      >>> get_method('grasp', per_class=5).name
      'grasp'
    """
    per_class = _positive_int(per_class, "per_class", "grasp")
    if not isinstance(temperature, (int, float, np.floating, np.integer)) or not temperature > 0:
        raise ValueError(f"grasp: hyperparameter temperature={temperature!r} must be a number > 0")

    def scores(params, *, key, context, prunable):
        apply_fn = _need(context, "apply_fn", "grasp", " (training mode)")
        x, y = _need(context, "x", "grasp"), _need(context, "y", "grasp")
        batch = _scores.class_balanced_sample(x, y, per_class=per_class, key=key, num_classes=context.num_classes)
        return _scores.grasp(params, apply_fn=apply_fn, batch=batch, temperature=temperature, prunable=prunable)

    return PruningMethod("grasp", scores)


def synflow(rounds: int = 100, dtype=None) -> PruningMethod:
    """SynFlow (Tanaka et al. 2020): :func:`lottojax.synflow` of the masked parameters on
    ``context.eval_apply_fn`` (BatchNorm in evaluation mode), ``rounds`` rounds with the
    exponential schedule (the paper: 100). Data-free; needs ``context.input_shape`` (or
    ``context.x``).

    Args:
      rounds: rounds of rescoring and pruning.
      dtype: computation dtype (``jnp.float64`` with 64-bit JAX for deep nets, see
        :func:`lottojax.synflow`); wide scores are divided by their maximum and ranked in
        float32, as :func:`lottojax.synflow_mask` does.

    Examples:
      >>> params = {'w0': jnp.array([[1., -2., .1]]), 'w1': jnp.array([[3.], [.5], [4.]])}
      >>> ctx = ScoreContext(eval_apply_fn=lambda p, x: jax.nn.relu(x @ p['w0']) @ p['w1'], input_shape=(1,))
      >>> mask = prune_with(synflow(rounds=3), params, jax.tree.map(lambda p: jnp.ones(p.shape, bool), params),
      ...                   key=jax.random.key(0), context=ctx, keep=2)
      >>> mask['w0'].tolist(), mask['w1'].tolist()
      ([[True, False, False]], [[True], [False], [False]])
    """
    rounds = _positive_int(rounds, "rounds", "synflow")
    _scores.check_dtype(dtype)
    wide = dtype is not None and jnp.dtype(dtype).itemsize > 4

    def scores(params, *, key, context, prunable):
        del key, prunable
        apply_fn = _need(context, "eval_apply_fn", "synflow",
                         " (BatchNorm in evaluation mode; for a net without BatchNorm, the same as apply_fn)")
        out = _scores.synflow(params, apply_fn=apply_fn, input_shape=_input_shape(context, "synflow"), dtype=dtype)
        if wide:
            top = jnp.max(jnp.stack([jnp.max(s) for s in jax.tree.leaves(out)]))
            out = jax.tree.map(lambda s: (s / top).astype(jnp.float32), out)
        return out

    return PruningMethod("synflow", scores, rounds=rounds)


def iterative_snip(batch_size: int = 100, rounds: int = 100) -> PruningMethod:
    """SNIP applied progressively (the schedule of FORCE, de Jorge et al. 2021): ``rounds``
    rounds of the exponential schedule, each rescoring the *masked* network on a fresh
    batch, so weights that only matter with their neighbours gone are not cut early.

    Examples:
      >>> get_method('iterative-snip', rounds=10).rounds
      10
    """
    return snip(batch_size)._replace(name="iterative-snip", rounds=_positive_int(rounds, "rounds", "iterative-snip"))


METHODS: Mapping[str, Callable[..., PruningMethod]] = types.MappingProxyType({
    "magnitude": magnitude,
    "random": random,
    "random-erk": random_erk,
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
    "iterative-snip": iterative_snip,
})
"""The registry: name -> factory. Read-only; pass a :class:`PruningMethod` value for a
method that is not registered."""


def get_method(name: str, **hparams) -> PruningMethod:
    """The registered method ``name`` built with ``hparams``.

    Raises:
      ValueError: for an unknown name (listing the registered ones), or a hyperparameter
        the factory does not take (listing the ones it does) or rejects.

    Examples:
      >>> get_method('synflow', rounds=10).rounds
      10
      >>> get_method('snipp')
      Traceback (most recent call last):
      ...
      ValueError: pruning method 'snipp' is not registered; registered: 'magnitude', 'random', 'random-erk', 'snip', 'grasp', 'synflow', 'iterative-snip' (or pass a PruningMethod value)
      >>> get_method('snip', batch=10)
      Traceback (most recent call last):
      ...
      ValueError: pruning method 'snip' has no hyperparameter 'batch'; it takes: batch_size
    """
    return from_registry(METHODS, name, hparams, kind="pruning method", value_type="PruningMethod")


def from_registry(registry: Mapping[str, Callable], name: str, hparams: dict, *, kind: str, value_type: str):
    """``registry[name](**hparams)``, with errors that list the registered names or the
    hyperparameters the factory takes (every registry of methods shares it)."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(
            f"{kind} {name!r} is not registered; registered: "
            f"{', '.join(repr(n) for n in registry)} (or pass a {value_type} value)"
        )
    factory = registry[name]
    accepted = list(inspect.signature(factory).parameters)
    for hparam in hparams:
        if hparam not in accepted:
            takes = ", ".join(accepted) if accepted else "no hyperparameters"
            raise ValueError(f"{kind} {name!r} has no hyperparameter {hparam!r}; it takes: {takes}")
    return factory(**hparams)


def resolve_method(method, **hparams) -> PruningMethod:
    """A :class:`PruningMethod` from a registered name (with ``hparams``) or a method value
    (returned as is; hyperparameters then belong in the value: ``method._replace(...)``).

    Examples:
      >>> resolve_method('magnitude').name, resolve_method(get_method('random')).name
      ('magnitude', 'random')
    """
    if isinstance(method, PruningMethod):
        if hparams:
            raise ValueError(
                f"hyperparameters {sorted(hparams)} apply to registered names; the PruningMethod value "
                f"{method.name!r} is already built (use method._replace(...) or its own factory)"
            )
        return method
    if isinstance(method, str):
        return get_method(method, **hparams)
    raise TypeError(f"method must be a registered name or a PruningMethod, got {type(method).__name__}")


# ---------------------------------------------------------------------------------------
# The mask builder.


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_fraction(value, *, leaf: Optional[str] = None, scope: str = "global", origin: str = "") -> None:
    """Concrete fractions must be one number in [0, 1); traced ones are clipped later."""
    if not _is_concrete(value):
        return
    try:
        concrete = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        concrete = None
    where = f" for {leaf}" if leaf is not None else f" with scope={scope!r}{origin}"
    if concrete is None or concrete.shape != ():
        hint = "" if leaf is not None else "; per-leaf fractions need scope='layerwise'"
        raise ValueError(f"fraction{where} must be one number, got {type(value).__name__}{hint}")
    if not 0.0 <= float(concrete) < 1.0:
        raise ValueError(
            f"fraction={float(concrete)}{where} is outside [0, 1): it is the fraction of the currently "
            "alive prunable entries to remove (0.2 removes 20%)"
        )


def _remove_count(fraction, alive: jax.Array) -> jax.Array:
    """``round(fraction * alive)`` in float32, halves to even (the rule of lottojax.prune)."""
    product = jnp.asarray(fraction, jnp.float32) * alive.astype(jnp.float32)
    return jnp.clip(jnp.round(product).astype(jnp.int32), 0, alive)


def _check_keep(keep, total: int) -> None:
    if not _is_concrete(keep):
        if not jnp.issubdtype(jnp.result_type(keep), jnp.integer):
            raise ValueError(f"keep must be an integer count, got dtype {jnp.result_type(keep)}")
        return
    value = np.asarray(keep)
    if value.shape != () or not (np.issubdtype(value.dtype, np.integer) or float(value) == int(value)):
        raise ValueError(f"keep={keep!r} must be an integer count of prunable entries to keep")
    if not 0 <= int(value) <= total:
        raise ValueError(f"keep={int(value)} is outside [0, {total}] (the number of prunable entries)")


def _raw_densities(shapes: list[tuple[int, ...]], distribution: str) -> np.ndarray:
    """The unscaled per-leaf densities of :mod:`lottojax.distributions`."""
    raw = []
    for shape in shapes:
        if distribution == "uniform":
            raw.append(1.0)
            continue
        dims = shape[-2:] if distribution == "erdos_renyi" else shape
        raw.append(float(np.sum(dims)) / float(np.prod(dims, dtype=np.float64)))
    return np.asarray(raw, np.float64)


@functools.partial(jax.jit, static_argnames=("shapes", "distribution"))
def _distribution_counts(target: jax.Array, alive: jax.Array, *, shapes: tuple[tuple[int, ...], ...],
                         distribution: str) -> jax.Array:
    """Per-leaf kept counts summing to exactly ``target`` (traced int, at most
    ``sum(alive)``): leaf ``l`` keeps ``ε r_l n_l`` (``r_l`` the raw density of
    :mod:`lottojax.distributions`, ``n_l`` its size), capped at its ``alive`` count with ``ε``
    solved again over the uncapped leaves (from a dense mask the cap is ``n_l``: RigL's
    density cap at 1, so the densities are :func:`lottojax.layer_densities`'), then
    ``floor`` plus one for the leaves with the largest remainders."""
    sizes = jnp.asarray([float(np.prod(s)) for s in shapes], jnp.float32)
    raw = jnp.asarray(_raw_densities(list(shapes), distribution), jnp.float32)
    weight = raw * sizes
    caps = alive.astype(jnp.float32)
    budget = target.astype(jnp.float32)

    def scale_of(capped):
        free = jnp.sum(jnp.where(capped, 0.0, weight))
        return (budget - jnp.sum(jnp.where(capped, caps, 0.0))) / jnp.where(free > 0, free, 1.0)

    capped = jnp.zeros(len(shapes), bool)
    for _ in range(len(shapes)):  # water-filling: the capped set only grows, so L passes suffice
        capped = capped | (scale_of(capped) * weight > caps)
    wanted = jnp.where(capped, caps, jnp.minimum(caps, scale_of(capped) * weight))
    base = jnp.clip(jnp.floor(wanted), 0, caps).astype(jnp.int32)
    remainder = wanted - base
    deficit = target - jnp.sum(base)
    # One more entry for the leaves with the largest remainders among those below their cap
    # (one fewer for the smallest, should float error overshoot); ties to the lower index.
    up_key = jnp.where(base < alive, remainder, -jnp.inf)
    up_rank = jnp.argsort(jnp.argsort(-up_key, stable=True), stable=True)
    down_key = jnp.where(base > 0, remainder, jnp.inf)
    down_rank = jnp.argsort(jnp.argsort(down_key, stable=True), stable=True)
    return base + (up_rank < deficit).astype(jnp.int32) - (down_rank < -deficit).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("per_leaf",))
def _keep_lowest(scores: list, masks: list, keep: jax.Array, *, per_leaf: bool) -> list:
    """The prunable mask leaves with only the ``keep`` highest-scoring alive entries left, in
    all (``keep`` a scalar) or per leaf (``keep`` a vector). Jitted as a unit, so an eager
    call compiles once per shape instead of op by op."""
    if not per_leaf:
        return remove_lowest_global(scores, masks, lambda alive: alive - keep, prunable=True)
    return [remove_lowest_global(s, m, lambda alive: alive - keep[j], prunable=True)
            for j, (s, m) in enumerate(zip(scores, masks))]


def prune_with(
    method,
    params: PyTree,
    mask: PyTree,
    *,
    key: jax.Array,
    context: Optional[ScoreContext] = None,
    fraction=None,
    keep=None,
    scope: str = "global",
    prunable: Spec = None,
) -> PyTree:
    """Prunes ``mask`` further by ``method``'s scores of ``apply_mask(params, mask)``.

    The amount is exactly one of:

    - ``fraction``: remove ``round(fraction * alive)`` of the ``alive`` prunable entries
      (float32 product, halves to even, as :func:`lottojax.prune_global`). With
      ``scope='global'`` a float in ``[0, 1)`` (one threshold across layers); with
      ``scope='layerwise'`` a float, a prefix pytree or a rule ``(path, leaf) -> float``
      applied per leaf to that leaf's alive count (as :func:`lottojax.prune_layerwise`).
    - ``keep``: keep exactly ``keep`` prunable entries in all (an int; clipped to the alive
      count, since masks only shrink). Not with ``scope='layerwise'``.

    With ``scope`` in ``('erk', 'er', 'uniform')`` the global target ``K`` (``keep``, or
    ``alive - round(fraction * alive)``) is split over the prunable leaves by
    :func:`lottojax.layer_densities` at density ``K / N`` (``N`` prunable entries; ``'er'``
    is Erdős–Rényi), rounded so the leaves' counts sum to exactly ``K`` (largest
    remainders). From a mask that is already sparse, a leaf keeps at most its alive
    entries, and the others share what it cannot keep in the same proportions (as
    ``layer_densities`` caps densities at 1), so the total is still exactly ``K``.
    ``method.scope``, when set, overrides ``scope``.

    With ``method.rounds = n > 1`` the target is reached in ``n`` rounds (one
    ``lax.fori_loop``, compiled once): round ``k`` rescores the masked parameters and keeps
    ``round(alive0 * (T / alive0) ** (k / n))`` (float32) of the prunable entries (per leaf
    for the per-leaf scopes, ``T`` the target), the last round exactly ``T``. Round ``k``
    scores with ``jax.random.fold_in(key, k)``; a one-round method with ``key`` itself.

    Pure: jittable (``fraction``/``keep`` may be traced) and vmappable over a leading seed
    axis of ``params``, ``mask`` and ``key``. Masks only shrink. Non-prunable leaves are
    returned unchanged.

    Args:
      method: a registered name (default hyperparameters; use :func:`get_method` for
        others) or a :class:`PruningMethod`.
      params: the parameters to score (masked by ``mask`` first).
      mask: the current bool mask (structure and shapes of ``params``).
      key: the random key (random scores, sampled batches).
      context: a :class:`ScoreContext` for data-driven methods.
      fraction: fraction of the alive prunable entries to remove (see above).
      keep: number of prunable entries to keep (see above).
      scope: ``'global'``, ``'layerwise'``, ``'erk'``, ``'er'`` or ``'uniform'``.
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``).

    Returns:
      The new bool mask, same structure as ``mask``.

    Examples:
      >>> params = {'a': jnp.array([[1., -2.]]), 'b': jnp.array([[3., .5], [-4., 5.]])}
      >>> mask = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
      >>> new = prune_with('magnitude', params, mask, key=jax.random.key(0), keep=3)
      >>> new['a'].tolist(), new['b'].tolist()
      ([[False, False]], [[True, False], [True, True]])
      >>> new = prune_with('magnitude', params, mask, key=jax.random.key(0), fraction=.5, scope='layerwise')
      >>> new['a'].tolist(), new['b'].tolist()
      ([[False, True]], [[False, False], [True, True]])
    """
    method = resolve_method(method)
    origin = ""
    if method.scope is not None:
        scope, origin = method.scope, f" (the scope of pruning method {method.name!r})"
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}{origin} unknown; choose from {SCOPES}")
    rounds = method.rounds
    if isinstance(rounds, (bool, np.bool_)) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"pruning method {method.name!r}: rounds={rounds!r} must be an int >= 1")
    if (fraction is None) == (keep is None):
        raise ValueError("pass exactly one of fraction= (remove that fraction of the alive entries) "
                         "and keep= (the number of prunable entries to keep)")
    context = ScoreContext() if context is None else context
    if not isinstance(context, ScoreContext):
        raise TypeError(f"context must be a lottojax.methods.ScoreContext, got {type(context).__name__}")
    check_mask(params, mask)
    paths, _, _, flags = prunable_leaves(params, prunable, name="params")
    _, mask_leaves, treedef = leaves_with_paths(mask)
    picked = [i for i, f in enumerate(flags) if f]
    shapes = [tuple(jnp.shape(mask_leaves[i])) for i in picked]
    total = sum(int(np.prod(s)) for s in shapes)
    alive0 = [jnp.sum(mask_leaves[i], dtype=jnp.int32) for i in picked]

    per_leaf = scope != "global"
    if scope == "layerwise":
        if keep is not None:
            raise ValueError(f"scope='layerwise'{origin} takes fraction= (per leaf); keep= is a global count: "
                             "use scope='global', or 'uniform' for the same density in every layer")
        fractions = resolve_spec(fraction, params, name="fraction", default=None)
        targets = []
        for i, a in zip(picked, alive0):
            _check_fraction(fractions[i], leaf=paths[i])
            targets.append(a - _remove_count(fractions[i], a))
        targets = jnp.stack(targets)
    else:
        alive_all = sum(alive0)
        if keep is not None:
            _check_keep(keep, total)
            target = jnp.clip(jnp.asarray(keep).astype(jnp.int32), 0, alive_all)
        else:
            _check_fraction(fraction, scope=scope, origin=origin)
            target = alive_all - _remove_count(fraction, alive_all)
        if per_leaf:
            targets = _distribution_counts(target, jnp.stack(alive0), shapes=tuple(shapes),
                                           distribution=_DISTRIBUTIONS[scope])
        else:
            targets = target
    start = jnp.stack(alive0) if per_leaf else sum(alive0)
    ratio = jnp.where(start > 0, targets.astype(jnp.float32) / jnp.maximum(start, 1).astype(jnp.float32), 1.0)

    def one_round(k, mask, round_key):
        scores = method.scores(apply_mask(params, mask), key=round_key, context=context, prunable=prunable)
        check_same_shapes(params, scores, a_name="params", b_name=f"scores of pruning method {method.name!r}")
        if rounds == 1:
            keep_k = targets
        else:
            scheduled = jnp.round(ratio ** (k / rounds) * start.astype(jnp.float32)).astype(jnp.int32)
            keep_k = jnp.where(k == rounds, targets, scheduled)
        m_leaves, s_leaves = jax.tree.leaves(mask), jax.tree.leaves(scores)
        kept = _keep_lowest([jnp.asarray(s_leaves[i], jnp.float32) for i in picked], [m_leaves[i] for i in picked],
                            keep_k, per_leaf=per_leaf)
        new = list(m_leaves)
        for i, m in zip(picked, kept):
            new[i] = m
        return jax.tree.unflatten(treedef, new)

    if rounds == 1:
        return one_round(1, mask, key)
    return jax.lax.fori_loop(1, rounds + 1, lambda k, m: one_round(k, m, jax.random.fold_in(key, k)), mask)
