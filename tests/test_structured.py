"""Channel and N:M masks: exact counts against a Python reference, jit/vmap, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lottojax as lj


def expected_count(fraction: float, alive: int) -> int:
    return int(np.round(np.float32(fraction) * np.float32(alive)))


@st.composite
def kernel_and_mask(draw, min_dims=2, max_dims=4):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=min_dims, max_size=max_dims)))
    size = int(np.prod(shape))
    # Few distinct values so that ties are common; some NaN.
    values = draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, np.nan]), min_size=size, max_size=size))
    alive = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    return np.array(values, np.float32).reshape(shape), np.array(alive, bool).reshape(shape)


def reference_channels(scores, alive, fraction, norm):
    """Python reference: per channel (last axis) norm of alive scores, NaN norm as -inf."""
    channels = scores.shape[-1]
    flat_s, flat_a = scores.reshape(-1, channels), alive.reshape(-1, channels)
    live = [c for c in range(channels) if flat_a[:, c].any()]
    def norm_of(c):
        v = np.where(flat_a[:, c], flat_s[:, c], 0.0).astype(np.float64)
        value = np.abs(v).sum() if norm == "l1" else np.sqrt((v * v).sum())
        return -np.inf if np.isnan(value) else value
    count = expected_count(fraction, len(live))
    removed = [c for _, c in sorted((norm_of(c), c) for c in live)[:count]]
    out = alive.copy()
    out[..., removed] = False
    return out, count


@settings(max_examples=30, deadline=None)
@given(data=kernel_and_mask(), fraction=st.floats(0.0, 0.999), norm=st.sampled_from(["l1", "l2"]))
def test_channels_exact_count_whole_channels_reference(data, fraction, norm):
    scores, alive = data
    new = np.asarray(lj.prune_channels({"w": scores}, {"w": alive}, fraction, norm=norm)["w"])
    expected, count = reference_channels(scores, alive, fraction, norm)
    np.testing.assert_array_equal(new, expected)
    live_before = alive.reshape(-1, alive.shape[-1]).any(0).sum()
    live_after = new.reshape(-1, new.shape[-1]).any(0).sum()
    assert live_before - live_after == count
    assert not np.any(new & ~alive), "masks only shrink"


def test_channels_hand_worked_conv_l2_and_other_axis():
    w = np.zeros((3, 3, 2, 4), np.float32)
    w[..., 0], w[..., 1], w[..., 2], w[..., 3] = 1.0, 0.2, 0.5, 0.5  # l2 norms 4.24, .85, 2.12, 2.12
    mask = lj.prune_channels(lj.magnitude({"k": w}), lj.ones_like({"k": w}), 0.5, norm="l2")["k"]
    assert mask[..., 0].all() and not mask[..., 1].any() and not mask[..., 2].any() and mask[..., 3].all()
    # axis=0: rows of a dense kernel are the channels (e.g. input features).
    d = jnp.array([[1.0, 1.0], [0.1, 0.1], [2.0, 0.0]])
    rows = lj.prune_channels({"d": d}, lj.ones_like({"d": d}), 0.34, axis=0)["d"]
    np.testing.assert_array_equal(rows, [[True, True], [False, False], [True, True]])


def gather_groups(a: np.ndarray, axis: int, m: int) -> np.ndarray:
    moved = np.moveaxis(a, axis, -1)
    return moved.reshape(-1, moved.shape[-1] // m, m).reshape(-1, m)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 4)]),
    axis=st.integers(-4, 3),
    seed=st.integers(0, 10_000),
    dense=st.booleans(),
)
def test_nm_groups_keep_exactly_n_best_alive(shape, nm, axis, seed, dense):
    n, m = nm
    axis = axis % len(shape)
    shape[axis] *= m
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=shape).astype(np.float32)  # ties are common
    alive = np.ones(shape, bool) if dense else rng.random(shape) < 0.6
    new = np.asarray(lj.prune_nm({"w": scores}, {"w": alive}, n=n, m=m, axis=axis)["w"])
    assert not np.any(new & ~alive)
    for s, a, k in zip(gather_groups(scores, axis, m), gather_groups(alive, axis, m), gather_groups(new, axis, m)):
        ranked = sorted((i for i in range(m) if a[i]), key=lambda i: (s[i], i))  # pruned first
        expected = set(ranked[max(len(ranked) - n, 0):])
        assert set(np.flatnonzero(k)) == expected
        assert k.sum() == (n if dense else min(n, a.sum()))


def test_nm_two_four_on_a_conv_kernel_along_input_channels():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 5))
    mask = lj.prune_nm(lj.magnitude({"k": kernel}), lj.ones_like({"k": kernel}), n=2, m=4)["k"]
    groups = np.asarray(mask).reshape(3, 3, 2, 4, 5).sum(axis=3)
    assert np.all(groups == 2)
    assert float(lj.density({"k": mask})) == 0.5


def test_jit_and_vmap_match_per_seed():
    keys = jax.random.split(jax.random.key(1), 3)
    scores = jax.vmap(lambda k: {"a": jax.random.normal(k, (8, 6)), "b": jax.random.normal(k, (4, 4, 4, 3))})(keys)
    masks = jax.vmap(lj.ones_like)(scores)
    fns = (lambda s, m: lj.prune_channels(s, m, 0.4), lambda s, m: lj.prune_nm(s, m, n=1, m=4))
    for fn in fns:
        batched = jax.jit(jax.vmap(fn))(scores, masks)
        for i in range(3):
            one = jax.tree.map(lambda x: x[i], (scores, masks))
            chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], batched), fn(*one))


def test_nm_composes_with_a_per_leaf_prunable_spec():
    params = {"fc0": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)}, "output": {"kernel": jnp.ones((3, 2))}}
    mask = lj.prune_nm(lj.magnitude(params), lj.ones_like(params), n=2, m=4, prunable={"fc0": {"kernel": True, "bias": False}, "output": False})
    assert int(mask["fc0"]["kernel"].sum()) == 12 and bool(mask["output"]["kernel"].all())


def test_bad_input_errors_are_clear():
    params = {"fc0": {"kernel": jnp.ones((6, 4))}, "output": {"kernel": jnp.ones((4, 2))}}
    mask = lj.ones_like(params)
    with pytest.raises(ValueError, match=r"leaf fc0/kernel has shape \(6, 4\): its axis -2 has length 6, not a multiple of m=4"):
        lj.prune_nm(params, mask, n=2, m=4)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        lj.prune_nm(params, mask, n=5, m=4)
    with pytest.raises(ValueError, match="axis=3 is out of range for leaf fc0/kernel"):
        lj.prune_nm(params, mask, n=1, m=2, axis=3)
    with pytest.raises(ValueError, match="norm='l3'"):
        lj.prune_channels(params, mask, 0.5, norm="l3")
    with pytest.raises(ValueError, match=r"fraction for output/kernel=1.0 is outside \[0, 1\)"):
        lj.prune_channels(params, mask, {"fc0": 0.5, "output": 1.0})
    with pytest.raises(ValueError, match=r"fc0/kernel has shape"):
        lj.prune_channels(params, {"fc0": {"kernel": jnp.ones((4, 6), bool)}, "output": mask["output"]}, 0.5)
