"""Masks, density reports, prunable specs, rewinding and the two LTH controls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lottojax as lj

PARAMS = {
    "fc0": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones(4)},
    "output": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.ones(2)},
}


def test_density_counts_only_prunable_leaves_by_default():
    mask = lj.ones_like(PARAMS)
    mask["fc0"]["kernel"] = mask["fc0"]["kernel"].at[0].set(False)  # 4 of 12 pruned
    mask["fc0"]["bias"] = jnp.zeros(4, bool)  # not prunable by default: ignored
    assert float(lj.density(mask)) == pytest.approx(16 / 20)
    assert float(lj.sparsity(mask)) == pytest.approx(4 / 20)
    assert lj.layer_report(mask) == {"fc0/kernel": (8, 12), "output/kernel": (8, 8)}


def test_prunable_spec_as_prefix_bool_and_predicate():
    mask = lj.ones_like(PARAMS)
    mask["output"]["kernel"] = jnp.zeros((4, 2), bool)
    assert float(lj.density(mask, {"fc0": True, "output": False})) == pytest.approx(16 / 16)
    assert float(lj.density(mask, lambda path, leaf: path.startswith("output"))) == pytest.approx(2 / 10)
    assert float(lj.density(mask, True)) == pytest.approx(18 / 26)
    with pytest.raises(TypeError, match="Python bools"):
        lj.density(mask, lambda path, leaf: leaf.sum() > 0)


def test_prefix_spec_is_matched_by_path_not_container():
    from flax.core import FrozenDict

    mask = lj.ones_like(FrozenDict(PARAMS))
    mask = mask.copy({"output": {"kernel": jnp.zeros((4, 2), bool), "bias": mask["output"]["bias"]}})
    assert float(lj.density(mask, {"fc0": True, "output": False})) == pytest.approx(1.0)
    assert float(lj.density(mask, {"fc0": {"kernel": False, "bias": False}, "output": True})) == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match=r"entry fc1 matches no leaf .*\['fc0/bias', 'fc0/kernel', 'output/bias', 'output/kernel'\]"):
        lj.density(mask, {"fc0": True, "fc1": True, "output": False})


def test_structure_errors_are_short_and_name_the_node():
    tupled = {"fc0": (PARAMS["fc0"]["bias"], PARAMS["fc0"]["kernel"]), "output": PARAMS["output"]}
    with pytest.raises(ValueError, match="paths in params but not in mask: \\['fc0/bias', 'fc0/kernel'\\]") as err:
        lj.check_mask(PARAMS, lj.ones_like(tupled))
    assert "PyTreeDef" not in str(err.value)


def test_apply_mask_takes_a_mask_in_other_containers():
    from flax.core import FrozenDict

    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    pruned = lj.apply_mask(PARAMS, FrozenDict(mask))
    assert type(pruned) is dict
    for p, q in zip(jax.tree.leaves(pruned), jax.tree.leaves(lj.apply_mask(PARAMS, mask))):
        np.testing.assert_array_equal(p, q)


def test_density_under_jit_and_vmap():
    masks = jax.vmap(lambda k: jax.tree.map(lambda x: jax.random.bernoulli(k, 0.5, x.shape), PARAMS))(
        jax.random.split(jax.random.key(0), 3)
    )
    batched = jax.jit(jax.vmap(lj.density))(masks)
    for i in range(3):
        assert float(batched[i]) == pytest.approx(float(lj.density(jax.tree.map(lambda x: x[i], masks))))


def test_format_report_lists_layers_and_total():
    text = lj.format_report(lj.ones_like(PARAMS))
    assert "fc0/kernel" in text and "output/kernel" in text and "100.00%" in text


def test_rewind_takes_values_of_target_and_zeroes_pruned():
    trained = jax.tree.map(lambda x: x * 7.0, PARAMS)
    mask = lj.prune_layerwise(lj.magnitude(trained), lj.ones_like(trained), 0.5)
    rewound = lj.rewind(trained, PARAMS, mask)
    for r, p, m in zip(jax.tree.leaves(rewound), jax.tree.leaves(PARAMS), jax.tree.leaves(mask)):
        np.testing.assert_array_equal(r, np.where(m, p, 0.0))
    with pytest.raises(ValueError, match="to leaf fc0/kernel"):
        lj.rewind(trained, {**PARAMS, "fc0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(4)}}, mask)


def test_random_reinit_keeps_mask_and_changes_values():
    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    init = lambda k: jax.tree.map(lambda x: jax.random.normal(k, x.shape), PARAMS)
    fresh = lj.random_reinit(init, mask, key=jax.random.key(3))
    for f, m in zip(jax.tree.leaves(fresh), jax.tree.leaves(mask)):
        assert bool(jnp.all((f != 0) == m))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.95))
def test_shuffle_mask_keeps_per_layer_counts(seed, p):
    key = jax.random.key(seed)
    mask = jax.tree.map(lambda x: jax.random.bernoulli(key, p, x.shape), PARAMS)
    shuffled = lj.shuffle_mask(mask, key=jax.random.fold_in(key, 1))
    assert lj.layer_report(shuffled) == lj.layer_report(mask)
    np.testing.assert_array_equal(shuffled["fc0"]["bias"], mask["fc0"]["bias"])  # not prunable


def test_shuffle_mask_moves_entries():
    big = {"w": jnp.arange(1000.0).reshape(20, 50)}
    mask = lj.prune_layerwise(lj.magnitude(big), lj.ones_like(big), 0.5)  # first half pruned
    shuffled = lj.shuffle_mask(mask, key=jax.random.key(0))
    assert int(shuffled["w"].sum()) == 500
    assert int((shuffled["w"] != mask["w"]).sum()) > 300  # ~500 expected for a fresh draw
