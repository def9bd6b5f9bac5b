"""The model interface the training loop uses, and the adapter from Flax linen.

A :class:`Model` is two pure functions. ``init(key)`` returns ``(params, state)``:
the trainable parameters and the mutable model state (BatchNorm statistics; an empty
dict for nets without any). ``apply(params, state, x, train)`` returns
``(logits, new_state)``. Any framework fits behind these two functions; the training
loop, IMP and the stability tools never see Flax.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
ModelState = Any


class Model(NamedTuple):
    """A network as a pair of pure functions.

    Attributes:
      init: ``key -> (params, state)``.
      apply: ``(params, state, x, train) -> (logits, new_state)``; ``train`` is a Python
        bool (BatchNorm uses batch statistics and returns updated running statistics
        when it is True, running statistics when it is False).
    """

    init: Callable[[jax.Array], tuple[Params, ModelState]]
    apply: Callable[[Params, ModelState, jax.Array, bool], tuple[jax.Array, ModelState]]


def from_linen(module, input_shape: tuple[int, ...]) -> Model:
    """Wraps a Flax linen module whose ``__call__(x, train)`` returns logits.

    Collections other than ``params`` (``batch_stats``) become the model state and are
    updated when ``train`` is True.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train=False):
      ...     return nn.Dense(3)(x)
      >>> model = from_linen(Net(), input_shape=(4,))
      >>> params, state = model.init(jax.random.key(0))
      >>> logits, state = model.apply(params, state, jnp.ones((2, 4)), False)
      >>> logits.shape, state
      ((2, 3), {})
    """

    def init(key):
        variables = module.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
        variables = dict(variables)
        params = variables.pop("params")
        return params, variables

    def apply(params, state, x, train):
        variables = {"params": params, **state}
        if train and state:
            logits, new_state = module.apply(variables, x, train=True, mutable=list(state))
            return logits, dict(new_state)
        return module.apply(variables, x, train=train), state

    return Model(init, apply)
