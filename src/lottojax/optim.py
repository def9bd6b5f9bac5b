"""The optimizer enforces the mask: an optax transform that zeroes pruned updates.

Put :func:`masked_updates` **last** in ``optax.chain``: whatever came before (momentum,
Adam's moments, weight decay, clipping), the update of a pruned weight is exactly 0, so
a weight that is 0 stays 0 with no multiply in the forward pass. Under ``jit``, XLA folds
the mask's select into the kernel that already adds each update to its weight, so a
masked step runs exactly the kernels of a dense one; the mask costs one 1-byte read per
weight. The mask lives in the optimizer state; :func:`set_mask` swaps in a new one with
the same shapes and dtype, so a jitted train step is not recompiled between pruning rounds.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lottojax.masks import PyTree, check_mask, ones_like


class MaskedUpdatesState(NamedTuple):
    """State of :func:`masked_updates`: the current bool mask."""

    mask: PyTree


def masked_updates(mask: Optional[PyTree] = None) -> optax.GradientTransformation:
    """Zeroes the updates of pruned weights; the mask is held in the state.

    Args:
      mask: the initial mask; ``None`` starts dense (all-True, built from the params
        given to ``init``).

    Examples:
      >>> import optax
      >>> params = {'w': jnp.array([1., 0., 3.])}
      >>> mask = {'w': jnp.array([True, False, True])}
      >>> tx = optax.chain(optax.adamw(0.1, weight_decay=0.5), masked_updates(mask))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)
      >>> float(optax.apply_updates(params, updates)['w'][1])
      0.0
    """

    def init(params):
        if mask is None:
            return MaskedUpdatesState(ones_like(params))
        check_mask(params, mask)
        return MaskedUpdatesState(mask)

    def update(updates, state, params=None):
        del params
        check_mask(updates, state.mask, params_name="updates")
        masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.mask)
        return masked, state

    return optax.GradientTransformation(init, update)


def _is_masked_state(node: Any) -> bool:
    return isinstance(node, MaskedUpdatesState)


def _masked_states(opt_state) -> list[MaskedUpdatesState]:
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(n)]
    if not found:
        raise ValueError(
            "opt_state holds no MaskedUpdatesState: build the optimizer with "
            "optax.chain(..., lottojax.masked_updates()) (last in the chain)."
        )
    return found


def set_mask(opt_state, mask: PyTree):
    """Returns ``opt_state`` with the mask of every :func:`masked_updates` inside it replaced.

    Finds the state inside any ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` or
    other wrapper. The new mask must have the old one's structure, shapes and dtype (so
    nothing recompiles).

    Examples:
      >>> import optax
      >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9), masked_updates())
      >>> state = tx.init({'w': jnp.ones(2)})
      >>> state = set_mask(state, {'w': jnp.array([True, False])})
      >>> get_mask(state)
      {'w': Array([ True, False], dtype=bool)}
    """
    old = _masked_states(opt_state)[0].mask
    check_mask(old, mask, params_name="current mask", mask_name="mask")

    def swap(node):
        return MaskedUpdatesState(mask) if _is_masked_state(node) else node

    return jax.tree.map(swap, opt_state, is_leaf=_is_masked_state)


def get_mask(opt_state) -> PyTree:
    """The mask held by the (first) :func:`masked_updates` state inside ``opt_state``."""
    return _masked_states(opt_state)[0].mask
