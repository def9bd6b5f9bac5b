"""lottojax: lottery-ticket research in JAX.

Masks are bool pytrees shaped like the parameters; scoring, pruning and rewinding are pure,
jittable, vmappable functions; an optax transform keeps pruned weights at exactly zero;
Early-Bird detection is a pure state machine over mask distances.
"""
from lottojax.early_bird import (
    EarlyBird,
    EarlyBirdState,
    bn_scales,
    channel_mask,
    detect_early_bird,
    early_bird_detector,
    hamming_distance,
    mask_distance_matrix,
    slimming_penalty,
    weight_mask,
)
from lottojax.masks import apply_mask, check_mask, density, format_report, layer_report, ones_like, sparsity
from lottojax.optim import MaskedUpdatesState, get_mask, masked_updates, set_mask
from lottojax.prune import prune_global, prune_layerwise, rates_by_layer
from lottojax.rewind import random_reinit, rewind, shuffle_mask
from lottojax.scores import magnitude, random_scores

__version__ = "0.1.0"

__all__ = [
    "EarlyBird",
    "EarlyBirdState",
    "MaskedUpdatesState",
    "apply_mask",
    "bn_scales",
    "channel_mask",
    "check_mask",
    "density",
    "detect_early_bird",
    "early_bird_detector",
    "format_report",
    "get_mask",
    "hamming_distance",
    "layer_report",
    "magnitude",
    "mask_distance_matrix",
    "masked_updates",
    "ones_like",
    "prune_global",
    "prune_layerwise",
    "random_reinit",
    "random_scores",
    "rates_by_layer",
    "rewind",
    "set_mask",
    "shuffle_mask",
    "slimming_penalty",
    "sparsity",
    "weight_mask",
]
