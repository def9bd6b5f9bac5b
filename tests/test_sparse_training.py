"""Dynamic sparse training: schedules, GMP/static/SET/RigL masks, the transform's exact zeros,
moment resets, no retracing, seeding and the trainer."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lottojax as lj
from lottojax.data import Dataset
from lottojax.models import create
from lottojax.optim import MaskedUpdatesState, get_mask, mask_state, masked_updates, set_mask
from lottojax.sparse_training import (
    SPARSE_METHODS,
    SparseMethod,
    SparseTrainingState,
    cosine_drop_fraction,
    cubic,
    get_sparse_method,
    gmp,
    one_shot,
    periodic,
    rigl,
    seed,
    set_,
    sparse_training,
    static,
)
from lottojax.train import make_trainer

RNG = np.random.default_rng(0)


def make_params(shapes=((6, 5), (5, 4)), rng=RNG):
    """An MLP-like tree: kernels (prunable) and biases (dense), values from numpy."""
    params = {}
    for i, (n_in, n_out) in enumerate(shapes):
        params[f"l{i}"] = {
            "kernel": jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(n_out), jnp.float32),
        }
    return params


def mlp_loss(params, x, y):
    h = x
    layers = sorted(params)
    for i, name in enumerate(layers):
        h = h @ params[name]["kernel"] + params[name]["bias"]
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def make_data(params, n=16, rng=RNG):
    layers = sorted(params)
    n_in = params[layers[0]]["kernel"].shape[0]
    n_out = params[layers[-1]]["kernel"].shape[1]
    x = jnp.asarray(rng.standard_normal((n, n_in)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((n, n_out)), jnp.float32)
    return x, y


def make_step(tx, x, y):
    def step(params, state):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def kernels(tree):
    return {name: np.asarray(tree[name]["kernel"]) for name in sorted(tree)}


def counts(mask):
    return {name: int(m.sum()) for name, m in kernels(mask).items()}


def total_prunable(params):
    return sum(v.size for v in kernels(params).values())


def expected_keep(sparsity, total):
    return int(np.round(np.float32(np.float32(1) - np.float32(sparsity)) * np.float32(total)))


# ---------------------------------------------------------------------------------------
# Schedules.


def events(schedule, horizon):
    flags = jax.vmap(schedule.is_update)(jnp.arange(horizon, dtype=jnp.int32))
    return np.flatnonzero(np.asarray(flags)).tolist()


def test_schedule_event_steps():
    assert events(one_shot(0.5, at_step=7), 20) == [7]
    assert events(periodic(0.9, every=4), 17) == [0, 4, 8, 12, 16]
    assert events(periodic(0.9, every=4, begin_step=3, end_step=15), 30) == [3, 7, 11]
    assert events(cubic(0.8, begin_step=10, end_step=30, every=5), 50) == [10, 15, 20, 25, 30]
    assert float(periodic(0.9, every=4).sparsity(jnp.int32(123))) == pytest.approx(0.9)


def test_cubic_values_hand_worked():
    # s_f = 0.8, s_i = 0.2, t0 = 10, Δt = 5, n = 4: s_t = 0.8 - 0.6 (1 - (t - 10) / 20)^3
    schedule = cubic(0.8, begin_step=10, end_step=30, every=5, initial_sparsity=0.2)
    steps = jnp.asarray([0, 10, 15, 20, 25, 30, 100], jnp.int32)
    values = np.asarray(jax.vmap(schedule.sparsity)(steps))
    # 0.6 * 0.75^3 = 0.253125; 0.6 * 0.5^3 = 0.075; 0.6 * 0.25^3 = 0.009375
    np.testing.assert_allclose(values, [0.2, 0.2, 0.546875, 0.725, 0.790625, 0.8, 0.8], rtol=1e-6)


def test_cosine_drop_fraction_values():
    f = cosine_drop_fraction(0.4, end_step=100)
    values = np.asarray(jax.vmap(f)(jnp.asarray([0, 25, 50, 100, 150], jnp.int32)))
    # 0.2 (1 + cos(π/4)) = 0.2 + 0.1414214
    np.testing.assert_allclose(values, [0.4, 0.34142136, 0.2, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("build, match", [
    (lambda: one_shot(1.0, at_step=0), r"one_shot: sparsity=1.0 is outside \[0, 1\)"),
    (lambda: one_shot(-0.1, at_step=0), r"sparsity=-0.1"),
    (lambda: one_shot("high", at_step=0), r"sparsity='high'"),
    (lambda: one_shot(0.5, at_step=-1), r"at_step=-1 must be an int >= 0"),
    (lambda: periodic(0.5, every=0), r"periodic: every=0 must be an int >= 1"),
    (lambda: periodic(0.5, every=2, begin_step=5, end_step=5), r"end_step=5 must be > begin_step=5"),
    (lambda: cubic(0.9, begin_step=0, end_step=10, every=3), r"cubic: end_step - begin_step = 10 - 0 = 10 .* every=3"),
    (lambda: cubic(0.9, begin_step=5, end_step=5, every=1), r"positive multiple"),
    (lambda: cubic(0.5, begin_step=0, end_step=4, every=2, initial_sparsity=0.6), r"initial_sparsity=0.6 must be <="),
    (lambda: cubic(1.2, begin_step=0, end_step=4, every=2), r"final_sparsity=1.2"),
    (lambda: cosine_drop_fraction(1.5, end_step=10), r"alpha=1.5"),
    (lambda: cosine_drop_fraction(0.3, end_step=0), r"end_step=0"),
    (lambda: rigl(drop_fraction=2.0), r"rigl: drop_fraction=2.0 is outside \[0, 1\]"),
    (lambda: set_(drop_fraction="a lot"), r"set: drop_fraction='a lot'"),
])
def test_bad_schedule_and_method_arguments_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------------------
# Registry and errors.


def test_registry_and_errors():
    assert list(SPARSE_METHODS) == ["gmp", "static", "set", "rigl"]
    with pytest.raises(TypeError):
        SPARSE_METHODS["mine"] = gmp  # read-only
    assert get_sparse_method("set", drop_fraction=0.1).name == "set"
    with pytest.raises(ValueError, match=r"'sett' is not registered; registered: 'gmp', 'static', 'set', 'rigl'"):
        sparse_training(optax.sgd(0.1), "sett", periodic(0.5, every=2))
    with pytest.raises(ValueError, match=r"'rigl' has no hyperparameter 'alpha'; it takes: drop_fraction, regrow_dropped"):
        get_sparse_method("rigl", alpha=0.3)
    with pytest.raises(ValueError, match=r"scope='layerwise' unknown"):
        sparse_training(optax.sgd(0.1), "gmp", periodic(0.5, every=2), scope="layerwise")
    with pytest.raises(TypeError, match=r"schedule must be a SparsitySchedule"):
        sparse_training(optax.sgd(0.1), "gmp", 0.5)
    params = make_params()
    tx = sparse_training(optax.sgd(0.1), "rigl", periodic(0.5, every=2))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"params is None; call update\(grads, state, params\)"):
        tx.update(params, state)
    inner_masked = sparse_training(optax.chain(optax.sgd(0.1), masked_updates()), "gmp", periodic(0.5, every=2))
    with pytest.raises(ValueError, match=r"holds a MaskedUpdatesState; sparse_training replaces masked_updates"):
        inner_masked.init(params)
    with pytest.raises(ValueError, match=r"no leaf of the params is prunable .*'l0/bias'"):
        tx.init({"l0": {"bias": jnp.ones(3)}})


# ---------------------------------------------------------------------------------------
# Exact counts (hypothesis over shapes and schedules).

layer_shapes = st.lists(st.tuples(st.integers(2, 7), st.integers(2, 7)), min_size=1, max_size=3)


def chain_shapes(dims):
    """Consecutive layers: the output width of one is the input width of the next."""
    shapes, n_in = [], dims[0][0]
    for _, n_out in dims:
        shapes.append((n_in, n_out))
        n_in = n_out
    return tuple(shapes)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=layer_shapes, final=st.sampled_from([0.3, 0.5, 0.8, 0.95]), every=st.integers(1, 3),
       n=st.integers(1, 3), begin=st.integers(0, 2), scope=st.sampled_from(["global", "uniform", "erk"]),
       data_seed=st.integers(0, 2**16))
def test_gmp_keeps_exactly_the_scheduled_count_after_every_event(dims, final, every, n, begin, scope, data_seed):
    rng = np.random.default_rng(data_seed)
    params = make_params(chain_shapes(dims), rng)
    x, y = make_data(params, rng=rng)
    schedule = cubic(final, begin_step=begin, end_step=begin + n * every, every=every)
    tx = sparse_training(optax.sgd(0.05), "gmp", schedule, scope=scope)
    state = tx.init(params)
    step = jax.jit(make_step(tx, x, y))
    total = total_prunable(params)
    kept = total
    for t in range(begin + n * every + 2):
        old = kernels(get_mask(state))
        params, state = step(params, state)
        mask = kernels(get_mask(state))
        if t in range(begin, begin + n * every + 1, every):
            kept = expected_keep(schedule.sparsity(t), total)
        assert sum(m.sum() for m in mask.values()) == kept, (t, kept)
        for name in mask:
            assert not (mask[name] & ~old[name]).any(), "gmp masks only shrink"
            assert (kernels(params)[name][~mask[name]] == 0).all()
    if scope == "uniform":  # the same density in every layer, up to one entry of rounding
        for name, m in mask.items():
            assert abs(m.sum() - kept * m.size / total) < 1 + 1e-9 * total


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=layer_shapes, sparsity=st.sampled_from([0.2, 0.5, 0.75, 0.9]), alpha=st.sampled_from([0.1, 0.3, 0.5, 1.0]),
       name=st.sampled_from(["static", "set", "rigl"]), scope=st.sampled_from(["global", "uniform", "erk"]),
       regrow_dropped=st.booleans(), data_seed=st.integers(0, 2**16))
def test_drop_and_grow_preserve_per_layer_counts(dims, sparsity, alpha, name, scope, regrow_dropped, data_seed):
    rng = np.random.default_rng(data_seed)
    params = make_params(chain_shapes(dims), rng)
    x, y = make_data(params, rng=rng)
    method = static() if name == "static" else get_sparse_method(name, drop_fraction=alpha, regrow_dropped=regrow_dropped)
    tx = sparse_training(optax.sgd(0.05), method, periodic(sparsity, every=2), scope=scope)
    state = seed(tx.init(params), jax.random.key(data_seed))
    step = jax.jit(make_step(tx, x, y))
    params, state = step(params, state)  # count 0 draws the initial mask
    first = kernels(get_mask(state))
    assert sum(m.sum() for m in first.values()) == expected_keep(sparsity, total_prunable(params))
    for t in range(1, 5):
        old = kernels(get_mask(state))
        params, state = step(params, state)
        mask = kernels(get_mask(state))
        assert counts(get_mask(state)) == {k: int(m.sum()) for k, m in first.items()}, t
        assert all(get_mask(state)[k]["bias"].all() for k in get_mask(state)), "biases stay dense"
        for k in mask:
            assert (kernels(params)[k][~mask[k]] == 0).all()
            if name == "static":
                assert (mask[k] == old[k]).all()


# ---------------------------------------------------------------------------------------
# Hand-worked drop and grow.


def test_rigl_grows_the_largest_gradients_hand_worked():
    params = {"a": jnp.asarray([[0.5, -0.2, 0.0, 0.0], [1.0, 0.3, 0.0, 0.0]]),
              "b": jnp.asarray([[0.0, 2.0], [-0.1, 0.0], [0.7, 0.0]])}
    mask = {"a": jnp.asarray([[True, True, False, False], [True, True, False, False]]),
            "b": jnp.asarray([[False, True], [True, False], [True, False]])}
    grads = {"a": jnp.asarray([[9.0, 9.0, 0.1, -4.0], [9.0, 9.0, 3.0, -3.0]]),
             "b": jnp.asarray([[-1.0, 9.0], [9.0, 1.0], [9.0, 0.5]])}
    new = rigl(0.5).update(mask, params, grads, key=jax.random.key(0), step=0, sparsity=0.5, scope="uniform",
                           prunable=None)
    # a: 4 active, drop 2 smallest |θ| (-0.2, 0.3), grow the 2 largest |g| inactive (-4, 3)
    assert np.asarray(new["a"]).tolist() == [[True, False, False, True], [True, False, True, False]]
    # b: 3 active, drop round(1.5) = 2 (halves to even: -0.1, 0.7); grow the two inactive with |g| = 1, not 0.5
    assert np.asarray(new["b"]).tolist() == [[True, True], [False, True], [False, False]]


def test_rigl_regrow_dropped_reference_option():
    params = {"w": jnp.asarray([[0.5, -0.1, 2.0, 0.0, 0.0, 0.0]])}
    mask = {"w": jnp.asarray([[True, True, True, False, False, False]])}
    grads = {"w": jnp.asarray([[0.0, 9.0, 0.0, 1.0, 0.0, 0.0]])}
    kwargs = dict(key=jax.random.key(0), step=0, sparsity=0.5, scope="uniform", prunable=None)
    paper = rigl(1 / 3).update(mask, params, grads, **kwargs)["w"]
    reference = rigl(1 / 3, regrow_dropped=True).update(mask, params, grads, **kwargs)["w"]
    assert np.asarray(paper).tolist() == [[True, False, True, True, False, False]]
    assert np.asarray(reference).tolist() == [[True, True, True, False, False, False]]  # -0.1 comes straight back


def test_drop_ties_go_to_the_lower_index_and_counts_are_capped_by_inactive():
    params = {"w": jnp.asarray([[1.0, 1.0, 1.0, 1.0, 0.0]])}
    mask = {"w": jnp.asarray([[True, True, True, True, False]])}
    grads = {"w": jnp.ones((1, 5))}
    kwargs = dict(key=jax.random.key(0), step=0, sparsity=0.2, scope="uniform", prunable=None)
    # round(0.5 * 4) = 2 to drop, but only 1 inactive: drop 1 (index 0, the tie's lowest), grow index 4
    assert np.asarray(rigl(0.5).update(mask, params, grads, **kwargs)["w"]).tolist() == [[False, True, True, True, True]]


def test_set_grows_only_among_inactive_and_keeps_counts():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 10)).astype(np.float32)
    m = rng.random((8, 10)) < 0.3
    params, mask = {"w": jnp.asarray(w * m)}, {"w": jnp.asarray(m)}
    k = int(np.round(np.float32(0.4) * np.float32(m.sum())))
    smallest = np.argsort(np.where(m, np.abs(w), np.inf).reshape(-1), kind="stable")[:k]

    def one(key):
        return set_(0.4).update(mask, params, None, key=key, step=0, sparsity=0.7, scope="uniform", prunable=None)["w"]

    news = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 8)))
    for new in news:
        assert new.sum() == m.sum()
        assert not new.reshape(-1)[smallest].any(), "the k smallest active weights are dropped"
        grown = new & ~m
        assert grown.sum() == k and not (grown & m).any()
        assert ((new & m).sum()) == m.sum() - k, "only the dropped ones leave"
    assert len({n.tobytes() for n in news}) > 1, "different keys grow different weights"


# ---------------------------------------------------------------------------------------
# The transform: exact zeros, moment reset.


def adam_moments(state):
    inner = state.inner
    adam = inner[0] if isinstance(inner, tuple) else inner
    return adam.mu, adam.nu


@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_grown_weights_and_their_adam_moments_are_exactly_zero(regrow_dropped):
    params = make_params()
    x, y = make_data(params)
    tx = sparse_training(optax.adamw(0.05, weight_decay=0.1), rigl(0.5, regrow_dropped=regrow_dropped),
                         periodic(0.6, every=3), scope="erk")
    state = seed(tx.init(params), jax.random.key(5))
    step = jax.jit(make_step(tx, x, y))
    grown_total = 0
    for t in range(13):
        old = kernels(get_mask(state))
        before = kernels(params)
        params, state = step(params, state)
        mask, now = kernels(get_mask(state)), kernels(params)
        mu, nu = kernels(adam_moments(state)[0]), kernels(adam_moments(state)[1])
        for k in mask:
            assert (now[k][~mask[k]] == 0).all(), "inactive and dropped weights are exactly 0"
            grown = mask[k] & ~old[k]
            if t == 0:
                continue  # the initial draw: every kept weight was active (dense) before
            grown_total += grown.sum()
            assert (now[k][grown] == 0).all() and (mu[k][grown] == 0).all() and (nu[k][grown] == 0).all()
            survived = mask[k] & old[k]
            if t % 3 == 0:
                assert (now[k][survived] != before[k][survived]).any()
            if t % 3 != 0:
                assert not grown.any() and (mask[k] == old[k]).all()
        assert all(bool(get_mask(state)[k]["bias"].all()) for k in get_mask(state))
    assert grown_total > 0


@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_just_dropped_weight_regrown_only_with_the_reference_option(regrow_dropped):
    params = {"w": jnp.asarray([[0.5, 0.1, 2.0, 0.0, 0.0, 0.0]])}
    grads = {"w": jnp.asarray([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0]])}
    mask = {"w": jnp.asarray([[True, True, True, False, False, False]])}
    tx = sparse_training(optax.sgd(0.1, momentum=0.9), rigl(1 / 3, regrow_dropped=regrow_dropped),
                         periodic(0.5, every=1))
    state = set_mask(tx.init(params), mask)  # already sparse: kept at count 0, no drop/grow
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), [[0.5, -0.1, 2.0, 0.0, 0.0, 0.0]], rtol=1e-6)
    # event at count 1: |-0.1| is the smallest active weight and is dropped; the largest
    # |gradient| outside the kept weights is its own (2.0), the largest among the weights
    # inactive before the event is index 3's (1.0).
    updates, state = tx.update(grads, state, params)
    after = np.asarray(optax.apply_updates(params, updates)["w"])
    trace = np.asarray(state.inner[0].trace["w"])
    mask = np.asarray(get_mask(state)["w"])[0].tolist()
    if regrow_dropped:  # the reference: it comes straight back, keeping its value and momentum
        assert mask == [True, True, True, False, False, False]
        assert after[0, 1] == pytest.approx(-0.1 - 0.1 * (0.9 * 2.0 + 2.0))
        assert trace[0, 1] == pytest.approx(3.8) and after[0, 3] == 0
    else:  # the paper: index 3 grows, at 0 with a fresh momentum; the dropped weight is 0
        assert mask == [True, False, True, True, False, False]
        assert after[0, 1] == 0 and after[0, 3] == 0 and trace[0, 3] == 0
        assert after[0, 0] == 0.5 and after[0, 2] == 2.0  # zero gradient, zero momentum


def test_static_with_a_fixed_mask_equals_masked_updates():
    params = make_params()
    x, y = make_data(params)
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.6)
    params = lj.apply_mask(params, mask)
    inner = optax.adamw(0.05, weight_decay=0.1)
    sparse = sparse_training(inner, "static", periodic(0.6, every=2))
    dense = optax.chain(inner, masked_updates(mask))
    (p1, s1), (p2, s2) = (params, set_mask(sparse.init(params), mask)), (params, dense.init(params))
    step1, step2 = jax.jit(make_step(sparse, x, y)), jax.jit(make_step(dense, x, y))
    for _ in range(5):
        p1, s1 = step1(p1, s1)
        p2, s2 = step2(p2, s2)
    # Two different programs: the same arithmetic, possibly fused differently (1 ulp apart).
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=0)
    chex.assert_trees_all_equal(jax.tree.map(lambda p: p != 0, p1), mask)  # exactly the mask's zeros
    chex.assert_trees_all_equal(get_mask(s1), mask)


def test_non_param_shaped_state_and_custom_init_fallback():
    params = make_params()
    x, y = make_data(params)

    def init(p):  # reads the leaves: tree_map_params' placeholder cannot run it
        return {"trace": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), p), "n": jnp.zeros((), jnp.int32)}

    def update(g, s, p=None):
        trace = jax.tree.map(lambda t, gi: 0.9 * t + gi, s["trace"], g)
        return jax.tree.map(lambda t: -0.1 * t, trace), {"trace": trace, "n": s["n"] + 1}

    for inner in (optax.adafactor(0.05), optax.GradientTransformation(init, update)):
        tx = sparse_training(inner, "rigl", periodic(0.5, every=2))
        state = seed(tx.init(params), jax.random.key(0))
        step = jax.jit(make_step(tx, x, y))
        p = params
        for t in range(3):
            old = kernels(get_mask(state))
            p, state = step(p, state)
        mask = kernels(get_mask(state))
        assert all((kernels(p)[k][~mask[k]] == 0).all() for k in mask)
        if "trace" in state.inner:
            grown = {k: mask[k] & ~old[k] for k in mask}
            assert all((np.asarray(state.inner["trace"][k]["kernel"])[grown[k]] == 0).all() for k in mask)
            assert any(g.any() for g in grown.values())


# ---------------------------------------------------------------------------------------
# Compilation, seeds, mask helpers, trainer.


def test_no_retrace_across_mask_updates():
    params = make_params()
    x, y = make_data(params)
    tx = sparse_training(optax.adam(0.05), "rigl", periodic(0.5, every=2))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        return make_step(tx, x, y)(params, state)

    masks = []
    for _ in range(8):
        params, state = step(params, state)
        masks.append(kernels(get_mask(state))["l0"])
    assert sum(not np.array_equal(a, b) for a, b in zip(masks, masks[1:])) >= 2, "the mask changed several times"


def test_vmapped_steps_without_an_event_skip_the_mask_update():
    seen = []

    def update(mask, params, grads, *, step, **unused):
        jax.debug.callback(lambda t: seen.append(np.asarray(t).tolist()), step)
        return mask

    tx = sparse_training(optax.sgd(0.1), SparseMethod("probe", False, update), periodic(0.5, every=3))
    params = make_params()
    x, y = make_data(params)
    step = jax.jit(jax.vmap(make_step(tx, x, y)))
    batch = jax.tree.map(lambda a: jnp.stack([a, a]), (params, tx.init(params)))
    for _ in range(7):
        batch = step(*batch)
    assert sorted(set(np.ravel(seen).tolist())) == [0, 3, 6]


def test_vmap_over_seeds_equals_per_seed():
    params = make_params()
    x, y = make_data(params)
    tx = sparse_training(optax.sgd(0.05, momentum=0.9), "set", periodic(0.7, every=2))
    keys = jax.random.split(jax.random.key(7), 3)
    step = make_step(tx, x, y)

    def run(key):
        p, s = jax.lax.fori_loop(0, 5, lambda _, c: step(*c), (params, seed(tx.init(params), key)))
        return p, get_mask(s)

    batched = jax.jit(jax.vmap(run))(keys)
    single = jax.jit(run)
    for i in range(3):
        p, m = single(keys[i])
        chex.assert_trees_all_equal(m, jax.tree.map(lambda a: a[i], batched[1]))
        chex.assert_trees_all_close(p, jax.tree.map(lambda a: a[i], batched[0]), atol=1e-5)
    l0 = np.asarray(batched[1]["l0"]["kernel"])
    assert not np.array_equal(l0[0], l0[1]) and not np.array_equal(l0[1], l0[2]), "each seed its own mask"


def test_seed_is_a_no_op_without_sparse_state_and_accepts_raw_keys():
    state = optax.chain(optax.adam(1e-3), masked_updates()).init(make_params())
    assert seed(state, jax.random.key(0)) is state
    tx = sparse_training(optax.sgd(0.1), "static", periodic(0.5, every=2))
    raw = seed(tx.init(make_params()), jax.random.PRNGKey(3))
    typed = seed(tx.init(make_params()), jax.random.wrap_key_data(jax.random.PRNGKey(3)))
    assert jnp.issubdtype(raw.key.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(raw.key), jax.random.key_data(typed.key))


def test_get_mask_set_mask_and_mask_state_find_the_mask():
    params = make_params()
    tx = sparse_training(optax.sgd(0.1), "gmp", one_shot(0.5, at_step=3))
    state = tx.init(params)
    assert isinstance(state, SparseTrainingState) and isinstance(state.masked, MaskedUpdatesState)
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.25)
    params2, state2 = mask_state((params, state), mask)
    chex.assert_trees_all_equal(get_mask(state2), mask)
    assert (kernels(params2)["l0"][~kernels(mask)["l0"]] == 0).all()


def test_trainer_run_with_rigl():
    model = create("mlp", input_shape=(6,), hidden=(12,), num_classes=3)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((40, 6)), jnp.float32)
    y = jnp.asarray(np.arange(40) % 3, jnp.int32)
    data = Dataset(x, y, x[:8], y[:8], x[:8], y[:8])
    tx = sparse_training(optax.adam(1e-2), rigl(cosine_drop_fraction(0.3, end_step=9)),
                         periodic(0.8, every=3, end_step=9), scope="erk")
    trainer = make_trainer(model, tx, batch_size=8, eval_every=5)
    state = trainer.init(jax.random.key(0))
    other = trainer.init(jax.random.key(1))
    assert not np.array_equal(jax.random.key_data(state.opt_state.key), jax.random.key_data(other.opt_state.key))
    train = jax.jit(trainer.train, static_argnames="num_steps")
    state, history = train(state, data, jax.random.key(1), 0, num_steps=10)
    assert history.step.tolist() == [5, 10] and np.isfinite(np.asarray(history.val_loss)).all()
    assert int(state.opt_state.count) == 10 and int(state.step) == 10
    mask = get_mask(state.opt_state)
    kernel_masks = [np.asarray(m) for m in jax.tree.leaves(mask) if m.ndim == 2]
    assert len(kernel_masks) == 2
    assert sum(int(m.sum()) for m in kernel_masks) == expected_keep(0.8, sum(m.size for m in kernel_masks))
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)):
        assert (np.asarray(p)[~np.asarray(m)] == 0).all()
