"""Pruning methods: one conformance list over every registered method (plus user-defined
values), then method-specific checks against direct calls of the score functions.

A newly registered method gets every conformance test with no new test code; give it small
hyperparameters in ``TEST_HPARAMS`` if its defaults are slow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lottojax as lj
from lottojax import methods as M
from lottojax.prune import remove_lowest_global

NUM_CLASSES = 4
TEST_HPARAMS = {"snip": {"batch_size": 16}, "grasp": {"per_class": 4}, "synflow": {"rounds": 3}}


def _neg_magnitude(params, **unused):
    return jax.tree.map(lambda w: -jnp.abs(w), params)


# User-defined values go through the same list: a multi-round per-leaf method and one with its own scope.
USER_METHODS = {
    "user-iterative-layerwise": M.PruningMethod("user-iterative", _neg_magnitude, rounds=3, scope="layerwise"),
    "user-uniform": M.PruningMethod("user-uniform", _neg_magnitude, scope="uniform"),
}
ALL = [*M.METHODS, *USER_METHODS]


def make_method(name):
    return USER_METHODS[name] if name in USER_METHODS else M.get_method(name, **TEST_HPARAMS.get(name, {}))


# ---------------------------------------------------------------------------------------
# Two small nets: a 2-layer MLP and a conv net, params as linen-style nested dicts.


# Test data from numpy's generator: jax.random's threefry kernels take seconds to compile on
# a loaded 2-core machine, once per shape, and the tests only need fixed arbitrary numbers.
def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def mlp_params(seed):
    return {
        "fc0": {"kernel": normal(seed, (8, 16), 1 / 3), "bias": normal(seed + 100, (16,), 0.1)},
        "fc1": {"kernel": normal(seed + 200, (16, NUM_CLASSES), 1 / 4), "bias": jnp.zeros(NUM_CLASSES)},
    }


def mlp_apply(params, x):
    h = jax.nn.relu(x @ params["fc0"]["kernel"] + params["fc0"]["bias"])
    return h @ params["fc1"]["kernel"] + params["fc1"]["bias"]


def conv_params(seed):
    return {
        "conv": {"kernel": normal(seed, (3, 3, 1, 4), 1 / 3), "bias": jnp.zeros(4)},
        "fc": {"kernel": normal(seed + 100, (64, NUM_CLASSES), 1 / 8), "bias": jnp.zeros(NUM_CLASSES)},
    }


def conv_apply(params, x):
    h = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params["conv"]["bias"])
    return h.reshape(h.shape[0], -1) @ params["fc"]["kernel"] + params["fc"]["bias"]


NETS = {"mlp": (mlp_params, mlp_apply, (8,)), "conv": (conv_params, conv_apply, (6, 6, 1))}


def context_for(net):
    _, apply_fn, input_shape = NETS[net]
    x = normal(1, (128, *input_shape))
    y = jnp.arange(128) % NUM_CLASSES
    return M.ScoreContext(apply_fn=apply_fn, eval_apply_fn=apply_fn, x=x, y=y, input_shape=input_shape,
                          num_classes=NUM_CLASSES)


def random_mask(params, seed, density=0.7):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(rng.random(p.shape) < density) if p.ndim >= 2 else jnp.ones(p.shape, bool), params)


def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def prunable_leaves(mask):
    return {p: m for p, m in zip(*lj.masks.leaves_with_paths(mask)[:2]) if m.ndim >= 2}


def kept(mask):
    return sum(int(m.sum()) for m in prunable_leaves(mask).values())


def assert_masks_equal(a, b):
    for (path, x), y in zip(zip(*lj.masks.leaves_with_paths(a)[:2]), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


def effective_scope(method, scope):
    return method.scope or scope


def expected_kept_fraction(mask, fraction, scope):
    """Prunable entries kept by removing ``fraction``: global count, or per leaf."""
    remove = lambda alive: int(np.round(np.float32(fraction) * np.float32(alive)))
    if scope == "layerwise":
        return sum(int(m.sum()) - remove(int(m.sum())) for m in prunable_leaves(mask).values())
    return kept(mask) - remove(kept(mask))


# ---------------------------------------------------------------------------------------
# The conformance list.


@pytest.mark.parametrize("name", ALL)
def test_jit_and_vmap_over_seeds_equal_eager_with_exact_counts(name):
    # One compiled program, jit(vmap(...)) over 3 seeds of (params, mask, key) with the
    # amounts traced, against eager calls seed by seed (so one compile per method).
    method = make_method(name)
    ctx = context_for("mlp")
    layerwise = effective_scope(method, "global") == "layerwise"

    amount, value = ("fraction", 0.4) if layerwise else ("keep", 50)

    def prune(p, m, k, v):
        return M.prune_with(method, p, m, key=k, context=ctx, **{amount: v})

    params = stack([mlp_params(s) for s in (4, 5, 6)])
    masks = stack([random_mask(mlp_params(s), s) for s in (4, 5, 6)])
    keys = jax.random.split(jax.random.key(6), 3)
    together = jax.jit(jax.vmap(prune, in_axes=(0, 0, 0, None)))(params, masks, keys, value)
    for s in range(3):
        pick = lambda t: jax.tree.map(lambda x: x[s], t)
        eager = prune(pick(params), pick(masks), keys[s], value)
        assert_masks_equal(pick(together), eager)
        if layerwise:
            assert kept(eager) == expected_kept_fraction(pick(masks), 0.4, "layerwise")
        else:
            assert kept(eager) == 50
        for before, after in zip(jax.tree.leaves(pick(masks)), jax.tree.leaves(eager)):
            assert not np.any(np.asarray(after) & ~np.asarray(before)), "a pruned entry was revived"


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("name", ALL)
def test_exact_counts_and_masks_only_shrink(name, net):
    method = make_method(name)
    init, _, _ = NETS[net]
    params, ctx = init(7), context_for(net)
    mask, key = random_mask(params, 8), jax.random.key(9)
    # The conv net only with one global threshold: every per-leaf path on conv shapes would
    # compile again (slow on 2 cores); the scopes themselves are checked on the MLP.
    for scope in ("global", "layerwise", "erk") if net == "mlp" else ("global",):
        scope_used = effective_scope(method, scope)
        new = M.prune_with(method, params, mask, key=key, context=ctx, fraction=0.3, scope=scope)
        assert kept(new) == expected_kept_fraction(mask, 0.3, scope_used), scope
        if scope_used == "layerwise":
            for path, m in prunable_leaves(new).items():
                alive = int(prunable_leaves(mask)[path].sum())
                assert int(m.sum()) == alive - int(np.round(np.float32(0.3) * np.float32(alive))), path
        for before, after in zip(jax.tree.leaves(mask), jax.tree.leaves(new)):
            assert not np.any(np.asarray(after) & ~np.asarray(before)), "a pruned entry was revived"
        # non-prunable leaves (biases) are untouched
        for path, m in zip(*lj.masks.leaves_with_paths(new)[:2]):
            if m.ndim < 2:
                assert bool(m.all()), path
    if effective_scope(method, "global") != "layerwise":
        again = M.prune_with(method, params, new, key=key, context=ctx, keep=kept(new) // 2)
        assert kept(again) == kept(new) // 2
        for before, after in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
            assert not np.any(np.asarray(after) & ~np.asarray(before))
        # asking to keep more than is alive keeps what is alive (masks only shrink)
        assert_masks_equal(M.prune_with(method, params, new, key=key, context=ctx, keep=kept(new) + 5), new)


@pytest.mark.parametrize("name", ALL)
def test_errors_name_the_tree_path(name):
    method = make_method(name)
    params, ctx = mlp_params(0), context_for("mlp")
    mask = lj.ones_like(params)
    bad = {**mask, "fc1": {**mask["fc1"], "kernel": jnp.ones((4, 16), bool)}}
    with pytest.raises(ValueError, match="fc1/kernel"):
        M.prune_with(method, params, bad, key=jax.random.key(0), context=ctx, keep=10)
    not_bool = {**mask, "fc0": {**mask["fc0"], "kernel": jnp.ones((8, 16))}}
    with pytest.raises(ValueError, match="fc0/kernel.*bool"):
        M.prune_with(method, params, not_bool, key=jax.random.key(0), context=ctx, keep=10)
    if effective_scope(method, "layerwise") == "layerwise":
        with pytest.raises(ValueError, match="fc0/kernel"):
            M.prune_with(method, params, mask, key=jax.random.key(0), context=ctx, fraction={"fc0": 1.5, "fc1": 0.1},
                         scope="layerwise")


# ---------------------------------------------------------------------------------------
# Each method against a direct call of its score function.


def test_magnitude_equals_prune_global():
    params = mlp_params(0)
    mask = random_mask(params, 1)
    for fraction in (0.0, 0.25, 0.5, 0.9):
        got = M.prune_with("magnitude", params, mask, key=jax.random.key(0), fraction=fraction)
        assert_masks_equal(got, lj.prune_global(lj.magnitude(params), mask, fraction))
        got = M.prune_with("magnitude", params, mask, key=jax.random.key(0), fraction=fraction, scope="layerwise")
        assert_masks_equal(got, lj.prune_layerwise(lj.magnitude(params), mask, fraction))


def test_random_equals_random_scores():
    params = mlp_params(0)
    mask, key = random_mask(params, 1), jax.random.key(2)
    got = M.prune_with("random", params, mask, key=key, keep=40)
    assert_masks_equal(got, remove_lowest_global(lj.random_scores(params, key=key), mask, lambda a: a - 40))


def test_snip_and_grasp_equal_direct_calls_on_the_same_batch():
    # prune_with scores apply_mask(params, mask); from a dense mask that is params itself, so
    # the masks must equal keeping the top `keep` of lottojax.snip / grasp on the batch the
    # method draws with the key: choice without replacement (SNIP), class-balanced (GraSP).
    params, ctx = mlp_params(0), context_for("mlp")
    dense, key = lj.ones_like(params), jax.random.key(3)
    index = jax.random.choice(key, 128, (16,), replace=False)
    expected = lj.snip(params, apply_fn=mlp_apply, batch=(ctx.x[index], ctx.y[index]))
    got = M.prune_with(M.snip(batch_size=16), params, dense, key=key, context=ctx, keep=60)
    assert_masks_equal(got, remove_lowest_global(expected, dense, lambda a: a - 60))

    batch = lj.class_balanced_sample(ctx.x, ctx.y, per_class=4, key=key, num_classes=NUM_CLASSES)
    expected = lj.grasp(params, apply_fn=mlp_apply, batch=batch, temperature=50.0)
    got = M.prune_with(M.grasp(per_class=4, temperature=50.0), params, dense, key=key, context=ctx, keep=60)
    assert_masks_equal(got, remove_lowest_global(expected, dense, lambda a: a - 60))


def test_synflow_equals_synflow_mask():
    # Same schedule: round k keeps round((K/N)^(k/n) * N) in float32, the last exactly K.
    params, ctx = mlp_params(0), context_for("mlp")
    total = 8 * 16 + 16 * NUM_CLASSES
    for keep in (100, 13):
        got = M.prune_with(M.synflow(rounds=4), params, lj.ones_like(params), key=jax.random.key(0), context=ctx,
                           keep=keep)
        expected = lj.synflow_mask(params, apply_fn=mlp_apply, input_shape=(8,),
                                   density=jnp.float32(keep) / jnp.float32(total), rounds=4)
        assert_masks_equal(got, expected)
        assert kept(got) == keep


def test_distribution_scopes_match_layer_densities_and_are_exact():
    params = {"a": normal(0, (100, 100)), "b": normal(1, (100, 10)), "c": normal(2, (3, 3, 8, 16)),
              "bias": jnp.zeros(10)}
    dense = lj.ones_like(params)
    n = {k: v.size for k, v in params.items() if v.ndim >= 2}
    total = sum(n.values())
    scopes = {"erk": "erk", "er": "erdos_renyi", "uniform": "uniform"}
    for scope, distribution in scopes.items():
        for keep in (50, 1234, 9000):  # eager (jit and vmap over scopes are in the conformance list)
            got = M.prune_with("magnitude", params, dense, key=jax.random.key(0), keep=keep, scope=scope)
            densities = lj.layer_densities(params, density=keep / total, distribution=distribution)
            counts = {k: int(got[k].sum()) for k in n}
            assert sum(counts.values()) == keep, (scope, keep)
            for k in n:
                assert abs(counts[k] - densities[k] * n[k]) < 1.01, (scope, keep, k)
            assert bool(got["bias"].all())
    # per leaf the highest |w| are kept
    a = np.abs(np.asarray(params["a"])).ravel()
    kept_a = np.asarray(got["a"]).ravel()
    assert a[kept_a].min() >= a[~kept_a].max()


def test_random_erk_is_random_scores_with_erk_scope():
    params = mlp_params(0)
    dense, key = lj.ones_like(params), jax.random.key(1)
    got = M.prune_with("random-erk", params, dense, key=key, keep=100, scope="global")  # its own scope wins
    counts = M._distribution_counts(jnp.int32(100), jnp.array([128, 64]), shapes=((8, 16), (16, NUM_CLASSES)),
                                    distribution="erk")
    expected = lj.prune_layerwise(lj.random_scores(params, key=key), dense,
                                  {"fc0": 1 - int(counts[0]) / 128, "fc1": 1 - int(counts[1]) / 64})
    assert_masks_equal(got, expected)
    assert kept(got) == 100


def test_multi_round_schedule_reaches_target_through_rescoring():
    # A score that prefers entries far from the current mean of alive weights changes between
    # rounds; whatever the scores, the last round keeps exactly the target.
    def recentred(params, **unused):
        return jax.tree.map(lambda w: jnp.abs(w - jnp.sum(w) / jnp.maximum(jnp.sum(w != 0), 1)), params)

    params = mlp_params(0)
    for rounds in (1, 2, 5):
        method = M.PruningMethod("recentred", recentred, rounds=rounds)
        got = M.prune_with(method, params, lj.ones_like(params), key=jax.random.key(0), keep=17)
        assert kept(got) == 17


# ---------------------------------------------------------------------------------------
# Registry and argument errors.


def test_registry_is_read_only_and_lists_names():
    with pytest.raises(TypeError):
        M.METHODS["mine"] = M.magnitude
    with pytest.raises(ValueError, match="'magnitude', 'random', 'random-erk', 'snip', 'grasp', 'synflow', 'iterative-snip'"):
        M.get_method("nope")
    with pytest.raises(ValueError, match="no hyperparameter 'batchsize'.*batch_size"):
        M.get_method("snip", batchsize=3)
    with pytest.raises(ValueError, match="rounds=0"):
        M.get_method("synflow", rounds=0)
    with pytest.raises(ValueError, match="temperature"):
        M.get_method("grasp", temperature=-1.0)
    with pytest.raises(ValueError, match="already built"):
        M.resolve_method(M.magnitude(), rounds=3)
    with pytest.raises(ValueError, match="not registered"):
        M.prune_with("nope", {}, {}, key=jax.random.key(0), keep=1)


def test_argument_errors():
    params = mlp_params(0)
    mask, key = lj.ones_like(params), jax.random.key(0)
    with pytest.raises(ValueError, match="exactly one of fraction"):
        M.prune_with("magnitude", params, mask, key=key)
    with pytest.raises(ValueError, match="exactly one of fraction"):
        M.prune_with("magnitude", params, mask, key=key, keep=3, fraction=0.1)
    with pytest.raises(ValueError, match="layerwise"):
        M.prune_with("magnitude", params, mask, key=key, keep=3, scope="layerwise")
    with pytest.raises(ValueError, match="scope='glob'"):
        M.prune_with("magnitude", params, mask, key=key, keep=3, scope="glob")
    with pytest.raises(ValueError, match=r"keep=1000 is outside \[0, 192\]"):
        M.prune_with("magnitude", params, mask, key=key, keep=1000)
    with pytest.raises(ValueError, match=r"fraction=1.0 with scope='global' is outside \[0, 1\)"):
        M.prune_with("magnitude", params, mask, key=key, fraction=1.0)
    with pytest.raises(ValueError, match="per-leaf fractions need scope='layerwise'"):
        M.prune_with("magnitude", params, mask, key=key, fraction={"fc0": 0.1, "fc1": 0.2})
    with pytest.raises(ValueError, match=r"fraction with scope='erk' \(the scope of pruning method 'random-erk'\) must be one"):
        M.prune_with("random-erk", params, mask, key=key, fraction={"fc0": 0.1, "fc1": 0.2}, scope="layerwise")
    with pytest.raises(ValueError, match="no leaf of the params is prunable"):
        M.prune_with("magnitude", params, mask, key=key, keep=3, prunable=False)


def test_missing_context_field_names_field_and_method():
    params = mlp_params(0)
    mask, key = lj.ones_like(params), jax.random.key(0)
    with pytest.raises(ValueError, match=r"'snip' needs context.apply_fn"):
        M.prune_with("snip", params, mask, key=key, keep=3)
    with pytest.raises(ValueError, match=r"'grasp' needs context.x"):
        M.prune_with("grasp", params, mask, key=key, keep=3, context=M.ScoreContext(apply_fn=mlp_apply))
    with pytest.raises(ValueError, match=r"'synflow' needs context.eval_apply_fn"):
        M.prune_with("synflow", params, mask, key=key, keep=3, context=M.ScoreContext(apply_fn=mlp_apply))
    with pytest.raises(ValueError, match=r"'synflow' needs context.input_shape"):
        M.prune_with("synflow", params, mask, key=key, keep=3, context=M.ScoreContext(eval_apply_fn=mlp_apply))


def test_user_method_with_wrong_scores_names_path():
    params = mlp_params(0)
    wrong = M.PruningMethod("wrong", lambda p, **unused: {**p, "fc0": {**p["fc0"], "kernel": jnp.ones((3, 3))}})
    with pytest.raises(ValueError, match="scores of pruning method 'wrong' leaf fc0/kernel"):
        M.prune_with(wrong, params, lj.ones_like(params), key=jax.random.key(0), keep=5)
