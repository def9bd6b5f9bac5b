"""lottojax: lottery-ticket research in JAX.

Masks are bool pytrees shaped like the parameters; scoring, pruning and rewinding are pure,
jittable, vmappable functions; an optax transform keeps pruned weights at exactly zero;
Early-Bird detection is a pure state machine over mask distances; sparse training (GMP,
static, SET, RigL) wraps any optax optimizer and STE runs through ``straight_through``.
"""
from lottojax.distributions import densities_to_fractions, erk, layer_densities
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
from lottojax.grokking import params_norm, precise_cross_entropy, scale_to_norm, steps_to_threshold, train_curves
from lottojax.jackpots import jackpot_init, make_searcher, restriction_rate, short_restriction
from lottojax.masks import apply_mask, check_mask, density, format_report, layer_report, ones_like, sparsity
from lottojax.methods import METHODS, PruningMethod, ScoreContext, get_method, prune_with
from lottojax.optim import MaskedUpdatesState, get_mask, mask_state, masked_updates, set_mask
from lottojax.prune import prune_global, prune_layerwise, rates_by_layer
from lottojax.rewind import random_reinit, rewind, shuffle_mask
from lottojax.scores import class_balanced_sample, grasp, magnitude, random_scores, snip, synflow, synflow_mask
from lottojax.seeds import map_seeds
from lottojax.sparse_training import (
    SPARSE_METHODS,
    SparseMethod,
    SparsitySchedule,
    cosine_drop_fraction,
    cubic,
    get_sparse_method,
    one_shot,
    periodic,
    sparse_training,
)
from lottojax.stability import LinearPath, error_barrier, instability, interpolate, recompute_batch_stats
from lottojax.straight_through import sr_ste_decay, ste_mask, ste_model, ste_params, straight_through
from lottojax.structured import prune_channels, prune_nm
from lottojax.tickets import Ticket, load_ticket, save_ticket

__version__ = "0.1.0"

__all__ = [
    "EarlyBird",
    "EarlyBirdState",
    "LinearPath",
    "METHODS",
    "MaskedUpdatesState",
    "PruningMethod",
    "SPARSE_METHODS",
    "ScoreContext",
    "SparseMethod",
    "SparsitySchedule",
    "Ticket",
    "apply_mask",
    "bn_scales",
    "channel_mask",
    "check_mask",
    "class_balanced_sample",
    "cosine_drop_fraction",
    "cubic",
    "densities_to_fractions",
    "density",
    "detect_early_bird",
    "early_bird_detector",
    "erk",
    "error_barrier",
    "format_report",
    "get_mask",
    "get_method",
    "get_sparse_method",
    "grasp",
    "hamming_distance",
    "instability",
    "interpolate",
    "jackpot_init",
    "layer_densities",
    "layer_report",
    "load_ticket",
    "magnitude",
    "make_searcher",
    "map_seeds",
    "mask_distance_matrix",
    "mask_state",
    "masked_updates",
    "one_shot",
    "ones_like",
    "params_norm",
    "periodic",
    "precise_cross_entropy",
    "prune_channels",
    "prune_global",
    "prune_layerwise",
    "prune_nm",
    "prune_with",
    "random_reinit",
    "random_scores",
    "rates_by_layer",
    "recompute_batch_stats",
    "restriction_rate",
    "rewind",
    "save_ticket",
    "scale_to_norm",
    "set_mask",
    "short_restriction",
    "shuffle_mask",
    "slimming_penalty",
    "snip",
    "sparse_training",
    "sparsity",
    "sr_ste_decay",
    "ste_mask",
    "ste_model",
    "ste_params",
    "steps_to_threshold",
    "straight_through",
    "synflow",
    "synflow_mask",
    "train_curves",
    "weight_mask",
]
