"""Structured masks: whole output channels (filters), and N:M groups.

Both functions follow the pruning functions of :mod:`lottojax.prune`: ``(scores, mask,
...) -> mask``, pure, jittable, vmappable; masks only shrink; exact counts; lower scores
go first, ties by the lower index, ``NaN`` ranks as ``-inf``.

- :func:`prune_channels`: one decision per output channel of each prunable leaf, from the
  L1 or L2 norm of its alive scores (with ``scores = magnitude(params)``: filter pruning by
  weight norm, Li et al. 2017), expanded to every entry of that channel.
- :func:`prune_nm`: N:M sparsity (``n=2, m=4`` is the 2:4 pattern of sparse tensor
  cores): in every group of ``m`` consecutive entries along ``axis``, the ``n``
  highest-scoring alive entries stay.

Masks cover the kernels only: a pruned output channel's BatchNorm shift (or bias) still
adds a constant, as in the masked-network view of structured pruning; physically removing
the channel also removes those and the next layer's inputs.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from lottojax.masks import PyTree, Spec, check_mask, leaves_with_paths, prunable_flags
from lottojax.prune import lowest_alive, map_prunable_leaves, prune_count

NORMS = ("l1", "l2")


def _axis(axis: int, ndim: int, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for leaf {path} with {ndim} dimensions")
    return axis % ndim


def _channel_norms(scores: jax.Array, alive: jax.Array, norm: str) -> jax.Array:
    """``(..., C)`` → ``(C,)``: the norm of each channel's alive scores."""
    values = jnp.where(alive, jnp.asarray(scores, jnp.float32), 0.0).reshape(-1, scores.shape[-1])
    if norm == "l1":
        return jnp.sum(jnp.abs(values), axis=0)
    return jnp.sqrt(jnp.sum(values * values, axis=0))


def prune_channels(
    scores: PyTree, mask: PyTree, fraction, *, norm: str = "l1", axis: int = -1, prunable: Spec = None
) -> PyTree:
    """Removes ``round(fraction * alive channels)`` lowest-norm output channels per leaf.

    A channel is the slice of a leaf at one index of ``axis`` (default ``-1``: the output
    channels of Flax kernels, ``(in, out)`` and ``(h, w, in, out)``); it is alive while any
    of its entries is alive, and its score is the L1 or L2 norm of its alive entries'
    scores. A removed channel is removed whole (every entry of the slice); the count is
    exact, as in :func:`lottojax.prune_layerwise`.

    Args:
      scores: a pytree like the parameters; ``magnitude(params)`` gives norm-based filter
        pruning, other scores (e.g. SNIP) give their channel-summed variants.
      mask: the current bool mask; the result is a subset of it.
      fraction: float in ``[0, 1)`` or a per-leaf spec, of the alive channels to remove.
      norm: ``'l1'`` or ``'l2'``.
      axis: the channel axis of every prunable leaf.
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``).

    Returns:
      The new mask, same structure as ``mask``.

    Examples:
      >>> import lottojax as lj
      >>> w = jnp.array([[1., -5., 0.5], [1., 0.1, 0.5]])  # channel norms (l1): 2, 5.1, 1
      >>> mask = prune_channels(lj.magnitude({'w': w}), lj.ones_like({'w': w}), 0.34)
      >>> mask['w']  # round(0.34 * 3) = 1 channel goes: the last
      Array([[ True,  True, False],
             [ True,  True, False]], dtype=bool)
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} unknown; choose from {NORMS}")
    check_mask(scores, mask, params_name="scores")

    def prune_leaf(path, m, s, frac):
        channel_axis = _axis(axis, m.ndim, path)
        m_last = jnp.moveaxis(m, channel_axis, -1)
        s_last = jnp.moveaxis(jnp.asarray(s), channel_axis, -1)
        alive = jnp.any(m_last.reshape(-1, m_last.shape[-1]), axis=0)
        count = prune_count(frac, jnp.sum(alive, dtype=jnp.int32))
        removed = lowest_alive(_channel_norms(s_last, m_last, norm), alive, count)
        return jnp.moveaxis(m_last & ~removed, -1, channel_axis)

    return map_prunable_leaves(prune_leaf, scores, mask, fraction, prunable)


def prune_nm(scores: PyTree, mask: PyTree, *, n: int, m: int, axis: int = -2, prunable: Spec = None) -> PyTree:
    """N:M sparsity: of every ``m`` consecutive entries along ``axis``, keep the ``n`` best.

    Groups are ``m`` consecutive indices of ``axis`` (default ``-2``: the input axis of
    Flax kernels, ``(in, out)`` and ``(h, w, in, out)``, the reduction dimension that
    sparse tensor cores group). In each group the ``n`` highest-scoring *alive* entries stay,
    so from a dense mask every group keeps exactly ``n``; a group with fewer than ``n``
    alive entries keeps those it has. Ties: the lower index goes first.

    Args:
      scores: a pytree like the parameters.
      mask: the current bool mask; the result is a subset of it.
      n: entries kept per group, ``1 <= n <= m``.
      m: the group size; ``axis`` must have a length divisible by ``m`` in every prunable
        leaf.
      axis: the axis along which groups run.
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``).

    Returns:
      The new mask, same structure as ``mask``.

    Examples:
      >>> import lottojax as lj
      >>> w = jnp.array([[4., 1.], [-3., 2.], [0.5, 3.], [2., -4.]])  # (in=4, out=2)
      >>> prune_nm(lj.magnitude({'w': w}), lj.ones_like({'w': w}), n=2, m=4)['w']
      Array([[ True, False],
             [ True, False],
             [False,  True],
             [False,  True]], dtype=bool)
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"n={n!r}, m={m!r}: need integers with 1 <= n <= m (2:4 is n=2, m=4)")
    check_mask(scores, mask, params_name="scores")
    paths, mask_leaves, treedef = leaves_with_paths(mask)
    flags = prunable_flags(mask, prunable)
    new_leaves = []
    for path, alive, s, flag in zip(paths, mask_leaves, jax.tree.leaves(scores), flags):
        if not flag:
            new_leaves.append(alive)
            continue
        group_axis = _axis(axis, alive.ndim, path)
        length = alive.shape[group_axis]
        if length % m:
            raise ValueError(
                f"leaf {path} has shape {alive.shape}: its axis {axis} has length {length}, not a "
                f"multiple of m={m}; choose another axis= or leave the leaf out with prunable="
            )
        new_leaves.append(_keep_top_n_per_group(jnp.asarray(s), alive, n=n, m=m, axis=group_axis))
    return jax.tree.unflatten(treedef, new_leaves)


@partial(jax.jit, static_argnames=("n", "m", "axis"))
def _keep_top_n_per_group(scores: jax.Array, alive: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    s = jnp.moveaxis(scores, axis, -1)
    a = jnp.moveaxis(alive, axis, -1)
    shape = a.shape
    s = s.reshape(*shape[:-1], shape[-1] // m, m)
    a = a.reshape(s.shape)
    key = jnp.where(jnp.isnan(s), -jnp.inf, s).astype(jnp.float32)
    index = jnp.broadcast_to(jnp.arange(m), s.shape)
    order = jnp.lexsort((index, key, a), axis=-1)  # ascending: dead, then low score, then low index
    rank = jnp.argsort(order, axis=-1)
    kept = a & (rank >= m - n)
    return jnp.moveaxis(kept.reshape(shape), -1, axis)
