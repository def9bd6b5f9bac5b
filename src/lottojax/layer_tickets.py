"""Layer tickets (Jordao et al., "When layers play the lottery"): drop whole residual blocks.

Score every residual block at initialisation by the sum of its per-weight scores (SNIP or
GraSP, :mod:`lottojax.scores`), remove the ``count`` lowest-scoring blocks except those next
to downsampling, and build the shallower network with the kept blocks' weights.

This works on the parameter layout of :class:`lottojax.models.ResNet`: top-level entries
``stage{s}_block{b}``, where a block with a ``shortcut_conv`` (the first block of a stage
that changes resolution or width) sits next to downsampling and is never removed. The
kept blocks of each stage are renumbered ``0, 1, ...`` in their original order, so the
result is exactly the parameters (and BatchNorm statistics) of
``ResNet(stage_sizes=ticket.stage_sizes)``. Choosing blocks reads the scores' values, so
these functions run outside ``jit`` (the network's structure changes).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp

from lottojax.masks import PyTree, Spec, leaves_with_paths, prunable_flags

_BLOCK = re.compile(r"stage(\d+)_block(\d+)")


class LayerTicket(NamedTuple):
    """A shallower ResNet made of the kept blocks.

    Attributes:
      stage_sizes: blocks per stage of the new network (``ResNet(stage_sizes=...)``).
      removed: names of the removed blocks (in the original numbering).
      block_scores: original block name -> summed score (a float), for every block.
      params: the new network's parameters.
      model_state: its model state (BatchNorm statistics), renumbered the same way.
    """

    stage_sizes: tuple[int, ...]
    removed: tuple[str, ...]
    block_scores: dict[str, float]
    params: PyTree
    model_state: PyTree


def _block_names(params: PyTree) -> list[str]:
    names = sorted(
        (k for k in params if _BLOCK.fullmatch(str(k))),
        key=lambda k: tuple(int(g) for g in _BLOCK.fullmatch(k).groups()),
    )
    if not names:
        raise ValueError(
            f"params has no residual blocks named stage{{s}}_block{{b}} at the top level "
            f"(keys: {sorted(map(str, params))[:8]}); layer tickets need lottojax.models.ResNet's layout"
        )
    return names


def block_scores(scores: PyTree, *, prunable: Spec = None) -> dict[str, jax.Array]:
    """Per residual block, the sum of the scores of its prunable leaves (default: kernels).

    Examples:
      >>> scores = {'conv0': {'kernel': jnp.ones((3, 3, 3, 4))},
      ...           'stage0_block0': {'conv0': {'kernel': jnp.full((3, 3, 4, 4), 0.5)},
      ...                             'bn0': {'scale': jnp.full(4, 9.)}}}
      >>> {k: float(v) for k, v in block_scores(scores).items()}  # 144 * 0.5; BN not counted
      {'stage0_block0': 72.0}
    """
    names = _block_names(scores)
    paths, leaves, _ = leaves_with_paths(scores)
    flags = prunable_flags(scores, prunable)
    totals = {}
    for name in names:
        chosen = [jnp.sum(x) for p, x, f in zip(paths, leaves, flags) if f and p.split("/")[0] == name]
        totals[name] = sum(chosen) if chosen else jnp.zeros(())
    return totals


def removable_blocks(params: PyTree) -> list[str]:
    """The blocks a layer ticket may remove: those without a ``shortcut_conv``.

    Examples:
      >>> params = {'stage0_block0': {'conv0': 0}, 'stage1_block0': {'conv0': 0, 'shortcut_conv': 0},
      ...           'stage1_block1': {'conv0': 0}}
      >>> removable_blocks(params)
      ['stage0_block0', 'stage1_block1']
    """
    return [name for name in _block_names(params) if "shortcut_conv" not in params[name]]


def _renumbered(tree: PyTree, kept: list[str]) -> PyTree:
    """Keeps the non-block entries of a top-level mapping and the ``kept`` blocks, renumbered."""
    out = {k: v for k, v in tree.items() if not _BLOCK.fullmatch(str(k))}
    position: dict[int, int] = {}
    for name in kept:
        stage = int(_BLOCK.fullmatch(name).group(1))
        if name in tree:
            out[f"stage{stage}_block{position.get(stage, 0)}"] = tree[name]
        position[stage] = position.get(stage, 0) + 1
    return type(tree)(out) if isinstance(tree, dict) else out


def random_block_scores(params: PyTree, *, key: jax.Array) -> dict[str, jax.Array]:
    """One uniform draw per residual block: ranking by it removes every removable block
    with the same probability, whatever its size (summing per-weight random scores would
    favour removing the blocks with fewer weights).

    Examples:
      >>> params = {'stage0_block0': {'conv0': 0}, 'stage0_block1': {'conv0': 0}}
      >>> draws = random_block_scores(params, key=jax.random.key(0))
      >>> sorted(draws), all(0 <= float(v) < 1 for v in draws.values())
      (['stage0_block0', 'stage0_block1'], True)
    """
    names = _block_names(params)
    draws = jax.random.uniform(key, (len(names),))
    return {name: draws[i] for i, name in enumerate(names)}


def remove_lowest_blocks(params: PyTree, model_state: PyTree, totals: dict, *, count: int) -> LayerTicket:
    """Removes the ``count`` removable blocks with the lowest ``totals`` (block name -> a
    number, e.g. :func:`block_scores` or :func:`random_block_scores`).

    Ties remove the earlier block first. :func:`remove_blocks` is this on summed per-weight
    scores; see it for ``params``, ``model_state`` and ``count``.

    Examples:
      >>> params = {'conv0': {'kernel': jnp.ones((3, 3, 1, 2))}, 'stage0_block0': {'conv0': {'kernel': 1.}},
      ...           'stage0_block1': {'conv0': {'kernel': 2.}}}
      >>> ticket = remove_lowest_blocks(params, {}, {'stage0_block0': 5.0, 'stage0_block1': 1.0}, count=1)
      >>> ticket.removed, ticket.stage_sizes, ticket.params['stage0_block0']['conv0']['kernel']
      (('stage0_block1',), (1,), 1.0)
    """
    names = _block_names(params)
    removable = removable_blocks(params)
    if not 0 <= count <= len(removable):
        raise ValueError(
            f"count={count}: this network has {len(removable)} removable blocks ({removable}); "
            "blocks with a shortcut_conv (next to downsampling) are kept"
        )
    missing = [k for k in names if k not in totals]
    if missing:
        raise ValueError(f"totals has no score for blocks {missing}; give one number per block of params")
    totals = {k: float(totals[k]) for k in names}
    order = sorted(removable, key=lambda k: (totals[k], names.index(k)))
    removed = set(order[:count])
    kept = [k for k in names if k not in removed]
    sizes = [0] * (1 + max(int(_BLOCK.fullmatch(k).group(1)) for k in names))
    for name in kept:
        sizes[int(_BLOCK.fullmatch(name).group(1))] += 1
    state = {collection: _renumbered(tree, kept) for collection, tree in model_state.items()}
    return LayerTicket(
        stage_sizes=tuple(sizes),
        removed=tuple(k for k in names if k in removed),
        block_scores=totals,
        params=_renumbered(params, kept),
        model_state=type(model_state)(state) if isinstance(model_state, dict) else state,
    )


def remove_blocks(params: PyTree, model_state: PyTree, scores: PyTree, *, count: int, prunable: Spec = None) -> LayerTicket:
    """Removes the ``count`` removable blocks with the lowest summed ``scores``.

    Args:
      params: the ResNet's parameters (at initialisation, for a layer ticket).
      model_state: its model state, e.g. ``{'batch_stats': ...}`` (each collection is
        renumbered like ``params``); ``{}`` if none.
      scores: per-weight scores like ``params`` (higher = keep), e.g. :func:`lottojax.snip`
        or :func:`lottojax.grasp`.
      count: how many blocks to remove; ``0`` returns the network unchanged.
      prunable: the leaves whose scores are summed (default: kernels).

    Returns:
      A :class:`LayerTicket`. Ties in the block scores remove the earlier block first.

    Examples:
      >>> import jax, lottojax as lj
      >>> from lottojax.models import ResNet, from_linen
      >>> model = from_linen(ResNet(stage_sizes=(2, 2), width=1), input_shape=(8, 8, 3))
      >>> params, state = jax.jit(model.init)(jax.random.key(0))
      >>> ticket = remove_blocks(params, state, lj.magnitude(params), count=2)
      >>> ticket.stage_sizes, ticket.removed  # the 16-channel blocks sum the least |θ|
      ((0, 2), ('stage0_block0', 'stage0_block1'))
      >>> sorted(ticket.params)
      ['bn0', 'conv0', 'output', 'stage1_block0', 'stage1_block1']
    """
    return remove_lowest_blocks(params, model_state, block_scores(scores, prunable=prunable), count=count)


def _matmul_flops(eqn) -> float:
    """2 × multiply-adds of one ``conv_general_dilated`` or ``dot_general``; 0 otherwise."""
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "conv_general_dilated":
        kernel = eqn.invars[1].aval
        out_features = kernel.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(out.shape) * math.prod(kernel.shape) / out_features
    if eqn.primitive.name == "dot_general":
        (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contracting)
    return 0.0


def _sub_jaxprs(value) -> list:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _matmul_flops(eqn)
        name = eqn.primitive.name
        if name == "while":
            raise ValueError("traced_flops: the function has a while loop, whose trip count is unknown")
        inner = [_jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if name == "cond":  # one branch runs: count the dearest
            total += max(inner, default=0.0)
        else:
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def traced_flops(fn, *args) -> float:
    """FLOPs of one call ``fn(*args)``: 2 per multiply-add of every convolution and matrix
    product in its traced program (nested calls and scans included, a ``cond`` counted by
    its dearest branch). Elementwise work (BatchNorm, activations, additions, pooling) is
    not counted, as in the usual FLOP counts of convolutional networks.

    Examples:
      >>> w = jnp.ones((3, 4)); k = jnp.ones((3, 3, 2, 5))
      >>> traced_flops(lambda w, x: x @ w, w, jnp.ones((2, 3)))  # 2 · (2·4 outputs) · 3
      48.0
      >>> conv = lambda k, x: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      >>> traced_flops(conv, k, jnp.ones((1, 6, 6, 2)))  # 2 · (6·6·5 outputs) · (3·3·2)
      6480.0
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
