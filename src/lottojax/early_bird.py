"""Early-Bird tickets (You et al., ICLR 2020): mask distances and the detector, on any pytree.

During training, the mask that pruning *would* draw (channel masks from BatchNorm scales,
or per-weight magnitude masks) stops changing long before the weights converge. The
detector keeps a FIFO window of the last ``window`` masks and draws the ticket at the
first update where the newest mask is within normalised Hamming distance ``eps`` of every
older mask in the window.

Everything here is pure and jittable and works on any pytree (no Flax):

- :func:`hamming_distance`: the fraction of mask entries that differ, over whole pytrees;
- :func:`early_bird_detector` returns an :class:`EarlyBird` pair ``(init, update)`` of pure
  functions over an :class:`EarlyBirdState` (fixed shapes, so it lives in a ``lax.scan``
  or ``lax.while_loop`` carry and vmaps over seeds and pruning ratios);
- :func:`detect_early_bird` scans a stacked mask history and :func:`mask_distance_matrix`
  gives the epoch x epoch distances of the paper's heatmap;
- :func:`channel_mask` draws the paper's channel masks: ``|gamma|`` of all BatchNorm
  scales, one global threshold, an exact count; :func:`slimming_penalty` is the
  network-slimming L1 term on those scales as an optax transform.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree, Spec, check_same_shapes, leaves_with_paths, ones_like, prunable_flags
from lottojax.prune import prune_global, prune_layerwise
from lottojax.scores import magnitude


def hamming_distance(mask_a: PyTree, mask_b: PyTree) -> jax.Array:
    """The normalised Hamming distance: the fraction of all entries of two masks that differ.

    The fraction is over every entry of every leaf together (not a mean of per-leaf
    fractions), so a channel mask over several layers counts each channel once.

    Args:
      mask_a: a bool pytree.
      mask_b: a bool pytree of the same structure and leaf shapes.

    Returns:
      A float32 scalar in ``[0, 1]``.

    Examples:
      >>> a = {'bn0': jnp.array([True, True, False, False]), 'bn1': jnp.array([True, False])}
      >>> b = {'bn0': jnp.array([True, False, False, True]), 'bn1': jnp.array([True, False])}
      >>> float(hamming_distance(a, b))  # 2 of 6 entries differ
      0.3333333432674408
    """
    check_same_shapes(mask_a, mask_b, a_name="mask_a", b_name="mask_b")
    pairs = zip(jax.tree.leaves(mask_a), jax.tree.leaves(mask_b))
    differ = sum(jnp.sum(jnp.asarray(a) != jnp.asarray(b), dtype=jnp.int32) for a, b in pairs)
    total = sum(int(np.prod(jnp.shape(a))) for a in jax.tree.leaves(mask_a))
    if total == 0:
        raise ValueError("the masks have no entries; the distance is undefined")
    return differ.astype(jnp.float32) / total


class EarlyBirdState(NamedTuple):
    """State of the Early-Bird detector (fixed shapes: a valid ``scan``/``while_loop`` carry).

    Attributes:
      window: the last ``window`` masks, stacked on a leading axis, oldest first (slots not
        yet filled hold all-False masks).
      seen: int32, how many masks the detector has been given.
      distances: float32 ``(window - 1,)``, the distance of the newest mask to each older
        mask in the window, oldest first; NaN for slots not yet filled.
      epoch: int32, the ``epoch`` passed to the update at which the ticket was drawn;
        ``-1`` until then. It never changes once set.
    """

    window: PyTree
    seen: jax.Array
    distances: jax.Array
    epoch: jax.Array


class EarlyBird(NamedTuple):
    """The detector as pure functions (see :func:`early_bird_detector`).

    Attributes:
      init: ``mask -> EarlyBirdState``; ``mask`` only gives the structure and shapes.
      update: ``(state, mask, epoch) -> EarlyBirdState``: pushes ``mask`` into the window and
        draws the ticket at ``epoch`` if the window is full and all its distances are below
        ``eps``.
    """

    init: Callable[[PyTree], EarlyBirdState]
    update: Callable[[EarlyBirdState, PyTree, Any], EarlyBirdState]


def early_bird_detector(window: int = 5, eps: float = 0.1) -> EarlyBird:
    """The Early-Bird detector of You et al.: a FIFO window of masks and a distance threshold.

    An update pushes the newest mask, computes its normalised Hamming distances to the
    ``window - 1`` older masks in the window, and fires (records ``epoch``) at the first
    update where the window is full and *all* those distances are ``< eps``. The paper uses
    ``window=5, eps=0.1``.

    Args:
      window: number of masks compared (the newest and ``window - 1`` older ones); >= 2.
      eps: distance threshold in ``(0, 1]``.

    Returns:
      An :class:`EarlyBird` ``(init, update)`` pair; both jittable and vmappable (vmap the
      state and mask over seeds or over pruning ratios).

    Examples:
      >>> detector = early_bird_detector(window=2, eps=0.3)
      >>> masks = [jnp.array([1, 1, 0, 0], bool), jnp.array([1, 0, 1, 0], bool),
      ...          jnp.array([1, 0, 1, 1], bool)]
      >>> state = detector.init(masks[0])
      >>> for epoch, mask in enumerate(masks, start=1):
      ...   state = detector.update(state, mask, epoch)
      ...   print(epoch, state.distances.tolist(), int(state.epoch))
      1 [nan] -1
      2 [0.5] -1
      3 [0.25] 3
    """
    if not isinstance(window, (int, np.integer)) or window < 2:
        raise ValueError(f"window={window!r} must be an int >= 2 (the newest mask and at least one older one)")
    if not 0.0 < float(eps) <= 1.0:
        raise ValueError(f"eps={eps!r} must be in (0, 1]: it bounds a normalised Hamming distance")

    def init(mask: PyTree) -> EarlyBirdState:
        empty = jax.tree.map(lambda m: jnp.zeros((window, *jnp.shape(m)), jnp.bool_), mask)
        return EarlyBirdState(
            window=empty,
            seen=jnp.zeros((), jnp.int32),
            distances=jnp.full((window - 1,), jnp.nan, jnp.float32),
            epoch=jnp.full((), -1, jnp.int32),
        )

    def update(state: EarlyBirdState, mask: PyTree, epoch) -> EarlyBirdState:
        newest = jax.tree.map(lambda w: w[0], state.window)
        check_same_shapes(newest, mask, a_name="the detector's masks", b_name="mask")
        window_ = jax.tree.map(
            lambda w, m: jnp.concatenate([w[1:], jnp.asarray(m, jnp.bool_)[None]]), state.window, mask
        )
        older = jax.tree.map(lambda w: w[:-1], window_)
        seen = state.seen + 1
        # Older slot j holds mask number seen - window + j (0-based); it is filled if >= 0.
        filled = seen - window + jnp.arange(window - 1) >= 0
        distances = jnp.where(filled, jax.vmap(hamming_distance, (0, None))(older, mask), jnp.nan)
        fires = (state.epoch < 0) & (seen >= window) & jnp.all(distances < eps)
        fired_at = jnp.where(fires, jnp.asarray(epoch, jnp.int32), state.epoch)
        return EarlyBirdState(window_, seen, distances, fired_at)

    return EarlyBird(init, update)


def detect_early_bird(history: PyTree, *, window: int = 5, eps: float = 0.1, epochs=None) -> tuple[jax.Array, jax.Array]:
    """Runs the detector over a stacked mask history in one ``lax.scan``.

    Args:
      history: a mask pytree whose leaves have a leading time axis ``T`` (mask ``t`` is
        ``history[t]``).
      window: see :func:`early_bird_detector`.
      eps: see :func:`early_bird_detector`.
      epochs: ``(T,)`` int labels of the masks (default ``0..T-1``).

    Returns:
      ``(epoch, distances)``: the label at which the ticket was drawn (``-1`` if never) and
      the ``(T, window - 1)`` distances of each mask to the older ones in the window
      (NaN where the window was not yet full).

    Examples:
      >>> history = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]], bool)
      >>> epoch, distances = detect_early_bird(history, window=3, eps=0.3)
      >>> int(epoch), distances[2].tolist()
      (2, [0.25, 0.0])
    """
    length = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(history)}
    if len(length) != 1 or None in length:
        raise ValueError(f"every leaf of history needs the same leading time axis; got lengths {length}")
    (steps,) = length
    epochs = jnp.arange(steps, dtype=jnp.int32) if epochs is None else jnp.asarray(epochs, jnp.int32)
    if epochs.shape != (steps,):
        raise ValueError(f"epochs has shape {epochs.shape}; it needs one label per mask: ({steps},)")
    detector = early_bird_detector(window, eps)

    def body(state, step):
        mask, epoch = step
        state = detector.update(state, mask, epoch)
        return state, state.distances

    first = jax.tree.map(lambda x: x[0], history)
    state, distances = jax.lax.scan(body, detector.init(first), (history, epochs))
    return state.epoch, distances


def mask_distance_matrix(history: PyTree) -> jax.Array:
    """The ``(T, T)`` matrix of Hamming distances between all pairs of masks in a history.

    The paper's heatmap of mask distances between epochs.

    Examples:
      >>> history = {'w': jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)}
      >>> (3 * mask_distance_matrix(history)).round().astype(int).tolist()
      [[0, 1, 2], [1, 0, 1], [2, 1, 0]]
    """
    return jax.vmap(jax.vmap(hamming_distance, (None, 0)), (0, None))(history, history)


def is_bn_scale(path: str, leaf) -> bool:
    """The default selection of BatchNorm scales: 1-D leaves named ``scale`` inside a layer
    whose name contains ``bn`` (``bn0``, ``shortcut_bn``, ``bn_final``) or ``batchnorm``
    (Flax's default ``BatchNorm_0``).

    Examples:
      >>> is_bn_scale('stage0_block1/bn0/scale', jnp.ones(16)), is_bn_scale('conv0/kernel', jnp.ones((3, 1, 16)))
      (True, False)
    """
    parts = path.split("/")
    if len(parts) < 2 or parts[-1] != "scale" or jnp.ndim(leaf) != 1:
        return False
    layer = parts[-2].lower()
    return "bn" in layer or "batchnorm" in layer


def _selected(params: PyTree, select: Spec, what: str) -> list[bool]:
    flags = prunable_flags(params, is_bn_scale if select is None else select)
    if not any(flags):
        paths, _, _ = leaves_with_paths(params)
        raise ValueError(
            f"{what}: select= picks no leaf of params (paths: {paths[:8]}{'...' if len(paths) > 8 else ''}); "
            "the default picks 1-D 'scale' leaves of layers named like 'bn*'; pass select=(path, leaf) -> bool"
        )
    return flags


def bn_scales(params: PyTree, *, select: Spec = None) -> dict[str, jax.Array]:
    """The selected BatchNorm scales as a flat dict ``path -> (channels,)`` (in tree order).

    This dict is the structure of a channel mask: one bool per channel.

    Examples:
      >>> params = {'conv0': {'kernel': jnp.ones((5, 1, 2))}, 'bn0': {'scale': jnp.array([.5, -2.]), 'bias': jnp.zeros(2)}}
      >>> bn_scales(params)
      {'bn0/scale': Array([ 0.5, -2. ], dtype=float32)}
    """
    paths, leaves, _ = leaves_with_paths(params)
    flags = _selected(params, select, "bn_scales")
    return {p: x for p, x, f in zip(paths, leaves, flags) if f}


def channel_mask(params: PyTree, ratio, *, select: Spec = None) -> dict[str, jax.Array]:
    """The paper's channel mask: prune ``round(ratio * channels)`` channels of smallest ``|gamma|``
    over all BatchNorm layers at once (one global threshold).

    The count is exact (ties broken by position in tree order, then by channel index), as in
    :func:`lottojax.prune_global`; ``ratio`` may be traced (e.g. vmapped over several ratios).

    Args:
      params: the parameter pytree.
      ratio: fraction of all selected channels to prune, in ``[0, 1)``.
      select: which leaves are BatchNorm scales (default :func:`is_bn_scale`).

    Returns:
      A dict ``path -> (channels,) bool`` keyed like :func:`bn_scales` (True keeps).

    Examples:
      >>> params = {'bn0': {'scale': jnp.array([.1, -.9, .5])}, 'bn1': {'scale': jnp.array([.3, .2])}}
      >>> channel_mask(params, 0.4)  # 2 of 5 channels go: |gamma| = .1 and .2
      {'bn0/scale': Array([False,  True,  True], dtype=bool), 'bn1/scale': Array([ True, False], dtype=bool)}
    """
    scales = bn_scales(params, select=select)
    return prune_global(magnitude(scales), ones_like(scales), ratio, prunable=True)


def weight_mask(params: PyTree, ratio, *, scope: str = "global", prunable: Spec = None) -> dict[str, jax.Array]:
    """The unstructured Early-Bird mask: prune ``ratio`` of the prunable weights by magnitude.

    Returns only the prunable leaves, as a flat dict ``path -> bool array`` (so that mask
    distances count weights, not the always-kept biases and norms). The full-structure mask
    is ``prune_global(magnitude(params), ones_like(params), ratio)`` (or
    ``prune_layerwise``), whose prunable leaves these are.

    Args:
      params: the parameter pytree.
      ratio: fraction of the prunable weights to prune, in ``[0, 1)``; may be traced.
      scope: ``'global'`` (one threshold over all prunable leaves) or ``'layerwise'``.
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``).

    Examples:
      >>> params = {'w': jnp.array([[.1, -.9], [.5, .2]]), 'b': jnp.array([.0, .0])}
      >>> weight_mask(params, 0.5)
      {'w': Array([[False,  True],
             [ True, False]], dtype=bool)}
    """
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope={scope!r}: use 'global' or 'layerwise'")
    prune = prune_global if scope == "global" else prune_layerwise
    full = prune(magnitude(params), ones_like(params), ratio, prunable=prunable)
    paths, leaves, _ = leaves_with_paths(full)
    return {p: m for p, m, f in zip(paths, leaves, prunable_flags(params, prunable)) if f}


class SlimmingPenaltyState(NamedTuple):
    """:func:`slimming_penalty`'s state: the number of updates so far (the schedule's step)."""

    count: jax.Array


def slimming_penalty(strength: Union[float, Callable[[jax.Array], jax.Array]] = 1e-4, *, select: Spec = None,
                     layer_weights: Optional[Mapping[str, float]] = None) -> optax.GradientTransformation:
    """Network slimming's L1 penalty on BatchNorm scales: adds ``strength * sign(gamma)`` to
    the gradient of every selected scale and leaves every other gradient unchanged.

    Put it first in ``optax.chain`` (it acts on gradients, before momentum and the learning
    rate), as the reference code adds it to ``.grad`` before ``optimizer.step()``.

    Args:
      strength: ``s`` (the paper uses 1e-4), or a schedule ``step -> s`` (an optax schedule,
        e.g. ``optax.linear_schedule(0, rho, warmup)``: SuperTickets ramps its penalty up).
      select: which leaves are BatchNorm scales (default :func:`is_bn_scale`).
      layer_weights: a weight per selected leaf, by path (``'bn0/scale' -> π``): the penalty
        of that leaf is ``s * π * sign(gamma)`` (SuperTickets weights each layer by its share
        of the FLOPs, :func:`lottojax.supertickets.flops_weights`). Every selected leaf needs
        one. ``None``: weight 1.

    Examples:
      >>> import optax
      >>> params = {'bn0': {'scale': jnp.array([.5, -2., 0.]), 'bias': jnp.ones(3)}}
      >>> tx = optax.chain(slimming_penalty(0.1), optax.sgd(1.0))
      >>> updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
      >>> updates['bn0']['scale'].tolist(), updates['bn0']['bias'].tolist()
      ([-0.10000000149011612, 0.10000000149011612, 0.0], [0.0, 0.0, 0.0])
    """
    if not callable(strength) and float(strength) < 0:
        raise ValueError(f"strength={strength} must be >= 0")
    schedule = strength if callable(strength) else (lambda step: strength)

    def weights_of(params) -> list[float]:
        flags = _selected(params, select, "slimming_penalty")
        paths = leaves_with_paths(params)[0]
        if layer_weights is None:
            return [1.0 if f else 0.0 for f in flags]
        picked = [p for p, f in zip(paths, flags) if f]
        missing, unknown = set(picked) - set(layer_weights), set(layer_weights) - set(picked)
        if missing or unknown:
            raise ValueError(f"slimming_penalty: layer_weights must name every selected leaf and nothing else; "
                             f"missing {sorted(missing)}, not selected {sorted(unknown)} (selected: {picked})")
        return [float(layer_weights[p]) if f else 0.0 for p, f in zip(paths, flags)]

    def init(params):
        weights_of(params)
        return SlimmingPenaltyState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("slimming_penalty needs params: call tx.update(grads, state, params)")
        check_same_shapes(params, updates, a_name="params", b_name="updates")
        s = schedule(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        new = [g + (s * w * jnp.sign(p)).astype(g.dtype) if w else g
               for g, p, w in zip(leaves, jax.tree.leaves(params), weights_of(params))]
        return jax.tree.unflatten(treedef, new), SlimmingPenaltyState(count=state.count + 1)

    return optax.GradientTransformation(init, update)
