"""The optimizer enforces the mask: an optax transform that zeroes pruned updates.

Put :func:`masked_updates` **last** in ``optax.chain``: whatever came before (momentum,
Adam's moments, weight decay, clipping), the update of a pruned weight is exactly 0, so
a weight that is 0 stays 0 with no multiply in the forward pass. Under ``jit``, XLA folds
the mask's select into the kernel that already adds each update to its weight, so a
masked step runs exactly the kernels of a dense one; the mask costs one 1-byte read per
weight. The mask lives in the optimizer state; :func:`set_mask` swaps in a new one with
the same shapes and dtype, so a jitted train step is not recompiled between pruning rounds.

The optimizer only keeps pruned weights where they are: a weight must also be *zero*
where the mask is False. :func:`mask_state` does both at once (zeroes the weights and sets
the optimizer's mask) for a lottojax or Flax ``TrainState``, a ``(params, opt_state)``
pair, or an nnx ``(model, optimizer)`` pair.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree, apply_mask, check_mask, conform_mask, leaves_with_paths, ones_like


class MaskedUpdatesState(NamedTuple):
    """State of :func:`masked_updates`: the current bool mask."""

    mask: PyTree


def masked_updates(mask: Optional[PyTree] = None) -> optax.GradientTransformation:
    """Zeroes the updates of pruned weights; the mask is held in the state.

    Args:
      mask: the initial mask; ``None`` starts dense (all-True, built from the params
        given to ``init``). It is laid out like those params (see
        :func:`lottojax.masks.conform_mask`).

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
        return MaskedUpdatesState(conform_mask(params, mask))

    def update(updates, state, params=None):
        del params
        check_mask(updates, state.mask, params_name="updates")
        masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.mask)
        return masked, state

    return optax.GradientTransformation(init, update)


def _is_masked_state(node: Any) -> bool:
    return isinstance(node, MaskedUpdatesState)


def _is_nnx_optimizer(obj: Any) -> bool:
    """Duck-typed ``flax.nnx.Optimizer``: holds ``opt_state``, ``tx`` and a ``wrt`` filter."""
    return all(hasattr(obj, a) for a in ("opt_state", "tx", "wrt")) and not hasattr(obj, "params")


def _masked_states(opt_state) -> list[MaskedUpdatesState]:
    if _is_nnx_optimizer(opt_state) or (hasattr(opt_state, "params") and hasattr(opt_state, "opt_state")):
        raise ValueError(
            f"set_mask/get_mask take an optimizer state, not a {type(opt_state).__name__}: pass "
            "its .opt_state (and assign the result back), or use lottojax.mask_state(...) to zero "
            "the pruned weights and set the mask together."
        )
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(n)]
    if not found:
        raise ValueError(
            "opt_state holds no MaskedUpdatesState: build the optimizer with "
            "optax.chain(..., lottojax.masked_updates()) (last in the chain)."
        )
    return found


def _check_pruned_are_zero(params: PyTree, mask: PyTree) -> None:
    mask = conform_mask(params, mask)
    paths, leaves, _ = leaves_with_paths(params)
    for path, p, m in zip(paths, leaves, jax.tree.leaves(mask)):
        if isinstance(p, jax.core.Tracer) or isinstance(m, jax.core.Tracer):
            raise TypeError(
                "set_mask(..., params=) reads the weights' values, so it cannot run under jit or "
                "vmap: check outside the transform, or use lottojax.mask_state, which zeroes them."
            )
        nonzero = int(np.count_nonzero(np.asarray(p)[~np.asarray(m)]))
        if nonzero:
            raise ValueError(
                f"params leaf {path} has {nonzero} non-zero weights where the new mask is False: "
                "set_mask only swaps the optimizer's mask, which keeps pruned weights where they "
                "are, so they would stay frozen at non-zero values. Use lottojax.mask_state(state, "
                "mask) to zero them and set the mask together (or lottojax.apply_mask(params, mask))."
            )


