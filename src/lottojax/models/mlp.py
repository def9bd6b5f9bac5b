"""Fully connected networks: LeNet-300-100 and the MNIST-1D MLP."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn

from lottojax.models.layers import glorot_normal


class MLP(nn.Module):
    """A ReLU MLP with Glorot-normal kernels and zero biases (Frankle & Carbin 2019).

    The input is flattened, so the same class is LeNet-300-100 on ``(28, 28, 1)`` MNIST
    images and the MNIST-1D MLP on ``(40,)`` signals. Layers: ``fc0, fc1, ...`` then
    ``output``.

    Attributes:
      hidden: widths of the hidden layers.
      num_classes: number of logits.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = MLP(hidden=(300, 100))
      >>> x = jnp.zeros((2, 28, 28, 1))
      >>> variables = jax.eval_shape(net.init, jax.random.key(0), x)  # shapes only
      >>> sorted(variables["params"]), variables["params"]["fc0"]["kernel"].shape
      (['fc0', 'fc1', 'output'], (784, 300))
      >>> jax.eval_shape(net.apply, variables, x).shape
      (2, 10)
    """

    hidden: Sequence[int] = (300, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits; ``train`` has no effect (no BatchNorm or dropout)."""
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, kernel_init=glorot_normal, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, kernel_init=glorot_normal, name="output")(x)
