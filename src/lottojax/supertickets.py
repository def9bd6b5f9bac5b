"""SuperTickets (You et al., ECCV 2022): channel search and weight pruning in one run.

The joint search trains a supernet with

- network slimming on the BatchNorm scales, each layer's L1 penalty weighted by its share of
  the FLOPs, ``ρ(t) · Σ_l π_l Σ|γ_l|`` with ``ρ`` ramped up linearly (that is
  :func:`lottojax.slimming_penalty` with ``layer_weights=flops_weights(...)`` and an
  ``optax.linear_schedule`` strength);
- every few epochs, physical removal of the channels whose ``|γ|`` and its running average
  are both at most a threshold (:func:`removable_channels`, then
  :func:`lottojax.slimming.channel_plan` / :func:`~lottojax.slimming.shrink_train_state`);
- gradual global magnitude pruning to the sparsity :func:`pruning_sparsity` of the epoch.

When a layer is rebuilt smaller, its weights can get an all-ones mask (the reference code:
earlier-pruned weights come back, :func:`rebuilt_mask` with ``reactivate=True``) or keep
their mask. Each pruning event prunes exactly to the schedule's sparsity
(:func:`prune_to_sparsity`); :func:`event_due` says which epochs have an event.
:mod:`lottojax.experiments.supertickets` runs the whole search.

Examples:
  >>> [pruning_sparsity(e, every=3, step=0.1, target=0.9) for e in (0, 1, 2, 5, 30)]
  [0.0, 0.0, 0.1, 0.2, 0.9]
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.compact import count
from lottojax.early_bird import bn_scales
from lottojax.masks import PyTree, Spec, leaves_with_paths, prunable_flags
from lottojax.prune import remove_lowest_global
from lottojax.scores import magnitude


def pruning_sparsity(epoch, *, every: int, step: float, target: float):
    """The global sparsity after ``epoch`` (0-based) of gradual pruning: ``min(step *
    ⌊(epoch + 1) / every⌋, target)`` (the reference code's 10% steps every 25 epochs is
    ``step=0.1, every=25``). Works on Python and traced integers.
    """
    if every < 1 or not 0 < step <= 1 or not 0 <= target < 1:
        raise ValueError(f"every={every} must be >= 1, step={step} in (0, 1] and target={target} in [0, 1)")
    events = (epoch + 1) // every
    if isinstance(events, (int, np.integer)):
        return round(min(step * int(events), target), 10)
    return jnp.minimum(step * events, target)


def flops_weights(params: PyTree, name: str, *, input_shape: tuple, select: Spec = None,
                  **model_kwargs) -> dict[str, float]:
    """``π_l`` of each BatchNorm scale ``bn{i}/scale``: the dense forward FLOPs of the layer
    it gates (``conv{i}``) per channel, over the network's total dense forward FLOPs.

    Examples:
      >>> from lottojax.models import create
      >>> net = create('cnn1d', input_shape=(40,), num_classes=10, channels=(4, 8))
      >>> params = jax.eval_shape(net.init, jax.random.key(0))[0]
      >>> w = flops_weights(jax.tree.map(jnp.zeros_like, params), 'cnn1d', input_shape=(40,), channels=(4, 8))
      >>> {k: round(v, 5) for k, v in w.items()}  # conv0 2*5*1*4*20 = 800, conv1 3200 of 5600 FLOPs
      {'bn0/scale': 0.03571, 'bn1/scale': 0.07143}
    """
    counts = count(params, name=name, input_shape=tuple(input_shape), xla=False, **model_kwargs)
    total = counts.total.flops_dense
    weights = {}
    for path, gamma in bn_scales(params, select=select).items():
        layer = path.rsplit("/", 1)[0].replace("bn", "conv")
        if layer not in counts.layers:
            raise ValueError(f"{path}: no layer {layer!r} in the FLOP counts of {name!r} (layers: {sorted(counts.layers)})")
        weights[path] = counts.layers[layer].flops_dense / gamma.shape[0] / total
    return weights


def update_scale_averages(averages: Optional[Mapping[str, jax.Array]], params: PyTree, *, decay: float = 0.9,
                          select: Spec = None) -> dict[str, jax.Array]:
    """Running averages of ``|γ|`` per BatchNorm scale: ``decay * avg + (1 - decay) * |γ|``
    (``averages=None`` starts at ``|γ|``)."""
    scales = {k: jnp.abs(v) for k, v in bn_scales(params, select=select).items()}
    if averages is None:
        return scales
    if set(averages) != set(scales) or any(averages[k].shape != scales[k].shape for k in scales):
        raise ValueError("averages do not match the BatchNorm scales of params (a layer was rebuilt: "
                         "shrink the averages with the same channel plan, or restart them with None)")
    return {k: decay * averages[k] + (1 - decay) * scales[k] for k in scales}


def removable_channels(params: PyTree, averages: Mapping[str, jax.Array], *, threshold: float = 1e-3,
                       select: Spec = None) -> dict[str, np.ndarray]:
    """The channel mask that keeps a channel unless ``|γ|`` and its running average are both
    ``<= threshold`` (a layer keeps at least its largest channel, so the net stays connected).

    Examples:
      >>> params = {'bn0': {'scale': jnp.array([0.5, 1e-4, -2e-4, 1e-4]), 'bias': jnp.zeros(4)}}
      >>> averages = {'bn0/scale': jnp.array([0.5, 1e-4, 0.3, 1e-4])}
      >>> removable_channels(params, averages)['bn0/scale'].tolist()
      [True, False, True, False]
    """
    keep = {}
    for path, gamma in bn_scales(params, select=select).items():
        magnitude = np.abs(np.asarray(gamma))
        mask = (magnitude > threshold) | (np.asarray(averages[path]) > threshold)
        mask[np.argmax(magnitude)] = True
        keep[path] = mask
    return keep


def rebuilt_mask(old_mask: PyTree, shrunk_mask: PyTree, *, reactivate: bool) -> PyTree:
    """The weight mask of a net just rebuilt smaller (``shrunk_mask``: ``old_mask`` cut with
    the same channel plan). A layer is rebuilt when its leaf changed shape; with
    ``reactivate`` its mask becomes all ones, so weights pruned earlier in the surviving
    channels come back (the reference code: "connectivity may change"); layers that kept
    their shape, and every layer without ``reactivate``, keep their mask.

    Examples:
      >>> old = {'conv0': {'kernel': jnp.array([[True, False, True]])}, 'conv1': {'kernel': jnp.array([[False]])}}
      >>> shrunk = {'conv0': {'kernel': jnp.array([[False, True]])}, 'conv1': {'kernel': jnp.array([[False]])}}
      >>> new = rebuilt_mask(old, shrunk, reactivate=True)
      >>> new['conv0']['kernel'].tolist(), new['conv1']['kernel'].tolist()
      ([[True, True]], [[False]])
    """
    if jax.tree.structure(old_mask) != jax.tree.structure(shrunk_mask):
        raise ValueError("old_mask and shrunk_mask must have the same tree structure (shrink old_mask with the plan)")
    if not reactivate:
        return shrunk_mask
    return jax.tree.map(lambda old, new: new if jnp.shape(old) == jnp.shape(new) else jnp.ones_like(new, bool),
                        old_mask, shrunk_mask)


def shrink_averages(kept: Mapping[str, np.ndarray], averages: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The running averages of the channels a plan keeps (``kept``: :attr:`ChannelPlan.kept
    <lottojax.slimming.ChannelPlan.kept>`, BatchNorm layer -> surviving indices).

    Examples:
      >>> shrink_averages({'bn0': np.array([0, 2])}, {'bn0/scale': jnp.array([.1, .2, .3])})['bn0/scale'].tolist()
      [0.10000000149011612, 0.30000001192092896]
    """
    out = {}
    for path, average in averages.items():
        layer = path.rsplit("/", 1)[0]
        if layer not in kept:
            raise ValueError(f"averages[{path!r}]: the plan has no layer {layer!r} (layers: {sorted(kept)})")
        out[path] = jnp.asarray(average)[jnp.asarray(kept[layer])]
    return out


