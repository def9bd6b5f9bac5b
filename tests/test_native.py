"""The native CSR kernel: equal to the dense product (every batch path, threads, jit, vmap), bad input, and
what happens where it cannot be built."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax import native
from lottojax.sparse_inference import FORMATS, export_inference

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def sparse_weight(outputs, inputs, density, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((outputs, inputs)).astype(np.float32) * (rng.random((outputs, inputs)) < density)
    weight[1] = 0  # an output row with no weights: bias only
    return weight


def reference(x, weight, bias, relu):
    y = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    return np.maximum(y, 0) if relu else y


@needs_kernel
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 63, 64, 65, 130, 1000])  # below a 64-column block, exact blocks, a ragged last block
def test_csr_matmul_equals_the_dense_product(batch, relu):
    weight = sparse_weight(37, 50, 0.1)
    bias = np.random.default_rng(1).standard_normal(37).astype(np.float32)
    x = np.random.default_rng(batch).standard_normal((batch, 50)).astype(np.float32)
    run = jax.jit(lambda x: native.csr_matmul(x, *native.csr_arrays(weight), bias=bias, relu=relu))
    np.testing.assert_allclose(run(x), reference(x, weight, bias, relu), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_layer_large_enough_for_the_thread_pool_is_exact():
    weight = sparse_weight(300, 784, 0.036)  # LeNet-300-100's first layer at 3.6%: blocks spread over threads
    x = np.random.default_rng(0).standard_normal((1000, 784)).astype(np.float32)
    y = native.csr_matmul(x, *native.csr_arrays(weight))
    np.testing.assert_allclose(y, reference(x, weight, 0.0, False), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_csr_matmul_under_vmap_equals_each_call():
    weight = sparse_weight(12, 9, 0.3)
    xs = np.random.default_rng(0).standard_normal((4, 70, 9)).astype(np.float32)
    arrays = native.csr_arrays(weight)
    batched = jax.vmap(lambda x: native.csr_matmul(x, *arrays, relu=True))(xs)
    np.testing.assert_array_equal(batched, np.stack([native.csr_matmul(x, *arrays, relu=True) for x in xs]))


@needs_kernel
def test_an_all_zero_matrix_gives_the_bias():
    indptr, indices, values = native.csr_arrays(np.zeros((4, 6), np.float32))
    assert indices.size == 0
    y = native.csr_matmul(np.ones((2, 6), np.float32), indptr, indices, values, bias=np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(y, [[0, 1, 2, 3]] * 2)


@needs_kernel
def test_bad_arguments_are_named():
    indptr, indices, values = native.csr_arrays(sparse_weight(5, 4, 0.5))
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"x must be a 2-D float32 array; got shape \(2, 4\) dtype int32"):
        native.csr_matmul(x.astype(np.int32), indptr, indices, values)
    with pytest.raises(ValueError, match=r"indptr must be a 1-D int32"):
        native.csr_matmul(x, indptr.astype(np.float32), indices, values)
    with pytest.raises(ValueError, match=r"bias must have 5 \(got 3\)"):
        native.csr_matmul(x, indptr, indices, values, bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"indices and values one per nonzero"):
        native.csr_matmul(x, indptr, indices, values[:-1])
    with pytest.raises(ValueError, match="weight must be 2-D"):
        native.csr_arrays(np.zeros(3))
    with pytest.raises(Exception, match="reads outside x"):  # checked inside the kernel, on every call
        jax.block_until_ready(native.csr_matmul(x, indptr, indices + 4, values))
    with pytest.raises(Exception, match="indptr decreases"):
        decreasing = np.array([0, 2, 1, 1, 1, len(values)], np.int32)
        jax.block_until_ready(native.csr_matmul(x, decreasing, indices, values))


@pytest.fixture
def reload_native():
    """Forgets the loaded kernel before and after a test that changes how it loads."""
    native._load.cache_clear()
    yield
    native._load.cache_clear()


@pytest.mark.parametrize("env, why", [
    ({"LOTTOJAX_NATIVE": "0"}, "disabled by LOTTOJAX_NATIVE=0"),
    ({"CXX": "no-such-compiler-xyz"}, r"no C\+\+ compiler: 'no-such-compiler-xyz'.*set CXX"),
    ({"CXX": "false"}, r"building or loading the kernel failed: `false -O3"),  # a 'compiler' that fails
])
def test_without_the_kernel_auto_skips_csr_and_forcing_it_says_why(env, why, monkeypatch, tmp_path, reload_native):
    monkeypatch.setenv("LOTTOJAX_CACHE_DIR", str(tmp_path))  # nothing cached: the build runs
    monkeypatch.delenv("LOTTOJAX_NATIVE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not native.available()
    assert re.search(why, native.unavailable_reason())
    with pytest.raises(RuntimeError, match="native CSR kernel is not available: " + why):
        native.csr_matmul(np.ones((1, 2), np.float32), *native.csr_arrays(np.eye(2)))

    from lottojax.models import create
    params, _ = create("mlp", input_shape=(6,), hidden=(8,)).init(jax.random.key(0))
    exported = export_inference("mlp", params, measure=lambda fns: {f: 1.0 for f in fns})
    assert all(set(m) == set(FORMATS) - {"csr"} for m in exported.measurements.values())
    assert all(skipped["csr"].startswith("native kernel unavailable") for skipped in exported.skipped.values())
    with pytest.raises(RuntimeError, match=r"'csr' for layers \['output'\], but the native kernel unavailable"):
        export_inference("mlp", params, formats={"output": "csr"})
    with pytest.raises(ValueError, match="no candidate format is available here"):
        export_inference("mlp", params, candidates=("csr",))


def test_the_cache_key_follows_the_compiler_and_jax(monkeypatch, tmp_path):
    monkeypatch.setenv("LOTTOJAX_CACHE_DIR", str(tmp_path))
    path = native.library_path("c++")
    assert path.parent == tmp_path / "native" and path.name.startswith("csr_matmul-")
    assert native.library_path("clang++") != path
    monkeypatch.setattr(jax, "__version__", "0.0.0")
    assert native.library_path("c++") != path


@needs_kernel
def test_exported_csr_layers_run_under_jit_with_the_bias_and_relu_fused():
    weight = sparse_weight(8, 6, 0.4)
    params = {"fc0": {"kernel": jnp.asarray(weight.T), "bias": jnp.ones(8)},
              "output": {"kernel": jnp.asarray(sparse_weight(10, 8, 0.5, seed=3).T), "bias": jnp.zeros(10)}}
    exported = export_inference("mlp", params, formats="csr", hidden=(8,))
    assert exported.formats == {"fc0": "csr", "output": "csr"}
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    hidden = np.maximum(x @ np.asarray(params["fc0"]["kernel"]) + 1, 0)
    np.testing.assert_allclose(exported(x), hidden @ np.asarray(params["output"]["kernel"]), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 63, 64, 130, 1000])  # per example, whole blocks, a ragged block, threads
def test_csr_chain_equals_the_layers_one_after_another(batch):
    weights = [sparse_weight(40, 70, 0.2, seed=0), sparse_weight(30, 40, 0.3, seed=1), sparse_weight(7, 30, 0.5, seed=2)]
    biases = [np.random.default_rng(i).standard_normal(w.shape[0]).astype(np.float32) for i, w in enumerate(weights)]
    relu = [True, True, False]
    x = np.random.default_rng(batch).standard_normal((batch, 70)).astype(np.float32)
    layers = [dict(zip(("indptr", "indices", "values"), native.csr_arrays(w)), bias=b) for w, b in zip(weights, biases)]
    expected = x.astype(np.float64)
    for w, b, r in zip(weights, biases, relu):
        expected = reference(expected, w, b, r)
    y = jax.jit(lambda x: native.csr_chain(x, layers, relu=relu))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_chain_whose_layers_do_not_fit_is_refused():
    first = dict(zip(("indptr", "indices", "values"), native.csr_arrays(sparse_weight(5, 4, 0.5))))
    wide = dict(zip(("indptr", "indices", "values"), native.csr_arrays(np.ones((2, 6), np.float32))))  # reads 6 inputs
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"layers \(2\) and relu \(1\) need one entry per layer"):
        native.csr_chain(x, [first, first], relu=[True])
    with pytest.raises(Exception, match="an input index reads outside x"):  # layer 1 has 5 inputs, not 6
        jax.block_until_ready(native.csr_chain(x, [first, wide], relu=[True, False]))
