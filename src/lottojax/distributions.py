"""Per-layer densities from one global target: uniform, Erdős–Rényi and ERK.

A sparsity *distribution* decides how many weights each prunable leaf keeps when the
network as a whole keeps a fraction ``density`` of its prunable weights:

- ``'uniform'``: every prunable leaf keeps ``density``;
- ``'erdos_renyi'`` (Mocanu et al. 2018): leaf ``l`` of shape ``(..., n_in, n_out)`` keeps
  ``ε (n_in + n_out) / (n_in n_out)``;
- ``'erk'``, Erdős–Rényi-Kernel (Evci et al. 2020, RigL): ``ε Σ_i s_i / Π_i s_i`` over all
  dimensions ``s_i`` of the kernel (for dense kernels the same as Erdős–Rényi).

``ε`` is solved so that the kept weights sum to exactly ``density * N`` (``N`` prunable
weights, in float64). A leaf whose density would exceed 1 is capped at 1 (kept dense)
and ``ε`` is solved again over the others, largest raw density first, as in RigL.

The densities are static Python floats (computed from shapes); :func:`densities_to_fractions`
turns them into a fraction spec for :func:`lottojax.prune_layerwise` from a dense mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.masks import PyTree, Spec, prunable_leaves

DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk")


def _raw_density(shape: tuple[int, ...], distribution: str) -> float:
    if distribution == "uniform":
        return 1.0
    dims = shape[-2:] if distribution == "erdos_renyi" else shape
    return float(np.sum(dims)) / float(np.prod(dims, dtype=np.float64))


def layer_densities(params: PyTree, *, density: float, distribution: str = "erk", prunable: Spec = None) -> PyTree:
    """Per-leaf densities (Python floats; 1.0 on leaves that are not prunable).

    Args:
      params: the parameters (only shapes are read).
      density: the global fraction of prunable weights to keep, in ``(0, 1]``.
      distribution: ``'uniform'``, ``'erdos_renyi'`` or ``'erk'`` (see the module doc).
      prunable: which leaves are pruned (default: kernels, ``ndim >= 2``).

    Returns:
      A pytree like ``params`` of floats in ``(0, 1]``; ``Σ d_l n_l = density * N``.

    Examples:
      >>> params = {'fc0': jnp.zeros((100, 100)), 'output': jnp.zeros((100, 10)), 'b': jnp.zeros(10)}
      >>> d = layer_densities(params, density=0.1, distribution='erk')
      >>> round(d['fc0'], 4), round(d['output'], 4), d['b']  # the narrow layer keeps more
      (0.071, 0.3903, 1.0)
      >>> round((d['fc0'] * 10000 + d['output'] * 1000) / 11000, 6)
      0.1
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r} unknown; choose from {DISTRIBUTIONS}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]: it is the fraction of prunable weights kept")
    paths, leaves, treedef, flags = prunable_leaves(params, prunable, name="params")
    sizes = {i: int(np.prod(jnp.shape(x))) for i, (x, f) in enumerate(zip(leaves, flags)) if f}
    raw = {i: _raw_density(tuple(jnp.shape(leaves[i])), distribution) for i in sizes}
    budget = float(density) * sum(sizes.values())
    dense: set[int] = set()
    while True:
        sparse = [i for i in sizes if i not in dense]
        if not sparse:
            break
        scale = (budget - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in sparse)
        largest = max(raw[i] for i in sparse)
        if scale * largest <= 1.0:
            break
        dense |= {i for i in sparse if raw[i] == largest}
    values = [1.0] * len(leaves)
    for i in sizes:
        values[i] = 1.0 if i in dense else min(1.0, scale * raw[i])
    return jax.tree.unflatten(treedef, values)


def erk(params: PyTree, *, density: float, prunable: Spec = None) -> PyTree:
    """ERK per-leaf densities for a global ``density``: :func:`layer_densities` with
    ``distribution='erk'``.

    Examples:
      >>> params = {'conv0': jnp.zeros((3, 3, 16, 32)), 'output': jnp.zeros((32, 10))}
      >>> {k: round(v, 3) for k, v in erk(params, density=0.1).items()}
      {'conv0': 0.06, 'output': 0.674}
      >>> {k: round(v, 3) for k, v in erk(params, density=0.5).items()}  # output capped at 1
      {'conv0': 0.465, 'output': 1.0}
    """
    return layer_densities(params, density=density, distribution="erk", prunable=prunable)


def densities_to_fractions(densities: PyTree) -> PyTree:
    """Per-leaf densities → the fraction spec that prunes a *dense* mask to them.

    ``fraction = 1 - density`` per leaf, for :func:`lottojax.prune_layerwise` applied to
    ``ones_like(params)``; each leaf then keeps ``n - round(fraction * n)`` entries.

    Examples:
      >>> import lottojax as lj
      >>> params = {'a': jnp.ones((10, 10)), 'b': jnp.ones((10, 2))}
      >>> fractions = densities_to_fractions({'a': 0.3, 'b': 1.0})
      >>> mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), fractions)
      >>> int(mask['a'].sum()), int(mask['b'].sum())
      (30, 20)
    """
    return jax.tree.map(lambda d: 1.0 - float(d), densities)
