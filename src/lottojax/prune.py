"""Scores → masks: remove an exact number of the lowest-scoring surviving entries.

Both functions are pure, jittable and vmappable, and masks only shrink: an entry pruned
once stays pruned. The count is exact: ``n = round(fraction * alive)`` with ``alive`` the
number of surviving prunable entries, the product taken in float32 and halves rounded to
even (``numpy.round`` semantics). Ordering is deterministic:

- lower score is pruned first; among equal scores, the lower flat index (C order) first;
- ``NaN`` scores rank as ``-inf`` (pruned first) and ``+inf`` as the largest, so
  non-finite scores never change how many entries are removed.

``fraction`` is a float in ``[0, 1)``, or (for :func:`prune_layerwise`) a per-leaf spec: a
pytree that is a prefix of the parameter tree (``{'fc0': .2, 'fc1': .2, 'output': .1}``)
or a callable ``(path, leaf) -> float``. Concrete fractions outside ``[0, 1)`` raise;
traced ones (under ``jit``) are clipped to the alive count, so they still remove an exact,
well-defined number.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.masks import PyTree, Spec, check_mask, prunable_leaves, resolve_spec


def _check_fraction(value, where: str) -> None:
    try:
        concrete = np.asarray(value, dtype=np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: clipped in prune_count
    if concrete.shape != ():
        raise ValueError(f"{where} must be a scalar, got shape {concrete.shape}")
    if not 0.0 <= float(concrete) < 1.0:
        raise ValueError(
            f"{where}={float(concrete)} is outside [0, 1): it is the fraction of the *surviving* "
            "entries to remove this round (0.2 removes 20%). To reach a target density d from "
            "density d0 in one step, use fraction = 1 - d / d0."
        )


def prune_count(fraction, alive: jax.Array) -> jax.Array:
    """How many of ``alive`` entries a ``fraction`` removes: ``round(fraction × alive)`` in
    float32, halves to even, clipped to ``[0, alive]``.

    Examples:
      >>> int(prune_count(0.2, jnp.int32(12))), int(prune_count(0.25, jnp.int32(10)))
      (2, 2)
    """
    product = jnp.asarray(fraction, jnp.float32) * alive.astype(jnp.float32)
    return jnp.clip(jnp.round(product).astype(jnp.int32), 0, alive)


def _ordered_bits(scores: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 scores (NaN as -inf, -0.0 as +0.0)."""
    key = jnp.where(jnp.isnan(scores), -jnp.inf, scores).astype(jnp.float32)
    key = jnp.where(key == 0, jnp.float32(0), key)
    bits = jax.lax.bitcast_convert_type(key, jnp.uint32)
    negative = (bits >> 31).astype(bool)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


@jax.jit
def lowest_alive(scores: jax.Array, alive: jax.Array, count: jax.Array) -> jax.Array:
    """Bool vector marking the ``count`` lowest-scoring alive entries of flat vectors.

    Ties go to the lower index. A selection, not a sort: 32 bisection steps find the
    ``count``-th smallest key ``t`` among the alive entries (each step one counting pass),
    then every alive entry below ``t`` is chosen, plus the first entries equal to ``t``
    (8-20x faster than a 3-key lexsort on CPU: experiments/benchmarks/prune_selection.py).
    Jitted as a unit: one compilation per shape when called eagerly.
    """
    key = _ordered_bits(scores)

    def bisect(_, bounds):
        lo, hi = bounds  # invariant: the count-th smallest alive key is in [lo, hi]
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(alive & (key <= mid), dtype=jnp.int32) >= count
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    bounds = (jnp.uint32(0), jnp.uint32(0xFFFFFFFF))
    threshold, _ = jax.lax.fori_loop(0, 32, bisect, bounds)
    below = alive & (key < threshold)
    at = alive & (key == threshold)
    needed = count - jnp.sum(below, dtype=jnp.int32)
    return below | (at & (jnp.cumsum(at, dtype=jnp.int32) <= needed))


