"""Fuzzing the pruning API: random pytrees (dicts, lists, tuples, ``nnx.State``, Equinox
partitions), prunable specs, fractions, scores with ties, NaN, inf and -0.0, and masks with
holes. Every call either returns the mask an independent NumPy reference computes (the
documented exact counts and order) or raises an error that names the tree path (or the
argument); it never returns a silently wrong mask. The same call under ``jax.jit`` gives
the same mask."""
import math
import os
import zlib

import equinox as eqx
import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lottojax.masks import leaves_with_paths, prunable_flags
from lottojax.prune import prune_global, prune_layerwise

EXAMPLES = int(os.environ.get("LOTTOJAX_FUZZ_EXAMPLES", 25))  # the campaign of docs/reliability.md ran 1000
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, math.nan, math.inf, -math.inf]
SCORE = st.one_of(st.sampled_from(SPECIAL), st.floats(-10, 10, width=32, allow_subnormal=False))
SHAPE = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
NAME = st.text("abcdefgh", min_size=1, max_size=3)


def arrays(shape, dtype, elements):
    return hnp.arrays(dtype, shape, elements=elements)


@st.composite
def structures(draw, depth=0, dicts_only=False):
    """A nested container whose leaves are shapes."""
    if depth >= 2 or draw(st.integers(0, 3)) == 0:
        return draw(SHAPE)
    size = draw(st.integers(1, 3))
    kind = "dict" if dicts_only else draw(st.sampled_from(["dict", "list", "tuple"]))
    children = [draw(structures(depth + 1, dicts_only)) for _ in range(size)]
    if kind == "dict":
        keys = draw(st.lists(NAME, min_size=size, max_size=size, unique=True))
        return dict(zip(keys, children))
    return children if kind == "list" else tuple(children)


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


@st.composite
def trees(draw):
    """``(scores, mask)``: the same random pytree twice, float32 scores and a bool mask."""
    kind = draw(st.sampled_from(["plain", "plain", "nnx", "equinox"]))
    if kind == "equinox":
        mlp = eqx.nn.MLP(draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                         draw(st.integers(0, 2)), key=jax.random.key(0))
        params, _ = eqx.partition(mlp, eqx.is_array)
        shapes = [np.shape(x) for x in jax.tree.leaves(params)]
        scores = jax.tree.unflatten(jax.tree.structure(params),
                                    [draw(arrays(s, np.float32, SCORE)) for s in shapes])
        mask = jax.tree.unflatten(jax.tree.structure(params), [draw(arrays(s, np.bool_, st.booleans())) for s in shapes])
        return scores, mask
    structure = draw(structures(dicts_only=kind == "nnx"))
    leaves, treedef = jax.tree.flatten(structure, is_leaf=_is_shape)
    scores = treedef.unflatten([draw(arrays(s, np.float32, SCORE)) for s in leaves])
    mask = treedef.unflatten([draw(arrays(s, np.bool_, st.booleans())) for s in leaves])
    if kind == "nnx" and isinstance(structure, dict):
        wrap = lambda tree: nnx.State(jax.tree.map(nnx.Param, tree))
        return wrap(scores), wrap(mask)
    return scores, mask


def _crc(path, salt):
    return (zlib.crc32(path.encode()) + salt) % 3


@st.composite
def prunable_specs(draw, tree):
    """A prunable spec and the flags it means, worked out here without the library."""
    paths, leaves, _ = leaves_with_paths(tree)
    kind = draw(st.sampled_from(["default", "bool", "predicate", "prefix"]))
    if kind == "default":
        return None, [np.ndim(x) >= 2 for x in leaves]
    if kind == "bool":
        flag = draw(st.booleans())
        return flag, [flag] * len(leaves)
    salt = draw(st.integers(0, 2))
    if kind == "predicate" or not isinstance(tree, dict) or not tree:
        return (lambda path, leaf: _crc(path, salt) != 0), [_crc(p, salt) != 0 for p in paths]
    chosen = {k: draw(st.booleans()) for k in tree}
    return chosen, [chosen[p.split("/")[0]] for p in paths]


FRACTION = st.one_of(st.floats(0, 1, exclude_max=True, width=32, allow_subnormal=False),
                     st.sampled_from([0.0, 0.5, 0.25, 1 / 3, 0.999]))
BAD_FRACTION = st.sampled_from([-0.1, 1.0, 1.5, math.nan, math.inf])


def expected_removed(scores, alive, count):
    """The ``count`` lowest alive scores (NaN as -inf, -0.0 as 0.0), ties to the lower index."""
    key = np.where(np.isnan(scores), -np.inf, scores).astype(np.float32)
    key = np.where(key == 0, np.float32(0), key)
    index = np.flatnonzero(alive)
    order = index[np.lexsort((index, key[index]))]
    removed = np.zeros(alive.shape, bool)
    removed[order[:count]] = True
    return removed


