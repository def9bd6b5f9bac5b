"""Tests of lottojax.models.Conv / conv / max_pool: outputs and gradients equal to
lax.conv_general_dilated and flax.linen.Conv, under jit and vmap; the reference models give
the same logits and gradients with either implementation; the benchmark script runs."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from lottojax.models import Conv, conv, create, max_pool
from lottojax.models.convolution import padding_pairs, resolve_impl

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)

# (input shape, kernel size, strides, padding, dilation): every padding form, strides that
# do and do not divide the input, dilation, 1x1 kernels, 1-D and 3-D.
CASES = [
    ((2, 9, 9, 3), (3, 3), 1, "SAME", 1),
    ((2, 9, 9, 3), (3, 3), 2, "SAME", 1),
    ((2, 11, 11, 3), (3, 3), 2, "VALID", (2, 1)),
    ((2, 9, 8, 3), (3, 2), (2, 1), ((1, 2), (0, 1)), 1),
    ((2, 8, 8, 3), (1, 1), 2, "SAME", 1),
    ((2, 8, 8, 3), (1, 1), 1, 1, 1),
    ((2, 9, 9, 3), (4, 4), 3, (2, 1), 1),
    ((2, 7, 3), (5,), 3, "SAME", 1),
    ((2, 5, 5, 5, 2), (2, 3, 2), 1, "SAME", 1),
    ((3, 2, 2, 5), (3, 3), 1, "SAME", 1),  # input smaller than the kernel: the matrix-product path
    ((2, 2, 3, 3), (3, 3), 2, ((2, 1), (1, 2)), 1),
]


def reference(x, kernel, strides, padding, dilation):
    n = kernel.ndim - 2
    strides = (strides,) * n if isinstance(strides, int) else strides
    dilation = (dilation,) * n if isinstance(dilation, int) else dilation
    spatial = "DHW"[3 - n:]
    pads = padding_pairs(padding, x.shape[1:-1], kernel.shape[:n], strides, dilation)
    return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
                                    precision=lax.Precision.HIGHEST)


def inputs(shape, kernel_size, c_out=4):
    kx, kk, kg = jax.random.split(KEY, 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (*kernel_size, shape[-1], c_out)) / np.sqrt(np.prod(kernel_size) * shape[-1])
    return x, kernel, kg


def value_and_grads(f, x, kernel, cotangent):
    y, vjp = jax.vjp(f, x, kernel)
    return (y, *vjp(cotangent))


@pytest.mark.parametrize("shape, kernel_size, strides, padding, dilation", CASES)
def test_patches_matches_lax_outputs_and_gradients_under_jit(shape, kernel_size, strides, padding, dilation):
    x, kernel, kg = inputs(shape, kernel_size)
    out_shape = jax.eval_shape(lambda: reference(x, kernel, strides, padding, dilation)).shape
    cotangent = jax.random.normal(kg, out_shape)  # a random cotangent: every output position counts
    ours = jax.jit(lambda x, k, g: value_and_grads(
        lambda x, k: conv(x, k, strides, padding, dilation, impl="patches"), x, k, g))(x, kernel, cotangent)
    theirs = jax.jit(lambda x, k, g: value_and_grads(
        lambda x, k: reference(x, k, strides, padding, dilation), x, k, g))(x, kernel, cotangent)
    for a, b in zip(ours, theirs):  # output, input gradient, kernel gradient
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
    # a wrong gradient would not be this close: the kernel gradient is far from zero
    assert float(jnp.max(jnp.abs(theirs[2]))) > 0.1


def test_native_and_patches_agree_under_vmap_over_kernels_and_inputs():
    x, kernel, kg = inputs((3, 2, 7, 7, 3), (3, 3))  # 3 seeds, batch 2
    kernels = jnp.stack([kernel, 2 * kernel, -kernel])

    def loss(impl):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, 2, "SAME", impl=impl)))

    grads = {impl: jax.jit(jax.vmap(jax.grad(loss(impl), argnums=(0, 1))))(x, kernels)
             for impl in ("native", "patches")}
    for a, b in zip(grads["native"], grads["patches"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(grads["patches"][1][0], grads["patches"][1][1])  # seeds really differ


def test_extra_leading_axes_are_batch_axes():
    x, kernel, _ = inputs((2, 3, 6, 6, 2), (3, 3))
    y = conv(x, kernel, impl="patches")
    np.testing.assert_allclose(y.reshape(6, 6, 6, 4), reference(x.reshape(6, 6, 6, 2), kernel, 1, "SAME", 1),
                               rtol=1e-5, atol=1e-5)


def test_second_order_gradients_match():
    x, kernel, _ = inputs((2, 6, 6, 2), (3, 3))

    def hvp(impl):
        f = lambda k: jnp.sum(jnp.tanh(conv(x, k, impl=impl)))
        return jax.jvp(jax.grad(f), (kernel,), (jnp.ones_like(kernel),))[1]

    np.testing.assert_allclose(hvp("patches"), hvp("native"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    dict(features=5, kernel_size=(3, 3)),
    dict(features=4, kernel_size=(2, 3), strides=2, padding=((1, 0), (2, 1)), kernel_dilation=(2, 1),
         use_bias=False),
])
def test_conv_layer_is_a_drop_in_nn_conv(kwargs):
    x = jax.random.normal(KEY, (2, 9, 9, 3))
    ours, theirs = Conv(**kwargs, impl="patches"), nn.Conv(**kwargs)
    params = ours.init(jax.random.key(1), x)
    theirs_params = theirs.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(theirs_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs_params)):
        np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
    assert isinstance(ours, nn.Conv)
    f = jax.jit(lambda p, module: jax.value_and_grad(lambda p: jnp.sum(jnp.sin(module.apply(p, x))))(p),
                static_argnums=1)
    for a, b in zip(jax.tree.leaves(f(params, ours)), jax.tree.leaves(f(params, theirs))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_layer_unbatched_input_and_native_is_nn_conv():
    x = jax.random.normal(KEY, (6, 6, 2))
    params = nn.Conv(3, (3, 3)).init(KEY, x)
    expected = nn.Conv(3, (3, 3)).apply(params, x)
    for impl in ("native", "patches"):
        np.testing.assert_allclose(Conv(3, (3, 3), impl=impl).apply(params, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(feature_group_count=2), "feature_group_count=2"),
    (dict(input_dilation=2), "input_dilation=2"),
    (dict(padding="CIRCULAR"), "padding='CIRCULAR'"),
    (dict(impl="winograd"), "impl='winograd'"),
])
def test_unsupported_options_raise(kwargs, message):
    x = jnp.zeros((1, 6, 6, 4))
    with pytest.raises(ValueError, match=message):
        Conv(4, (3, 3), **{"impl": "patches", **kwargs}).init(KEY, x)
    if "impl" not in kwargs and "input_dilation" not in kwargs:  # native handles them as nn.Conv does
        Conv(4, (3, 3), impl="native", **kwargs).init(KEY, x)


def test_auto_is_patches_on_cpu():
    assert resolve_impl("auto") == ("patches" if jax.default_backend() == "cpu" else "native")


def test_max_pool_matches_flax_values_and_gradients_without_ties():
    x = jax.random.normal(KEY, (2, 9, 8, 3))  # odd height: the last row is dropped
    expected = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool(x, impl="patches"), expected)
    np.testing.assert_array_equal(max_pool(x, impl="native"), expected)
    g = lambda impl: jax.grad(lambda x: jnp.sum(jnp.sin(max_pool(x, impl=impl)) * jnp.arange(3.)))(x)
    np.testing.assert_allclose(g("patches"), g("native"), rtol=1e-6)
    assert int(jnp.sum(g("patches") != 0)) == expected.size * 2 // 3  # one winner per tile, channel 0 weighs 0


def same_params(models):
    params, state = models["native"].init(jax.random.key(1))
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(models["patches"].init(jax.random.key(1)))):
        np.testing.assert_array_equal(a, b)  # the same parameters from the same key
    return params, state


@pytest.mark.parametrize("name, input_shape, kwargs", [
    ("conv2", (12, 12, 1), dict(conv_widths=(4, 6), fc_widths=(8,))),
    ("resnet20", (8, 8, 3), dict(stage_sizes=(1, 1))),  # a stride-2 block with a 1x1 projection
])
def test_reference_models_same_logits_and_gradients_with_either_impl(name, input_shape, kwargs):
    x = jax.random.normal(KEY, (3, *input_shape))
    models = {impl: create(name, input_shape=input_shape, conv_impl=impl, **kwargs) for impl in ("native", "patches")}
    params, state = same_params(models)

    def run(model):
        def loss(p):
            logits, new_state = model.apply(p, state, x, True)
            return jnp.sum(jnp.sin(logits)), (logits, new_state)
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    (g_native, aux_native), (g_patches, aux_patches) = run(models["native"]), run(models["patches"])
    np.testing.assert_allclose(aux_patches[0], aux_native[0], rtol=1e-4, atol=1e-5)  # logits
    for a, b in zip(jax.tree.leaves((g_patches, aux_patches[1])), jax.tree.leaves((g_native, aux_native[1]))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)  # gradients, BatchNorm statistics


@pytest.mark.parametrize("name, input_shape, kwargs", [
    ("conv4", (8, 8, 3), dict(conv_widths=(4, 4, 6, 6), fc_widths=(8,))),
    ("vgg11", (16, 16, 3), dict(widths=(4, 4, 6, 6, 8, 8, 8, 8))),
    ("resnet20", (8, 8, 3), dict(stage_sizes=(1, 1), pre_activation=True)),
])
def test_reference_models_same_eval_logits_with_either_impl(name, input_shape, kwargs):
    x = jax.random.normal(KEY, (3, *input_shape))
    models = {impl: create(name, input_shape=input_shape, conv_impl=impl, **kwargs) for impl in ("native", "patches")}
    params, state = same_params(models)
    logits = {impl: jax.jit(lambda p, m=m: m.apply(p, state, x, False)[0])(params) for impl, m in models.items()}
    scale = float(jnp.max(jnp.abs(logits["native"])))  # VGG's output layer is N(0, 0.01): tiny logits
    assert scale > 0 and float(jnp.std(logits["native"])) > 0.01 * scale  # not trivially equal
    np.testing.assert_allclose(logits["patches"] / scale, logits["native"] / scale, rtol=1e-4, atol=1e-5)


def test_conv_vs_torch_benchmark_smoke(tmp_path):
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("conv_vs_torch", ROOT / "experiments/benchmarks/conv_vs_torch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--nets", "conv2", "--inputs", "mnist", "--batch", "4", "--steps", "1",
                       "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmarks" / "conv_vs_torch.json").read_text())
    assert [(r["net"], r["input"], r["batch"]) for r in saved["rows"]] == [("conv2", "mnist", 4)] == \
        [(r["net"], r["input"], r["batch"]) for r in rows]
    cases = saved["rows"][0]["comparison"]["cases"]
    assert set(cases) == {"lottojax", "torch"} and all(c["median_s"] > 0 for c in cases.values())
    assert saved["rows"][0]["memory"]["temp_bytes"] > 0
    # the PyTorch twins have the lottojax nets' parameter counts
    import torch

    for name, shape in [("conv4", (32, 32, 3)), ("vgg16", (32, 32, 3)), ("resnet20", (28, 28, 1))]:
        params, _ = jax.eval_shape(create(name, input_shape=shape).init, KEY)
        ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        assert ours == sum(p.numel() for p in bench.torch_net(torch, name, shape).parameters())
