"""Common corruptions and last-layer geometry: the measurements of the robustness lottery.

Li et al. compare pruning methods by how their tickets respond to corrupted inputs, and
explain the accuracy drop through the geometry of the last layer: a logit is
``z_c = ‖w_c‖ ‖f‖ cos θ_c + b_c``, so a corruption can move the feature ``f`` away from its
class (the angle ``θ_y``), shrink it (``‖f‖``) or cross a decision boundary (the margin).

- :data:`IMAGE_CORRUPTIONS` (images ``(N, H, W, C)`` in ``[0, 1]``): Gaussian noise, blur,
  contrast, brightness and quantisation; :data:`SIGNAL_CORRUPTIONS` (1-D signals ``(N, L)``
  such as MNIST-1D): noise, shift, scale, blur, drift and dropout. Each is a pure function
  ``(key, x, severity) -> x`` with severities 1-5 (the parameter of each severity is in
  :data:`SEVERITIES`), deterministic by key, jittable and vmappable; ``severity`` may be a
  Python int (checked) or a traced integer.
- :func:`last_layer_geometry`: per example the angle to the true class, the feature norm and
  the margin ``min_{j≠y} (z_y − z_j) / ‖w_y − w_j‖`` (the distance to the nearest decision
  boundary of the linear head); :func:`head_features` reads the features ``f`` (the input
  of the head layer) off any Flax linen model of :mod:`lottojax.models`.

Examples:
  >>> x = jnp.full((1, 4, 4, 1), 0.5)
  >>> y = corrupt("brightness", jax.random.key(0), x, severity=2)
  >>> float(y[0, 0, 0, 0])
  0.7
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Corruption = Callable[[jax.Array, jax.Array, Union[int, jax.Array]], jax.Array]

#: Per corruption, its parameter at severities 1..5 (the meaning is in each function's doc).
SEVERITIES = MappingProxyType({
    # images, pixel values in [0, 1]
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # noise std
    "blur": (0.5, 0.75, 1.0, 1.5, 2.0),  # Gaussian kernel std, pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the distance to the image mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "quantise": (32, 16, 8, 4, 2),  # grey levels kept
    # 1-D signals (MNIST-1D is standardised: std ≈ 1)
    "signal_noise": (0.1, 0.2, 0.3, 0.5, 0.8),  # noise std
    "shift": (1, 2, 3, 4, 6),  # samples, direction random per example
    "scale": (1.05, 1.1, 1.2, 1.3, 1.5),  # time stretch (or squeeze, random per example)
    "signal_blur": (0.5, 1.0, 1.5, 2.0, 3.0),  # Gaussian kernel std, samples
    "drift": (0.25, 0.5, 1.0, 1.5, 2.0),  # linear trend: rise over the whole signal, random sign
    "dropout": (0.05, 0.1, 0.2, 0.3, 0.5),  # fraction of samples set to 0
})

_BLUR_RADIUS = 6  # static kernel half-width: 3 std of the largest blur


def _parameter(name: str, severity) -> jax.Array:
    """``SEVERITIES[name][severity - 1]``; a Python ``severity`` is checked, a traced one clipped."""
    if isinstance(severity, (int, np.integer)) and not 1 <= int(severity) <= 5:
        raise ValueError(f"severity={severity} must be an integer in 1..5")
    table = jnp.asarray(SEVERITIES[name], jnp.float32)
    return table[jnp.clip(jnp.asarray(severity, jnp.int32), 1, 5) - 1]


def _check_rank(x: jax.Array, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"x has shape {x.shape}; this corruption takes {what}")


def _gaussian_kernel(std: jax.Array) -> jax.Array:
    offsets = jnp.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (offsets / std) ** 2)
    return weights / weights.sum()


def _smooth(x: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
    """Convolves ``x`` along ``axis`` with a symmetric kernel, edges repeated."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (_BLUR_RADIUS, _BLUR_RADIUS)
    padded = jnp.pad(x, pad, mode="edge")
    length = x.shape[axis]
    return sum(w * jax.lax.slice_in_dim(padded, i, i + length, axis=axis) for i, w in enumerate(kernel))


# --- images ---------------------------------------------------------------------------


def gaussian_noise(key, x, severity):
    """Adds ``N(0, σ²)`` noise to every pixel, then clips to ``[0, 1]``."""
    _check_rank(x, 4, "images (N, H, W, C)")
    return jnp.clip(x + _parameter("gaussian_noise", severity) * jax.random.normal(key, x.shape), 0.0, 1.0)


def blur(key, x, severity):
    """Gaussian blur of std ``σ`` pixels (separable, edges repeated); ``key`` is unused."""
    _check_rank(x, 4, "images (N, H, W, C)")
    kernel = _gaussian_kernel(_parameter("blur", severity))
    return _smooth(_smooth(x, kernel, axis=1), kernel, axis=2)


def contrast(key, x, severity):
    """Scales each image's distance to its mean by ``c`` (lower contrast); ``key`` unused."""
    _check_rank(x, 4, "images (N, H, W, C)")
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return jnp.clip((x - mean) * _parameter("contrast", severity) + mean, 0.0, 1.0)


def brightness(key, x, severity):
    """Adds ``b`` to every pixel, then clips to ``[0, 1]``; ``key`` is unused."""
    _check_rank(x, 4, "images (N, H, W, C)")
    return jnp.clip(x + _parameter("brightness", severity), 0.0, 1.0)


def quantise(key, x, severity):
    """Keeps ``n`` evenly spaced grey levels (the blocky loss of heavy JPEG compression,
    without its block transform); ``key`` is unused."""
    _check_rank(x, 4, "images (N, H, W, C)")
    steps = _parameter("quantise", severity) - 1.0
    return jnp.round(jnp.clip(x, 0.0, 1.0) * steps) / steps


# --- 1-D signals ----------------------------------------------------------------------


def signal_noise(key, x, severity):
    """Adds ``N(0, σ²)`` to every sample."""
    _check_rank(x, 2, "signals (N, L)")
    return x + _parameter("signal_noise", severity) * jax.random.normal(key, x.shape)


def shift(key, x, severity):
    """Shifts each signal by ``s`` samples left or right (random per example), the vacated
    end filled with the edge value."""
    _check_rank(x, 2, "signals (N, L)")
    s = _parameter("shift", severity).astype(jnp.int32)
    sign = jnp.where(jax.random.bernoulli(key, 0.5, (x.shape[0],)), 1, -1)
    positions = jnp.clip(jnp.arange(x.shape[1])[None, :] - sign[:, None] * s, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, positions, axis=1)


def scale(key, x, severity):
    """Stretches (or squeezes, random per example) each signal in time by ``a`` about its
    centre, by linear interpolation; outside the signal the edge value is kept."""
    _check_rank(x, 2, "signals (N, L)")
    factor = _parameter("scale", severity)
    factor = jnp.where(jax.random.bernoulli(key, 0.5, (x.shape[0],)), factor, 1.0 / factor)
    length = x.shape[1]
    centre = (length - 1) / 2.0
    source = jnp.clip(centre + (jnp.arange(length)[None, :] - centre) / factor[:, None], 0.0, length - 1.0)
    low = jnp.floor(source).astype(jnp.int32)
    high = jnp.minimum(low + 1, length - 1)
    weight = source - low
    return (1 - weight) * jnp.take_along_axis(x, low, 1) + weight * jnp.take_along_axis(x, high, 1)


def signal_blur(key, x, severity):
    """Gaussian smoothing of std ``σ`` samples (edges repeated); ``key`` is unused."""
    _check_rank(x, 2, "signals (N, L)")
    return _smooth(x, _gaussian_kernel(_parameter("signal_blur", severity)), axis=1)


def drift(key, x, severity):
    """Adds a linear trend rising (or falling, random per example) by ``d`` over the signal,
    zero at its centre."""
    _check_rank(x, 2, "signals (N, L)")
    sign = jnp.where(jax.random.bernoulli(key, 0.5, (x.shape[0],)), 1.0, -1.0)
    ramp = jnp.linspace(-0.5, 0.5, x.shape[1])
    return x + sign[:, None] * _parameter("drift", severity) * ramp[None, :]


def dropout(key, x, severity):
    """Sets a fraction ``p`` of the samples of each signal to 0 (independently per sample)."""
    _check_rank(x, 2, "signals (N, L)")
    return jnp.where(jax.random.bernoulli(key, _parameter("dropout", severity), x.shape), 0.0, x)


#: Corruptions of images ``(N, H, W, C)`` in ``[0, 1]``, by name.
IMAGE_CORRUPTIONS = MappingProxyType({
    "gaussian_noise": gaussian_noise, "blur": blur, "contrast": contrast, "brightness": brightness,
    "quantise": quantise,
})
#: Corruptions of 1-D signals ``(N, L)`` (MNIST-1D), by name.
SIGNAL_CORRUPTIONS = MappingProxyType({
    "signal_noise": signal_noise, "shift": shift, "scale": scale, "signal_blur": signal_blur, "drift": drift,
    "dropout": dropout,
})
CORRUPTIONS = MappingProxyType({**IMAGE_CORRUPTIONS, **SIGNAL_CORRUPTIONS})