def exact_count(fraction, alive):
    return int(np.clip(np.round(np.float32(fraction) * np.float32(alive)), 0, alive))


def names_a_path(message, paths):
    return any((p or "<root>") in message for p in paths)


@SETTINGS
@given(data=st.data())
def test_layerwise_returns_the_reference_mask_or_names_the_path(data):
    scores, mask = data.draw(trees())
    prunable, flags = data.draw(prunable_specs(mask))
    paths, score_leaves, _ = leaves_with_paths(scores)
    mask_leaves = jax.tree.leaves(mask)
    per_leaf = data.draw(st.booleans())
    values = data.draw(st.lists(st.one_of(FRACTION, BAD_FRACTION) if data.draw(st.booleans()) else FRACTION,
                                min_size=3, max_size=3))
    fraction = (lambda path, leaf: values[_crc(path, 0)]) if per_leaf else values[0]
    fractions = [values[_crc(p, 0)] if per_leaf else values[0] for p in paths]
    bad = [p for p, f, flag in zip(paths, fractions, flags) if flag and not 0 <= f < 1]
    call = lambda s, m: prune_layerwise(s, m, fraction, prunable=prunable)
    if not any(flags) or bad:
        with pytest.raises(ValueError) as error:
            call(scores, mask)
        message = str(error.value)
        assert names_a_path(message, bad[:1] if bad else paths) or (not paths and "prunable" in message), message
        return
    assert [bool(f) for f in prunable_flags(mask, prunable)] == flags
    result = call(scores, mask)
    assert jax.tree.structure(result) == jax.tree.structure(mask)
    for path, s, m, new, flag, f in zip(paths, score_leaves, mask_leaves, jax.tree.leaves(result), flags, fractions):
        new, m = np.asarray(new), np.asarray(m)
        assert new.shape == m.shape and new.dtype == bool, path
        if not flag:
            np.testing.assert_array_equal(new, m, err_msg=path)
            continue
        alive = m.reshape(-1)
        removed = expected_removed(np.asarray(s).reshape(-1), alive, exact_count(f, alive.sum()))
        np.testing.assert_array_equal(new.reshape(-1), alive & ~removed, err_msg=path)
    if data.draw(st.integers(0, 3)) == 0:  # compiling costs: a quarter of the examples
        jitted = jax.jit(call)(scores, mask)
        for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(result)):
            np.testing.assert_array_equal(a, b)


@SETTINGS
@given(data=st.data())
def test_global_returns_the_reference_mask_or_names_the_path(data):
    scores, mask = data.draw(trees())
    prunable, flags = data.draw(prunable_specs(mask))
    fraction = data.draw(st.one_of(FRACTION, BAD_FRACTION))
    paths, score_leaves, _ = leaves_with_paths(scores)
    mask_leaves = [np.asarray(m) for m in jax.tree.leaves(mask)]
    call = lambda s, m: prune_global(s, m, fraction, prunable=prunable)
    if not 0 <= fraction < 1:
        with pytest.raises(ValueError, match=r"fraction=.* is outside \[0, 1\)"):
            call(scores, mask)
        return
    if not any(flags):
        with pytest.raises(ValueError, match="no leaf of the mask is prunable") as error:
            call(scores, mask)
        assert names_a_path(str(error.value), paths) or not paths
        return
    result = [np.asarray(x) for x in jax.tree.leaves(call(scores, mask))]
    picked = [i for i, f in enumerate(flags) if f]
    alive = np.concatenate([mask_leaves[i].reshape(-1) for i in picked])
    flat = np.concatenate([np.asarray(score_leaves[i]).reshape(-1) for i in picked])
    expected = alive & ~expected_removed(flat, alive, exact_count(fraction, alive.sum()))
    got = np.concatenate([result[i].reshape(-1) for i in picked])
    np.testing.assert_array_equal(got, expected)
    for i, (m, new) in enumerate(zip(mask_leaves, result)):
        if not flags[i]:
            np.testing.assert_array_equal(new, m, err_msg=paths[i])


@SETTINGS
@given(data=st.data())
def test_a_mask_that_does_not_fit_is_named_by_its_path(data):
    scores, mask = data.draw(trees())
    paths, mask_leaves, treedef = leaves_with_paths(mask)
    if not paths:
        return
    i = data.draw(st.integers(0, len(paths) - 1))
    leaves = list(mask_leaves)
    if data.draw(st.booleans()):
        leaves[i] = np.zeros(np.shape(leaves[i]) + (2,), bool)
        pattern = f"leaf {paths[i] or '<root>'} has shape"
    else:
        leaves[i] = np.asarray(leaves[i], np.float32)
        pattern = f"leaf {paths[i] or '<root>'} has dtype float32"
    bad = jax.tree.unflatten(treedef, leaves)
    for prune in (prune_layerwise, prune_global):
        with pytest.raises(ValueError) as error:
            prune(scores, bad, 0.5, prunable=True)
        assert pattern in str(error.value), str(error.value)
