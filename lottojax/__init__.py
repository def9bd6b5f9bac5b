"""lottojax: lottery-ticket research in JAX.

Masks are bool pytrees shaped like the parameters; scoring, pruning and rewinding are pure,
jittable, vmappable functions; an optax transform keeps pruned weights at exactly zero.
"""
from lottojax.masks import apply_mask, check_mask, density, format_report, layer_report, ones_like, sparsity
from lottojax.optim import MaskedUpdatesState, get_mask, masked_updates, set_mask
from lottojax.prune import prune_global, prune_layerwise, rates_by_layer
from lottojax.rewind import random_reinit, rewind, shuffle_mask
from lottojax.scores import magnitude, random_scores
from lottojax.stability import LinearPath, error_barrier, instability, interpolate, recompute_batch_stats

__version__ = "0.1.0"

__all__ = [
    "LinearPath",
    "MaskedUpdatesState",
    "apply_mask",
    "check_mask",
    "density",
    "error_barrier",
    "format_report",
    "get_mask",
    "instability",
    "interpolate",
    "layer_report",
    "magnitude",
    "masked_updates",
    "ones_like",
    "prune_global",
    "prune_layerwise",
    "random_reinit",
    "random_scores",
    "rates_by_layer",
    "recompute_batch_stats",
    "rewind",
    "set_mask",
    "shuffle_mask",
    "sparsity",
]
