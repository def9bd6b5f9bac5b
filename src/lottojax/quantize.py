"""Low-precision training by simulated (fake) quantisation with stochastic rounding.

The Early-Bird paper searches for tickets with 8-bit weights, activations and gradients and
retrains the ticket in full precision. Here the master weights stay float32; each training
step computes with quantised copies:

- :func:`quantize`: symmetric per-tensor quantisation to ``2**(bits-1) - 1`` levels each
  side of 0, step ``max|x| / (2**(bits-1) - 1)``, with stochastic rounding (unbiased:
  ``E[quantize(x)] = x``) or round-to-nearest;
- :func:`fake_quant`: :func:`quantize` in the forward pass, and stochastic quantisation of
  the incoming gradient in the backward pass (a ``custom_vjp``);
- :func:`low_precision` wraps a :class:`lottojax.models.Model`: kernels are fake-quantised
  before ``apply`` (so their gradients are quantised too), and so is the input of every
  Flax ``nn.Conv``/``nn.Dense`` call (activations, and the errors flowing back through them)
  via ``flax.linen.intercept_methods``. The rounding key lives in the model state, so the
  training loop needs no change. BatchNorm and the optimizer stay in full precision.
"""
from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lottojax.masks import PyTree, Spec, prunable_flags
from lottojax.models.core import Model


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} must be an int in [2, 16]")


def quantize(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
    """Quantises ``x`` to the symmetric grid ``k * max|x| / L``, ``k = -L..L``, ``L = 2**(bits-1) - 1``.

    With a ``key`` the rounding is stochastic: ``x`` goes to one of its two neighbouring
    levels with probabilities that make the result unbiased. Without one it rounds to
    the nearest level. The scale is treated as a constant (no gradient flows through it).

    Args:
      x: a float array.
      key: a PRNG key for stochastic rounding, or ``None`` for round-to-nearest.
      bits: bits per value, sign included (8: levels -127..127).

    Examples:
      >>> x = jnp.array([-1.0, 0.3, 0.5, 0.26])
      >>> quantize(x, bits=3).tolist()  # L = 3 levels each side: multiples of 1/3
      [-1.0, 0.3333333432674408, 0.6666666865348816, 0.3333333432674408]
      >>> draws = jax.vmap(lambda k: quantize(x, k, bits=3))(jax.random.split(jax.random.key(0), 20000))
      >>> [round(float(m), 2) for m in draws.mean(0)]  # unbiased
      [-1.0, 0.3, 0.5, 0.26]
    """
    _check_bits(bits)
    levels = 2 ** (bits - 1) - 1
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
    step = jnp.where(scale > 0, scale / levels, jnp.ones_like(scale))
    y = x / step
    if key is None:
        k = jnp.round(y)
    else:
        k = jnp.floor(y + jax.random.uniform(key, jnp.shape(x), x.dtype))
    return (jnp.clip(k, -levels, levels) * step).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def fake_quant(x: jax.Array, key: jax.Array, bits: int = 8) -> jax.Array:
    """Stochastic :func:`quantize` forward; the gradient is stochastically quantised backward.

    The backward pass is straight-through (the quantiser counts as the identity) followed
    by quantising the incoming cotangent with its own scale and an independent key.

    Examples:
      >>> x = jnp.array([0.2, -0.7, 1.0])
      >>> g = jax.grad(lambda x: jnp.sum(fake_quant(x, jax.random.key(0)) * jnp.array([1., .013, 2.])))(x)
      >>> bool(jnp.all(jnp.abs(g * 127 / 2 - jnp.round(g * 127 / 2)) < 1e-4))  # on the 8-bit grid of max|g| = 2
      True
    """
    return quantize(x, jax.random.fold_in(key, 0), bits=bits)


def _fake_quant_fwd(x, key, bits):
    return fake_quant(x, key, bits), key


def _fake_quant_bwd(bits, key, g):
    return quantize(g, jax.random.fold_in(key, 1), bits=bits), None


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


class LowPrecisionState(NamedTuple):
    """Model state of :func:`low_precision`: the wrapped model's state and the rounding key
    (raw ``uint32`` key data, so it checkpoints and ``jnp.where``-s like any array)."""

    model_state: PyTree
    rounding_key: jax.Array


def _quantized_inputs(step_key: jax.Array, bits: int):
    """A Flax method interceptor quantising the input of every nn.Conv / nn.Dense call."""
    from flax import linen as nn

    counter = itertools.count()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, (nn.Conv, nn.Dense)):
            return next_fun(*args, **kwargs)
        x, *rest = args
        if step_key is None:
            x = quantize(x, bits=bits)
        else:
            x = fake_quant(x, jax.random.fold_in(step_key, next(counter)), bits)
        return next_fun(x, *rest, **kwargs)

    return interceptor


def low_precision(model: Model, *, bits: int = 8, weights: Spec = None) -> Model:
    """Wraps ``model`` to train with ``bits``-bit weights, activations and gradients.

    In training mode, every selected weight leaf and the input of every Flax ``nn.Conv``
    and ``nn.Dense`` call go through :func:`fake_quant` (stochastic rounding forward and
    backward), with keys drawn from the rounding key held in the model state. In
    evaluation mode the same tensors are rounded to nearest. Models not written in Flax
    linen get quantised weights and gradients only.

    Args:
      model: the full-precision :class:`lottojax.models.Model`.
      bits: bits per value (8 in the paper).
      weights: which parameter leaves are quantised, as a prunable spec (default: kernels,
        ``ndim >= 2``; BatchNorm scales and biases stay full precision).

    Returns:
      A :class:`Model` whose state is a :class:`LowPrecisionState`. The parameters have
      the wrapped model's structure, so a ticket found with it is retrained with ``model``
      itself (take ``state.model_state`` for the BatchNorm statistics).

    Examples:
      >>> from lottojax.models import create
      >>> model = low_precision(create('cnn1d', input_shape=(40,), channels=(4, 4)))
      >>> params, state = jax.eval_shape(model.init, jax.random.key(0))  # shapes only
      >>> logits, state = jax.eval_shape(lambda p, s: model.apply(p, s, jnp.ones((2, 40)), True), params, state)
      >>> logits.shape, sorted(state.model_state['batch_stats'])
      ((2, 10), ['bn0', 'bn1'])
    """
    _check_bits(bits)

    def init(key):
        params, state = model.init(key)
        return params, LowPrecisionState(state, jax.random.key_data(jax.random.fold_in(key, 0x5EED)))

    def apply(params, state, x, train):
        if not isinstance(state, LowPrecisionState):
            raise TypeError(f"low_precision's apply needs the LowPrecisionState from its init, got {type(state).__name__}")
        flags = prunable_flags(params, weights)
        leaves, treedef = jax.tree.flatten(params)
        if train:
            weight_key, step_key, next_key = jax.random.split(jax.random.wrap_key_data(state.rounding_key), 3)
            quantized = [fake_quant(p, jax.random.fold_in(weight_key, i), bits) if f else p
                         for i, (p, f) in enumerate(zip(leaves, flags))]
            rounding_key = jax.random.key_data(next_key)
        else:
            step_key = None
            quantized = [quantize(p, bits=bits) if f else p for p, f in zip(leaves, flags)]
            rounding_key = state.rounding_key
        from flax import linen as nn

        with nn.intercept_methods(_quantized_inputs(step_key, bits)):
            logits, model_state = model.apply(jax.tree.unflatten(treedef, quantized), state.model_state, x, train)
        return logits, LowPrecisionState(model_state, rounding_key)

    return Model(init, apply)
