"""Lottery Jackpots: the short restriction (hand-worked cases, ties in both modes, exact
counts under hypothesis against a sort-based reference), jackpot_init's ratios, the search
(frozen weights bit for bit, BatchNorm statistics, the straight-through gradient, PyTorch's
SGD order, jit/vmap over seeds) and the experiment end to end with resume."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lottojax as lj
from lottojax.data import Dataset
from lottojax.jackpots import (
    jackpot_init,
    jackpot_optimizer,
    jackpot_params,
    jackpot_scores,
    make_searcher,
    restriction_rate,
    searched_flags,
    short_restriction,
)
from lottojax.models import create
from lottojax.models.core import from_linen

ALL = lambda path, leaf: True  # every leaf prunable (1-D test vectors)


def restrict(m, kept, rate=1.0, **kw):
    return np.asarray(short_restriction(jnp.asarray(m, jnp.float32), jnp.asarray(kept), rate, prunable=ALL, **kw))


def bits(x):
    return np.asarray(x).view(np.uint32)


# ---------------------------------------------------------------------------------------
# short_restriction


@pytest.mark.parametrize("rate, expected", [
    (1.0, [0, 1, 0, 1, 1, 1]),
    (0.5, [1, 1, 0, 1, 0, 1]),
    (0.0, [1, 1, 1, 1, 0, 0]),
])
def test_hand_worked_restriction_of_papers_md(rate, expected):
    # m = [.5, .9, .3, .8, .6, .95], kept = [T,T,T,T,F,F], p = 2 -> tau = .5, R = {4, 5}, D = {0, 2}
    m, kept = [.5, .9, .3, .8, .6, .95], [True, True, True, True, False, False]
    assert restrict(m, kept, rate).astype(int).tolist() == expected
    assert restrict(m, kept, rate, skip_on_tie=True).astype(int).tolist() == expected  # no ties at tau
    # As a kernel (default prunable: ndim >= 2), jitted, with a traced rate.
    out = jax.jit(short_restriction)(jnp.asarray([m]), jnp.asarray([kept]), rate)
    assert np.asarray(out).astype(int).tolist() == [expected]


@pytest.mark.parametrize("m, kept, rate, paper, reference", [
    # p = 1, tau = .5 shared by two kept entries: |D| = 2 > |R| = 1. The lower index goes.
    ([.5, .5, .9, .7], [1, 1, 1, 0], 1.0, [0, 1, 1, 1], [1, 1, 1, 0]),
    # p = 3, tau = .3 shared by three kept entries: |D| = 3 > |R| = 2; the two lowest indices go.
    ([.3, .3, .3, .8, .9, .1], [1, 1, 1, 0, 0, 0], 1.0, [0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]),
    # ... at rate .5: k = ceil(.5 * 2) = 1: the highest of R (.9, index 4) in, index 0 out.
    ([.3, .3, .3, .8, .9, .1], [1, 1, 1, 0, 0, 0], 0.5, [0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0]),
    # Ties inside R (no tie at tau): both .8 revivable, k = 1 revives the lower index.
    ([.2, .8, .8, .1, .3], [1, 0, 0, 1, 1], 0.5, [1, 1, 0, 0, 1], [1, 1, 0, 0, 1]),
    ([.2, .8, .8, .1, .3], [1, 0, 0, 1, 1], 1.0, [0, 1, 1, 0, 1], [0, 1, 1, 0, 1]),
    # A pruned entry ties a kept one at tau: nothing is above tau among the pruned (R empty).
    ([.4, .4, .9, .1], [1, 0, 1, 0], 1.0, [1, 0, 1, 0], [1, 0, 1, 0]),
    # Dense leaf (p = 0) and empty leaf (nothing kept): nothing to swap.
    ([.1, .9, .5], [1, 1, 1], 1.0, [1, 1, 1], [1, 1, 1]),
    ([.1, .9, .5], [0, 0, 0], 1.0, [0, 0, 0], [0, 0, 0]),
])
def test_ties_in_both_modes(m, kept, rate, paper, reference):
    kept = np.asarray(kept, bool)
    assert restrict(m, kept, rate).astype(int).tolist() == paper
    assert restrict(m, kept, rate, skip_on_tie=True).astype(int).tolist() == reference


def reference_restriction(s, m, rate, skip_on_tie):
    """§4 step 5 by sorting, in numpy (ties by flat index)."""
    s, m = np.asarray(s, np.float32).reshape(-1), np.asarray(m, bool).reshape(-1)
    n, p = m.size, int((~m).sum())
    if p == 0:
        return m.copy()
    tau = s[np.lexsort((np.arange(n), s))[p - 1]]
    revive_set, drop_set = np.flatnonzero(~m & (s > tau)), np.flatnonzero(m & (s <= tau))
    k = min(int(np.ceil(np.float32(rate) * np.float32(len(revive_set)))), len(revive_set))
    if skip_on_tie and len(drop_set) > len(revive_set):
        k = 0
    revive = revive_set[np.lexsort((revive_set, -s[revive_set]))][:k]
    drop = drop_set[np.lexsort((drop_set, s[drop_set]))][:k]
    out = m.copy()
    out[revive], out[drop] = True, False
    return out


@st.composite
def restriction_cases(draw):
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6)), min_size=1, max_size=3))
    tied = draw(st.booleans())  # scores from a few values: many ties at tau
    leaves = []
    for shape in shapes:
        size = shape[0] * shape[1]
        # No subnormals: XLA:CPU flushes them to 0, so they tie with 0 there but not in numpy.
        values = st.sampled_from([0.1, 0.5, 0.99, 1.0]) if tied else st.floats(-3, 3, width=32, allow_subnormal=False)
        s = np.asarray(draw(st.lists(values, min_size=size, max_size=size)), np.float32).reshape(shape)
        m = np.asarray(draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(shape)
        leaves.append((s, m))
    rate = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]) | st.floats(0, 1, allow_subnormal=False))
    return leaves, rate, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(restriction_cases())
def test_restriction_keeps_every_count_and_matches_a_sorting_reference(case):
    leaves, rate, skip = case
    scores = {f"l{i}": jnp.asarray(s) for i, (s, _) in enumerate(leaves)}
    mask = {f"l{i}": jnp.asarray(m) for i, (_, m) in enumerate(leaves)}
    new = short_restriction(scores, mask, rate, skip_on_tie=skip)
    for i, (s, m) in enumerate(leaves):
        out = np.asarray(new[f"l{i}"])
        assert out.sum() == m.sum()  # the per-leaf count, exactly
        np.testing.assert_array_equal(out.reshape(-1), reference_restriction(s, m, rate, skip))
        if rate == 0:
            np.testing.assert_array_equal(out, m)


def test_rate_one_without_ties_keeps_the_top_k_of_every_leaf():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.permutation(60).reshape(6, 10).astype(np.float32))
    m = jnp.asarray(rng.random((6, 10)) < 0.3)
    out = np.asarray(short_restriction(s, m, 1.0))
    k = int(np.asarray(m).sum())
    np.testing.assert_array_equal(out.reshape(-1), np.isin(np.arange(60), np.argsort(-np.asarray(s).reshape(-1))[:k]))


def test_restriction_under_vmap_equals_per_seed():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.choice([0.1, 0.5, 0.9], (3, 4, 5)).astype(np.float32))
    m = jnp.asarray(rng.random((3, 4, 5)) < 0.5)
    rates = jnp.asarray([1.0, 0.5, 0.25])
    for skip in (False, True):
        batched = jax.jit(jax.vmap(lambda s, m, r: short_restriction(s, m, r, skip_on_tie=skip)))(s, m, rates)
        for i in range(3):
            np.testing.assert_array_equal(batched[i], short_restriction(s[i], m[i], float(rates[i]), skip_on_tie=skip))


def test_restriction_errors_name_the_argument_or_path():
    s = {"fc0": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="rate=1.5 is outside"):
        short_restriction(s, {"fc0": {"kernel": jnp.ones((2, 2), bool)}}, 1.5)
    with pytest.raises(ValueError, match="mask leaf fc0/kernel has shape"):
        short_restriction(s, {"fc0": {"kernel": jnp.ones((2, 3), bool)}})
    with pytest.raises(ValueError, match="mask leaf fc0/kernel has dtype float32"):
        short_restriction(s, {"fc0": {"kernel": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match="paths in scores but not in mask"):
        short_restriction(s, {"fc1": {"kernel": jnp.ones((2, 2), bool)}})
    with pytest.raises(TypeError, match="scores leaf fc0/kernel has dtype int32"):
        short_restriction({"fc0": {"kernel": jnp.ones((2, 2), jnp.int32)}}, {"fc0": {"kernel": jnp.ones((2, 2), bool)}})


# ---------------------------------------------------------------------------------------
# jackpot_init and the schedules


def net():
    # |w|: fc0 = 1..8, fc1 = .5, 2.5, 4.5, 6.5, output (kept dense) tiny.
    return {"fc0": {"kernel": jnp.asarray([[1., -2., 3., -4.], [5., -6., 7., -8.]]), "bias": jnp.zeros(4)},
            "fc1": {"kernel": jnp.asarray([[.5], [-2.5], [4.5], [-6.5]]), "bias": jnp.zeros(1)},
            "output": {"kernel": jnp.asarray([[1e-3]]), "bias": jnp.zeros(1)}}


def test_jackpot_init_hand_worked_ratios():
    # 12 searched weights, density 1/3: keep 4, the |w| >= 6: fc0 keeps 6, 7, 8 (r = 5/8), fc1 keeps 6.5 (r = 3/4).
    scores, mask = jackpot_init(net(), density=1 / 3)
    assert mask["fc0"]["kernel"].tolist() == [[False] * 4, [False, True, True, True]]
    assert mask["fc1"]["kernel"].tolist() == [[False], [False], [False], [True]]
    assert mask["output"]["kernel"].tolist() == [[True]]  # the classifier stays dense
    assert all(bool(m.all()) for m in (mask["fc0"]["bias"], mask["fc1"]["bias"], mask["output"]["bias"]))
    np.testing.assert_array_equal(scores["fc0"]["kernel"], np.where(mask["fc0"]["kernel"], 1.0, 0.99).astype(np.float32))
    assert scores["output"]["kernel"].tolist() == [[1.0]] and scores["fc0"]["bias"].dtype == jnp.float32
    # Searching the classifier too: 13 weights, keep round(13 / 3) = 4, the output's 1e-3 is pruned.
    _, mask = jackpot_init(net(), density=1 / 3, keep_dense=None)
    assert mask["output"]["kernel"].tolist() == [[False]] and int(mask["fc0"]["kernel"].sum()) == 3


def test_jackpot_init_count_is_exact_with_ties_and_under_jit_and_vmap():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": -jnp.ones((4, 2))}, "output": {"kernel": jnp.ones((2, 2))}}
    _, mask = jackpot_init(params, density=0.25)  # 20 weights, all |w| = 1: keep 5, the last ones in flatten order
    assert int(mask["a"]["kernel"].sum()) == 0 and int(mask["b"]["kernel"].sum()) == 5
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x * jnp.arange(1, x.size + 1).reshape(x.shape)]), net())
    batched = jax.jit(jax.vmap(lambda p, d: jackpot_init(p, density=d), (0, None)))(stacked, 0.5)
    for i in range(2):
        one = jackpot_init(jax.tree.map(lambda x: x[i], stacked), density=0.5)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], batched), one)


def test_jackpot_init_errors():
    with pytest.raises(ValueError, match="density=1.5 is outside"):
        jackpot_init(net(), density=1.5)
    with pytest.raises(ValueError, match=r"keep_dense='head' names no prunable leaf.*'fc0/kernel'"):
        jackpot_init(net(), density=0.5, keep_dense="head")
    with pytest.raises(ValueError, match="no leaf of the params is left to search"):
        jackpot_init({"output": {"kernel": jnp.ones((2, 2))}}, density=0.5)
    with pytest.raises(TypeError, match="params leaf fc0/kernel has dtype int32"):
        jackpot_init({"fc0": {"kernel": jnp.ones((2, 2), jnp.int32)}}, density=0.5, keep_dense=None)
    assert searched_flags(net(), keep_dense={"fc0": True, "fc1": False, "output": False}) == [False, False, False, True, False, True]


def test_rate_schedules():
    steps = jnp.arange(0, 100, 10)
    e = np.arange(0, 100, 10) / 100
    assert np.allclose(jax.vmap(restriction_rate("constant"))(steps), 1.0)
    assert np.allclose(jax.vmap(restriction_rate("quartic", num_steps=100))(steps), (1 - e) ** 4)
    assert np.allclose(jax.vmap(restriction_rate("cosine", num_steps=100, value=0.5))(steps), 0.25 * (1 + np.cos(np.pi * e)))
    with pytest.raises(ValueError, match="needs num_steps="):
        restriction_rate("quartic")


# ---------------------------------------------------------------------------------------
# The search


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16, name="fc0")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        return nn.Dense(3, name="output")(x)


def tiny_data(n=96, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int32)
    return Dataset(x, y, x[:32], y[:32], x[:32], y[:32])


def test_straight_through_gradient_reaches_pruned_scores_as_w_times_upstream():
    params = net()
    scores, mask = jackpot_init(params, density=1 / 3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32))

    def forward(p):
        h0 = jnp.tanh(x @ p["fc0"]["kernel"] + p["fc0"]["bias"])
        h1 = jnp.tanh(h0 @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        return jnp.sum((h1 @ p["output"]["kernel"]) ** 2 + h1) + jnp.sum(h0 ** 3)

    weights = jackpot_params(params, scores, mask)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(bits(jnp.abs(a)), bits(jnp.abs(b))),
                 weights, lj.apply_mask(params, mask))  # forward: the masked weights exactly
    g_scores = jax.grad(lambda s: forward(jackpot_params(params, s, mask)))(scores)
    g_weights = jax.grad(forward)(weights)
    for layer in ("fc0", "fc1"):
        expected = g_weights[layer]["kernel"] * params[layer]["kernel"]
        np.testing.assert_array_equal(g_scores[layer]["kernel"], expected)
        assert bool(jnp.any((g_scores[layer]["kernel"] != 0) & ~mask[layer]["kernel"]))  # pruned entries too
    assert float(jnp.abs(g_scores["output"]["kernel"]).sum()) == 0.0 and float(jnp.abs(g_scores["fc0"]["bias"]).sum()) == 0.0


def test_optimizer_is_pytorch_sgd_with_decay_before_momentum():
    tx = jackpot_optimizer(0.1, num_steps=4, momentum=0.9, weight_decay=0.01)
    m, state = {"w": jnp.asarray([1.0, -2.0])}, None
    state = tx.init(m)
    grads = [np.array([0.5, 0.1]), np.array([-0.3, 0.2]), np.array([0.2, 0.2])]
    ref, buf = np.array([1.0, -2.0]), np.zeros(2)
    for t, g in enumerate(grads):
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, m)
        m = optax.apply_updates(m, updates)
        d = g + 0.01 * ref
        buf = 0.9 * buf + d
        ref = ref - 0.1 * 0.5 * (1 + math.cos(math.pi * t / 4)) * buf
        np.testing.assert_allclose(m["w"], ref, rtol=1e-6)


def bn_setup(seed=0):
    model = from_linen(BNNet(), input_shape=(8,))
    params, state = model.init(jax.random.key(seed))
    params = jax.tree.map(lambda w: w + 0.05 * jnp.sign(w) if w.ndim else w, params)
    return model, params, state


def test_search_changes_only_scores_mask_and_batchnorm_statistics():
    model, params, state = bn_setup()
    scores, mask = jackpot_init(params, density=0.3)
    searcher = make_searcher(model, jackpot_optimizer(0.5, num_steps=12), batch_size=16, eval_every=4,
                             rate=restriction_rate("cosine", num_steps=12))
    s0 = searcher.init(params, scores, mask, state)
    data = tiny_data()
    s1, losses = jax.jit(searcher.run_steps, static_argnames="num_steps")(s0, data, jax.random.key(3), 0, num_steps=12)
    assert losses.shape == (12,) and int(s1.step) == 12
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(bits(a), bits(b)), s1.params, params)  # frozen, bitwise
    assert not bool(jnp.all(s1.model_state["batch_stats"]["bn"]["mean"] == state["batch_stats"]["bn"]["mean"]))
    flags = searched_flags(params)
    for f, a, b, sa, sb in zip(flags, jax.tree.leaves(s1.mask), jax.tree.leaves(mask),
                               jax.tree.leaves(s1.scores), jax.tree.leaves(scores)):
        assert int(a.sum()) == int(b.sum())  # every leaf keeps its count
        if not f:  # biases, BatchNorm scale and offset, the classifier: never searched
            np.testing.assert_array_equal(bits(sa), bits(sb))
            assert bool(a.all())
    assert not bool(jnp.all(s1.mask["fc0"]["kernel"] == mask["fc0"]["kernel"]))  # the search moved the mask
    assert 0 < float(searcher.overlap(s1)) < 1
    # search(): evaluations every 4 steps, the same trajectory as run_steps
    s2, history = jax.jit(searcher.search, static_argnames="num_steps")(s0, data, jax.random.key(3), 0, num_steps=12)
    assert history.step.tolist() == [4, 8, 12]
    np.testing.assert_array_equal(s2.mask["fc0"]["kernel"], s1.mask["fc0"]["kernel"])
    np.testing.assert_allclose(history.train_loss, losses.reshape(3, 4).mean(1), rtol=1e-6)
    metrics = searcher.evaluate(s2, data.x_test, data.y_test)
    assert float(metrics.accuracy) == pytest.approx(float(history.test_accuracy[-1]))


def test_search_over_seeds_equals_each_seed_alone():
    model = create("mlp", input_shape=(8,), num_classes=3, hidden=(12,))
    keys = jax.random.split(jax.random.key(0), 2)
    params, state = jax.vmap(model.init)(keys)
    data = tiny_data()
    searcher = make_searcher(model, jackpot_optimizer(0.5, num_steps=6), batch_size=16, eval_every=3)

    def one(params, state, key):
        scores, mask = jackpot_init(params, density=0.25)
        s = searcher.init(params, scores, mask, state)
        s, history = searcher.search(s, data, key, 0, 6)
        return s.mask, history.train_loss

    order = jax.random.split(jax.random.key(5), 2)
    for strategy in ("vmap", "map"):
        masks, losses = jax.jit(lj.map_seeds(one, in_axes=(0, 0, 0), strategy=strategy))(params, state, order)
        for i in range(2):
            mask_i, loss_i = jax.jit(one)(jax.tree.map(lambda x: x[i], params), jax.tree.map(lambda x: x[i], state), order[i])
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], masks), mask_i)
            np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)


def test_searcher_errors_name_the_path():
    model, params, state = bn_setup()
    scores, mask = jackpot_init(params, density=0.3)
    searcher = make_searcher(model, jackpot_optimizer(0.1, num_steps=2), batch_size=8, eval_every=1)
    bad = jax.tree.map(lambda x: x, mask)
    bad["fc0"]["kernel"] = bad["fc0"]["kernel"].T
    with pytest.raises(ValueError, match="mask leaf fc0/kernel has shape"):
        searcher.init(params, scores, bad, state)
    with pytest.raises(ValueError, match="rate=-0.5 is outside"):
        make_searcher(model, optax.sgd(0.1), batch_size=8, eval_every=1, rate=-0.5)
    with pytest.raises(ValueError, match="keep_dense='classifier' names no prunable leaf"):
        make_searcher(model, optax.sgd(0.1), batch_size=8, eval_every=1, keep_dense="classifier").init(
            params, scores, mask, state)
    assert jackpot_scores(mask)["fc0"]["kernel"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# The experiment


from lottojax.experiments.jackpots import ARMS, JackpotConfig, jackpot_table, run_jackpots  # noqa: E402
from lottojax.experiments.metrics import read_metrics  # noqa: E402

TINY = JackpotConfig(widths=(32, 16), num_steps=60, eval_every=30, seeds=(0, 1), sparsities=(0.9, 0.8),
                     search_steps=20, search_batch_size=64, search_eval_every=10)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_jackpots(TINY, root, progress=False)
    return root, summary, workdir


def test_experiment_outputs(experiment):
    root, summary, workdir = experiment
    for name in ("config.json", "dense.npz", "results.json", "results.npz", "jackpots.png", "table.txt",
                 "arms/search-s90.npz", "tickets/random-init-s80.npz"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert summary["dense"]["test_accuracy"]["n"] == 2
    for tag, entry in summary["sparsities"].items():
        assert set(entry["arms"]) == set(ARMS)
        for name, arm in entry["arms"].items():
            assert arm["test_accuracy"]["n"] == 2
            expected = {"magnitude": [0], "search-third": [0, 7]}.get(name, [0, 10, 20])  # 7 = round(20 / 3)
            assert arm["curve"]["step"] == expected, name
        # every arm's start is the magnitude mask of its net; step 0 of 'search' is the magnitude arm
        assert entry["arms"]["search"]["start_test_accuracy"] == entry["arms"]["magnitude"]["test_accuracy"]
        assert len(entry["search_cost"]["random_init_steps"]) == 2 and entry["search_cost"]["third"]["n"] == 2
    # The saved jackpots keep every layer's count of the start; the classifier stays dense.
    dense = lj.load_ticket(os.path.join(workdir, "dense.npz"))
    start = jax.vmap(lambda p: jackpot_init(p, density=0.1)[1])(dense.params)
    for name in ("search", "random-init"):
        ticket = lj.load_ticket(os.path.join(workdir, "tickets", f"{name}-s90.npz"))
        for layer in ("fc0", "fc1", "output"):
            np.testing.assert_array_equal(ticket.mask[layer]["kernel"].sum((1, 2)), start[layer]["kernel"].sum((1, 2)))
        assert bool(ticket.mask["output"]["kernel"].all())
        jax.tree.map(np.testing.assert_array_equal, ticket.params, dense.params)  # the frozen weights
    lines = jackpot_table(summary).splitlines()
    assert lines[0].startswith("dense (pre-trained)") and sum(line.strip().startswith("search ") for line in lines) == 2
    with open(os.path.join(workdir, "table.txt")) as f:
        assert f.read().strip() == jackpot_table(summary)
    # Per-evaluation metrics: the dense pre-training, and every arm's search curve per seed.
    rows = read_metrics(workdir)
    dense_rows = [r for r in rows if r["unit"] == "dense"]
    assert [int(r["step"]) for r in dense_rows] == [30, 60] * 2
    assert [float(r["test_accuracy"]) for r in dense_rows[1::2]] == pytest.approx(summary["dense"]["test_accuracy"]["per_seed"])
    search = [r for r in rows if r["unit"] == "search-s90"]
    assert [(int(r["seed"]), int(r["step"])) for r in search] == [(s, t) for s in (0, 1) for t in (0, 10, 20)]
    assert all(0 <= float(r["overlap"]) <= 1 for r in search)


def test_experiment_resumes_without_recomputing(experiment):
    root, summary, workdir = experiment
    files = ["dense.npz"] + [os.path.join("arms", f) for f in os.listdir(os.path.join(workdir, "arms"))
                             if f.endswith(".npz")]  # CHECKSUMS.json beside them is rewritten
    stamps = {f: os.path.getmtime(os.path.join(workdir, f)) for f in files}
    os.remove(os.path.join(workdir, "arms", "random-net-s80.npz"))  # a run killed before this arm
    again, same = run_jackpots(TINY, root, progress=False)
    assert same == workdir
    for f, t in stamps.items():
        if f != os.path.join("arms", "random-net-s80.npz"):
            assert os.path.getmtime(os.path.join(workdir, f)) == t, f  # the dense nets and finished arms reused
    redone = again["sparsities"]["s80"]["arms"]["random-net"]
    before = summary["sparsities"]["s80"]["arms"]["random-net"]
    assert redone["test_accuracy"] == before["test_accuracy"] and redone["curve"] == before["curve"]
    assert {k: v for k, v in again.items() if k != "sparsities"} == {k: v for k, v in summary.items() if k != "sparsities"}
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["sparsities"]["s90"]["arms"]["search"]["test_accuracy"] == \
            summary["sparsities"]["s90"]["arms"]["search"]["test_accuracy"]


def _cli_main():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "jackpots.py")
    spec = importlib.util.spec_from_file_location("jackpots_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_refuses_bad_flags_before_writing(capsys, tmp_path):
    main = _cli_main()
    for argv, flag in ((["--sparsities", "1.2"], "--sparsities"), (["--arms", "edge-popup"], "--arms"),
                       (["--search-steps", "0"], "--search-steps"), (["--keep-dense", ""], "--keep-dense")):
        with pytest.raises(SystemExit) as error:
            main([*argv, "--out", str(tmp_path)])
        assert error.value.code == 2 and flag in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    from lottojax.experiments.cli import parse_config

    config, _ = parse_config(JackpotConfig, ["--dataset", "fashion-mnist", "--model", "lenet300100", "--seeds", "5"])
    assert (config.dataset, config.model, config.seeds, config.search_steps) == ("fashion-mnist", "lenet300100",
                                                                                 (0, 1, 2, 3, 4), 1500)


def test_keep_dense_that_names_no_layer_leaves_no_run_directory(tmp_path):
    with pytest.raises(ValueError, match="keep_dense='head' names no prunable leaf"):
        run_jackpots(JackpotConfig(keep_dense="head", seeds=(0,), num_steps=10), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []
