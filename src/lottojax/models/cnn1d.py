"""A small 1D convolutional net with BatchNorm for MNIST-1D."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lottojax.models.layers import batch_norm, he_normal


def conv1d_same(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """SAME-padded strided 1D convolution (cross-correlation) as one contraction over patches.

    Computes what ``lax.conv_general_dilated(x, kernel, (stride,), 'SAME')`` computes with
    ``NWC``/``WIO`` layouts: the input is padded as XLA pads SAME (the odd element at the
    end), the ``kernel_size`` shifted strided views are stacked into patches, and one
    ``einsum`` contracts them with the kernel. XLA:CPU runs the weight gradient of a
    native convolution inside ``lax.scan`` (the training loop) 25-50x slower than on its
    own; the gradient of this form is two matrix products and has no such slowdown.

    Args:
      x: ``(N, L, C_in)`` signals.
      kernel: ``(kernel_size, C_in, C_out)``.
      stride: step between output positions; the output has ``ceil(L / stride)`` positions.

    Examples:
      >>> x = jnp.arange(5.)[None, :, None]          # one signal 0 1 2 3 4
      >>> kernel = jnp.array([1., 10., 100.])[:, None, None]
      >>> conv1d_same(x, kernel, 2)[0, :, 0]         # windows (0 0 1), (1 2 3), (3 4 0)
      Array([100., 321.,  43.], dtype=float32)
    """
    size, length = kernel.shape[0], x.shape[1]
    out = -(-length // stride)
    pad = max((out - 1) * stride + size - length, 0)
    padded = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
    last = stride * (out - 1) + 1
    patches = jnp.stack([padded[:, i : i + last : stride] for i in range(size)], axis=2)
    return jnp.einsum("nlkc,kco->nlo", patches, kernel)


class PatchConv1D(nn.Module):
    """A bias-free SAME 1D convolution through :func:`conv1d_same`.

    Its parameter is ``kernel`` of shape ``(kernel_size, C_in, features)``, exactly as in
    ``nn.Conv``, and it draws the same initial values from the same key.
    """

    features: int
    kernel_size: int
    stride: int
    kernel_init: Callable = he_normal

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (self.kernel_size, x.shape[-1], self.features))
        return conv1d_same(x, kernel.astype(x.dtype), self.stride)


class CNN1D(nn.Module):
    """Strided 1D convolutions, each followed by BatchNorm and ReLU, then a dense head.

    With the defaults a ``(40,)`` MNIST-1D signal goes through three convolutions of
    kernel 5 and stride 2 (lengths 40 -> 20 -> 10 -> 5, 32 channels each), is flattened
    (160 features) and mapped to the logits. Layers: ``conv0, bn0, conv1, bn1, ...``,
    ``output``. Convolutions have no bias (the BatchNorm shift plays that role) and
    He-normal kernels; they are computed by :func:`conv1d_same` (same parameters and
    outputs as ``nn.Conv``, much faster to train on CPU).

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
            x = PatchConv1D(width, self.kernel_size, self.stride, name=f"conv{i}")(x)
            x = nn.relu(batch_norm(train, f"bn{i}")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="output")(x)