def _check_inputs(scores: PyTree, mask: PyTree) -> None:
    check_mask(scores, mask, params_name="scores")


def prune_layerwise(scores: PyTree, mask: PyTree, fraction, *, prunable: Spec = None) -> PyTree:
    """Removes ``round(fraction * alive)`` lowest-scoring survivors in every prunable leaf.

    Args:
      scores: a pytree like the parameters (higher = more important).
      mask: the current bool mask; the result is a subset of it.
      fraction: float in ``[0, 1)``, or a per-leaf spec (prefix pytree or
        ``(path, leaf) -> float``), e.g. the LTH rates ``{'fc0': .2, 'fc1': .2, 'output': .1}``.
      prunable: which leaves may be pruned (default: ``ndim >= 2``).

    Returns:
      The new mask, same structure as ``mask``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lottojax import ones_like, magnitude
      >>> params = {'w': jnp.array([[0.5, -2.0], [0.1, 3.0]]), 'b': jnp.array([0.01, 9.0])}
      >>> mask = prune_layerwise(magnitude(params), ones_like(params), 0.5)
      >>> mask['w'], mask['b']  # the two smallest |w| go; biases are not prunable
      (Array([[False,  True],
             [False,  True]], dtype=bool), Array([ True,  True], dtype=bool))
    """
    _check_inputs(scores, mask)

    def prune_leaf(path, m, s, frac):
        alive = m.reshape(-1)
        count = prune_count(frac, jnp.sum(alive, dtype=jnp.int32))
        removed = lowest_alive(jnp.asarray(s).reshape(-1), alive, count)
        return (alive & ~removed).reshape(m.shape)

    return map_prunable_leaves(prune_leaf, scores, mask, fraction, prunable)


def map_prunable_leaves(prune_leaf: Callable, scores: PyTree, mask: PyTree, fraction, prunable: Spec) -> PyTree:
    """The mask with ``prune_leaf(path, mask_leaf, score_leaf, fraction)`` applied to every
    prunable leaf (its fraction checked first); the other leaves are kept."""
    paths, mask_leaves, treedef, flags = prunable_leaves(mask, prunable)
    fractions = resolve_spec(fraction, mask, name="fraction", default=None)
    new_leaves = []
    for path, m, s, flag, frac in zip(paths, mask_leaves, jax.tree.leaves(scores), flags, fractions):
        if not flag:
            new_leaves.append(m)
            continue
        _check_fraction(frac, f"fraction for {path or '<root>'}")
        new_leaves.append(prune_leaf(path, m, s, frac))
    return jax.tree.unflatten(treedef, new_leaves)


def prune_global(scores: PyTree, mask: PyTree, fraction, *, prunable: Spec = None) -> PyTree:
    """Removes ``round(fraction * alive)`` lowest-scoring survivors over all prunable leaves
    at once (one threshold across layers, as in Frankle et al.'s rewinding experiments).

    Examples:
      >>> import jax.numpy as jnp
      >>> from lottojax import ones_like
      >>> scores = {'a': jnp.array([[1., 2.]]), 'b': jnp.array([[3., 0.5], [4., 5.]])}
      >>> mask = prune_global(scores, ones_like(scores), 0.5)
      >>> mask['a'], mask['b']  # 3 of 6 go: 0.5, 1 and 2, wherever they are
      (Array([[False, False]], dtype=bool), Array([[ True, False],
             [ True,  True]], dtype=bool))
    """
    _check_fraction(fraction, "fraction")
    return remove_lowest_global(scores, mask, lambda alive: prune_count(fraction, alive), prunable=prunable)