def prune_to_sparsity(params: PyTree, mask: PyTree, sparsity: float, *, prunable: Spec = None) -> PyTree:
    """Global magnitude pruning of the survivors of ``mask`` until exactly
    ``round(sparsity * N)`` of the ``N`` prunable weights are pruned (one pruning event of
    gradual pruning). A pruned weight never comes back: a mask that already prunes more is
    returned as it is.

    Examples:
      >>> params = {'w': jnp.array([[0.5, -3., 1., 2.]])}
      >>> mask = {'w': jnp.array([[True, True, False, True]])}
      >>> prune_to_sparsity(params, mask, 0.5)['w'].tolist()
      [[False, True, False, True]]
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    leaves = leaves_with_paths(params)[1]
    total = sum(int(np.prod(jnp.shape(leaf))) for leaf, flag in zip(leaves, prunable_flags(params, prunable)) if flag)
    keep = total - round(sparsity * total)
    return remove_lowest_global(magnitude(params), mask, lambda alive: alive - keep, prunable=prunable)


def event_due(epochs_done: int, *, every: int, start: int = 0, stop: Optional[int] = None) -> bool:
    """Whether an event that happens every ``every`` epochs from ``start`` (epochs done,
    1-based) until ``stop`` (inclusive; ``None``: never stops) falls after ``epochs_done`` epochs.

    Examples:
      >>> [e for e in range(1, 20) if event_due(e, every=3, start=4, stop=13)]
      [4, 7, 10, 13]
    """
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    in_window = epochs_done >= start and (stop is None or epochs_done <= stop)
    return bool(in_window and (epochs_done - start) % every == 0)
