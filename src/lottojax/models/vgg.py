"""VGG with BatchNorm for CIFAR, as in network slimming and the Early-Bird paper."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lottojax.models.convolution import Conv, max_pool
from lottojax.models.layers import batch_norm, he_normal_fan_out

#: Layer configurations by depth: an int is a 3x3 conv-BN-ReLU with that many channels,
#: ``"M"`` a 2x2 max-pool (Liu et al. 2017, "Learning Efficient Convolutional Networks
#: through Network Slimming"; reused by You et al. 2020, "Drawing Early-Bird Tickets").
VGG_CONFIGS: dict[int, tuple] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512),
}


class VGG(nn.Module):
    """Conv3x3-BN-ReLU stacks with max-pools, global average pooling and one dense layer.

    Follows network slimming's CIFAR VGG: convolutions without bias and with He-normal
    (fan-out) kernels, BatchNorm scales initialised to 0.5, and a single ``output`` layer
    with ``N(0, 0.01)`` weights on the pooled features (the global average pool equals
    that code's 2x2 average pool on 32x32 inputs). Layers: ``conv0, bn0, conv1, bn1, ...``,
    ``output``.

    Attributes:
      depth: one of the keys of :data:`VGG_CONFIGS` (11, 13, 16, 19); fixes the number of
        convolutions and where the max-pools go.
      widths: output channels of each convolution, overriding the configuration's (e.g.
        for a net narrowed by channel pruning); ``None`` keeps the configuration's.
      num_classes: number of logits.
      conv_impl: ``'auto'``, ``'native'`` or ``'patches'`` (:mod:`lottojax.models.convolution`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = VGG(depth=11, widths=(32, 64, 128, 128, 256, 256, 256, 100))
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> params = jax.eval_shape(net.init, jax.random.key(0), x)["params"]  # shapes only
      >>> [k for k in params if k.startswith("conv")][-1], params["output"]["kernel"].shape
      ('conv7', (100, 10))
    """

    depth: int = 16
    widths: Optional[Sequence[int]] = None
    num_classes: int = 10
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits of NHWC images.

        ``train`` normalizes with batch statistics and updates the running ones.
        """
        if self.depth not in VGG_CONFIGS:
            raise ValueError(f"depth={self.depth}; expected one of {sorted(VGG_CONFIGS)}.")
        config = VGG_CONFIGS[self.depth]
        default_widths = [v for v in config if v != "M"]
        widths = default_widths if self.widths is None else list(self.widths)
        if len(widths) != len(default_widths):
            raise ValueError(
                f"VGG-{self.depth} has {len(default_widths)} convolutions; "
                f"got {len(widths)} widths."
            )
        i = 0
        for v in config:
            if v == "M":
                x = max_pool(x, 2, impl=self.conv_impl)
            else:
                x = Conv(
                    widths[i], (3, 3), padding="SAME", use_bias=False,
                    kernel_init=he_normal_fan_out, impl=self.conv_impl, name=f"conv{i}",
                )(x)
                x = nn.relu(batch_norm(train, f"bn{i}", nn.initializers.constant(0.5))(x))
                i += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), name="output"
        )(x)
