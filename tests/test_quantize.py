"""The stochastic-rounding quantiser: levels, range, unbiasedness, gradients, the model wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax.models import create
from lottojax.quantize import LowPrecisionState, fake_quant, low_precision, quantize

X = jnp.array([-1.3, -0.4, 0.0, 0.0071, 0.25, 0.9, 1.3, 1.2999])


def grid_index(q, scale, bits):
    """The integer level of every quantised value (asserting it is on the grid)."""
    levels = 2 ** (bits - 1) - 1
    k = np.asarray(q, np.float64) * levels / scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    return np.round(k).astype(int)


@pytest.mark.parametrize("bits", [3, 8])
def test_values_lie_on_the_symmetric_grid_within_range(bits):
    draws = jax.jit(jax.vmap(lambda k: quantize(X, k, bits=bits)))(jax.random.split(jax.random.key(0), 64))
    k = grid_index(draws, 1.3, bits)
    levels = 2 ** (bits - 1) - 1
    assert k.min() >= -levels and k.max() <= levels
    # max|x| is a level, so it is kept exactly; 0 stays 0; each value goes to one of its two neighbours.
    np.testing.assert_array_equal(draws[:, [0, 6]], np.broadcast_to([-1.3, 1.3], (64, 2)).astype(np.float32))
    assert np.all(draws[:, 2] == 0)
    exact = np.asarray(X) * levels / 1.3
    assert np.all((k >= np.floor(exact - 1e-4)) & (k <= np.ceil(exact + 1e-4)))


def test_stochastic_rounding_is_unbiased():
    n = 40000
    draws = jax.jit(jax.vmap(lambda k: quantize(X, k, bits=3)))(jax.random.split(jax.random.key(1), n))
    step = 1.3 / 3
    # Each draw is within one step of x: the standard error of the mean is below step / (2 sqrt(n)).
    np.testing.assert_allclose(np.asarray(draws).mean(0), X, atol=5 * step / (2 * np.sqrt(n)))
    # and the probability of rounding up is the fractional part (0.25 -> level 0.577 of a step).
    up = np.mean(np.asarray(draws[:, 4]) > 0.2)
    assert up == pytest.approx(0.25 / step, abs=0.01)


def test_round_to_nearest_and_degenerate_inputs():
    q = quantize(X, bits=8)
    step = 1.3 / 127
    assert float(jnp.max(jnp.abs(q - X))) <= step / 2 + 1e-7
    grid_index(q, 1.3, 8)
    np.testing.assert_array_equal(quantize(jnp.zeros(4), jax.random.key(0)), jnp.zeros(4))
    with pytest.raises(ValueError, match="bits"):
        quantize(X, bits=1)


def test_fake_quant_gradient_is_the_quantised_cotangent():
    weights = jnp.array([1.0, 0.013, 2.0, -0.5, 0.0])
    key = jax.random.key(2)

    def grad(k):
        return jax.grad(lambda x: jnp.sum(fake_quant(x, k, 8) * weights))(X[:5])

    grads = jax.jit(jax.vmap(grad))(jax.random.split(key, 20000))
    grid_index(grads, 2.0, 8)  # the cotangent (= weights) quantised on its own scale, max|g| = 2
    np.testing.assert_allclose(np.asarray(grads).mean(0), weights, atol=2e-4)  # unbiased
    assert np.all(np.asarray(grads)[:, [2, 4]] == np.asarray(weights)[[2, 4]])  # levels (max|g|, 0) stay exact


def test_low_precision_model_quantises_weights_inputs_and_gradients():
    base = create("mlp", input_shape=(6,), hidden=(), num_classes=3)  # a single Dense layer
    model = low_precision(base, bits=4)
    params, state = jax.jit(model.init)(jax.random.key(0))
    assert isinstance(state, LowPrecisionState)
    x = jax.random.normal(jax.random.key(1), (5, 6))
    # Evaluation: nearest rounding of the kernel and of the Dense input; the bias is not quantised.
    logits, same = jax.jit(lambda p, s, x: model.apply(p, s, x, False))(params, state, x)
    kernel, bias = params["output"]["kernel"], params["output"]["bias"]
    expected = quantize(x, bits=4) @ quantize(kernel, bits=4) + bias
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(same.rounding_key, state.rounding_key)

    # Training: the rounding key advances, and the kernel's gradient lies on the 4-bit grid.
    def loss(p, s):
        logits, new = model.apply(p, s, x, True)
        return jnp.sum(logits * jnp.arange(3.0)), new

    grads, new_state = jax.jit(jax.grad(loss, has_aux=True))(params, state)
    assert not np.array_equal(new_state.rounding_key, state.rounding_key)
    g = np.asarray(grads["output"]["kernel"])
    grid_index(g, np.abs(g).max(), 4)
    full_precision = jax.grad(lambda p: jnp.sum(base.apply(p, {}, x, True)[0] * jnp.arange(3.0)))(params)
    assert not np.allclose(g, full_precision["output"]["kernel"])  # it really is quantised
    with pytest.raises(TypeError, match="LowPrecisionState"):
        model.apply(params, {}, x, False)
