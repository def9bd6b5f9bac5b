"""Rewinding (params, mask → params) and the two standard controls of the LTH paper.

- :func:`rewind`: survivors take their values at initialisation (``θ0``) or at an early
  step ``k`` (``θk``); pruned entries are 0. This is how a winning ticket is drawn.
- :func:`random_reinit`: the same mask on a fresh initialisation (the "random
  reinitialisation" control: is the *initialisation* special?).
- :func:`shuffle_mask`: the mask's entries permuted within each layer, keeping each
  layer's density (the "random pruning" control: is the *structure* special?).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lottojax.masks import PyTree, Spec, apply_mask, check_same_shapes, prunable_flags


def rewind(params: PyTree, to: PyTree, mask: PyTree) -> PyTree:
    """Resets ``params`` to ``to`` (``θ0`` or ``θk``) and zeroes the pruned entries.

    Every leaf, biases included, takes its value from ``to``, as in Frankle & Carbin.
    ``params`` is checked against ``to`` so that a rewind point from another network
    fails loudly instead of silently training the wrong thing.

    Examples:
      >>> trained = {'w': jnp.array([5., -6., 0.1])}
      >>> theta0 = {'w': jnp.array([1., 2., 3.])}
      >>> rewind(trained, theta0, {'w': jnp.array([True, True, False])})
      {'w': Array([1., 2., 0.], dtype=float32)}
    """
    check_same_shapes(params, to, a_name="params", b_name="to")
    return apply_mask(to, mask)


def random_reinit(init_fn: Callable[[jax.Array], PyTree], mask: PyTree, *, key: jax.Array) -> PyTree:
    """The mask applied to a fresh initialisation ``init_fn(key)``.

    Examples:
      >>> init = lambda k: {'w': jax.random.normal(k, (3,))}
      >>> p = random_reinit(init, {'w': jnp.array([True, False, True])}, key=jax.random.key(1))
      >>> float(p['w'][1])
      0.0
    """
    return apply_mask(init_fn(key), mask)


def shuffle_mask(mask: PyTree, *, key: jax.Array, prunable: Spec = None) -> PyTree:
    """Permutes each prunable leaf's mask entries at random: same count per layer.

    Examples:
      >>> m = {'w': jnp.array([[True, False, False], [False, False, True]])}
      >>> int(shuffle_mask(m, key=jax.random.key(0))['w'].sum())
      2
    """
    leaves, treedef = jax.tree.flatten(mask)
    flags = prunable_flags(mask, prunable)
    keys = jax.random.split(key, len(leaves))
    shuffled = [
        jax.random.permutation(k, m.reshape(-1)).reshape(m.shape) if flag else m
        for k, m, flag in zip(keys, leaves, flags)
    ]
    return jax.tree.unflatten(treedef, shuffled)