def set_mask(opt_state, mask: PyTree, *, params: Optional[PyTree] = None):
    """Returns ``opt_state`` with the mask of every :func:`masked_updates` inside it replaced.

    Pure: it only swaps the optimizer's mask. It does **not** zero the weights, and the
    optimizer keeps a pruned weight where it is, so a weight that is non-zero where the
    new mask is False stays frozen at that value. To prune a training state, use
    :func:`mask_state`, which zeroes the weights and sets the mask together. Pass
    ``params=`` to have that checked: ``ValueError`` names the first leaf with a non-zero
    weight where ``mask`` is False (this reads values, so not under ``jit``).

    Finds the state inside any ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` or
    other wrapper, and inside an ``nnx.Optimizer``'s ``opt_state``
    (``optimizer.opt_state = set_mask(optimizer.opt_state, mask)``). The new mask must have
    the old one's leaf paths, shapes and dtype (so nothing recompiles); it is stored in
    the old one's containers (e.g. nnx ``OptVariable``).

    Examples:
      >>> import optax
      >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9), masked_updates())
      >>> state = tx.init({'w': jnp.ones(2)})
      >>> state = set_mask(state, {'w': jnp.array([True, False])})
      >>> get_mask(state)
      {'w': Array([ True, False], dtype=bool)}
      >>> set_mask(state, {'w': jnp.array([True, False])}, params={'w': jnp.ones(2)})
      Traceback (most recent call last):
      ...
      ValueError: params leaf w has 1 non-zero weights where the new mask is False: ... lottojax.mask_state...
    """
    old = _masked_states(opt_state)[0].mask
    mask = conform_mask(old, mask, params_name="current mask", mask_name="mask")
    if params is not None:
        _check_pruned_are_zero(params, mask)

    def swap(node):
        return MaskedUpdatesState(mask) if _is_masked_state(node) else node

    return jax.tree.map(swap, opt_state, is_leaf=_is_masked_state)


def get_mask(opt_state, *, like: Optional[PyTree] = None) -> PyTree:
    """The mask held by the (first) :func:`masked_updates` state inside ``opt_state``.

    Args:
      opt_state: an optimizer state (for nnx, ``optimizer.opt_state``).
      like: if given, the mask is returned in ``like``'s containers (e.g. the
        ``nnx.State`` of the model's params rather than the optimizer's ``OptVariable``
        copies), matched by path.

    Examples:
      >>> import optax
      >>> state = optax.chain(optax.sgd(0.1), masked_updates()).init({'w': jnp.ones(2)})
      >>> get_mask(state)
      {'w': Array([ True,  True], dtype=bool)}
    """
    mask = _masked_states(opt_state)[0].mask
    return mask if like is None else conform_mask(like, mask, params_name="like")


def _mask_nnx(model, optimizer, mask) -> None:
    from flax import nnx  # only an nnx optimizer gets here

    nnx.update(model, apply_mask(nnx.state(model, optimizer.wrt), mask))
    optimizer.opt_state = set_mask(optimizer.opt_state, mask)


def mask_state(state, mask: PyTree):
    """Prunes a training state: zeroes the weights where ``mask`` is False **and** sets the
    mask of the optimizer's :func:`masked_updates`, in one call.

    ``state`` is one of:

    - a train state with ``params`` and ``opt_state`` fields: lottojax's
      :class:`~lottojax.train.TrainState` (a NamedTuple, via ``_replace``) or Flax's
      ``flax.training.train_state.TrainState`` (via ``replace``): a new state is returned
      (pure and jittable);
    - a ``(params, opt_state)`` pair: a new pair is returned;
    - an nnx ``(model, optimizer)`` pair with a ``flax.nnx.Optimizer`` (or an
      ``nnx.ModelAndOptimizer``, which holds its model): nnx objects are mutable, so the
      model's weights and ``optimizer.opt_state`` are updated **in place**, and ``state``
      itself is returned.

    Use this, not :func:`set_mask` alone, after pruning: the optimizer keeps pruned
    weights where they are, so they must be zero first. Nothing recompiles: the mask
    keeps its shapes and dtype.

    Examples:
      >>> import optax
      >>> params = {'w': jnp.array([1., 2., 3.])}
      >>> tx = optax.chain(optax.sgd(0.1), masked_updates())
      >>> mask = {'w': jnp.array([True, False, True])}
      >>> params, opt_state = mask_state((params, tx.init(params)), mask)
      >>> params['w'], get_mask(opt_state)['w']
      (Array([1., 0., 3.], dtype=float32), Array([ True, False,  True], dtype=bool))
    """
    if hasattr(state, "params") and hasattr(state, "opt_state"):
        new = dict(params=apply_mask(state.params, mask), opt_state=set_mask(state.opt_state, mask))
        if hasattr(state, "_replace"):
            return state._replace(**new)
        if hasattr(state, "replace"):
            return state.replace(**new)
        raise TypeError(f"mask_state: {type(state).__name__} has params and opt_state but neither _replace nor replace")
    if _is_nnx_optimizer(state):
        if not hasattr(state, "model"):
            raise TypeError(
                "mask_state: an nnx.Optimizer does not hold its model (since Flax 0.11); "
                "pass the pair: mask_state((model, optimizer), mask)"
            )
        _mask_nnx(state.model, state, mask)
        return state
    if isinstance(state, tuple) and not hasattr(state, "_fields") and len(state) == 2:
        first, second = state
        if _is_nnx_optimizer(second):
            _mask_nnx(first, second, mask)
            return state
        return apply_mask(first, mask), set_mask(second, mask)
    raise TypeError(
        f"mask_state takes a train state with params and opt_state (lottojax or Flax TrainState), "
        f"a (params, opt_state) pair, or an nnx (model, optimizer) pair; got a {type(state).__name__}"
    )
