"""Corruptions (deterministic by key, severity-monotone, shape- and range-preserving, under
jit and vmap) and the last-layer geometry against hand-worked two-class cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax.robustness import (CORRUPTIONS, IMAGE_CORRUPTIONS, SEVERITIES, SIGNAL_CORRUPTIONS, corrupt,
                                 corruptions_for, last_layer_geometry)

IMAGES = jax.random.uniform(jax.random.key(1), (6, 12, 12, 1))
# Smooth signals (a few low frequencies, std about 1, as MNIST-1D): shifting or stretching
# white noise would not change it more at higher severity.
_T = jnp.linspace(0.0, 1.0, 40)
SIGNALS = sum(jax.random.normal(jax.random.key(k), (6, 1)) * jnp.sin(2 * jnp.pi * (k * _T + 0.1 * k)) for k in (1, 2))


def _inputs(name):
    return IMAGES if name in IMAGE_CORRUPTIONS else SIGNALS


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_by_key_shape_preserving_and_traceable(name):
    x, key = _inputs(name), jax.random.key(7)
    a = corrupt(name, key, x, 3)
    np.testing.assert_array_equal(a, corrupt(name, key, x, 3))
    assert a.shape == x.shape and a.dtype == x.dtype and bool(jnp.all(jnp.isfinite(a)))
    # a traced severity (under jit) gives the same values
    np.testing.assert_allclose(jax.jit(CORRUPTIONS[name])(key, x, jnp.int32(3)), a, rtol=1e-5, atol=1e-5)
    if name in IMAGE_CORRUPTIONS:
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    keyed = name in ("gaussian_noise", "signal_noise", "shift", "scale", "drift", "dropout")
    other = corrupt(name, jax.random.key(8), x, 3)
    assert keyed == (not np.array_equal(other, a)), "only the random corruptions depend on the key"


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damage_grows_with_severity(name):
    """The mean squared change from the clean input increases with every severity step (the
    noise variances in particular), on the same key."""
    x = _inputs(name)
    damage = [float(jnp.mean((corrupt(name, jax.random.key(3), x, s) - x) ** 2)) for s in range(1, 6)]
    assert all(b > a for a, b in zip(damage, damage[1:])), (name, damage)


def test_noise_variance_is_the_severity_table():
    x = jnp.full((200, 40), 0.0)
    for s, std in enumerate(SEVERITIES["signal_noise"], start=1):
        delta = corrupt("signal_noise", jax.random.key(s), x, s)
        assert float(jnp.std(delta)) == pytest.approx(std, rel=0.05)


def test_hand_worked_values():
    ramp = jnp.arange(8.0)[None, :]
    shifted = corrupt("shift", jax.random.key(0), jnp.tile(ramp, (2, 1)), 2)
    for row in np.asarray(shifted):  # right by 2 (edge value repeated) or left by 2
        assert row.tolist() in ([0, 0, 0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7, 7, 7])
    # drift: a trend of total rise d, zero at the centre
    d = corrupt("drift", jax.random.key(0), jnp.zeros((1, 5)), 3)[0]
    assert abs(float(d[-1] - d[0])) == pytest.approx(SEVERITIES["drift"][2]) and float(d[2]) == 0.0
    # blur keeps a constant image, quantise to 2 levels thresholds at 0.5, contrast shrinks to the mean
    flat = jnp.full((1, 5, 5, 1), 0.3)
    np.testing.assert_allclose(corrupt("blur", jax.random.key(0), flat, 5), flat, rtol=1e-6)
    q = corrupt("quantise", jax.random.key(0), jnp.array([0.2, 0.49, 0.51, 0.9]).reshape(1, 2, 2, 1), 5)
    assert q.ravel().tolist() == [0.0, 0.0, 1.0, 1.0]
    c = corrupt("contrast", jax.random.key(0), jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1), 2)
    np.testing.assert_allclose(c.ravel(), [0.25, 0.75])
    # scale keeps the centre sample of an odd-length signal; dropout zeroes about p of the samples
    s = corrupt("scale", jax.random.key(0), jnp.arange(9.0)[None, :] ** 2, 5)
    assert float(s[0, 4]) == 16.0
    kept = corrupt("dropout", jax.random.key(0), jnp.ones((100, 40)), 5)
    assert float(jnp.mean(kept == 0)) == pytest.approx(0.5, abs=0.03)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="severity=6"):
        corrupt("blur", jax.random.key(0), IMAGES, 6)
    with pytest.raises(ValueError, match="unknown; choose from"):
        corrupt("fog", jax.random.key(0), IMAGES, 1)
    with pytest.raises(ValueError, match=r"images \(N, H, W, C\)"):
        corrupt("blur", jax.random.key(0), SIGNALS, 1)
    with pytest.raises(ValueError, match=r"signals \(N, L\)"):
        corrupt("shift", jax.random.key(0), IMAGES, 1)
    assert corruptions_for(IMAGES.shape) == tuple(IMAGE_CORRUPTIONS)
    assert corruptions_for(SIGNALS.shape) == tuple(SIGNAL_CORRUPTIONS)
    with pytest.raises(ValueError, match="corruptions exist for"):
        corruptions_for((3, 4, 5))


def test_geometry_two_classes_by_hand():
    """Class weights w0 = (1, 0), w1 = (0, 1), bias (0, 0.5): the boundary is x - y = 0.5,
    ‖w0 − w1‖ = √2."""
    kernel = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    bias = jnp.array([0.0, 0.5])
    f = jnp.array([[2.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    g = last_layer_geometry(f, kernel, bias, jnp.array([0, 1, 1]))
    np.testing.assert_allclose(g.angle, [0.0, np.arccos(4 / 5), np.pi / 2], atol=1e-6)
    np.testing.assert_allclose(g.feature_norm, [2.0, 5.0, 0.0])
    # margins: (2 - 0.5)/√2, (4.5 - 3)/√2, (0.5 - 0)/√2
    np.testing.assert_allclose(g.margin, np.array([1.5, 1.5, 0.5]) / np.sqrt(2), rtol=1e-6)
    flipped = last_layer_geometry(f[:1], kernel, bias, jnp.array([1]))
    assert float(flipped.margin[0]) == pytest.approx(-1.5 / np.sqrt(2)) and float(flipped.angle[0]) == pytest.approx(np.pi / 2)


def test_geometry_margin_is_the_distance_to_the_nearest_boundary_for_many_classes():
    """Against a brute-force reference: the margin is the smallest signed distance from f to
    the hyperplanes z_y = z_j, and its sign says whether f is classified correctly."""
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    f = jax.random.normal(key1, (50, 6))
    kernel = jax.random.normal(key2, (6, 4))
    bias = jax.random.normal(key3, (4,))
    labels = jnp.arange(50) % 4
    g = jax.jit(last_layer_geometry)(f, kernel, bias, labels)
    z = np.asarray(f @ kernel + bias)
    for i in range(50):
        y = int(labels[i])
        ref = min((z[i, y] - z[i, j]) / np.linalg.norm(np.asarray(kernel[:, y] - kernel[:, j]))
                  for j in range(4) if j != y)
        assert float(g.margin[i]) == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert (float(g.margin[i]) > 0) == (int(np.argmax(z[i])) == y)
    with pytest.raises(ValueError, match="must be"):
        last_layer_geometry(f, kernel[:5], bias, labels)
