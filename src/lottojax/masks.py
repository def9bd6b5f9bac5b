"""Masks: bool pytrees with exactly the structure of the parameters they describe.

A mask has one bool array per parameter array, of the same shape; ``True`` keeps the
entry. Leaves that are never pruned (biases, norms) stay all-True. Which leaves may be
pruned is a separate, static *prunable spec*:

- ``None``: the default, every leaf with ``ndim >= 2`` (dense and conv kernels);
- a bool, or a pytree/prefix of bools (``{'fc0': True, 'output': False}``), matched to the
  parameters by tree path, so a plain dict also describes an ``nnx.State``;
- a predicate ``(path, leaf) -> bool``, where ``path`` is the leaf's path joined by
  ``/`` (``'fc0/kernel'``) and ``leaf`` is the array (look at its shape, not its values).

A callable spec may carry a ``check_tree(paths, leaves)`` attribute: :func:`resolve_spec`
calls it once with every leaf path and leaf of the tree before evaluating the spec per
leaf, so the spec can reject a tree it does not fit (:func:`lottojax.rates_by_layer` uses
it to insist that its output layer exists).

Paths read the same for every kind of tree: ``fc0/kernel`` for Flax linen params,
``l1/kernel`` for an ``nnx.State`` (the trailing ``value`` of an nnx ``Variable`` is
dropped), ``layers/0/weight`` for an Equinox module. Leaves must be arrays (or numbers):
split an Equinox module with ``eqx.partition(model, eqx.is_array)`` first, since its
activation functions are leaves too.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Spec = Union[None, bool, float, PyTree, Callable[[str, jax.Array], Any]]

_SHOWN = 10  # how many paths an error message lists


def _show(paths) -> str:
    paths = [p or "<root>" for p in paths]  # a bare array is a tree whose one leaf is the root
    more = f" ... ({len(paths)} in all)" if len(paths) > _SHOWN else ""
    return f"{paths[:_SHOWN]}{more}"


def _key_str(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_parts(path) -> tuple[str, ...]:
    """The components of a key path, without an nnx ``Variable``'s trailing ``.value``."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return tuple(_key_str(key) for key in path)


def path_str(path) -> str:
    """Renders a JAX key path as ``'a/b/0'``.

    The trailing ``value`` attribute through which an nnx ``Variable`` holds its array is
    dropped, so an ``nnx.State`` leaf reads ``'l1/kernel'``, like its linen counterpart.

    Examples:
      >>> paths = [p for p, _ in jax.tree_util.tree_flatten_with_path({'fc0': {'kernel': 0}})[0]]
      >>> path_str(paths[0])
      'fc0/kernel'
      >>> path_str((jax.tree_util.DictKey('l1'), jax.tree_util.DictKey('kernel'), jax.tree_util.GetAttrKey('value')))
      'l1/kernel'
    """
    return "/".join(_path_parts(path))


def _is_array_like(leaf) -> bool:
    return (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) or isinstance(leaf, (bool, int, float, complex, np.generic))


def _check_array_leaf(path: str, leaf) -> None:
    if _is_array_like(leaf):
        return
    what = type(leaf).__name__
    name = getattr(leaf, "__name__", None)
    raise TypeError(
        f"leaf {path or '<root>'} is a {what}{f' ({name})' if name else ''}, not an array: lottojax works on "
        "pytrees of arrays. For an Equinox module, split off the arrays first: "
        "params, static = eqx.partition(model, eqx.is_array), and rebuild the model with "
        "eqx.combine(params, static)."
    )


