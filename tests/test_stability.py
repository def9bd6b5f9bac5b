"""Linear mode connectivity: interpolation, paths, barriers, BatchNorm recomputation, instability."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import lottojax as lj
from lottojax.data import Dataset
from lottojax.models import Model, create, from_linen
from lottojax.stability import error_barrier, instability, interpolate, recompute_batch_stats
from lottojax.train import Metrics, make_trainer


def tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "fc": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jax.random.normal(k2, (4,))},
        "half": jax.random.normal(k3, (2,)).astype(jnp.bfloat16),
    }


def test_interpolate_is_exact_at_the_endpoints_and_linear_between():
    a, b = tree(jax.random.key(0)), tree(jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, interpolate(a, b, 0.0), a)
    jax.tree.map(np.testing.assert_array_equal, jax.jit(interpolate)(a, b, 1.0), b)
    quarter = interpolate(a, b, 0.25)
    np.testing.assert_allclose(quarter["fc"]["kernel"], 0.75 * a["fc"]["kernel"] + 0.25 * b["fc"]["kernel"], rtol=1e-6)
    assert quarter["half"].dtype == jnp.bfloat16
    # vmapped over α equals one call per α.
    alphas = jnp.linspace(0, 1, 7)
    batched = jax.vmap(interpolate, in_axes=(None, None, 0))(a, b, alphas)
    for i, alpha in enumerate(alphas):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[i], y), batched, interpolate(a, b, alpha))


@pytest.mark.parametrize(
    "b, message",
    [
        ({"fc": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(4)}, "half": jnp.zeros(2)}, "leaf fc/kernel has shape"),
        ({"fc": {"kernel": jnp.zeros((3, 4))}, "half": jnp.zeros(2)}, r"paths in params_a but not in params_b: \['fc/bias'\]"),
    ],
)
def test_interpolate_names_the_mismatched_path(b, message):
    with pytest.raises(ValueError, match=message):
        interpolate(tree(jax.random.key(0)), b, 0.5)


def test_interpolate_refuses_integer_leaves():
    with pytest.raises(ValueError, match="leaf count has dtype int32"):
        interpolate({"count": jnp.array(1)}, {"count": jnp.array(2)}, 0.5)


@pytest.fixture(scope="module")
def mlp_setup():
    x = jax.random.normal(jax.random.key(0), (300, 8))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (8, 3)), -1)
    data = jax.device_put(Dataset(*(np.asarray(v) for v in (x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:]))))
    model = create("mlp", input_shape=(8,), hidden=(16,), num_classes=3)
    trainer = make_trainer(model, optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=20, eval_every=10)
    return trainer, data


def test_path_endpoints_are_the_endpoint_metrics_and_vmapped_equals_looped(mlp_setup):
    trainer, data = mlp_setup
    a, b = (trainer.init(jax.random.key(i)).params for i in (1, 2))
    path = error_barrier(trainer.evaluate, a, b, data.x_test, data.y_test, num_points=6)
    np.testing.assert_array_equal(path.alpha, np.linspace(0, 1, 6, dtype=np.float32))
    for i, alpha in enumerate(path.alpha):
        m = trainer.evaluate(interpolate(a, b, alpha), {}, data.x_test, data.y_test)
        np.testing.assert_allclose(path.loss[i], m.loss, rtol=1e-6)
        np.testing.assert_allclose(path.error[i], 1 - m.accuracy, rtol=1e-6)
    end_a = trainer.evaluate(a, {}, data.x_test, data.y_test)
    end_b = trainer.evaluate(b, {}, data.x_test, data.y_test)
    # The endpoint parameters are bitwise the endpoints (see the interpolate test); the losses
    # agree to float32 rounding (the vmapped program sums in another order), the errors exactly.
    np.testing.assert_allclose([path.loss[0], path.loss[-1]], [end_a.loss, end_b.loss], rtol=3e-7)
    assert float(path.error[0]) == float(1 - end_a.accuracy) and float(path.error[-1]) == float(1 - end_b.accuracy)
    expected = np.max(path.error) - (path.error[0] + path.error[-1]) / 2
    assert float(path.barrier) == pytest.approx(float(expected)) and float(path.barrier) >= 0


def test_barrier_of_identical_networks_is_zero(mlp_setup):
    trainer, data = mlp_setup
    params = trainer.init(jax.random.key(3)).params
    path = error_barrier(trainer.evaluate, params, params, data.x_test, data.y_test)
    assert path.error.shape == (30,)
    assert float(path.barrier) == 0.0 and abs(float(path.loss_barrier)) <= 1e-6
    # (1 - α)·a + α·a is a only up to one rounding per weight (seen: 1 ulp of the loss at α = 8/29)
    np.testing.assert_allclose(path.loss, np.full(30, path.loss[0]), rtol=1e-6)


def test_least_squares_loss_along_the_path_stays_under_the_chord():
    """A convex loss is convex along any segment: it never rises above the chord, so its
    maximum is at an endpoint and the barrier is |L(0) − L(1)| / 2, the least possible
    (the barrier cannot be negative: the endpoints are on the path)."""
    x = jax.random.normal(jax.random.key(0), (120, 5))
    y = x @ jnp.arange(1.0, 6.0) + 0.5 * jax.random.normal(jax.random.key(1), (120,))

    def evaluate(params, state, x, y):
        residual = x @ params["w"] + params["b"] - y
        return Metrics(jnp.mean(residual**2), jnp.zeros(()))

    def fit(rows):  # least squares on half of the data: two different minima of the full loss
        design = np.c_[np.asarray(x[rows]), np.ones(60)]
        solution = np.linalg.lstsq(design, np.asarray(y[rows]), rcond=None)[0].astype(np.float32)
        return {"w": jnp.asarray(solution[:5]), "b": jnp.asarray(solution[5])}

    a, b = fit(slice(0, 60)), fit(slice(60, 120))
    path = error_barrier(evaluate, a, b, x, y)
    chord = (1 - path.alpha) * path.loss[0] + path.alpha * path.loss[-1]
    assert np.all(np.asarray(path.loss) <= np.asarray(chord) * (1 + 1e-6))
    assert float(path.loss[0]) != pytest.approx(float(path.loss[-1]))
    assert float(path.loss_barrier) == pytest.approx(abs(float(path.loss[0] - path.loss[-1])) / 2, abs=1e-6)


def test_linear_classifier_copies_have_convex_loss_and_no_new_errors():
    """Softmax regression: the loss is convex in the weights, so it stays under the chord.
    The error is not convex, but for a linear model every margin z_y − z_c is linear in α:
    an example right at both ends is right all along, so error(α) is at most the fraction
    of examples wrong at either end (checked against the endpoints' own predictions)."""
    x = jax.random.normal(jax.random.key(0), (400, 6))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (6, 4)) + jax.random.normal(jax.random.key(2), (400, 4)), -1)
    data = Dataset(*(np.asarray(v) for v in (x[:300], y[:300], x[300:], y[300:], x[300:], y[300:])))

    def init(key):
        return {"w": 0.1 * jax.random.normal(key, (6, 4)), "b": jnp.zeros(4)}, {}

    model = Model(init, lambda p, s, x, train: (x @ p["w"] + p["b"], s))
    trainer = make_trainer(model, optax.chain(optax.sgd(0.5), lj.masked_updates()), batch_size=30, eval_every=10)
    path, copies = instability(trainer, trainer.init(jax.random.key(3)), data, key=jax.random.key(4), start=0, num_steps=40)
    chord = (1 - path.alpha) * path.loss[0] + path.alpha * path.loss[-1]
    assert np.all(np.asarray(path.loss) <= np.asarray(chord) * (1 + 1e-6))
    wrong = [np.asarray(jnp.argmax(model.apply(jax.tree.map(lambda p: p[i], copies.params), {}, data.x_test, False)[0], -1))
             != np.asarray(data.y_test) for i in (0, 1)]
    assert np.all(np.asarray(path.error) <= np.mean(wrong[0] | wrong[1]) + 1e-6)
    assert not np.allclose(copies.params["w"][0], copies.params["w"][1]), "different data orders"


