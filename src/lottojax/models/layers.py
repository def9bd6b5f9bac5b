"""Initializers and the BatchNorm configuration shared by the reference models."""
from __future__ import annotations

from flax import linen as nn

#: Glorot/Xavier normal, untruncated: ``N(0, 2 / (fan_in + fan_out))`` (Frankle & Carbin).
glorot_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

#: He/Kaiming normal with fan-in, untruncated: ``N(0, 2 / fan_in)`` (open_lth's ResNets).
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

#: He/Kaiming normal with fan-out, untruncated: ``N(0, 2 / fan_out)`` (network slimming's VGG).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str, scale_init=nn.initializers.ones) -> nn.BatchNorm:
    """A BatchNorm layer with PyTorch's defaults (momentum 0.1, i.e. decay 0.9; eps 1e-5).

    Args:
      train: use batch statistics and update the running ones (True), or use the running
        statistics (False).
      name: the layer name (``bn0``, ``bn1``, ...).
      scale_init: initializer of the scale (gamma).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> bn = batch_norm(train=False, name="bn0")
      >>> variables = bn.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> sorted(variables["batch_stats"]), variables["params"]["scale"].shape
      (['mean', 'var'], (3,))
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=scale_init,
        name=name,
    )
