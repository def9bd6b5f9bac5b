"""Uniform / Erdős–Rényi / ERK per-layer densities: global target met, capping, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lottojax as lj

CONVNET = {
    "conv0": {"kernel": jnp.zeros((3, 3, 3, 16)), "bias": jnp.zeros(16)},
    "conv1": {"kernel": jnp.zeros((3, 3, 16, 32))},
    "bn1": {"scale": jnp.zeros(32)},
    "fc0": {"kernel": jnp.zeros((512, 128))},
    "output": {"kernel": jnp.zeros((128, 10))},
}
KERNELS = ["conv0", "conv1", "fc0", "output"]


def kernel_sizes(params):
    return {k: int(np.prod(params[k]["kernel"].shape)) for k in KERNELS}


@pytest.mark.parametrize("distribution", ["uniform", "erdos_renyi", "erk"])
@pytest.mark.parametrize("density", [0.9, 0.5, 0.1, 0.01])
def test_kept_weights_sum_to_the_global_target(distribution, density):
    d = lj.layer_densities(CONVNET, density=density, distribution=distribution)
    sizes = kernel_sizes(CONVNET)
    kept = sum(d[k]["kernel"] * n for k, n in sizes.items())
    np.testing.assert_allclose(kept, density * sum(sizes.values()), rtol=1e-12)
    assert all(0 < d[k]["kernel"] <= 1 for k in KERNELS)
    assert d["conv0"]["bias"] == 1.0 and d["bn1"]["scale"] == 1.0
    # From a dense mask the fraction spec hits each layer's count: n - round((1 - d) n).
    mask = lj.prune_layerwise(lj.magnitude(CONVNET), lj.ones_like(CONVNET), lj.densities_to_fractions(d))
    report = lj.layer_report(mask)
    total_kept = sum(k for k, _ in report.values())
    assert abs(total_kept - density * sum(sizes.values())) <= len(KERNELS)


def test_erk_hand_worked_and_uses_kernel_dimensions():
    params = {"conv": jnp.zeros((3, 3, 16, 32)), "output": jnp.zeros((32, 10))}
    # raw ERK: conv (3+3+16+32)/4608, output 42/320; ε solves Σ ε raw n = 0.1 * 4928.
    eps = 0.1 * 4928 / (54 + 42)
    d = lj.erk(params, density=0.1)
    np.testing.assert_allclose([d["conv"], d["output"]], [eps * 54 / 4608, eps * 42 / 320], rtol=1e-12)
    # Erdős–Rényi looks at the last two dimensions only: conv raw (16+32)/(16*32).
    er = lj.layer_densities(params, density=0.1, distribution="erdos_renyi")
    eps_er = 0.1 * 4928 / (48 / 512 * 4608 + 42)
    np.testing.assert_allclose(er["conv"], eps_er * 48 / 512, rtol=1e-12)
    uniform = lj.layer_densities(params, density=0.1, distribution="uniform")
    assert uniform == {"conv": 0.1, "output": 0.1}


def test_capped_layers_stay_dense_and_the_rest_absorbs_the_budget():
    d = lj.erk(CONVNET, density=0.6)
    sizes = kernel_sizes(CONVNET)
    capped = [k for k in KERNELS if d[k]["kernel"] == 1.0]
    assert "conv0" in capped and "output" in capped and "fc0" not in capped
    rest = [k for k in KERNELS if k not in capped]
    budget = 0.6 * sum(sizes.values()) - sum(sizes[k] for k in capped)
    np.testing.assert_allclose(sum(d[k]["kernel"] * sizes[k] for k in rest), budget, rtol=1e-12)
    assert lj.erk(CONVNET, density=1.0) == jax.tree.map(lambda _: 1.0, CONVNET)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 40), min_size=2, max_size=4).map(tuple), min_size=1, max_size=5),
    density=st.floats(0.001, 1.0),
)
def test_erk_meets_any_target_within_float_error(shapes, density):
    params = {f"l{i}": jnp.zeros(s) for i, s in enumerate(shapes)}
    d = lj.erk(params, density=density)
    sizes = {k: int(np.prod(v.shape)) for k, v in params.items()}
    np.testing.assert_allclose(sum(d[k] * n for k, n in sizes.items()), density * sum(sizes.values()), rtol=1e-9)
    assert all(0 < v <= 1 for v in d.values())


def test_bad_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"density=0 must be in \(0, 1\]"):
        lj.erk(CONVNET, density=0)
    with pytest.raises(ValueError, match=r"density=1.5"):
        lj.erk(CONVNET, density=1.5)
    with pytest.raises(ValueError, match="distribution='erk2' unknown"):
        lj.layer_densities(CONVNET, density=0.5, distribution="erk2")
    with pytest.raises(ValueError, match="no leaf of the params is prunable"):
        lj.erk({"b": jnp.zeros(3)}, density=0.5)
