"""The Conv-2/-4/-6 networks of Frankle & Carbin (2019) for CIFAR-10."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn

from lottojax.models.convolution import Conv, max_pool
from lottojax.models.layers import glorot_normal


class ConvNet(nn.Module):
    """VGG-like convolutional net: pairs of 3x3 convs, each pair followed by a 2x2 max-pool.

    ``conv_widths=(64, 64)`` is Conv-2, ``(64, 64, 128, 128)`` Conv-4 and
    ``(64, 64, 128, 128, 256, 256)`` Conv-6; all three end in dense layers of 256, 256
    and ``num_classes`` units. Convolutions use SAME padding; every layer but the last has a
    ReLU; kernels are Glorot normal and biases zero. Layers: ``conv0, conv1, ...``,
    ``fc0, fc1, ...``, ``output``.

    Attributes:
      conv_widths: output channels of each convolution (even length: a max-pool follows
        every second convolution). Entries may differ from the paper's, e.g. for a net
        narrowed by channel pruning.
      fc_widths: widths of the hidden dense layers.
      num_classes: number of logits.
      conv_impl: ``'auto'``, ``'native'`` or ``'patches'`` (:mod:`lottojax.models.convolution`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = ConvNet(conv_widths=(64, 64, 128, 128))  # Conv-4
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> params = jax.eval_shape(net.init, jax.random.key(0), x)["params"]
      >>> sorted(params)
      ['conv0', 'conv1', 'conv2', 'conv3', 'fc0', 'fc1', 'output']
      >>> params["fc0"]["kernel"].shape  # 8 * 8 * 128 features after two pools
      (8192, 256)
    """

    conv_widths: Sequence[int] = (64, 64)
    fc_widths: Sequence[int] = (256, 256)
    num_classes: int = 10
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits of NHWC images; ``train`` has no effect."""
        if len(self.conv_widths) % 2:
            raise ValueError(
                f"conv_widths={tuple(self.conv_widths)} must have even length: the nets "
                "max-pool after every second convolution."
            )
        for i, width in enumerate(self.conv_widths):
            conv = Conv(width, (3, 3), padding="SAME", kernel_init=glorot_normal,
                        impl=self.conv_impl, name=f"conv{i}")
            x = nn.relu(conv(x))
            if i % 2 == 1:
                x = max_pool(x, 2, impl=self.conv_impl)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.fc_widths):
            x = nn.relu(nn.Dense(width, kernel_init=glorot_normal, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, kernel_init=glorot_normal, name="output")(x)