def remove_lowest_global(scores: PyTree, mask: PyTree, count, *, prunable: Spec = None) -> PyTree:
    """Removes exactly ``count`` lowest-scoring survivors over all prunable leaves.

    The count-based core of :func:`prune_global`, for callers that know how many entries to
    remove (e.g. to keep exactly ``k`` weights): ``count`` is an int (may be traced; clipped
    to ``[0, alive]``) or a callable ``alive -> count`` of the traced number of survivors.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lottojax import ones_like
      >>> scores = {'a': jnp.array([[1., 2.]]), 'b': jnp.array([[3., 0.5]])}
      >>> keep_one = remove_lowest_global(scores, ones_like(scores), lambda alive: alive - 1)
      >>> keep_one['a'], keep_one['b']
      (Array([[False, False]], dtype=bool), Array([[ True, False]], dtype=bool))
    """
    check_mask(scores, mask, params_name="scores")
    _, mask_leaves, treedef, flags = prunable_leaves(mask, prunable)
    picked = [i for i, f in enumerate(flags) if f]
    score_leaves = jax.tree.leaves(scores)
    alive = jnp.concatenate([mask_leaves[i].reshape(-1) for i in picked])
    flat_scores = jnp.concatenate([jnp.asarray(score_leaves[i], jnp.float32).reshape(-1) for i in picked])
    alive_count = jnp.sum(alive, dtype=jnp.int32)
    count = count(alive_count) if callable(count) else count
    count = jnp.clip(jnp.asarray(count, jnp.int32), 0, alive_count)
    kept = alive & ~lowest_alive(flat_scores, alive, count)
    sizes = np.cumsum([mask_leaves[i].size for i in picked])[:-1]
    new_leaves = list(mask_leaves)
    for i, part in zip(picked, jnp.split(kept, sizes)):
        new_leaves[i] = part.reshape(mask_leaves[i].shape)
    return jax.tree.unflatten(treedef, new_leaves)


def rates_by_layer(*, conv: float, dense: float, output: float, output_name: str = "output"):
    """A per-leaf fraction spec from layer kind, as the LTH paper sets its rates.

    Leaves whose path has a component equal to ``output_name`` get ``output``; other
    leaves with ``ndim >= 3`` (conv kernels) get ``conv``; the rest get ``dense``.

    The returned ``(path, leaf) -> rate`` callable carries a ``check_tree`` hook, which
    the pruning functions call with the whole tree: if no leaf path contains
    ``output_name`` (a head named ``head``, ``out`` or ``Dense_1``), they raise
    ``ValueError`` listing the kernel paths, instead of silently giving the head the
    hidden-layer rate.

    Examples:
      >>> import jax.numpy as jnp
      >>> lth = rates_by_layer(conv=0.1, dense=0.2, output=0.1)
      >>> lth('conv0/kernel', jnp.ones((3, 3, 1, 8))), lth('fc0/kernel', jnp.ones((4, 4))), lth('output/kernel', jnp.ones((4, 2)))
      (0.1, 0.2, 0.1)
      >>> from lottojax import ones_like
      >>> params = {'Dense_0': {'kernel': jnp.ones((4, 4))}, 'Dense_1': {'kernel': jnp.ones((4, 2))}}
      >>> prune_layerwise(params, ones_like(params), lth)
      Traceback (most recent call last):
      ...
      ValueError: rates_by_layer: no leaf path has a component named 'output'... ['Dense_0/kernel', 'Dense_1/kernel']... output_name=...
    """

    def rate(path: str, leaf) -> float:
        if output_name in path.split("/"):
            return output
        return conv if jnp.ndim(leaf) >= 3 else dense

    def check_tree(paths, leaves) -> None:
        if any(output_name in path.split("/") for path in paths):
            return
        kernels = [p for p, x in zip(paths, leaves) if jnp.ndim(x) >= 2] or list(paths)
        raise ValueError(
            f"rates_by_layer: no leaf path has a component named {output_name!r}, so no layer would "
            f"get the output rate {output}; the kernel paths are {kernels[:10]}"
            f"{' ...' if len(kernels) > 10 else ''}. Pass output_name= the name of the output "
            f"layer (e.g. rates_by_layer(..., output_name='head') for 'head/kernel')."
        )

    rate.check_tree = check_tree
    return rate