class TinyBN(nn.Module):
    """Two BatchNorms with different momenta, and a float state leaf training leaves alone."""

    @nn.compact
    def __call__(self, x, train=False):
        self.variable("batch_stats", "constant", lambda: jnp.full((3,), 7.0))
        x = nn.Dense(4, name="fc0")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn0")(x))
        x = nn.Dense(3, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, epsilon=1e-5, name="bn1")(x)
        return nn.Dense(2, name="output")(x)


def numpy_batch_stats(params, batches):
    """Per-batch mean and biased variance of each BatchNorm's input (train mode), averaged."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    stats = {"bn0": [], "bn1": []}
    for x in np.asarray(batches, np.float64):
        h = x @ p["fc0"]["kernel"] + p["fc0"]["bias"]
        stats["bn0"].append((h.mean(0), h.var(0)))
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn0"]["scale"] + p["bn0"]["bias"]
        h = np.maximum(h, 0) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
        stats["bn1"].append((h.mean(0), h.var(0)))
    return {layer: np.mean(np.array(v), axis=0) for layer, v in stats.items()}  # (2, features): mean, var


def test_recomputed_statistics_are_the_numpy_batch_averages():
    model = from_linen(TinyBN(), input_shape=(5,))
    params, state = model.init(jax.random.key(0))
    params = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(1), v.shape), params)
    batches = 2.0 + jax.random.normal(jax.random.key(2), (4, 16, 5))
    stats = jax.jit(recompute_batch_stats, static_argnums=0)(model, params, state, batches)["batch_stats"]
    expected = numpy_batch_stats(params, batches)
    for layer in ("bn0", "bn1"):
        np.testing.assert_allclose(stats[layer]["mean"], expected[layer][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[layer]["var"], expected[layer][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(stats["constant"], np.full(3, 7.0))


def test_batchnorm_path_recomputes_statistics_at_every_point():
    model = from_linen(TinyBN(), input_shape=(5,))
    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = (x[:, 0] > 0).astype(jnp.int32)
    trainer = make_trainer(model, optax.chain(optax.sgd(0.1), lj.masked_updates()), batch_size=16, eval_every=5)
    recompute = functools.partial(recompute_batch_stats, model, batches=x.reshape(4, 16, 5))
    params, state = model.init(jax.random.key(1))
    _, state = model.apply(params, state, 3.0 + x[:16], True)  # running statistics that fit no data here
    with pytest.raises(ValueError, match="recompute_stats"):
        error_barrier(trainer.evaluate, params, params, x, y, model_state_a=state, model_state_b=state)
    # A network interpolated with itself: every point is the endpoint with recomputed statistics.
    path = error_barrier(trainer.evaluate, params, params, x, y, num_points=4,
                         model_state_a=state, model_state_b=state, recompute_stats=recompute)
    endpoint = trainer.evaluate(params, recompute(params, state), x, y)
    stale = trainer.evaluate(params, state, x, y)
    np.testing.assert_allclose(path.loss, np.full(4, endpoint.loss), rtol=1e-5)
    np.testing.assert_allclose(path.error, np.full(4, 1 - endpoint.accuracy), atol=1e-6)
    assert float(path.barrier) == 0.0
    assert not np.isclose(float(path.loss[0]), float(stale.loss)), "the running statistics were replaced"


def test_instability_trains_two_masked_copies_under_vmap_as_separate_runs_would(mlp_setup):
    trainer, data = mlp_setup
    k, steps = 7, 23  # θ_k mid-epoch (10 steps per epoch)
    states = jax.vmap(lambda key: trainer.run_steps(trainer.init(key), data, jax.random.key(6), 0, k)[0])(
        jax.random.split(jax.random.key(5)))
    masks = jax.vmap(lambda p: lj.prune_global(lj.magnitude(p), lj.ones_like(p), 0.6))(states.params)
    keys = jax.random.split(jax.random.key(7))
    seed = lambda tree, i: jax.tree.map(lambda v: v[i], tree)
    run = functools.partial(instability, trainer, data=data, start=k, num_steps=steps, num_points=5, split="val")
    both, both_copies = jax.vmap(lambda s, key, m: run(s, key=key, mask=m))(states, keys, masks)
    run_steps = jax.jit(trainer.run_steps, static_argnames="num_steps")
    for i in range(2):
        path, copies = run(seed(states, i), key=keys[i], mask=seed(masks, i))
        assert copies.step.tolist() == [k + steps] * 2
        np.testing.assert_allclose(both.loss[i], path.loss, rtol=1e-5)
        np.testing.assert_allclose(both.barrier[i], path.barrier, atol=1e-6)
        mask = seed(masks, i)
        assert not np.allclose(copies.params["fc0"]["kernel"][0], copies.params["fc0"]["kernel"][1])
        for c, copy_key in enumerate(jax.random.split(keys[i])):  # each copy is the run it stands for
            alone = seed(states, i)
            alone = alone._replace(params=lj.apply_mask(alone.params, mask), opt_state=lj.set_mask(alone.opt_state, mask))
            alone, _ = run_steps(alone, data, copy_key, k, num_steps=steps)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[c], b, rtol=1e-5, atol=1e-6), copies.params, alone.params)
            for p, m in zip(jax.tree.leaves(copies.params), jax.tree.leaves(mask)):
                assert np.all(np.asarray(p[c])[~np.asarray(m)] == 0.0), "pruned weights stay 0"
            end = trainer.evaluate(alone.params, {}, data.x_val, data.y_val)
            np.testing.assert_allclose(path.loss[-c], end.loss, rtol=1e-5)
