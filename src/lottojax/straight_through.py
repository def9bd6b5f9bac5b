"""Straight-through estimators, and STE / SR-STE sparse training.

:func:`straight_through` is the shared primitive: ``straight_through(hard, surrogate)``
*is* ``hard`` in the forward pass, bit for bit, and its gradient goes to ``surrogate``
unchanged (``hard`` gets a zero cotangent). It is a :func:`jax.custom_vjp`, not a
``stop_gradient`` spelling, which rounds in floating point: for float32 ``s ~ U(-3, 3)``
and ``b = (s > 0)``, ``b + s - stop_gradient(s)`` misses ``b`` on about 12% of the
entries (24% for ``b = sign(s)``), and ``s + stop_gradient(b - s)`` misses it once
``|s| >> |b|``, so a "binary" mask stops being binary. Supermask searches use it as
``weights * straight_through(mask, scores)``.

On top of it, sparse training with a magnitude mask recomputed at every step, through
which the gradient reaches *every* weight (pruned ones included, so they can come back):

- :func:`ste_mask`: the bool magnitude mask of the current weights, with an exact count
  (``sparsity`` and ``scope``, through :func:`lottojax.prune_with`) or an N:M pattern
  (``nm=(n, m)``, through :func:`lottojax.prune_nm`);
- :func:`ste_params`: ``straight_through(apply_mask(params, mask), params)``: the masked
  weights forward, the identity gradient to all weights;
- :func:`ste_model`: a :class:`lottojax.models.core.Model` whose ``apply`` runs on
  :func:`ste_params` (training and evaluation both see the sparse weights). The ticket
  at the end of training is ``ste_mask(trained_params, ...)``;
- :func:`sr_ste_decay`: SR-STE (Zhou et al. 2021), an optax transform that adds
  ``λ_w (1 − m) ⊙ θ`` to the gradient, ``m`` the current mask (N:M by default).

The SR-STE recipe (2:4, the paper's ``λ_w = 2e-4`` with SGD)::

    sparse = ste_model(model, nm=(2, 4))             # or sparsity=0.5, nm=(2, 4)
    tx = optax.chain(sr_ste_decay(2e-4, nm=(2, 4)), optax.sgd(0.1, momentum=0.9))
    # ... train sparse.apply with tx; the ticket is ste_mask(params, nm=(2, 4))

Examples:
  >>> s = jnp.array([0.4, -2.6, 1.3])
  >>> straight_through(jnp.sign(s), s)
  Array([ 1., -1.,  1.], dtype=float32)
  >>> jax.grad(lambda s: jnp.sum(straight_through(jnp.sign(s), s) * jnp.array([1., 2., 3.])))(s)
  Array([1., 2., 3.], dtype=float32)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree, Spec, apply_mask, check_same_shapes, leaves_with_paths, ones_like, prunable_leaves
from lottojax.methods import SCOPES, prune_with
from lottojax.models.core import Model
from lottojax.scores import magnitude
from lottojax.structured import prune_nm

# ---------------------------------------------------------------------------------------
# The primitive.


@jax.custom_vjp
def _straight_through_leaf(hard: jax.Array, surrogate: jax.Array) -> jax.Array:
    return hard


def _st_fwd(hard, surrogate):
    return hard, None


def _st_bwd(_, cotangent):
    return None, cotangent  # None: a zero cotangent for ``hard``


_straight_through_leaf.defvjp(_st_fwd, _st_bwd)


def _leaf_name(path: str) -> str:
    return f"leaf {path}" if path else "the array"


def _prepare_leaf(path: str, hard, surrogate) -> tuple[jax.Array, jax.Array]:
    hard, surrogate = jnp.asarray(hard), jnp.asarray(surrogate)
    where = _leaf_name(path)
    if not jnp.issubdtype(surrogate.dtype, jnp.floating):
        raise TypeError(
            f"straight_through: surrogate {where} has dtype {surrogate.dtype}; the surrogate receives "
            "the gradient, so it must be floating point"
        )
    if hard.shape != surrogate.shape:
        raise ValueError(
            f"straight_through: hard {where} has shape {hard.shape} but the surrogate has "
            f"{surrogate.shape} (no broadcasting: the gradient goes to the surrogate entry by entry)"
        )
    if jnp.issubdtype(hard.dtype, jnp.floating) or jnp.issubdtype(hard.dtype, jnp.complexfloating):
        if hard.dtype != surrogate.dtype:
            raise TypeError(
                f"straight_through: hard {where} has dtype {hard.dtype} but the surrogate has "
                f"{surrogate.dtype}; the result has the surrogate's dtype, which would round the hard "
                "value: cast one of them explicitly"
            )
        return hard, surrogate
    if hard.dtype == jnp.bool_ or jnp.issubdtype(hard.dtype, jnp.integer):
        return hard.astype(surrogate.dtype), surrogate  # exact for bools and small integers
    raise TypeError(f"straight_through: hard {where} has unsupported dtype {hard.dtype}")


def straight_through(hard: PyTree, surrogate: PyTree) -> PyTree:
    """``hard`` in the forward pass, exactly; the gradient goes to ``surrogate`` unchanged.

    Leaf by leaf, a :func:`jax.custom_vjp` whose primal output is ``hard`` itself (bit for
    bit, under ``jit`` and ``vmap`` too) and whose backward pass sends the incoming
    cotangent to ``surrogate`` as it is and a zero cotangent to ``hard``. Unlike the
    ``stop_gradient`` spellings (``b + s - stop_gradient(s)``,
    ``s + stop_gradient(b - s)``), no float arithmetic touches the forward value.

    Dtypes: the result has the *surrogate's* dtype (the gradient must flow into it). A
    bool or integer ``hard`` is cast to it, exactly for bools (``0``/``1``) and for integers
    the float dtype represents (``|v| <= 2**24`` in float32), so
    ``straight_through(mask, scores)`` is a float 0/1 mask. A floating ``hard`` must have
    the surrogate's dtype (``TypeError`` otherwise: a cast would round it). The surrogate
    must be floating point.

    Works under ``jit``, ``vmap`` and reverse-mode autodiff (``grad``, ``vjp``, ``jacrev``).
    Forward mode (``jvp``, ``jacfwd``, ``hessian``) is not available, as for every
    ``custom_vjp``.

    Args:
      hard: an array or pytree: the values of the forward pass (bool, integer or float).
      surrogate: an array or pytree of float arrays with the structure and shapes of
        ``hard``: what the gradient flows into.

    Returns:
      A pytree with the structure of ``surrogate``, equal to ``hard`` in the surrogate's
      dtype.

    Raises:
      ValueError: the structures or a leaf's shapes differ (naming the first tree path).
      TypeError: a surrogate leaf is not floating, or a float ``hard`` leaf has another dtype.

    Examples:
      >>> scores = {'w': jnp.array([0.9, -0.2, 0.5])}
      >>> mask = {'w': scores['w'] > 0}
      >>> straight_through(mask, scores)  # the bool mask, as floats
      {'w': Array([1., 0., 1.], dtype=float32)}
      >>> w = jnp.array([2., 3., 4.])
      >>> jax.grad(lambda s: jnp.sum(w * straight_through(s['w'] > 0, s['w'])))(scores)  # dL/ds = w
      {'w': Array([2., 3., 4.], dtype=float32)}
      >>> straight_through({'w': jnp.ones(2)}, {'v': jnp.ones(2)})
      Traceback (most recent call last):
      ...
      ValueError: hard does not have the structure of surrogate (paths in surrogate but not in hard: ['v']; paths in hard but not in surrogate: ['w'])
    """
    s_paths, s_leaves, s_def = leaves_with_paths(surrogate)
    if jax.tree_util.treedef_is_leaf(s_def) and jax.tree_util.treedef_is_leaf(jax.tree.structure(hard)):
        hard_leaves = [hard]
    else:
        check_same_shapes(surrogate, hard, a_name="surrogate", b_name="hard")
        hard_leaves = jax.tree.leaves(hard)
    out = []
    for path, h, s in zip(s_paths, hard_leaves, s_leaves):
        h, s = _prepare_leaf(path, h, s)
        out.append(_straight_through_leaf(h, s))
    return jax.tree.unflatten(s_def, out)


# ---------------------------------------------------------------------------------------
# STE sparse training.


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_nm(nm) -> tuple[int, int]:
    ok = (
        isinstance(nm, (tuple, list)) and len(nm) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in nm)
    )
    if not ok or not 1 <= nm[0] <= nm[1]:
        raise ValueError(f"nm={nm!r} must be a pair of ints (n, m) with 1 <= n <= m: keep n of every m (2:4 is (2, 4))")
    return int(nm[0]), int(nm[1])


def _check_sparsity_number(sparsity, what: str = "sparsity") -> None:
    if not _is_concrete(sparsity):
        return
    try:
        value = np.asarray(sparsity, dtype=np.float64)
    except (TypeError, ValueError):
        value = None
    if value is None or value.shape != ():
        raise ValueError(f"{what} must be one number in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{what}={float(value)} is outside [0, 1): it is the fraction of the prunable weights "
            "that are zero in the forward pass (0.9 keeps 10%)"
        )


def _check_mask_args(sparsity, scope, nm, nm_axis) -> Optional[tuple[int, int]]:
    """Validates the mask settings (static checks only); returns ``nm`` as a pair or None."""
    if not isinstance(nm_axis, (int, np.integer)) or isinstance(nm_axis, (bool, np.bool_)):
        raise ValueError(f"nm_axis={nm_axis!r} must be an int")
    if nm is not None:
        n, m = _check_nm(nm)
        if scope != "uniform":
            raise ValueError(
                f"scope={scope!r} does not apply with nm={nm!r}: an N:M mask keeps n of every m in every "
                "group of every prunable leaf; leave scope at its default"
            )
        if sparsity is not None:
            _check_sparsity_number(sparsity)
            if _is_concrete(sparsity) and not np.isclose(float(sparsity), 1 - n / m, rtol=0, atol=1e-6):
                raise ValueError(
                    f"sparsity={float(sparsity)} disagrees with nm={nm!r}, whose sparsity is 1 - {n}/{m} = "
                    f"{1 - n / m}; pass one of them (sparsity is optional with nm)"
                )
        return n, m
    if sparsity is None:
        raise ValueError("pass sparsity= (the fraction of prunable weights to zero, in [0, 1)) or nm=(n, m)")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} unknown; choose from {SCOPES}")
    if scope != "layerwise" or not _is_spec(sparsity):
        _check_sparsity_number(sparsity)
    return None


def _is_spec(value) -> bool:
    """A per-leaf spec (prefix pytree or rule) rather than one number."""
    return callable(value) or not jax.tree_util.treedef_is_leaf(jax.tree.structure(value))


def _keep_count(sparsity, total: int):
    """``total - round(sparsity * total)`` (float32 product, halves to even), as
    :func:`lottojax.prune_global` rounds; a Python int when ``sparsity`` is concrete."""
    if _is_concrete(sparsity):
        return total - int(np.round(np.float32(sparsity) * np.float32(total)))
    removed = jnp.round(jnp.asarray(sparsity, jnp.float32) * jnp.float32(total)).astype(jnp.int32)
    return jnp.int32(total) - jnp.clip(removed, 0, total)


def _mask_of(params, sparsity, scope, nm, nm_axis, prunable):
    nm = _check_mask_args(sparsity, scope, nm, nm_axis)
    weights = jax.lax.stop_gradient(params)
    dense = ones_like(weights)
    if nm is not None:
        prunable_leaves(weights, prunable, name="params")  # names the paths if nothing is prunable
        return prune_nm(magnitude(weights), dense, n=nm[0], m=nm[1], axis=int(nm_axis), prunable=prunable)
    key = jax.random.key(0)  # magnitude scores draw nothing
    if scope == "layerwise":
        return prune_with("magnitude", weights, dense, key=key, fraction=sparsity, scope="layerwise",
                          prunable=prunable)
    _, leaves, _, flags = prunable_leaves(weights, prunable, name="params")
    total = sum(int(np.prod(jnp.shape(x))) for x, f in zip(leaves, flags) if f)
    return prune_with("magnitude", weights, dense, key=key, keep=_keep_count(sparsity, total), scope=scope,
                      prunable=prunable)


def ste_mask(params: PyTree, *, sparsity=None, scope: str = "uniform", nm: Optional[tuple[int, int]] = None,
             nm_axis: int = -2, prunable: Spec = None) -> PyTree:
    """The bool magnitude mask of the current weights: what STE training prunes now.

    Without ``nm``: keep exactly ``K = N - round(sparsity * N)`` of the ``N`` prunable
    entries (float32 product, halves to even), those of largest ``|θ|`` (ties: the lower
    index goes first), by :func:`lottojax.prune_with` with ``keep=K`` and ``scope``:
    ``'uniform'`` (the same density ``K / N`` in every leaf, per-leaf counts rounded by
    largest remainders so they sum to exactly ``K``), ``'global'`` (one threshold over all
    leaves), ``'erk'`` / ``'er'`` (Erdős–Rényi(-Kernel) densities, summing to ``K``), or
    ``'layerwise'`` (each leaf drops ``round(sparsity * n_l)`` of its ``n_l`` entries;
    there ``sparsity`` may also be a per-leaf spec, a prefix pytree or rule
    ``(path, leaf) -> float``).

    With ``nm=(n, m)``: the N:M pattern of :func:`lottojax.prune_nm`: in every group of
    ``m`` consecutive entries along ``nm_axis`` (default ``-2``, the input axis of Flax
    kernels) the ``n`` largest ``|θ|`` stay. ``sparsity`` is then optional (if given it
    must be ``1 - n / m``) and ``scope`` does not apply.

    Non-prunable leaves (default: those with ``ndim < 2``) are all-True. Pure: jittable
    (``sparsity`` may be traced, except with ``'layerwise'``) and vmappable. No gradient
    flows through the mask.

    Examples:
      >>> params = {'w': jnp.array([[0.1, -2.], [3., 0.5]]), 'b': jnp.array([1., 0.])}
      >>> ste_mask(params, sparsity=0.5)['w']
      Array([[False,  True],
             [ True, False]], dtype=bool)
      >>> w = jnp.array([[4., 1.], [-3., 2.], [0.5, 3.], [2., -4.]])
      >>> ste_mask({'w': w}, nm=(2, 4))['w']  # 2 of every 4 along the input axis
      Array([[ True, False],
             [ True, False],
             [False,  True],
             [False,  True]], dtype=bool)
      >>> ste_mask(params, sparsity=1.0)
      Traceback (most recent call last):
      ...
      ValueError: sparsity=1.0 is outside [0, 1): ...
    """
    return _mask_of(params, sparsity, scope, nm, nm_axis, prunable)


def ste_params(params: PyTree, *, sparsity=None, scope: str = "uniform", nm: Optional[tuple[int, int]] = None,
               nm_axis: int = -2, prunable: Spec = None) -> PyTree:
    """The straight-through sparse weights: ``apply_mask(params, ste_mask(params, ...))``
    forward, the identity gradient to *all* weights.

    ``straight_through(apply_mask(params, mask), params)`` with the mask of
    :func:`ste_mask` (same arguments): a loss of ``ste_params(params)`` has the gradient
    of the dense loss evaluated at the masked weights, pruned entries included, so a
    pruned weight keeps learning and can re-enter the mask at a later step.

    Examples:
      >>> params = {'w': jnp.array([[0.1, -2.], [3., 0.5]])}
      >>> ste_params(params, sparsity=0.5)['w']
      Array([[ 0., -2.],
             [ 3.,  0.]], dtype=float32)
      >>> jax.grad(lambda p: jnp.sum(ste_params(p, sparsity=0.5)['w'] ** 2))(params)['w']  # 2 * masked w
      Array([[ 0., -4.],
             [ 6.,  0.]], dtype=float32)
      >>> jax.grad(lambda p: jnp.sum(ste_params(p, sparsity=0.5)['w']))(params)['w']  # reaches every weight
      Array([[1., 1.],
             [1., 1.]], dtype=float32)
    """
    mask = _mask_of(params, sparsity, scope, nm, nm_axis, prunable)
    return straight_through(apply_mask(params, mask), params)


def ste_model(model: Model, *, sparsity=None, scope: str = "uniform", nm: Optional[tuple[int, int]] = None,
              nm_axis: int = -2, prunable: Spec = None) -> Model:
    """``model`` trained and evaluated on its straight-through sparse weights.

    The returned :class:`~lottojax.models.core.Model` has ``model``'s ``init``; its
    ``apply(params, state, x, train)`` is ``model.apply(ste_params(params, ...), state, x,
    train)``: the magnitude mask of the current weights is recomputed at every call (every
    step), the forward pass (training and evaluation alike) sees only the kept weights,
    and the gradient reaches all of them (STE sparse training). Train ``params`` with any
    optimizer (dense updates: no :func:`lottojax.masked_updates`); the ticket at the end
    is ``ste_mask(params, ...)`` with the same settings, and
    ``apply_mask(params, ticket)`` the sparse weights the model computed with. For
    SR-STE add :func:`sr_ste_decay` first in the optimizer chain.

    The settings are checked here (``sparsity`` range, ``scope``, ``nm``); shapes (an
    ``nm`` group size that does not divide a leaf's axis) at the first ``apply``.

    Examples:
      >>> from lottojax.models.core import from_linen
      >>> from lottojax.models.mlp import MLP
      >>> dense = from_linen(MLP(hidden=(8,), num_classes=2), input_shape=(4,))
      >>> sparse = ste_model(dense, sparsity=0.75)
      >>> params, state = sparse.init(jax.random.key(0))
      >>> x = jnp.ones((1, 4))
      >>> kept = apply_mask(params, ste_mask(params, sparsity=0.75))
      >>> bool(jnp.all(sparse.apply(params, state, x, False)[0] == dense.apply(kept, state, x, False)[0]))
      True
      >>> ste_model(dense, nm=(2, 3), sparsity=0.5)
      Traceback (most recent call last):
      ...
      ValueError: sparsity=0.5 disagrees with nm=(2, 3), whose sparsity is 1 - 2/3 = ...
    """
    _check_mask_args(sparsity, scope, nm, nm_axis)
    if not hasattr(model, "init") or not hasattr(model, "apply"):
        raise TypeError(f"ste_model takes a lottojax Model (init, apply), got a {type(model).__name__}")

    def apply(params, state, x, train):
        sparse = ste_params(params, sparsity=sparsity, scope=scope, nm=nm, nm_axis=nm_axis, prunable=prunable)
        return model.apply(sparse, state, x, train)

    return Model(model.init, apply)


# ---------------------------------------------------------------------------------------
# SR-STE.


class SRSTEDecayState(NamedTuple):
    """State of :func:`sr_ste_decay`: none (the mask is recomputed from ``params``)."""


def sr_ste_decay(weight=2e-4, *, nm: Optional[tuple[int, int]] = (2, 4), nm_axis: int = -2, sparsity=None,
                 scope: str = "uniform", prunable: Spec = None) -> optax.GradientTransformation:
    """SR-STE's sparse-refined term (Zhou et al. 2021): adds ``weight · (1 − m) ⊙ θ`` to
    the gradient, ``m`` the current magnitude mask of ``params``.

    ``m`` is :func:`ste_mask` of the ``params`` passed to ``update`` (default the 2:4
    pattern; ``nm=None, sparsity=...`` for an unstructured mask with ``scope``), so only
    the pruned weights decay, towards zero, which keeps the mask from flipping back and
    forth. Put it **first** in ``optax.chain``, before the optimizer, as the paper adds it
    to the gradient (``λ_w = 2e-4`` with SGD)::

        sparse = ste_model(model, nm=(2, 4))
        tx = optax.chain(sr_ste_decay(2e-4, nm=(2, 4)), optax.sgd(0.1, momentum=0.9))

    Non-prunable leaves are not decayed. ``update`` needs ``params`` (``ValueError`` if
    ``None``). ``weight=0`` leaves the gradient unchanged. ``weight`` may be traced, e.g.
    scheduled with ``optax.inject_hyperparams(sr_ste_decay, static_args=('nm_axis',))``
    (``nm_axis`` must stay a Python int).

    Examples:
      >>> params = {'w': jnp.array([[4.], [1.], [-3.], [2.]])}   # 2:4 along the input axis keeps 4 and -3
      >>> tx = sr_ste_decay(0.5)
      >>> updates, _ = tx.update({'w': jnp.ones((4, 1))}, tx.init(params), params)
      >>> updates['w'].ravel()  # 1 + 0.5 * [0, 1, 0, 2]
      Array([1. , 1.5, 1. , 2. ], dtype=float32)
      >>> tx.update({'w': jnp.ones((4, 1))}, tx.init(params))
      Traceback (most recent call last):
      ...
      ValueError: sr_ste_decay needs params: call tx.update(grads, state, params) ...
    """
    if _is_concrete(weight):
        try:
            value = np.asarray(weight, dtype=np.float64)
        except (TypeError, ValueError):
            value = None
        if value is None or value.shape != () or not float(value) >= 0:
            raise ValueError(f"weight={weight!r} must be one number >= 0 (SR-STE's λ_w; the paper uses 2e-4)")
    _check_mask_args(sparsity, scope, nm, nm_axis)

    def init(params):
        del params
        return SRSTEDecayState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "sr_ste_decay needs params: call tx.update(grads, state, params) (the decay is "
                "weight * (1 - mask) * params, the mask recomputed from params)"
            )
        check_same_shapes(params, updates, a_name="params", b_name="updates")
        mask = _mask_of(params, sparsity, scope, nm, nm_axis, prunable)

        def decayed(u, p, m):
            term = jnp.where(m, jnp.zeros_like(p), jnp.asarray(weight, p.dtype) * p)
            return u + term.astype(u.dtype)

        return jax.tree.map(decayed, updates, params, mask), state

    return optax.GradientTransformation(init, update)
