"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56/110 and their pre-activation variants."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lottojax.models.convolution import Conv
from lottojax.models.layers import batch_norm, he_normal


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1-conv shortcut.

    Post-activation (He et al. 2016a): ``relu(bn1(conv1(relu(bn0(conv0(x))))) + s(x))``
    with ``s = shortcut_bn . shortcut_conv`` when the block changes the shape (option B),
    else the identity. Pre-activation (He et al. 2016b): ``h = relu(bn0(x))``, then
    ``conv1(relu(bn1(conv0(h)))) + s``, where ``s`` is ``shortcut_conv(h)`` (no BatchNorm)
    or ``x``; here ``bn{i}`` is the BatchNorm feeding ``conv{i}``.

    Attributes:
      features: output channels.
      strides: stride of ``conv0`` and of the shortcut convolution.
      pre_activation: the pre-activation block instead of the original one.
      inner_features: output channels of ``conv0`` (the block's inner width, which channel
        pruning can shrink without touching the residual path); ``None``: ``features``.
      conv_impl: how convolutions are computed (see :class:`lottojax.models.Conv`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> block = BasicBlock(features=8, strides=2)
      >>> x = jnp.zeros((2, 4, 4, 4))
      >>> variables = jax.eval_shape(block.init, jax.random.key(0), x)  # shapes only
      >>> sorted(variables["params"])
      ['bn0', 'bn1', 'conv0', 'conv1', 'shortcut_bn', 'shortcut_conv']
      >>> jax.eval_shape(block.apply, variables, x).shape
      (2, 2, 2, 8)
    """

    features: int
    strides: int = 1
    pre_activation: bool = False
    inner_features: Optional[int] = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block to NHWC features."""
        def conv(kernel, strides, name, features=self.features):
            return Conv(
                features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                use_bias=False, kernel_init=he_normal, impl=self.conv_impl, name=name,
            )

        inner = self.features if self.inner_features is None else self.inner_features
        needs_projection = self.strides != 1 or x.shape[-1] != self.features
        if self.pre_activation:
            h = nn.relu(batch_norm(train, "bn0")(x))
            shortcut = conv(1, self.strides, "shortcut_conv")(h) if needs_projection else x
            y = nn.relu(batch_norm(train, "bn1")(conv(3, self.strides, "conv0", inner)(h)))
            return conv(3, 1, "conv1")(y) + shortcut
        y = nn.relu(batch_norm(train, "bn0")(conv(3, self.strides, "conv0", inner)(x)))
        y = batch_norm(train, "bn1")(conv(3, 1, "conv1")(y))
        if needs_projection:
            x = batch_norm(train, "shortcut_bn")(conv(1, self.strides, "shortcut_conv")(x))
        return nn.relu(y + x)


class ResNet(nn.Module):
    """The CIFAR ResNet: a 3x3 stem, stages of basic blocks, global average pool, dense.

    Stage ``s`` has ``16 * width * 2**s`` channels and, after the first stage, starts with
    a stride-2 block; ``stage_sizes=(n, n, n)`` is ResNet-(6n+2): (3, 3, 3) ResNet-20,
    (5, 5, 5) ResNet-32, (9, 9, 9) ResNet-56. Kernels are He normal (fan-in). Layers: the
    stem ``conv0`` (and, post-activation, ``bn0``), blocks ``stage{s}_block{b}``
    (see :class:`BasicBlock`), with pre-activation a final ``bn_final`` before the pool,
    and ``output``.

    Attributes:
      stage_sizes: number of blocks in each stage.
      width: channel multiplier (1 gives 16/32/64).
      pre_activation: build PreResNet (pre-activation blocks).
      inner_widths: the inner width of every block, in order (stage by stage), e.g. for a
        net narrowed by channel pruning; ``None`` keeps each block's ``features``.
      num_classes: number of logits.
      conv_impl: how convolutions are computed: ``'auto'`` (``'patches'`` on CPU,
        ``'native'`` elsewhere), ``'native'`` or ``'patches'``; the parameters and outputs
        are the same (see :mod:`lottojax.models.convolution`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = ResNet(stage_sizes=(3, 3, 3))  # ResNet-20
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> variables = jax.eval_shape(net.init, jax.random.key(0), x)  # shapes only
      >>> sorted(variables["params"])
      ['bn0', 'conv0', 'output', 'stage0_block0', 'stage0_block1', 'stage0_block2',
       'stage1_block0', 'stage1_block1', 'stage1_block2',
       'stage2_block0', 'stage2_block1', 'stage2_block2']
      >>> sorted(variables["params"]["stage2_block0"])
      ['bn0', 'bn1', 'conv0', 'conv1', 'shortcut_bn', 'shortcut_conv']
      >>> jax.eval_shape(net.apply, variables, x).shape
      (2, 10)
    """

    stage_sizes: Sequence[int] = (3, 3, 3)
    width: int = 1
    pre_activation: bool = False
    inner_widths: Optional[Sequence[int]] = None
    num_classes: int = 10
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits of NHWC images.

        ``train`` normalizes with batch statistics and updates the running ones.
        """
        blocks = sum(self.stage_sizes)
        if self.inner_widths is not None and len(self.inner_widths) != blocks:
            raise ValueError(f"inner_widths has {len(self.inner_widths)} entries; this ResNet has {blocks} blocks.")
        inner_widths = iter([None] * blocks if self.inner_widths is None else self.inner_widths)
        x = Conv(
            16 * self.width, (3, 3), padding="SAME", use_bias=False, kernel_init=he_normal,
            impl=self.conv_impl, name="conv0",
        )(x)
        if not self.pre_activation:
            x = nn.relu(batch_norm(train, "bn0")(x))
        for s, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                x = BasicBlock(
                    features=16 * self.width * 2**s,
                    strides=2 if s > 0 and b == 0 else 1,
                    pre_activation=self.pre_activation,
                    inner_features=next(inner_widths),
                    conv_impl=self.conv_impl,
                    name=f"stage{s}_block{b}",
                )(x, train)
        if self.pre_activation:
            x = nn.relu(batch_norm(train, "bn_final")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=he_normal, name="output")(x)
