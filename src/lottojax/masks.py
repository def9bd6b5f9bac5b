"""Masks: bool pytrees with exactly the structure of the parameters they describe.

A mask has one bool array per parameter array, of the same shape; ``True`` keeps the
entry. Leaves that are never pruned (biases, norms) stay all-True. Which leaves may be
pruned is a separate, static *prunable spec*:

- ``None``: the default, every leaf with ``ndim >= 2`` (dense and conv kernels);
- a bool, or a pytree/prefix of bools (``{'fc0': True, 'output': False}``);
- a predicate ``(path, leaf) -> bool``, where ``path`` is the leaf's path joined by
  ``/`` (``'fc0/kernel'``) and ``leaf`` is the array (look at its shape, not its values).

Everything here works on any pytree: Flax linen params, ``nnx.State``, Equinox modules,
dicts, lists and tuples.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Spec = Union[None, bool, float, PyTree, Callable[[str, jax.Array], Any]]


def path_str(path) -> str:
    """Renders a JAX key path as ``'a/b/0'``.

    Examples:
      >>> paths = [p for p, _ in jax.tree_util.tree_flatten_with_path({'fc0': {'kernel': 0}})[0]]
      >>> path_str(paths[0])
      'fc0/kernel'
    """
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaves_with_paths(tree) -> tuple[list[str], list[Any], Any]:
    """Flattens ``tree`` into (path strings, leaves, treedef)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def resolve_spec(spec: Spec, tree: PyTree, *, name: str, default: Callable[[str, Any], Any]) -> list:
    """Expands a per-leaf spec into one value per leaf of ``tree`` (in flatten order).

    ``spec`` is ``None`` (use ``default(path, leaf)``), a scalar, a callable
    ``(path, leaf) -> value``, or a pytree that is a prefix of ``tree``.

    Examples:
      >>> params = {'fc0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}, 'output': {'kernel': jnp.ones((3, 1))}}
      >>> resolve_spec({'fc0': 0.2, 'output': 0.1}, params, name='fraction', default=None)
      [0.2, 0.2, 0.1]
    """
    paths, leaves, treedef = leaves_with_paths(tree)
    if spec is None:
        return [default(p, x) for p, x in zip(paths, leaves)]
    if callable(spec):
        return [spec(p, x) for p, x in zip(paths, leaves)]
    if not jax.tree_util.treedef_is_leaf(jax.tree.structure(spec)):
        try:
            spec = jax.tree.map(lambda value, sub: jax.tree.map(lambda _: value, sub), spec, tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{name} must be a scalar, a callable (path, leaf) -> value, or a pytree that is "
                f"a prefix of the parameter tree; its structure {jax.tree.structure(spec)} does not "
                f"match the parameter paths {paths[:6]}{'...' if len(paths) > 6 else ''}: {e}"
            ) from None
        return jax.tree.leaves(spec)
    return [spec] * len(leaves)


def default_prunable(path: str, leaf) -> bool:
    """The default prunable spec: kernels, i.e. leaves with ``ndim >= 2``."""
    del path
    return jnp.ndim(leaf) >= 2


def prunable_flags(tree: PyTree, prunable: Spec = None) -> list[bool]:
    """One static Python bool per leaf of ``tree``: may that leaf be pruned?"""
    flags = resolve_spec(prunable, tree, name="prunable", default=default_prunable)
    for flag in flags:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"prunable must resolve to Python bools per leaf (it is static); got {flag!r}. "
                "A predicate should look at the path and the leaf's shape, not its values."
            )
    return [bool(f) for f in flags]


def check_same_shapes(a: PyTree, b: PyTree, *, a_name: str, b_name: str) -> list[str]:
    """Raises ``ValueError`` naming the first path where ``b`` differs from ``a`` in structure
    or leaf shape; returns the leaf paths."""
    a_paths, a_leaves, a_def = leaves_with_paths(a)
    b_paths, b_leaves, b_def = leaves_with_paths(b)
    if a_def != b_def:
        missing = sorted(set(a_paths) - set(b_paths))
        extra = sorted(set(b_paths) - set(a_paths))
        detail = []
        if missing:
            detail.append(f"paths in {a_name} but not in {b_name}: {missing[:5]}")
        if extra:
            detail.append(f"paths in {b_name} but not in {a_name}: {extra[:5]}")
        if not detail:
            detail.append(f"{b_name} is {b_def}, {a_name} is {a_def}")
        raise ValueError(f"{b_name} does not have the structure of {a_name} ({'; '.join(detail)})")
    for path, x, y in zip(a_paths, a_leaves, b_leaves):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"{b_name} leaf {path} has shape {jnp.shape(y)} but the {a_name} leaf has {jnp.shape(x)}"
            )
    return a_paths


