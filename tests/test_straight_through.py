"""Straight-through estimator, STE sparse training and SR-STE: exactness, counts, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.models.core import from_linen
from lottojax.models.mlp import MLP
from lottojax.straight_through import sr_ste_decay, ste_mask, ste_model, ste_params, straight_through


def bits(x):
    return np.asarray(x).view(np.uint32)


# ---------------------------------------------------------------------------------------
# straight_through


def tricks(hard, s):
    """The two stop_gradient spellings of a straight-through estimator, as JAX computes them."""
    sg = jax.lax.stop_gradient
    return hard + s - sg(s), s + sg(hard - s)


@pytest.mark.parametrize("scale, hard_fn, inexact", [
    (1.0, lambda s: s > 0, 0),           # b in {0, 1}: hard + s - sg(s) rounds (about 12% of entries)
    (1.0, jnp.sign, 0),                  # b = ±1: about 24%
    (1e8, jnp.sign, 1),                  # s + sg(b - s) rounds once |s| >> |b|
    (1.0, jnp.round, 0),
])
def test_forward_is_hard_bitwise_where_the_stop_gradient_trick_is_not(scale, hard_fn, inexact):
    s = jnp.asarray((np.random.default_rng(0).uniform(-3, 3, 4096) * scale).astype(np.float32))
    hard = hard_fn(s).astype(jnp.float32)
    trick = tricks(hard, s)[inexact]
    assert np.mean(np.asarray(trick) != np.asarray(hard)) > 0.05  # the trick misses the hard value
    if scale == 1.0 and hard_fn is not jnp.round:  # the {0, 1} figure of PAPERS.md: ~12%, ±1: ~24%
        assert 0.08 < np.mean(np.asarray(trick) != np.asarray(hard)) < 0.3
    for out in (straight_through(hard, s), jax.jit(straight_through)(hard, s),
                straight_through(hard_fn(s), s)):  # also bool hard (s > 0)
        np.testing.assert_array_equal(bits(out), bits(hard))


def test_gradient_is_the_incoming_cotangent_exactly():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.uniform(-3, 3, (5, 7)).astype(np.float32))
    h = jnp.sign(s)
    cotangent = jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32))
    out, vjp = jax.vjp(straight_through, h, s)
    g_hard, g_surrogate = vjp(cotangent)
    np.testing.assert_array_equal(bits(out), bits(h))
    np.testing.assert_array_equal(bits(g_surrogate), bits(cotangent))
    np.testing.assert_array_equal(np.asarray(g_hard), 0.0)
    # As used: grad of sum(w * ste(hard(s), s)) w.r.t. s is w, through a jit.
    w = jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32))
    grad = jax.jit(jax.grad(lambda s: jnp.sum(w * straight_through(jnp.round(s), s))))(s)
    np.testing.assert_array_equal(bits(grad), bits(w))


def test_bool_and_integer_hard_become_the_surrogate_dtype():
    s = jnp.array([0.7, -0.1, 2.0, -3.0], jnp.float32)
    out = straight_through(s > 0, s)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0, 0.0])
    out = straight_through(jnp.sign(s).astype(jnp.int8), s)
    np.testing.assert_array_equal(out, [1.0, -1.0, 1.0, -1.0])
    grad = jax.grad(lambda s: jnp.sum(straight_through(s > 0, s) * jnp.arange(4.0)))(s)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 2.0, 3.0])
    # The Lottery-Jackpots / HideNseek use: weights * ste(mask, scores); dL/dscores = dL/dw_eff * w.
    weights = jnp.array([2.0, -1.0, 0.5, 3.0])
    grad = jax.grad(lambda s: jnp.sum(weights * straight_through(s > 0, s)))(s)
    np.testing.assert_array_equal(grad, weights)


def test_pytrees_keep_the_surrogate_structure():
    s = {"a": {"kernel": jnp.array([[0.4, -1.6]])}, "b": (jnp.array([2.5]), jnp.array([-0.5, 0.5]))}
    h = jax.tree.map(jnp.round, s)
    out = straight_through(h, s)
    assert jax.tree.structure(out) == jax.tree.structure(s)
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(h)):
        np.testing.assert_array_equal(bits(o), bits(r))
    grad = jax.grad(lambda s: sum(jnp.sum(3.0 * x) for x in jax.tree.leaves(straight_through(jax.tree.map(jnp.round, s), s))))(s)
    for g, x in zip(jax.tree.leaves(grad), jax.tree.leaves(s)):
        np.testing.assert_array_equal(g, np.full(x.shape, 3.0))


def test_jit_and_vmap():
    s = jnp.asarray(np.random.default_rng(2).uniform(-3, 3, (4, 6)).astype(np.float32))
    w = jnp.arange(6.0)
    per_row = lambda s: jax.grad(lambda s: jnp.sum(w * straight_through(jnp.sign(s), s) ** 2))(s)
    batched = jax.jit(jax.vmap(per_row))(s)
    # d/ds sum(w * ste^2) = 2 w * ste(sign(s)) = 2 w sign(s)
    np.testing.assert_array_equal(batched, 2 * w * np.sign(s))
    forward = jax.jit(jax.vmap(straight_through))(jnp.sign(s), s)
    np.testing.assert_array_equal(bits(forward), bits(np.sign(s)))


def test_mismatch_errors_name_the_path():
    s = {"fc0": {"kernel": jnp.ones((2, 3))}, "out": {"kernel": jnp.ones((3, 1))}}
    with pytest.raises(ValueError, match="hard leaf fc0/kernel has shape \\(3, 2\\)"):
        straight_through({"fc0": {"kernel": jnp.ones((3, 2))}, "out": {"kernel": jnp.ones((3, 1))}}, s)
    with pytest.raises(ValueError, match="paths in surrogate but not in hard: \\['out/kernel'\\]"):
        straight_through({"fc0": {"kernel": jnp.ones((2, 3))}, "head": {"kernel": jnp.ones((3, 1))}}, s)
    with pytest.raises(TypeError, match="hard leaf out/kernel has dtype float16"):
        straight_through({"fc0": {"kernel": jnp.ones((2, 3))}, "out": {"kernel": jnp.ones((3, 1), jnp.float16)}}, s)
    with pytest.raises(TypeError, match="surrogate leaf w has dtype int32"):
        straight_through({"w": jnp.ones(2)}, {"w": jnp.ones(2, jnp.int32)})
    with pytest.raises(ValueError, match="hard the array has shape \\(2,\\) but the surrogate has \\(3,\\)"):
        straight_through(jnp.ones(2), jnp.ones(3))


# ---------------------------------------------------------------------------------------
# STE sparse training

MODEL = from_linen(MLP(hidden=(8,), num_classes=3), input_shape=(8,))


def data(seed=0, n=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(8, 3)), axis=1).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def loss_of(apply, params, state, x, y):
    logits, _ = apply(params, state, x, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_ste_model_forward_is_the_masked_model():
    params, state = MODEL.init(jax.random.key(0))
    x, _ = data()
    sparse = ste_model(MODEL, sparsity=0.75)
    masked = lj.apply_mask(params, ste_mask(params, sparsity=0.75))
    for train in (True, False):
        np.testing.assert_array_equal(sparse.apply(params, state, x, train)[0], MODEL.apply(masked, state, x, train)[0])
    np.testing.assert_array_equal(jax.jit(sparse.apply, static_argnums=3)(params, state, x, False)[0],
                                  MODEL.apply(masked, state, x, False)[0])


def test_ste_gradient_reaches_all_weights_and_is_the_dense_gradient_at_the_masked_weights():
    params, state = MODEL.init(jax.random.key(0))
    x, y = data()
    mask = ste_mask(params, sparsity=0.75)
    sparse = ste_model(MODEL, sparsity=0.75)
    grad = jax.grad(lambda p: loss_of(sparse.apply, p, state, x, y))(params)
    dense_at_masked = jax.grad(lambda p: loss_of(MODEL.apply, p, state, x, y))(lj.apply_mask(params, mask))
    for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(dense_at_masked)):
        np.testing.assert_array_equal(g, d)  # the same operations on the same values: bitwise
    kernel_grad, kernel_mask = np.asarray(grad["fc0"]["kernel"]), np.asarray(mask["fc0"]["kernel"])
    assert (~kernel_mask).sum() > 0 and np.count_nonzero(kernel_grad[~kernel_mask]) > 0.5 * (~kernel_mask).sum()
    # The plain masked model (apply_mask inside the loss) gives zero there.
    plain = jax.grad(lambda p: loss_of(MODEL.apply, lj.apply_mask(p, mask), state, x, y))(params)
    assert np.all(np.asarray(plain["fc0"]["kernel"])[~kernel_mask] == 0)


def scope_params():
    rng = np.random.default_rng(3)
    return {
        "a": jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32)),   # 32
        "b": jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32)),   # 24
        "c": jnp.asarray(rng.normal(size=(6, 2)).astype(np.float32)),   # 12
        "bias": jnp.asarray(rng.normal(size=(6,)).astype(np.float32)),  # not prunable
    }


@pytest.mark.parametrize("scope, counts", [
    # N = 68, sparsity .7: round(47.6) = 48 removed, K = 20.
    ("uniform", (9, 7, 4)),      # 20 * (32, 24, 12) / 68 = 9.41, 7.06, 3.53: floors 19, +1 to c (largest remainder)
    ("layerwise", (10, 7, 4)),   # 32 - round(22.4), 24 - round(16.8), 12 - round(8.4)
    ("global", None),
    ("erk", None),
    ("er", None),
])
def test_ste_mask_exact_counts_per_scope(scope, counts):
    params = scope_params()
    mask = ste_mask(params, sparsity=0.7, scope=scope)
    kept = tuple(int(mask[k].sum()) for k in "abc")
    if counts is not None:
        assert kept == counts
    if scope != "layerwise":
        assert sum(kept) == 20
    assert bool(mask["bias"].all())
    for k in "abc":  # each leaf keeps its largest |w|
        w, m = np.abs(np.asarray(params[k])), np.asarray(mask[k])
        if m.any() and (~m).any():
            assert w[m].min() > w[~m].max()
    if scope == "global":
        all_w = np.concatenate([np.abs(np.asarray(params[k])).ravel() for k in "abc"])
        threshold = np.sort(all_w)[-20]
        for k in "abc":
            np.testing.assert_array_equal(mask[k], np.abs(np.asarray(params[k])) >= threshold)


def test_ste_mask_traced_sparsity_matches_concrete():
    params = scope_params()
    traced = jax.jit(lambda p, s: ste_mask(p, sparsity=s))(params, 0.7)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(ste_mask(params, sparsity=0.7))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("nm, axis", [((2, 4), -2), ((1, 4), -2), ((3, 4), -1)])
def test_ste_mask_nm_pattern_is_exact(nm, axis):
    n, m = nm
    rng = np.random.default_rng(4)
    params = {"dense": jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32)),
              "conv": jnp.asarray(rng.normal(size=(3, 3, 8, 4)).astype(np.float32)),
              "bias": jnp.ones(4)}
    mask = ste_mask(params, nm=nm, nm_axis=axis)
    for k in ("dense", "conv"):
        w = np.moveaxis(np.abs(np.asarray(params[k])), axis, -1)
        mk = np.moveaxis(np.asarray(mask[k]), axis, -1)
        groups_w = w.reshape(*w.shape[:-1], -1, m)
        groups_m = mk.reshape(groups_w.shape)
        np.testing.assert_array_equal(groups_m.sum(-1), n)
        top = np.argsort(-groups_w, axis=-1, kind="stable")[..., :n]
        expected = np.zeros_like(groups_m)
        np.put_along_axis(expected, top, True, axis=-1)
        np.testing.assert_array_equal(groups_m, expected)
    assert bool(mask["bias"].all())
    # sparsity is optional with nm, and may repeat it
    same = ste_mask(params, nm=nm, nm_axis=axis, sparsity=1 - n / m)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(mask)):
        np.testing.assert_array_equal(a, b)


def test_ste_params_nm_forward_and_gradient():
    w = jnp.array([[4.0, -1.0], [1.0, 2.0], [-3.0, 0.5], [2.0, -4.0]])
    out = ste_params({"w": w}, nm=(2, 4))
    np.testing.assert_array_equal(out["w"], [[4.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -4.0]])
    grad = jax.grad(lambda p: jnp.sum(ste_params(p, nm=(2, 4))["w"] * jnp.arange(8.0).reshape(4, 2)))({"w": w})
    np.testing.assert_array_equal(grad["w"], np.arange(8.0).reshape(4, 2))


# ---------------------------------------------------------------------------------------
# SR-STE


def test_sr_ste_decay_hand_worked():
    # 2:4 along the input axis (one group per column):
    #   column 0, |w| = 4, 1, 3, 2  -> keeps 4, -3; prunes 1, 2
    #   column 1, |w| = 1, 2, .5, 4 -> keeps 2, -4; prunes -1, .5
    # weight .25, gradient 1: 1 + .25 * (1 - m) * w
    #   column 0: 1, 1 + .25, 1, 1 + .5      column 1: 1 - .25, 1, 1 + .125, 1
    params = {"w": jnp.array([[4.0, -1.0], [1.0, 2.0], [-3.0, 0.5], [2.0, -4.0]]), "b": jnp.array([5.0, -5.0])}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = sr_ste_decay(0.25, nm=(2, 4))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], [[1.0, 0.75], [1.25, 1.0], [1.0, 1.125], [1.5, 1.0]])
    np.testing.assert_array_equal(updates["b"], [1.0, 1.0])  # not prunable: no decay
    # First in a chain, before SGD: w - lr * (g + decay)
    chain = optax.chain(sr_ste_decay(0.25, nm=(2, 4)), optax.sgd(1.0))
    updates, _ = chain.update(grads, chain.init(params), params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"],
                                  np.asarray(params["w"]) - [[1.0, 0.75], [1.25, 1.0], [1.0, 1.125], [1.5, 1.0]])
    # Unstructured variant: sparsity .5 keeps 4 of the 8 kernel entries: 4, -3, -4 and, of the
    # two 2s (flat indices 3 and 6), the later one (ties: the lower index is pruned first).
    tx = sr_ste_decay(0.25, nm=None, sparsity=0.5)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], [[1.0, 0.75], [1.25, 1.5], [1.0, 1.125], [1.0, 1.0]])


def test_sr_ste_decay_weight_as_an_injected_hyperparameter():
    params = {"w": jnp.array([[4.0, -1.0], [1.0, 2.0], [-3.0, 0.5], [2.0, -4.0]])}
    tx = optax.inject_hyperparams(sr_ste_decay, static_args=("nm_axis",))(weight=0.25)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    np.testing.assert_array_equal(updates["w"], [[1.0, 0.75], [1.25, 1.0], [1.0, 1.125], [1.5, 1.0]])
    state.hyperparams["weight"] = jnp.float32(0.0)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    np.testing.assert_array_equal(updates["w"], np.ones((4, 2)))


def test_sr_ste_decay_weight_zero_is_the_plain_gradient():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32)), "b": jnp.zeros(4)}
    grads = {"w": jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32)), "b": jnp.ones(4)}
    tx = sr_ste_decay(0.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(u, g)


# ---------------------------------------------------------------------------------------
# Training


def make_train(sparse, tx, steps):
    def train(key, x, y):
        params, state = sparse.init(key)
        opt = tx.init(params)

        def step(carry, _):
            params, opt = carry
            loss, g = jax.value_and_grad(lambda p: loss_of(sparse.apply, p, state, x, y))(params)
            updates, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        (params, _), losses = jax.lax.scan(step, (params, opt), None, length=steps)
        return params, losses

    return jax.jit(train)


def test_ste_training_run_exact_ticket_and_vmap_over_seeds():
    x, y = data()
    sparse = ste_model(MODEL, sparsity=0.75)
    train = make_train(sparse, optax.adam(1e-2), steps=60)
    keys = jax.random.split(jax.random.key(0), 2)
    batched, batched_losses = jax.vmap(train, in_axes=(0, None, None))(keys, x, y)
    prunable_total = 8 * 8 + 8 * 3
    expected_kept = prunable_total - int(np.round(np.float32(0.75) * np.float32(prunable_total)))
    for i in range(2):
        params, losses = train(keys[i], x, y)
        assert float(losses[-1]) < 0.8 * float(losses[0])
        ticket = ste_mask(params, sparsity=0.75)
        kept = sum(int(ticket[k]["kernel"].sum()) for k in ("fc0", "output"))
        assert kept == expected_kept
        assert lj.layer_report(ticket) == {"fc0/kernel": (16, 64), "output/kernel": (6, 24)}  # uniform: 22 * (64, 24) / 88
        seed_params = jax.tree.map(lambda a: a[i], batched)
        for a, b in zip(jax.tree.leaves(seed_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched_losses[i], losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(ste_mask(seed_params, sparsity=0.75)), jax.tree.leaves(ticket)):
            np.testing.assert_array_equal(a, b)


def test_sr_ste_training_run_keeps_the_nm_pattern():
    x, y = data(1)
    sparse = ste_model(MODEL, nm=(2, 4))
    tx = optax.chain(sr_ste_decay(2e-4, nm=(2, 4)), optax.sgd(0.1, momentum=0.9))
    params, losses = make_train(sparse, tx, steps=40)(jax.random.key(1), x, y)
    assert float(losses[-1]) < float(losses[0])
    ticket = ste_mask(params, nm=(2, 4))
    for k in ("fc0", "output"):
        groups = np.asarray(ticket[k]["kernel"]).T.reshape(-1, 4)  # groups of 4 along the input axis
        np.testing.assert_array_equal(groups.sum(-1), 2)


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
        ste_mask(scope_params(), sparsity=sparsity)
    with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
        ste_model(MODEL, sparsity=sparsity)


def test_bad_settings():
    params = scope_params()
    with pytest.raises(ValueError, match="pass sparsity="):
        ste_mask(params)
    with pytest.raises(ValueError, match="scope='blocks' unknown"):
        ste_model(MODEL, sparsity=0.5, scope="blocks")
    with pytest.raises(ValueError, match="nm=\\(3, 2\\) must be a pair of ints"):
        ste_model(MODEL, nm=(3, 2))
    with pytest.raises(ValueError, match="scope='global' does not apply with nm"):
        ste_mask(params, nm=(2, 4), scope="global")
    with pytest.raises(ValueError, match="disagrees with nm=\\(2, 4\\)"):
        ste_mask(params, nm=(2, 4), sparsity=0.75)
    with pytest.raises(ValueError, match="no leaf of the params is prunable"):
        ste_mask({"bias": jnp.ones(3)}, sparsity=0.5)
    with pytest.raises(ValueError, match="weight=-1.0 must be one number >= 0"):
        sr_ste_decay(-1.0)


def test_nm_not_dividing_the_axis_names_the_leaf():
    params = {"fc0": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match="leaf fc0/kernel has shape \\(6, 4\\).*not a multiple of m=4"):
        ste_mask(params, nm=(2, 4))
    sparse = ste_model(MODEL, nm=(2, 3))  # the MLP's kernels have 8 inputs
    model_params, state = sparse.init(jax.random.key(0))
    with pytest.raises(ValueError, match="leaf fc0/kernel .* not a multiple of m=3"):
        sparse.apply(model_params, state, jnp.ones((1, 8)), False)


def test_sr_ste_needs_params():
    params = {"w": jnp.ones((4, 2))}
    tx = sr_ste_decay()
    with pytest.raises(ValueError, match="sr_ste_decay needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="sr_ste_decay needs params"):
        chain = optax.chain(sr_ste_decay(), optax.sgd(0.1))
        chain.update(params, chain.init(params))