def _flatten(tree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    parts = [_path_parts(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    for p, leaf in zip(parts, leaves):
        _check_array_leaf("/".join(p), leaf)
    return parts, leaves, treedef


def leaves_with_paths(tree) -> tuple[list[str], list[Any], Any]:
    """Flattens ``tree`` into (path strings, leaves, treedef).

    Raises ``TypeError`` naming the path of a leaf that is not an array or a number
    (a function, a string: e.g. an Equinox module's activation).

    Examples:
      >>> leaves_with_paths({'fc0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}})[0]
      ['fc0/bias', 'fc0/kernel']
      >>> leaves_with_paths({'act': jax.nn.relu})
      Traceback (most recent call last):
      ...
      TypeError: leaf act is a ... (relu), not an array: ... eqx.partition(model, eqx.is_array)...
    """
    parts, leaves, treedef = _flatten(tree)
    return ["/".join(p) for p in parts], leaves, treedef


def _resolve_prefix(spec: PyTree, parts: list[tuple[str, ...]], *, name: str) -> list:
    """One value per leaf path: the value of the spec entry whose path is a prefix of it."""
    entries = [(_path_parts(p), v) for p, v in jax.tree_util.tree_flatten_with_path(spec)[0]]
    leaf_paths = ["/".join(p) for p in parts]
    used = [False] * len(entries)
    values = []
    for leaf_parts, leaf_path in zip(parts, leaf_paths):
        matches = [i for i, (e, _) in enumerate(entries) if leaf_parts[: len(e)] == e]
        if not matches:
            raise ValueError(
                f"{name} must be a scalar, a callable (path, leaf) -> value, or a pytree that is a "
                f"prefix of the parameter tree; it has no entry for leaf {leaf_path} (its entries: "
                f"{_show('/'.join(e) for e, _ in entries)}; the leaf paths: {_show(leaf_paths)})"
            )
        best = max(matches, key=lambda i: len(entries[i][0]))
        used[best] = True
        values.append(entries[best][1])
    unused = ["/".join(e) for (e, _), u in zip(entries, used) if not u]
    if unused:
        raise ValueError(
            f"{name} must be a prefix of the parameter tree, but its entry {unused[0]} matches no "
            f"leaf (the leaf paths: {_show(leaf_paths)})"
        )
    return values


def resolve_spec(spec: Spec, tree: PyTree, *, name: str, default: Callable[[str, Any], Any]) -> list:
    """Expands a per-leaf spec into one value per leaf of ``tree`` (in flatten order).

    ``spec`` is ``None`` (use ``default(path, leaf)``), a scalar, a callable
    ``(path, leaf) -> value``, or a pytree that is a prefix of ``tree`` by path: each
    entry applies to the leaves below its path, whatever the containers (a dict describes
    an ``nnx.State`` or a ``FrozenDict``). A callable's ``check_tree(paths, leaves)``
    attribute, if any, is called first with the whole tree.

    Examples:
      >>> params = {'fc0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}, 'output': {'kernel': jnp.ones((3, 1))}}
      >>> resolve_spec({'fc0': 0.2, 'output': 0.1}, params, name='fraction', default=None)
      [0.2, 0.2, 0.1]
      >>> resolve_spec({'fc0': 0.2, 'head': 0.1}, params, name='fraction', default=None)
      Traceback (most recent call last):
      ...
      ValueError: fraction must be ... no entry for leaf output/kernel ...
    """
    parts, leaves, _ = _flatten(tree)
    paths = ["/".join(p) for p in parts]
    if spec is None:
        return [default(p, x) for p, x in zip(paths, leaves)]
    is_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(spec))
    if is_leaf and callable(spec):
        check_tree = getattr(spec, "check_tree", None)
        if check_tree is not None:
            check_tree(paths, leaves)
        return [spec(p, x) for p, x in zip(paths, leaves)]
    if not is_leaf:
        return _resolve_prefix(spec, parts, name=name)
    return [spec] * len(leaves)


def default_prunable(path: str, leaf) -> bool:
    """The default prunable spec: kernels, i.e. leaves with ``ndim >= 2``."""
    del path
    return jnp.ndim(leaf) >= 2


def prunable_flags(tree: PyTree, prunable: Spec = None) -> list[bool]:
    """One static Python bool per leaf of ``tree``: may that leaf be pruned?"""
    flags = resolve_spec(prunable, tree, name="prunable", default=default_prunable)
    bad = [i for i, flag in enumerate(flags) if not isinstance(flag, (bool, np.bool_))]
    if bad:
        path, flag = leaves_with_paths(tree)[0][bad[0]], flags[bad[0]]
        raise TypeError(
            f"prunable must resolve to Python bools per leaf (it is static); got {flag!r} for "
            f"leaf {path or '<root>'}. A predicate should look at the path and the leaf's shape, not its values."
        )
    return [bool(f) for f in flags]



def prunable_size(tree: PyTree, prunable: Spec = None) -> int:
    """Number of entries in the prunable leaves of ``tree`` (arrays or shape structs).

    Examples:
      >>> prunable_size({'w': jnp.ones((3, 4)), 'b': jnp.ones(4)})
      12
    """
    return sum(int(np.prod(leaf.shape)) for leaf, flag in zip(jax.tree.leaves(tree), prunable_flags(tree, prunable))
               if flag)

def prunable_leaves(tree: PyTree, prunable: Spec = None, *, name: str = "mask") -> tuple[list[str], list[Any], Any, list[bool]]:
    """``(paths, leaves, treedef, flags)`` of ``tree``, raising if no leaf is prunable.

    The one check behind every "no leaf is prunable" error: a spec that selects nothing
    (a predicate on ``'kernel'`` against paths that read ``'weight'``) is a mistake, not a
    request to prune nothing, so the error lists the real paths.

    Examples:
      >>> prunable_leaves({'l1': {'weight': jnp.ones((2, 2))}}, lambda path, leaf: path.endswith('kernel'))
      Traceback (most recent call last):
      ...
      ValueError: no leaf of the mask is prunable under this prunable= spec; its leaf paths are ['l1/weight']...
    """
    paths, leaves, treedef = leaves_with_paths(tree)
    flags = prunable_flags(tree, prunable)
    if not any(flags):
        which = "by default (leaves with ndim >= 2)" if prunable is None else "under this prunable= spec"
        raise ValueError(
            f"no leaf of the {name} is prunable {which}; its leaf paths are {_show(paths)}. "
            "Pass prunable= to say which are: a prefix pytree of bools or a predicate "
            "(path, leaf) -> bool on these paths."
        )
    return paths, leaves, treedef, flags


def _describe_node(treedef) -> str:
    if jax.tree_util.treedef_is_leaf(treedef):
        return "a leaf"
    return f"a node of type {treedef.node_data()[0].__name__}"


def _structure_difference(a_def, b_def, paths: list[str], offset: int = 0):
    """``(path of the first leaf under the first differing node, a's node, b's node)``."""
    a_leaf, b_leaf = jax.tree_util.treedef_is_leaf(a_def), jax.tree_util.treedef_is_leaf(b_def)
    where = paths[offset] if offset < len(paths) else "<end>"
    if a_leaf and b_leaf:
        return None
    if a_leaf or b_leaf or a_def.node_data() != b_def.node_data() or len(a_def.children()) != len(b_def.children()):
        return where, _describe_node(a_def), _describe_node(b_def)
    for a_child, b_child in zip(a_def.children(), b_def.children()):
        found = _structure_difference(a_child, b_child, paths, offset)
        if found:
            return found
        offset += a_child.num_leaves
    return None


def check_same_shapes(a: PyTree, b: PyTree, *, a_name: str, b_name: str) -> list[str]:
    """Raises ``ValueError`` naming the first path where ``b`` differs from ``a`` in structure
    or leaf shape; returns the leaf paths. Messages are short: they name paths and node
    types, never a whole tree definition."""
    a_paths, a_leaves, a_def = leaves_with_paths(a)
    b_paths, b_leaves, b_def = leaves_with_paths(b)
    if a_def != b_def:
        missing = [p for p in a_paths if p not in set(b_paths)]
        extra = [p for p in b_paths if p not in set(a_paths)]
        detail = []
        if missing:
            detail.append(f"paths in {a_name} but not in {b_name}: {_show(missing)}")
        if extra:
            detail.append(f"paths in {b_name} but not in {a_name}: {_show(extra)}")
        if not detail:
            found = _structure_difference(a_def, b_def, a_paths)
            where, a_node, b_node = found if found else ("<root>", "another container", "another")
            detail.append(
                f"the same leaf paths, but at the node holding {where} {a_name} has {a_node} "
                f"and {b_name} has {b_node}"
            )
        raise ValueError(f"{b_name} does not have the structure of {a_name} ({'; '.join(detail)})")
    for path, x, y in zip(a_paths, a_leaves, b_leaves):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"{b_name} leaf {path or '<root>'} has shape {jnp.shape(y)} but the {a_name} leaf has {jnp.shape(x)}"
            )
    return a_paths


def check_bool(mask: PyTree, *, name: str = "mask") -> None:
    """Raises ``ValueError`` naming the first leaf of ``mask`` that is not bool, and its dtype.

    Examples:
      >>> check_bool({'w': jnp.ones(2)})
      Traceback (most recent call last):
      ...
      ValueError: mask leaf w has dtype float32; masks are bool ...
    """
    paths, leaves, _ = leaves_with_paths(mask)
    for path, m in zip(paths, leaves):
        if jnp.result_type(m) != jnp.bool_:
            raise ValueError(
                f"{name} leaf {path or '<root>'} has dtype {jnp.result_type(m)}; masks are bool "
                f"(use .astype(bool), or build them with lottojax.ones_like; a params tree is not a mask)"
            )


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
    check_same_shapes(params, mask, a_name=params_name, b_name=mask_name)
    check_bool(mask, name=mask_name)


def conform_mask(params: PyTree, mask: PyTree, *, params_name: str = "params", mask_name: str = "mask") -> PyTree:
    """``mask`` laid out in the tree structure of ``params``, matched leaf by leaf by path.

    Containers may differ (an ``nnx.State`` of ``Param`` variables, the ``OptVariable``
    copy inside an ``nnx.Optimizer``, a plain dict, a ``FrozenDict``) as long as the leaf
    paths, shapes and bool dtype agree; otherwise ``ValueError`` names the path.

    Examples:
      >>> from flax.core import FrozenDict
      >>> conform_mask({'w': jnp.ones(2)}, FrozenDict(w=jnp.array([True, False])))
      {'w': Array([ True, False], dtype=bool)}
    """
    p_paths, p_leaves, p_def = leaves_with_paths(params)
    m_paths, m_leaves, m_def = leaves_with_paths(mask)
    if m_def == p_def or sorted(m_paths) != sorted(p_paths) or len(set(p_paths)) != len(p_paths):
        check_mask(params, mask, params_name=params_name, mask_name=mask_name)
        return mask
    by_path = dict(zip(m_paths, m_leaves))
    leaves = [by_path[p] for p in p_paths]
    for path, x, m in zip(p_paths, p_leaves, leaves):
        if jnp.shape(x) != jnp.shape(m):
            raise ValueError(f"{mask_name} leaf {path or '<root>'} has shape {jnp.shape(m)} but the {params_name} leaf has {jnp.shape(x)}")
    conformed = jax.tree.unflatten(p_def, leaves)
    check_bool(conformed, name=mask_name)
    return conformed


def ones_like(params: PyTree) -> PyTree:
    """The dense mask: all-True, one bool array per parameter array.

    Examples:
      >>> ones_like({'w': jnp.zeros((2, 2)), 'b': jnp.zeros(2)})
      {'b': Array([ True,  True], dtype=bool), 'w': Array([[ True,  True],
             [ True,  True]], dtype=bool)}
    """
    leaves_with_paths(params)  # names a non-array leaf
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """Zeroes the pruned entries of ``params``; the result has the structure of ``params``.

    ``mask`` may use other containers with the same leaf paths (see :func:`conform_mask`).
    To prune a whole training state (weights and optimizer together), use
    :func:`lottojax.mask_state`.

    Examples:
      >>> apply_mask({'w': jnp.array([1., 2., 3.])}, {'w': jnp.array([True, False, True])})
      {'w': Array([1., 0., 3.], dtype=float32)}
    """
    mask = conform_mask(params, mask)
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def _prunable_mask_leaves(mask: PyTree, prunable: Spec, what: str) -> tuple[list[str], list[jax.Array]]:
    check_bool(mask, name=f"{what}: mask")
    paths, leaves, _, flags = prunable_leaves(mask, prunable)
    return [p for p, f in zip(paths, flags) if f], [m for m, f in zip(leaves, flags) if f]


def density(mask: PyTree, prunable: Spec = None) -> jax.Array:
    """Fraction of the prunable entries that are kept (a float32 scalar; jittable).

    Raises ``ValueError`` naming the first leaf that is not bool (a float mask or a params
    tree is not a mask), and if no leaf is prunable.

    Examples:
      >>> mask = {'w': jnp.array([[True, False], [False, False]]), 'b': jnp.array([True, True])}
      >>> float(density(mask))  # only the kernel w counts by default
      0.25
      >>> density({'w': jnp.ones((2, 2))})
      Traceback (most recent call last):
      ...
      ValueError: density: mask leaf w has dtype float32; masks are bool ...
    """
    _, leaves = _prunable_mask_leaves(mask, prunable, "density")
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
    paths, leaves = _prunable_mask_leaves(mask, prunable, "layer_report")
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
