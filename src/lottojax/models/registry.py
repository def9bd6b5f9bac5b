"""Reference models by name."""
from __future__ import annotations

from typing import Any

from lottojax.models.cnn1d import CNN1D
from lottojax.models.conv import ConvNet
from lottojax.models.core import Model, from_linen
from lottojax.models.grok import GrokMLP, GrokTransformer
from lottojax.models.mlp import MLP
from lottojax.models.resnet import ResNet
from lottojax.models.vgg import VGG

#: name -> (module class, constructor defaults); ``create``'s kwargs override the defaults.
_REGISTRY: dict[str, tuple[type, dict[str, Any]]] = {
    "mlp": (MLP, dict(hidden=(300, 100))),
    "lenet300100": (MLP, dict(hidden=(300, 100))),
    "conv2": (ConvNet, dict(conv_widths=(64, 64))),
    "conv4": (ConvNet, dict(conv_widths=(64, 64, 128, 128))),
    "conv6": (ConvNet, dict(conv_widths=(64, 64, 128, 128, 256, 256))),
    "cnn1d": (CNN1D, {}),
    "vgg11": (VGG, dict(depth=11)),
    "vgg16": (VGG, dict(depth=16)),
    "resnet20": (ResNet, dict(stage_sizes=(3, 3, 3))),
    "grok-mlp": (GrokMLP, dict(embed=500, hidden=48)),
    "grok-transformer": (GrokTransformer, dict(d_model=128, heads=4, d_mlp=512)),
}

#: The names :func:`create` accepts.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def create(name: str, *, input_shape: tuple[int, ...], num_classes: int = 10, **kwargs) -> Model:
    """Builds a reference model by name as a :class:`Model`.

    Args:
      name: one of :data:`MODEL_NAMES`: ``'mlp'`` (the MNIST-1D MLP, 300-100 hidden),
        ``'lenet300100'``, ``'conv2'``, ``'conv4'``, ``'conv6'``, ``'cnn1d'``, ``'vgg11'``,
        ``'vgg16'``, ``'resnet20'``, ``'grok-mlp'`` (:class:`~lottojax.models.grok.GrokMLP`, token
        inputs ``(2,)``), ``'grok-transformer'`` (:class:`~lottojax.models.grok.GrokTransformer`).
      input_shape: shape of one example, without the batch axis (e.g. ``(40,)``,
        ``(28, 28, 1)``, ``(32, 32, 3)``).
      num_classes: number of logits.
      **kwargs: passed to the module's constructor, overriding the name's defaults (e.g.
        ``channels=(16, 16, 16)`` for ``'cnn1d'``, ``width=4`` for ``'resnet20'``).

    Raises:
      ValueError: ``name`` is not a known model.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = create("mlp", input_shape=(40,))
      >>> params, state = model.init(jax.random.key(0))
      >>> logits, state = model.apply(params, state, jnp.zeros((5, 40)), False)
      >>> logits.shape
      (5, 10)
      >>> create("lenet5", input_shape=(28, 28, 1))
      Traceback (most recent call last):
      ...
      ValueError: Unknown model 'lenet5'; expected one of: mlp, lenet300100, ...
    """
    return from_linen(linen_module(name, num_classes=num_classes, **kwargs), input_shape)


def linen_module(name: str, *, num_classes: int = 10, **kwargs):
    """The Flax linen module behind :func:`create` (its fields: ``depth``, ``stride``, ...).

    Examples:
      >>> linen_module('vgg16', widths=(8,) * 13).depth
      16
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; expected one of: {', '.join(MODEL_NAMES)}.")
    cls, defaults = _REGISTRY[name]
    return cls(num_classes=num_classes, **{**defaults, **kwargs})