def corruptions_for(x_shape: tuple) -> tuple[str, ...]:
    """The corruption names that apply to inputs of shape ``(N, ...)``.

    Examples:
      >>> corruptions_for((8, 40))
      ('signal_noise', 'shift', 'scale', 'signal_blur', 'drift', 'dropout')
    """
    if len(x_shape) == 4:
        return tuple(IMAGE_CORRUPTIONS)
    if len(x_shape) == 2:
        return tuple(SIGNAL_CORRUPTIONS)
    raise ValueError(f"inputs of shape {tuple(x_shape)}: corruptions exist for images (N, H, W, C) "
                     "and 1-D signals (N, L)")


def corrupt(name: str, key: jax.Array, x: jax.Array, severity) -> jax.Array:
    """``CORRUPTIONS[name](key, x, severity)``, with the name checked."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} unknown; choose from {tuple(CORRUPTIONS)}")
    return CORRUPTIONS[name](key, x, severity)


class Geometry(NamedTuple):
    """Per example: the angle (radians) between the feature and the true class's weight
    vector, the feature norm, and the margin (signed distance to the nearest decision
    boundary; negative when misclassified)."""

    angle: jax.Array
    feature_norm: jax.Array
    margin: jax.Array


def last_layer_geometry(features: jax.Array, kernel: jax.Array, bias: jax.Array, labels: jax.Array) -> Geometry:
    """The geometry of a linear head ``z = f @ kernel + bias`` (Flax layout: ``kernel`` is
    ``(features, classes)``) at each example's true class ``y``.

    Examples:
      >>> f = jnp.array([[1.0, 1.0]]); w = jnp.array([[1.0, 0.0], [0.0, 2.0]]); b = jnp.zeros(2)
      >>> g = last_layer_geometry(f, w, b, jnp.array([0]))
      >>> round(float(g.angle[0]), 4), round(float(g.feature_norm[0]), 4), round(float(g.margin[0]), 4)
      (0.7854, 1.4142, -0.4472)
    """
    features, kernel, bias = jnp.asarray(features), jnp.asarray(kernel), jnp.asarray(bias)
    if features.ndim != 2 or kernel.ndim != 2 or features.shape[1] != kernel.shape[0]:
        raise ValueError(f"features {features.shape} and kernel {kernel.shape} must be (N, d) and (d, classes)")
    if bias.shape != (kernel.shape[1],) or labels.shape != (features.shape[0],):
        raise ValueError(f"bias {bias.shape} must be ({kernel.shape[1]},) and labels {labels.shape} "
                         f"({features.shape[0]},)")
    logits = features @ kernel + bias
    w_true = kernel.T[labels]  # (N, d)
    norm = jnp.linalg.norm(features, axis=1)
    cosine = jnp.sum(features * w_true, axis=1) / jnp.maximum(norm * jnp.linalg.norm(w_true, axis=1), 1e-12)
    z_true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    gaps = (z_true - logits) / jnp.maximum(jnp.linalg.norm(w_true[:, :, None] - kernel[None], axis=1), 1e-12)
    others = jnp.arange(kernel.shape[1])[None, :] != labels[:, None]
    margin = jnp.min(jnp.where(others, gaps, jnp.inf), axis=1)
    return Geometry(angle=jnp.arccos(jnp.clip(cosine, -1.0, 1.0)), feature_norm=norm, margin=margin)


def head_features(model, params, model_state, x: jax.Array, *, head: str = "output") -> tuple[jax.Array, jax.Array]:
    """``(features, logits)`` of a :class:`lottojax.models.Model` built from Flax linen, in
    evaluation mode: ``features`` is the input of the layer named ``head`` (the last
    ``nn.Dense``; every model of :mod:`lottojax.models` names it ``'output'``). Jittable.

    Examples:
      >>> from lottojax.models import create
      >>> model = create('mlp', input_shape=(40,), hidden=(8,))
      >>> params, state = model.init(jax.random.key(0))
      >>> f, logits = head_features(model, params, state, jnp.ones((2, 40)))
      >>> f.shape, bool(jnp.allclose(f @ params['output']['kernel'] + params['output']['bias'], logits))
      ((2, 8), True)
    """
    captured = []

    def capture(next_fun, args, kwargs, context):
        if context.module.name == head and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        logits, _ = model.apply(params, model_state, x, False)
    if len(captured) != 1:
        raise ValueError(f"head={head!r}: the model called a layer of that name {len(captured)} times (needs "
                         "exactly once); pass the name of its last Dense layer")
    return captured[0].reshape(x.shape[0], -1), logits
