"""Grokking tickets: the modular dataset, the grokking nets, the measures of
lottojax.grokking, and the experiment end to end on a tiny budget (outputs and resume)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.data import load
from lottojax.data.modular import modular_arithmetic, modular_pairs
from lottojax.experiments.base import ConfigError
from lottojax.experiments.grokking import ARMS, GrokkingConfig, grokking_table, run_grokking
from lottojax.experiments.metrics import read_metrics
from lottojax.grokking import (
    NEVER,
    Curves,
    params_norm,
    precise_cross_entropy,
    scale_to_norm,
    steps_to_threshold,
    train_curves,
)
from lottojax.models import GrokMLP, GrokTransformer, create
from lottojax.seeds import map_seeds, seed_keys
from lottojax.train import History, make_trainer

# --- the dataset -----------------------------------------------------------------------


def _pairs(x):
    return {tuple(row) for row in np.asarray(x).tolist()}


def test_reference_split_sizes_and_labels():
    ds = modular_arithmetic(67, "+", 0.4, seed=0, ordered=False)
    assert (len(ds.x_train), len(ds.x_test)) == (911, 1367)  # int(0.4 * 2278) = 911
    assert ds.x_train.dtype == np.int32 and ds.y_train.dtype == np.int32 and ds.x_train.shape[1] == 2
    everything = _pairs(ds.x_train) | _pairs(ds.x_test)
    assert len(everything) == 2278 and not _pairs(ds.x_train) & _pairs(ds.x_test)
    assert all(a <= b for a, b in everything)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        np.testing.assert_array_equal(y, (x[:, 0] + x[:, 1]) % 67)
    # The default validation split is the training split itself.
    np.testing.assert_array_equal(ds.x_val, ds.x_train)
    np.testing.assert_array_equal(ds.y_val, ds.y_train)


def test_ordered_split_validation_and_seed():
    ds = modular_arithmetic(67, "+", 0.4, seed=0)
    assert (len(ds.x_train), len(ds.x_test)) == (1795, 2694)  # int(0.4 * 4489)
    held = modular_arithmetic(67, "+", 0.4, seed=0, validation=100)
    assert (len(held.x_train), len(held.x_val), len(held.x_test)) == (1795, 100, 2594)
    np.testing.assert_array_equal(held.x_train, ds.x_train)  # held out of the test pairs only
    assert _pairs(held.x_val) | _pairs(held.x_test) == _pairs(ds.x_test)
    assert _pairs(modular_arithmetic(67, "+", 0.4, seed=1).x_train) != _pairs(ds.x_train)
    np.testing.assert_array_equal(modular_arithmetic(67, "+", 0.4, seed=0).x_train, ds.x_train)


def test_operations_and_named_loading():
    x, y = modular_pairs(5, "-")
    np.testing.assert_array_equal(y, (x[:, 0] - x[:, 1]) % 5)
    x, y = modular_pairs(7, "/")
    assert len(x) == 42 and (x[:, 1] != 0).all()
    np.testing.assert_array_equal((y * x[:, 1]) % 7, x[:, 0])  # (a / b) * b = a
    ds = load("modular:7:-", train_fraction=0.5, seed=3)
    assert len(ds.x_train) + len(ds.x_test) == 49
    np.testing.assert_array_equal(ds.y_test, (ds.x_test[:, 0] - ds.x_test[:, 1]) % 7)
    assert len(load("modular", p=5, ordered=False).x_train) == 6  # int(0.4 * 15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(p=1), "p=1 must be an int >= 2"),
    (dict(p=5, op="^"), "op='^' unknown"),
    (dict(p=6, op="/"), "p=6 must be prime"),
    (dict(p=5, train_fraction=0.0), "train_fraction=0.0 must be in (0, 1)"),
    (dict(p=5, train_fraction=0.01), "train_fraction=0.01 leaves an empty split"),
    (dict(p=5, seed=-1), "seed=-1 must be an int >= 0"),
    (dict(p=5, validation=15), "validation=15 must be <"),
])
def test_bad_dataset_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        modular_arithmetic(**kwargs)


# --- the models ------------------------------------------------------------------------


def _count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_grok_mlp_has_115000_weights_for_p67():
    model = create("grok-mlp", input_shape=(2,), num_classes=67)
    params, state = model.init(jax.random.key(0))
    assert state == {} and _count(params) == 115_000
    shapes = {k: v[next(iter(v))].shape for k, v in params.items()}
    assert shapes == {"embed": (67, 500), "fc0": (500, 48), "fc1": (48, 500), "output": (500, 67)}
    # N(0, 1/fan_in): the embedding's fan-in is the vocabulary.
    for name, fan_in in (("embed", 67), ("fc0", 500), ("fc1", 48), ("output", 500)):
        w = np.asarray(jax.tree.leaves(params[name])[0])
        assert abs(w.std() * np.sqrt(fan_in) - 1) < 0.05, name


P3 = {"embed": {"embedding": jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])},
      "fc0": {"kernel": jnp.array([[1.0, -1.0], [0.0, 1.0]])},
      "fc1": {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]])},
      "output": {"kernel": jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])}}


@pytest.mark.parametrize("factored", [True, False])
def test_grok_mlp_logits_by_hand_for_p3(factored):
    """(0, 2): E0 + E2 = [2, 1]; W_in -> [2, -1]; ReLU -> [2, 0]; W_out -> [2, 0]; W_U -> [2, 0, -2].
    (1, 1): [0, 2] -> [0, 2] -> [0, 2] -> [0, 4] -> [0, 4, 4].  (2, 1): [1, 2] -> [1, 1] -> [1, 2] -> [1, 2, 1]."""
    net = GrokMLP(num_classes=3, embed=2, hidden=2, factored=factored)
    x = jnp.array([[0, 2], [1, 1], [2, 1]])
    expected = [[2.0, 0.0, -2.0], [0.0, 4.0, 4.0], [1.0, 2.0, 1.0]]
    assert net.apply({"params": P3}, x).tolist() == expected
    assert net.apply({"params": P3}, jax.nn.one_hot(x, 3)).tolist() == expected  # SynFlow's soft input
    with pytest.raises(ValueError, match=r"input of shape \(3, 3\)"):
        net.apply({"params": P3}, jnp.zeros((3, 3)))


def test_factored_and_plain_mlp_agree():
    params = GrokMLP(num_classes=11).init(jax.random.key(1), jnp.zeros((1, 2), jnp.int32))
    x = jnp.array(modular_pairs(11)[0])
    a = GrokMLP(num_classes=11).apply(params, x)
    b = GrokMLP(num_classes=11, factored=False).apply(params, x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_transformer_reads_the_pair():
    model = create("grok-transformer", input_shape=(2,), num_classes=7, d_model=16, heads=2, d_mlp=32)
    params, _ = model.init(jax.random.key(0))
    assert params["embed"]["embedding"].shape == (8, 16)  # the '=' token is id 7
    x = jnp.array([[1, 2], [2, 1], [3, 6]])
    logits, _ = model.apply(params, {}, x, False)
    assert logits.shape == (3, 7)
    assert not np.allclose(logits[0], logits[1])  # positions are embedded: (1, 2) and (2, 1) differ
    soft, _ = model.apply(params, {}, jax.nn.one_hot(x, 8), False)
    np.testing.assert_allclose(soft, logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="heads=3 must divide d_model=16"):
        GrokTransformer(num_classes=7, d_model=16, heads=3).init(jax.random.key(0), x)



# --- the transformer trains on the task, and its tickets ------------------------------


@pytest.fixture(scope="module")
def transformer_run():
    """A small GrokTransformer, (a + b) mod 11 on 80% of the 121 ordered pairs (96 / 25),
    full-batch AdamW (betas (0.9, 0.98), weight decay 1) through the library's trainer,
    the reference loss; one jitted program serves the dense run and the ticket."""
    data = jax.device_put(modular_arithmetic(11, "+", 0.8, seed=0, ordered=True))
    model = create("grok-transformer", input_shape=(2,), num_classes=11, d_model=32, heads=4, d_mlp=64)
    tx = optax.chain(optax.adamw(1e-2, b1=0.9, b2=0.98, weight_decay=1.0), lj.masked_updates())
    trainer = make_trainer(model, tx, batch_size=len(data.x_train), eval_every=100, loss=precise_cross_entropy)
    run = jax.jit(lambda state, key: train_curves(trainer, state, data, key, num_steps=300, eval_every=100)[:2])
    key = jax.random.key(1)
    state, curves = run(trainer.init(key), key)
    return data, model, trainer, run, key, state, curves


def test_transformer_learns_the_modular_task(transformer_run):
    data, model, trainer, run, key, state, curves = transformer_run
    assert (len(data.x_train), len(data.x_test)) == (96, 25)
    assert curves.step.tolist() == [0, 100, 200, 300]
    train_acc, test_acc = np.asarray(curves.train_accuracy), np.asarray(curves.test_accuracy)
    assert train_acc[0] < 0.3 and test_acc[0] < 0.3  # θ0: about chance (1/11)
    assert train_acc[-1] == 1.0  # memorised the training pairs
    assert test_acc[-1] >= 0.6  # and generalises far above chance (6.6x)
    logits, _ = model.apply(state.params, state.model_state, data.x_test, False)
    assert float(jnp.mean(jnp.argmax(logits, -1) == data.y_test)) == pytest.approx(float(test_acc[-1]))


def test_transformer_ticket_counts_and_rewind(transformer_run):
    """A 40% magnitude ticket of the trained transformer: exact counts over its nine
    prunable leaves (globally and per leaf), rewound to θ0 ⊙ m, pruned weights stay 0."""
    data, model, trainer, run, key, state, _ = transformer_run
    sizes = {name: int(np.prod(leaf.shape)) for name, leaf in
             ((k, jax.tree.leaves(v)[0]) for k, v in state.params.items())}
    assert sizes == {"embed": 12 * 32, "pos_embed": 3 * 32, "attn_q": 32 * 32, "attn_k": 32 * 32,
                     "attn_v": 32 * 32, "attn_o": 32 * 32, "fc0": 32 * 64, "fc1": 64 * 32, "output": 32 * 11}
    total = sum(sizes.values())
    assert total == 9024
    keep = round(0.4 * total)  # 3610 of 9024
    ones = lj.ones_like(state.params)
    mask = lj.prune_with("magnitude", state.params, ones, key=jax.random.key(2), keep=keep, scope="global")
    kept = {k: int(jnp.sum(jax.tree.leaves(v)[0])) for k, v in mask.items()}
    assert sum(kept.values()) == keep == 3610
    # Global: one threshold over every leaf, the keep-th largest |w|.
    threshold = np.sort(np.concatenate([np.abs(np.asarray(w)).ravel() for w in jax.tree.leaves(state.params)]))[-keep]
    for name, value in state.params.items():
        assert kept[name] == int(np.sum(np.abs(np.asarray(jax.tree.leaves(value)[0])) >= threshold)), name
    # Per leaf: each keeps size - round(0.6 * size).
    layerwise = lj.prune_with("magnitude", state.params, ones, key=jax.random.key(2), fraction=0.6, scope="layerwise")
    assert {k: int(jnp.sum(jax.tree.leaves(v)[0])) for k, v in layerwise.items()} == {
        "embed": 154, "pos_embed": 38, "attn_q": 410, "attn_k": 410, "attn_v": 410, "attn_o": 410,
        "fc0": 819, "fc1": 819, "output": 141}

    # Rewind to θ0 and train the ticket: it starts at θ0 ⊙ m and pruned weights stay exactly 0.
    theta0, _ = model.init(key)
    ticket = trainer.init(key, mask)
    for w, w0, m in zip(jax.tree.leaves(ticket.params), jax.tree.leaves(theta0), jax.tree.leaves(mask)):
        np.testing.assert_array_equal(w, np.where(m, w0, 0.0))
    trained, curves = run(ticket, key)
    for w, w0, m in zip(jax.tree.leaves(trained.params), jax.tree.leaves(theta0), jax.tree.leaves(mask)):
        w, m = np.asarray(w), np.asarray(m)
        assert np.all(w[~m] == 0.0)  # weight decay included
        assert not np.allclose(w[m], np.asarray(w0)[m])  # the kept weights trained
    assert float(curves.train_accuracy[-1]) == 1.0  # the 40% ticket still fits the training pairs

# --- the measures ----------------------------------------------------------------------


def _curves(step, test_accuracy):
    step, acc = jnp.asarray(step), jnp.asarray(test_accuracy, jnp.float32)
    zeros = jnp.zeros(acc.shape)
    return Curves(step, zeros, zeros, zeros, acc)


def test_steps_to_threshold_edge_cases():
    steps = [0, 100, 200, 300]
    assert int(steps_to_threshold(_curves(steps, [0.1, 0.5, 0.9, 0.94]), 0.95)) == NEVER == -1
    assert int(steps_to_threshold(_curves(steps, [0.96, 0.5, 0.99, 1.0]), 0.95)) == 0  # reached at step 0
    assert int(steps_to_threshold(_curves(steps, [0.1, 0.95, 0.2, 1.0]), 0.95)) == 100  # at = reached; first one
    stacked = _curves(steps, [[0.1, 0.2, 0.96, 1.0], [0.1, 0.2, 0.3, 0.4]])
    assert steps_to_threshold(stacked, 0.95).tolist() == [200, -1]
    assert jax.jit(steps_to_threshold, static_argnames="metric")(stacked, 0.95).tolist() == [200, -1]
    per_seed = jax.vmap(lambda c: steps_to_threshold(c, 0.95), in_axes=(Curves(None, 0, 0, 0, 0),))(stacked)
    assert per_seed.tolist() == [200, -1]
    assert int(steps_to_threshold(stacked, 0.3, metric="train_accuracy")[0]) == NEVER
    # A trainer History: its first row is after eval_every steps.
    history = History(jnp.array([10, 20]), *(jnp.zeros(2),) * 4, jnp.array([0.99, 1.0]))
    assert int(steps_to_threshold(history, 0.95)) == 10


def test_steps_to_threshold_bad_input():
    curves = _curves([0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"threshold=1.5 must be in \[0, 1\]"):
        steps_to_threshold(curves, 1.5)
    with pytest.raises(ValueError, match="threshold='high' must be a number"):
        steps_to_threshold(curves, "high")
    with pytest.raises(ValueError, match="metric='val_accuracy'"):
        steps_to_threshold(curves, 0.5, metric="val_accuracy")


def test_scale_to_norm_in_both_modes():
    model = create("grok-mlp", input_shape=(2,), num_classes=13, embed=40, hidden=8)
    theta0, _ = model.init(jax.random.key(0))
    mask = lj.prune_with("random", theta0, lj.ones_like(theta0), key=jax.random.key(1), keep=700)
    mask["fc0"]["kernel"] = jnp.ones_like(mask["fc0"]["kernel"])  # uneven densities: the two modes differ
    mask["output"]["kernel"] = jnp.zeros_like(mask["output"]["kernel"])
    ticket = lj.apply_mask(theta0, mask)
    leaves, ticket_leaves = jax.tree.leaves(theta0), jax.tree.leaves(ticket)

    scaled = scale_to_norm(theta0, ticket)  # global: ‖θ0'‖ = ‖θ0 ⊙ m‖
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree)))
    assert norm(jax.tree.leaves(scaled)) == pytest.approx(norm(ticket_leaves), rel=1e-6)
    ratio = norm(ticket_leaves) / norm(leaves)

    per = scale_to_norm(theta0, ticket, mode="per_matrix")  # Σ_l ‖θ0_l'‖ = Σ_l ‖θ0_l ⊙ m_l‖
    fro = lambda tree: sum(float(np.linalg.norm(np.asarray(x, np.float64))) for x in tree)
    assert fro(jax.tree.leaves(per)) == pytest.approx(fro(ticket_leaves), rel=1e-6)
    ratio_ref = fro(ticket_leaves) / fro(leaves)
    assert ratio != pytest.approx(ratio_ref, rel=1e-3)  # the two modes differ
    for before, g, r in zip(leaves, jax.tree.leaves(scaled), jax.tree.leaves(per)):  # one scalar for every matrix
        np.testing.assert_allclose(g, before * ratio, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r, before * ratio_ref, rtol=1e-5, atol=1e-7)
    assert float(params_norm(scaled)) == pytest.approx(float(params_norm(ticket)), rel=1e-6)
    assert float(params_norm(per, mode="per_matrix")) == pytest.approx(float(params_norm(ticket, mode="per_matrix")),
                                                                       rel=1e-6)
    # A number as the target, zero weights left alone, jit.
    assert float(params_norm(jax.jit(scale_to_norm)(theta0, 2.5))) == pytest.approx(2.5, rel=1e-6)
    zeros = jax.tree.map(jnp.zeros_like, theta0)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(scale_to_norm(zeros, 3.0)))


def test_scale_to_norm_bad_input():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="mode='l1' unknown"):
        scale_to_norm(params, 1.0, mode="l1")
    with pytest.raises(ValueError, match="target=-1.0 must be >= 0"):
        scale_to_norm(params, -1.0)
    with pytest.raises(ValueError, match="mode='frobenius' unknown"):
        params_norm(params, mode="frobenius")


def test_precise_cross_entropy():
    z = jax.random.normal(jax.random.key(0), (64, 11)) * 3
    y = jnp.arange(64) % 11
    plain = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y)
    np.testing.assert_allclose(precise_cross_entropy(z, y), plain(z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda z: precise_cross_entropy(z, y).sum())(z),
                               jax.grad(lambda z: plain(z).sum())(z), rtol=1e-5, atol=1e-7)
    # Near zero loss: float32's plain form rounds to 0, this one keeps the float64 value
    # and a gradient that sums to 0 over the logits (p - onehot).
    confident = z.at[jnp.arange(64), y].add(40.0)
    exact = np.asarray([np.log1p(np.sum(np.exp(np.delete(row, c) - row[c])))
                        for row, c in zip(np.asarray(confident, np.float64), np.asarray(y))])
    assert float(jnp.max(plain(confident))) == 0.0
    np.testing.assert_allclose(precise_cross_entropy(confident, y), exact, rtol=1e-5)
    grad = jax.grad(lambda z: precise_cross_entropy(z, y).sum())(confident)
    assert float(jnp.min(grad[jnp.arange(64), y])) < 0  # the correct logit still gets a push
    assert bool(jnp.all(jnp.abs(grad.sum(-1)) <= 1e-5 * jnp.abs(grad[jnp.arange(64), y])))


# --- training curves and the seed axis -------------------------------------------------


@pytest.fixture(scope="module")
def small():
    data = jax.device_put(modular_arithmetic(11, "+", 0.5, seed=0))
    model = create("grok-mlp", input_shape=(2,), num_classes=11, embed=32, hidden=16)
    tx = optax.chain(optax.adamw(1e-2, b1=0.9, b2=0.98, weight_decay=1.0), lj.masked_updates())
    trainer = make_trainer(model, tx, batch_size=len(data.x_train), eval_every=10)
    return data, trainer


def test_train_curves_rows_and_captures(small):
    data, trainer = small
    capture = {"memorised": ("train_accuracy", 0.99), "never": ("test_accuracy", 1.01)}
    run = jax.jit(lambda s, k: train_curves(trainer, s, data, k, num_steps=60, eval_every=20, capture=capture))
    state0 = trainer.init(jax.random.key(0))
    state, curves, captured = run(state0, jax.random.key(1))
    assert curves.step.tolist() == [0, 20, 40, 60] and int(state.step) == 60
    first = trainer.evaluate(state0.params, state0.model_state, data.x_test, data.y_test)
    assert float(curves.test_accuracy[0]) == pytest.approx(float(first.accuracy))  # row 0 is θ0
    step = int(captured["memorised"].step)
    assert step == int(steps_to_threshold(curves, 0.99, metric="train_accuracy")) and step > 0
    assert int(captured["never"].step) == NEVER  # never met: the final weights
    for a, b in zip(jax.tree.leaves(captured["never"].params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    # The captured weights are the ones trained for `step` steps.
    again, _, _ = jax.jit(lambda s, k: train_curves(trainer, s, data, k, num_steps=step, eval_every=20))(
        state0, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(captured["memorised"].params), jax.tree.leaves(again.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_curves_bad_input(small):
    data, trainer = small
    state = trainer.init(jax.random.key(0))
    with pytest.raises(ValueError, match="num_steps=30 must be a multiple of eval_every=20"):
        train_curves(trainer, state, data, jax.random.key(1), num_steps=30, eval_every=20)
    with pytest.raises(ValueError, match="eval_every=0 must be an int >= 1"):
        train_curves(trainer, state, data, jax.random.key(1), num_steps=30, eval_every=0)
    with pytest.raises(ValueError, match=r"capture\['x'\]"):
        train_curves(trainer, state, data, jax.random.key(1), num_steps=20, eval_every=20,
                     capture={"x": ("val_accuracy", 0.5)})


def test_seed_axis_equals_per_seed_runs(small):
    """vmap and lax.map over seeds, jitted, give each seed's own jitted run."""
    data, trainer = small

    def one_seed(init_key, data_key, data):
        state, curves, _ = train_curves(trainer, trainer.init(init_key), data, data_key, num_steps=40, eval_every=20)
        return curves, steps_to_threshold(curves, 0.5, metric="train_accuracy"), state.params

    seeds = [0, 1]
    init_keys, data_keys = seed_keys(seeds, "init"), seed_keys(seeds, "data")
    single = jax.jit(one_seed)
    alone = [single(init_keys[i], data_keys[i], data) for i in range(len(seeds))]
    for strategy in ("vmap", "map"):
        batched = jax.jit(map_seeds(one_seed, in_axes=(0, 0, None), strategy=strategy))(init_keys, data_keys, data)
        for i, (curves, steps, params) in enumerate(alone):
            for field in Curves._fields:
                np.testing.assert_allclose(getattr(batched[0], field)[i], getattr(curves, field), rtol=1e-5,
                                           atol=1e-6, err_msg=f"{strategy} {field}")
            assert int(batched[1][i]) == int(steps)
            for a, b in zip(jax.tree.leaves(batched[2]), jax.tree.leaves(params)):
                np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)