def check_mask(params: PyTree, mask: PyTree, *, params_name: str = "params", mask_name: str = "mask") -> None:
    """Raises ``ValueError`` naming the tree path if ``mask`` does not describe ``params``.

    Checks the tree structure, each leaf's shape, and that mask leaves are bool. Only
    static information is read, so it costs nothing under ``jit``.

    Examples:
      >>> check_mask({'w': jnp.ones((2, 3))}, {'w': jnp.ones((3, 2), bool)})
      Traceback (most recent call last):
      ...
      ValueError: mask leaf w has shape (3, 2) but the params leaf has (2, 3)
    """
    paths = check_same_shapes(params, mask, a_name=params_name, b_name=mask_name)
    for path, m in zip(paths, jax.tree.leaves(mask)):
        if jnp.result_type(m) != jnp.bool_:
            raise ValueError(
                f"{mask_name} leaf {path} has dtype {jnp.result_type(m)}; masks are bool "
                f"(use .astype(bool), or build them with lottojax.ones_like)"
            )


def ones_like(params: PyTree) -> PyTree:
    """The dense mask: all-True, one bool array per parameter array.

    Examples:
      >>> ones_like({'w': jnp.zeros((2, 2)), 'b': jnp.zeros(2)})
      {'b': Array([ True,  True], dtype=bool), 'w': Array([[ True,  True],
             [ True,  True]], dtype=bool)}
    """
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """Zeroes the pruned entries of ``params``.

    Examples:
      >>> apply_mask({'w': jnp.array([1., 2., 3.])}, {'w': jnp.array([True, False, True])})
      {'w': Array([1., 0., 3.], dtype=float32)}
    """
    check_mask(params, mask)
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def _prunable_leaves(mask: PyTree, prunable: Spec) -> tuple[list[str], list[jax.Array]]:
    paths, leaves, _ = leaves_with_paths(mask)
    flags = prunable_flags(mask, prunable)
    chosen = [(p, m) for p, m, f in zip(paths, leaves, flags) if f]
    if not chosen:
        raise ValueError(
            f"no leaf of the mask is prunable (paths: {paths[:6]}); pass prunable= to say which are"
        )
    return [p for p, _ in chosen], [m for _, m in chosen]


def density(mask: PyTree, prunable: Spec = None) -> jax.Array:
    """Fraction of the prunable entries that are kept (a float32 scalar; jittable).

    Examples:
      >>> mask = {'w': jnp.array([[True, False], [False, False]]), 'b': jnp.array([True, True])}
      >>> float(density(mask))  # only the kernel w counts by default
      0.25
    """
    _, leaves = _prunable_leaves(mask, prunable)
    kept = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
    total = sum(int(np.prod(jnp.shape(m))) for m in leaves)
    return kept.astype(jnp.float32) / total


def sparsity(mask: PyTree, prunable: Spec = None) -> jax.Array:
    """Fraction of the prunable entries that are pruned: ``1 - density``."""
    return 1.0 - density(mask, prunable)


def layer_report(mask: PyTree, prunable: Spec = None) -> dict[str, tuple[int, int]]:
    """Per prunable leaf: ``path -> (kept, total)``, as Python ints (for printing).

    Examples:
      >>> layer_report({'fc0': {'kernel': jnp.array([[True, False], [True, True]])}})
      {'fc0/kernel': (3, 4)}
    """
    paths, leaves = _prunable_leaves(mask, prunable)
    return {p: (int(jnp.sum(m)), int(np.prod(jnp.shape(m)))) for p, m in zip(paths, leaves)}


def format_report(mask: PyTree, prunable: Spec = None) -> str:
    """A table of kept/total and density per prunable leaf, and overall.

    Examples:
      >>> print(format_report({'fc0': {'kernel': jnp.array([[True, False], [True, True]])}}))
      layer         kept   total  density
      fc0/kernel       3       4   75.00%
      all              3       4   75.00%
    """
    report = layer_report(mask, prunable)
    kept = sum(k for k, _ in report.values())
    total = sum(t for _, t in report.values())
    width = max(len("layer"), *(len(p) for p in report))
    rows = [f"{'layer':<{width}}  {'kept':>6}  {'total':>6}  density"]
    for path, (k, t) in [*report.items(), ("all", (kept, total))]:
        rows.append(f"{path:<{width}}  {k:>6}  {t:>6}  {k / t:>7.2%}")
    return "\n".join(rows)
