"""Score functions: params (and, where needed, a key) → a pytree of scores.

Higher scores are more important; the pruning functions in :mod:`lottojax.prune` remove
the lowest. Every score function returns a pytree with the structure of ``params``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lottojax.masks import PyTree


def magnitude(params: PyTree) -> PyTree:
    """``|θ|``, the score of magnitude pruning (and of IMP).

    Examples:
      >>> magnitude({'w': jnp.array([-2., 0.5])})
      {'w': Array([2. , 0.5], dtype=float32)}
    """
    return jax.tree.map(jnp.abs, params)


def random_scores(params: PyTree, *, key: jax.Array) -> PyTree:
    """I.i.d. uniform scores: pruning by them is random pruning.

    Each leaf draws from its own key (``jax.random.split`` of ``key`` by leaf index).

    Examples:
      >>> s = random_scores({'w': jnp.zeros((2, 3))}, key=jax.random.key(0))
      >>> s['w'].shape, bool((s['w'] >= 0).all() & (s['w'] < 1).all())
      ((2, 3), True)
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
    )