# --- the experiment --------------------------------------------------------------------

TINY = GrokkingConfig(p=11, ordered=True, train_fraction=0.5, num_steps=60, eval_every=20, seeds=(0, 1),
                      learning_rate=1e-2, threshold=0.3, transition_threshold=0.2, snip_batch=10, grasp_per_class=2,
                      synflow_rounds=4,
                      arms=("ticket-no-wd", "grasp", "synflow", "equal-norm", "equal-norm-reference", "memorisation"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grok"))
    summary, workdir = run_grokking(TINY, root, progress=False)
    return root, summary, workdir


def test_experiment_outputs(experiment):
    root, summary, workdir = experiment
    arms = summary["arms"]
    assert list(arms) == ["dense", *TINY.arms]
    total = 11 * 500 + 500 * 48 + 48 * 500 + 500 * 11
    assert summary["total"] == total and summary["keep"] == round(0.4 * total)
    for name, arm in arms.items():
        density = 1.0 if ARMS[name].mask is None else summary["keep"] / total
        assert arm["density"]["per_seed"] == pytest.approx([density] * 2), name
        assert arm["pruned_max"] == 0.0, name  # pruned weights stay exactly 0, weight decay included
        assert arm["curve"]["step"] == [0, 20, 40, 60]
        s = arm["steps_to_threshold"]
        assert s["n"] + s["never"] == 2 and len(s["per_seed"]) == 2
    # The ticket starts from θ0 ⊙ m; equal-norm starts dense at that global norm (the reference
    # mode's ratio, of per-matrix norms, gives another); memorisation checkpoints exist for both seeds.
    ticket_norm = arms["ticket-no-wd"]["initial_norm"]["per_seed"]
    assert arms["equal-norm"]["initial_norm"]["per_seed"] == pytest.approx(ticket_norm, rel=1e-5)
    assert arms["equal-norm-reference"]["initial_norm"]["per_seed"] != ticket_norm
    assert all(s > 0 for s in arms["dense"]["checkpoint_steps"]["memorisation"])
    assert arms["dense"]["ratio_to_dense"] in (1.0, None)
    for name in ("config.json", "results.json", "results.npz", "grokking.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    saved = [f for f in os.listdir(os.path.join(workdir, "arms")) if f.endswith(".npz")]  # beside CHECKSUMS.json
    assert sorted(saved) == sorted(f"{a}.npz" for a in arms)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["arms"]["synflow"]["steps_to_threshold"]["per_seed"] == \
            pytest.approx(arms["synflow"]["steps_to_threshold"]["per_seed"], nan_ok=True)
    with np.load(os.path.join(workdir, "results.npz")) as saved:
        assert saved["synflow__test_accuracy"].shape == (2, 4)
        rows = [r for r in read_metrics(workdir) if r["unit"] == "synflow"]  # per-evaluation metrics
        assert [(int(r["seed"]), int(r["step"])) for r in rows] == [(s, t) for s in (0, 1) for t in (0, 20, 40, 60)]
        np.testing.assert_allclose([float(r["test_accuracy"]) for r in rows], saved["synflow__test_accuracy"].ravel())
    table = grokking_table(summary)
    assert table.splitlines()[0].startswith("arm") and len(table.splitlines()) == 1 + len(arms)
    assert "steps to 30% test acc" in table


def test_experiment_resumes(experiment):
    root, summary, workdir = experiment
    arms_dir = os.path.join(workdir, "arms")
    arm_files = lambda: [name for name in os.listdir(arms_dir) if name.endswith(".npz")]
    before = {name: os.path.getmtime(os.path.join(arms_dir, name)) for name in arm_files()}
    os.remove(os.path.join(arms_dir, "synflow.npz"))  # as if killed while training synflow
    again, workdir2 = run_grokking(TINY, root, progress=False)
    assert workdir2 == workdir
    after = {name: os.path.getmtime(os.path.join(arms_dir, name)) for name in arm_files()}
    assert {k: v for k, v in after.items() if k != "synflow.npz"} == \
        {k: v for k, v in before.items() if k != "synflow.npz"}  # nothing else retrained
    for name in summary["arms"]:  # the same results, the retrained arm included
        for key in ("steps_to_threshold", "final_test_accuracy", "initial_norm"):
            assert again["arms"][name][key]["per_seed"] == pytest.approx(summary["arms"][name][key]["per_seed"],
                                                                         nan_ok=True), (name, key)


@pytest.mark.parametrize("change, field", [
    (dict(density=1.0), "density"),
    (dict(num_steps=50, eval_every=20), "num_steps"),
    (dict(batch_size=-1), "batch_size"),
    (dict(threshold=0.0), "threshold"),
    (dict(beta2=1.0), "beta2"),
    (dict(arms=("ticket", "ticket")), "arms"),
    (dict(arms=("lottery",)), "arms"),
    (dict(model="mlp"), "model"),
    (dict(train_fraction=1.0), "train_fraction"),
    (dict(loss="float64"), "loss"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError) as error:
        GrokkingConfig(**change).check()
    assert error.value.field == field


def test_cli_rejects_bad_flags(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "grokking_script", os.path.join(os.path.dirname(__file__), "..", "experiments", "grokking.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--density", "2", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--density" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
