"""Pruning: exact counts, determinism, masks only shrink, jit/vmap, any pytree, bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lottojax as lj


def expected_count(fraction: float, alive: int) -> int:
    """The documented count: round-half-even of the float32 product."""
    return int(np.round(np.float32(fraction) * np.float32(alive)))


def reference_removed(scores: np.ndarray, alive: np.ndarray, count: int) -> np.ndarray:
    """Independent reference: sort alive entries by (score with NaN as -inf, index) in Python."""
    flat_s, flat_a = scores.reshape(-1), alive.reshape(-1)
    key = [(-np.inf if np.isnan(s) else float(s), i) for i, s in enumerate(flat_s) if flat_a[i]]
    removed = np.zeros(flat_s.shape, bool)
    for _, i in sorted(key)[:count]:
        removed[i] = True
    return removed.reshape(scores.shape)


shapes = st.lists(st.integers(1, 6), min_size=2, max_size=3).map(tuple)
fractions = st.floats(0.0, 0.999, allow_nan=False)


@st.composite
def scored_mask(draw, shape=None):
    shape = shape or draw(shapes)
    size = int(np.prod(shape))
    # Few distinct values so that ties are common.
    scores = np.array(draw(st.lists(st.integers(-3, 3), min_size=size, max_size=size)), np.float32)
    alive = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool)
    return scores.reshape(shape), alive.reshape(shape)


@settings(max_examples=60, deadline=None)
@given(data=scored_mask(), fraction=fractions)
def test_layerwise_removes_exact_count_of_lowest(data, fraction):
    scores, alive = data
    new = np.asarray(lj.prune_layerwise({"w": scores}, {"w": alive}, fraction)["w"])
    count = expected_count(fraction, int(alive.sum()))
    assert int(alive.sum()) - int(new.sum()) == count
    assert not np.any(new & ~alive), "masks only shrink"
    np.testing.assert_array_equal(new, alive & ~reference_removed(scores, alive, count))


@settings(max_examples=40, deadline=None)
@given(a=scored_mask(), b=scored_mask(), fraction=fractions)
def test_global_removes_exact_total_of_lowest(a, b, fraction):
    scores = {"a": a[0], "b": b[0]}
    mask = {"a": a[1], "b": b[1]}
    new = lj.prune_global(scores, mask, fraction)
    alive = int(a[1].sum() + b[1].sum())
    count = expected_count(fraction, alive)
    flat_s = np.concatenate([a[0].ravel(), b[0].ravel()])
    flat_a = np.concatenate([a[1].ravel(), b[1].ravel()])
    expected = flat_a & ~reference_removed(flat_s, flat_a, count)
    got = np.concatenate([np.asarray(new["a"]).ravel(), np.asarray(new["b"]).ravel()])
    np.testing.assert_array_equal(got, expected)


def test_ties_prune_lower_flat_index_first():
    scores = {"w": jnp.zeros((2, 3))}
    new = lj.prune_layerwise(scores, lj.ones_like(scores), 0.5)
    np.testing.assert_array_equal(new["w"], [[False, False, False], [True, True, True]])


def test_hand_worked_layerwise_with_dead_entries():
    scores = {"w": jnp.array([[0.3, 0.1, 0.9], [0.2, 0.8, 0.05]])}
    mask = {"w": jnp.array([[True, True, True], [True, True, False]])}  # 0.05 already dead
    new = lj.prune_layerwise(scores, mask, 0.4)  # round(0.4 * 5) = 2: 0.1 and 0.2 go
    np.testing.assert_array_equal(new["w"], [[True, False, True], [False, True, False]])


def test_non_finite_scores_documented_order_and_exact_count():
    scores = {"w": jnp.array([[jnp.nan, 1.0, -jnp.inf, jnp.inf, 0.5, jnp.nan]])}
    mask = lj.ones_like(scores)
    new = lj.prune_layerwise(scores, mask, 0.5)  # 3 go: NaN(0), -inf(2), NaN(5) rank as -inf
    np.testing.assert_array_equal(new["w"], [[False, True, False, True, True, False]])
    new = lj.prune_layerwise(scores, mask, 0.9)  # 5 go: only +inf survives
    np.testing.assert_array_equal(new["w"], [[False, False, False, True, False, False]])


def test_per_layer_rates_prefix_and_callable_agree():
    params = {
        "fc0": {"kernel": jnp.arange(100.0).reshape(10, 10), "bias": jnp.ones(10)},
        "output": {"kernel": jnp.arange(20.0).reshape(10, 2), "bias": jnp.ones(2)},
    }
    mask = lj.ones_like(params)
    by_prefix = lj.prune_layerwise(lj.magnitude(params), mask, {"fc0": 0.2, "output": 0.1})
    by_rule = lj.prune_layerwise(
        lj.magnitude(params), mask, lj.rates_by_layer(conv=0.1, dense=0.2, output=0.1)
    )
    chex.assert_trees_all_equal(by_prefix, by_rule)
    assert lj.layer_report(by_prefix) == {"fc0/kernel": (80, 100), "output/kernel": (18, 20)}
    assert bool(by_prefix["fc0"]["bias"].all()) and bool(by_prefix["output"]["bias"].all())


def test_layer_with_nothing_left_prunes_nothing():
    scores = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    mask = {"a": jnp.zeros((2, 2), bool), "b": jnp.ones((2, 2), bool)}
    new = lj.prune_layerwise(scores, mask, 0.5)
    assert int(new["a"].sum()) == 0 and int(new["b"].sum()) == 2


def test_jit_and_vmap_match_eager_and_per_seed():
    keys = jax.random.split(jax.random.key(0), 4)
    scores = jax.vmap(lambda k: {"w": jax.random.normal(k, (8, 5)), "v": jax.random.normal(k, (5, 3))})(keys)
    masks = jax.vmap(lj.ones_like)(scores)
    for prune in (lj.prune_layerwise, lj.prune_global):
        batched = jax.jit(jax.vmap(lambda s, m: prune(s, m, 0.3)))(scores, masks)
        for i in range(4):
            one = jax.tree.map(lambda x: x[i], (scores, masks))
            chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], batched), prune(*one, 0.3))


def test_traced_fraction_is_exact_and_clipped():
    scores = {"w": jnp.arange(10.0).reshape(2, 5)}
    mask = lj.ones_like(scores)
    f = jax.jit(lambda fr: lj.prune_layerwise(scores, mask, fr))
    assert int(f(0.3)["w"].sum()) == 7
    assert int(f(1.5)["w"].sum()) == 0  # traced: clipped to the alive count
    assert int(f(-0.2)["w"].sum()) == 10


def test_no_retrace_across_rounds():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def round_(params, mask):
        return lj.prune_layerwise(lj.magnitude(params), mask, 0.2)

    params = {"w": jax.random.normal(jax.random.key(0), (20, 10))}
    mask = lj.ones_like(params)
    counts = []
    for _ in range(5):
        mask = round_(params, mask)
        counts.append(int(mask["w"].sum()))
    assert counts == [160, 128, 102, 82, 66]  # round(0.2 * alive) each time


def test_works_on_linen_nnx_tuples_lists_dicts():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="output")(nn.relu(nn.Dense(8, name="fc0")(x)))

    linen_params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    _, nnx_state = nnx.split(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    trees = {
        "linen": linen_params,
        "nnx": nnx_state,
        "tuple": (jnp.arange(12.0).reshape(3, 4), jnp.ones(4)),
        "list": [jnp.arange(12.0).reshape(4, 3), jnp.ones(3)],
        "dict": {"k": jnp.arange(12.0).reshape(6, 2)},
    }
    for name, params in trees.items():
        mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.25)
        assert jax.tree.structure(mask) == jax.tree.structure(params), name
        kernels = {p: kt for p, kt in lj.layer_report(mask).items()}
        assert all(k == t - round(0.25 * t) for k, t in kernels.values()), (name, kernels)
        pruned = lj.apply_mask(params, mask)
        for p, m in zip(jax.tree.leaves(pruned), jax.tree.leaves(mask)):
            assert bool(jnp.all(jnp.where(m, True, p == 0))), name
        gmask = lj.prune_global(lj.magnitude(params), lj.ones_like(params), 0.5)
        kept, total = map(sum, zip(*lj.layer_report(gmask).values()))
        assert total - kept == round(0.5 * total), name


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_raises(fraction):
    params = {"w": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        lj.prune_layerwise(params, lj.ones_like(params), fraction)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        lj.prune_global(params, lj.ones_like(params), fraction)


def test_bad_per_layer_fraction_names_the_path():
    params = {"fc0": {"kernel": jnp.ones((3, 3))}, "output": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match="fraction for output/kernel"):
        lj.prune_layerwise(params, lj.ones_like(params), {"fc0": 0.2, "output": 1.0})
    with pytest.raises(ValueError, match="prefix of the parameter tree"):
        lj.prune_layerwise(params, lj.ones_like(params), {"fc0": 0.2, "head": 0.1})


def test_mismatched_mask_errors_name_the_path():
    params = {"fc0": {"kernel": jnp.ones((784, 300))}, "fc1": {"kernel": jnp.ones((300, 100))}}
    bad_shape = {"fc0": {"kernel": jnp.ones((784, 300), bool)}, "fc1": {"kernel": jnp.ones((784, 300), bool)}}
    with pytest.raises(ValueError, match=r"fc1/kernel has shape \(784, 300\) but the .* \(300, 100\)"):
        lj.prune_layerwise(params, bad_shape, 0.2)
    with pytest.raises(ValueError, match=r"fc1/kernel has shape"):
        lj.apply_mask(params, bad_shape)
    missing = {"fc0": {"kernel": jnp.ones((784, 300), bool)}}
    with pytest.raises(ValueError, match="fc1/kernel"):
        lj.apply_mask(params, missing)
    floats = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="masks are bool"):
        lj.apply_mask(params, floats)


def test_nothing_prunable_raises():
    params = {"b": jnp.ones(3)}
    with pytest.raises(ValueError, match="prunable"):
        lj.prune_global(params, lj.ones_like(params), 0.5)
    with pytest.raises(ValueError, match="prunable"):
        lj.density(lj.ones_like(params))


def test_callable_spec_check_tree_hook_sees_the_whole_tree():
    params = {"fc0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "head": {"kernel": jnp.ones((3, 2))}}
    seen = []

    def fraction(path, leaf):
        return 0.5

    fraction.check_tree = lambda paths, leaves: seen.append((list(paths), [jnp.shape(x) for x in leaves]))
    lj.prune_layerwise(params, lj.ones_like(params), fraction)
    assert seen == [(["fc0/bias", "fc0/kernel", "head/kernel"], [(3,), (3, 3), (3, 2)])]


def test_prune_layerwise_refuses_a_spec_that_selects_nothing():
    params = {"l1": {"weight": jnp.ones((3, 3))}}
    with pytest.raises(ValueError, match=r"no leaf of the mask is prunable .*\['l1/weight'\]"):
        lj.prune_layerwise(params, lj.ones_like(params), 0.5, prunable=lambda path, leaf: path.endswith("kernel"))
