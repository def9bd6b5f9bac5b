"""A small 1D convolutional net with BatchNorm for MNIST-1D."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn

from lottojax.models.layers import batch_norm, he_normal


class CNN1D(nn.Module):
    """Strided 1D convolutions, each followed by BatchNorm and ReLU, then a dense head.

    With the defaults a ``(40,)`` MNIST-1D signal goes through three convolutions of
    kernel 5 and stride 2 (lengths 40 -> 20 -> 10 -> 5, 32 channels each), is flattened
    (160 features) and mapped to the logits. Layers: ``conv0, bn0, conv1, bn1, ...``,
    ``output``. Convolutions have no bias (the BatchNorm shift plays that role) and
    He-normal kernels.

    Attributes:
      channels: output channels of each convolution; a narrower tuple builds the physically
        smaller net that a channel mask describes.
      kernel_size: convolution width.
      stride: stride of every convolution (SAME padding, so each divides the length).
      num_classes: number of logits.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = CNN1D(channels=(8, 4))  # lengths 40 -> 20 -> 10
      >>> x = jnp.zeros((3, 40))
      >>> variables = jax.eval_shape(net.init, jax.random.key(0), x)  # shapes only
      >>> sorted(variables["params"]), variables["params"]["output"]["kernel"].shape
      (['bn0', 'bn1', 'conv0', 'conv1', 'output'], (40, 10))
      >>> jax.eval_shape(net.apply, variables, x).shape
      (3, 10)
    """

    channels: Sequence[int] = (32, 32, 32)
    kernel_size: int = 5
    stride: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits of ``(N, L)`` or ``(N, L, 1)`` signals.

        ``train`` normalizes with batch statistics and updates the running ones.
        """
        if x.ndim == 2:
            x = x[..., None]
        for i, width in enumerate(self.channels):
            x = nn.Conv(
                width, (self.kernel_size,), strides=(self.stride,), padding="SAME",
                use_bias=False, kernel_init=he_normal, name=f"conv{i}",
            )(x)
            x = nn.relu(batch_norm(train, f"bn{i}")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="output")(x)
