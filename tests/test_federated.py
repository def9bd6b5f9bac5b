"""HideNseek: the sign supermask (hand-worked forward and gradient, bitwise identity at
s = +1), the binary baseline, aggregation (weights respected, identical clients), the client
update and round (vmap over clients = a loop, padding changes nothing, θ0 untouched, scan =
a loop of rounds), non-IID splits (deterministic, exact classes, every example once) and
bad-input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lottojax.federated import (
    FEDERATED_METHODS,
    ClientData,
    binary_supermask,
    class_split,
    client_data,
    dirichlet_split,
    make_client_update,
    make_federated_round,
    run_rounds,
    sign_supermask,
    sign_vote,
    uplink_bits,
    weighted_mean,
)
from lottojax.masks import apply_mask
from lottojax.models import create


def bits(tree):
    """Every leaf's dtype and raw bytes: equal means bit for bit equal."""
    return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def mlp():
    model = create("mlp", input_shape=(6,), num_classes=3, hidden=(8,))
    params0, state = model.init(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 8))
    mask = jax.tree.map(lambda p: jax.random.bernoulli(next(keys), 0.4, p.shape) if p.ndim == 2 else
                        jnp.ones(p.shape, bool), params0)
    apply_fn = lambda p, x: model.apply(p, state, x, True)[0]
    return params0, mask, apply_fn


def toy_clients(num_clients=3, size=10, seed=0):
    """Clients of different sizes (5, 7, 10 of 10 slots), padding weighted 0."""
    x = jax.random.normal(jax.random.key(seed), (num_clients, size, 6))
    y = jax.random.randint(jax.random.key(seed + 1), (num_clients, size), 0, 3)
    counts = np.array([5, 7, 10, 4, 8][:num_clients])
    weight = (np.arange(size)[None, :] < counts[:, None]).astype(np.float32)
    return ClientData(x, y, jnp.asarray(weight))


# ---------------------------------------------------------------------------------------
# The supermasks.


def test_sign_supermask_forward_and_gradient_hand_worked():
    params0 = {"a": jnp.array([[0.5, -2.0], [3.0, -0.25]]), "b": jnp.array([1.5])}
    mask = {"a": jnp.array([[True, True], [False, True]]), "b": jnp.array([True])}
    scores = {"a": jnp.array([[-0.3, 0.0], [-5.0, 2.0]]), "b": jnp.array([-0.0])}  # sign(0) = sign(-0) = +1
    out = sign_supermask(params0, mask, scores)
    np.testing.assert_array_equal(out["a"], [[-0.5, -2.0], [0.0, -0.25]])
    np.testing.assert_array_equal(out["b"], [1.5])
    upstream = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([-2.0])}
    loss = lambda s: sum(jnp.sum(u * w) for u, w in zip(jax.tree.leaves(upstream),
                                                          jax.tree.leaves(sign_supermask(params0, mask, s))))
    grads = jax.grad(loss)(scores)  # upstream * θ0 * m, whatever the sign: the straight-through estimator
    np.testing.assert_array_equal(grads["a"], [[0.5, -4.0], [0.0, -1.0]])
    np.testing.assert_array_equal(grads["b"], [-3.0])
    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(scores)["a"], grads["a"])


def test_scores_of_plus_one_give_the_masked_weights_bit_for_bit(mlp):
    params0, mask, _ = mlp
    ones = jax.tree.map(jnp.ones_like, params0)
    expected = bits(apply_mask(params0, mask))
    assert bits(sign_supermask(params0, mask, ones)) == expected
    assert bits(jax.jit(sign_supermask)(params0, mask, ones)) == expected
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), (params0, mask, ones))
    assert bits(jax.tree.map(lambda x: x[1], jax.vmap(sign_supermask)(*stacked))) == expected
    # the binary supermask with scores = mask selects exactly the mask too
    assert bits(binary_supermask(params0, mask, FEDERATED_METHODS["binary"].init(params0, mask))) == expected


def test_binary_supermask_keeps_each_leafs_count_and_passes_gradient_to_every_entry():
    params0 = {"w": jnp.array([[2.0, -1.0, 0.5], [4.0, 3.0, -6.0]])}
    mask = {"w": jnp.array([[True, False, False], [False, True, False]])}
    scores = {"w": jnp.array([[0.1, 0.7, 0.7], [0.2, -1.0, 0.0]])}  # tie at 0.7: the lower index wins
    out = binary_supermask(params0, mask, scores)
    np.testing.assert_array_equal(out["w"], [[0.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    grads = jax.grad(lambda s: jnp.sum(binary_supermask(params0, mask, s)["w"] * jnp.arange(6.0).reshape(2, 3)))(scores)
    np.testing.assert_array_equal(grads["w"], params0["w"] * jnp.arange(6.0).reshape(2, 3))  # pruned entries too


# ---------------------------------------------------------------------------------------
# Aggregation.


def test_weighted_mean_respects_the_weights():
    trees = {"s": jnp.array([[1.0, -2.0], [4.0, 6.0], [100.0, 100.0]])}
    np.testing.assert_allclose(weighted_mean(trees, jnp.array([1.0, 3.0, 0.0]))["s"], [3.25, 4.0], rtol=1e-6)
    np.testing.assert_allclose(weighted_mean(trees, jnp.array([2.0, 2.0, 0.0]))["s"], [2.5, 2.0], rtol=1e-6)
    # a client of weight 0 has no influence, whatever it sends
    other = {"s": trees["s"].at[2].set(-1e6)}
    weights = jnp.array([1.0, 3.0, 0.0])
    assert bits(weighted_mean(other, weights)) == bits(weighted_mean(trees, weights))


def test_aggregating_identical_clients_returns_their_tree_bit_for_bit():
    tree = {"s": jax.random.normal(jax.random.key(0), (5, 7)) * 3.0}
    three = jax.tree.map(lambda x: jnp.stack([x, x, x]), tree)
    for weights in (jnp.array([1.0, 1.0, 1.0]), jnp.array([0.3, 7.0, 2.0])):
        assert bits(weighted_mean(three, weights)) == bits(tree)
        assert bits(sign_vote(three, weights)) == bits(jax.tree.map(lambda s: jnp.where(s >= 0, 1.0, -1.0), tree))


def test_sign_vote_is_the_weighted_majority():
    trees = {"s": jnp.array([[0.5, -0.5, 2.0, 0.0], [-1.0, 3.0, -2.0, -1.0], [-1.0, 3.0, 2.0, -1.0]])}
    np.testing.assert_array_equal(sign_vote(trees, jnp.array([3.0, 1.0, 1.0]))["s"], [1.0, -1.0, 1.0, 1.0])  # 3 vs 2
    np.testing.assert_array_equal(sign_vote(trees, jnp.array([1.0, 1.0, 1.0]))["s"], [-1.0, 1.0, 1.0, -1.0])
    np.testing.assert_array_equal(sign_vote(trees, jnp.array([2.0, 1.0, 1.0]))["s"], [1.0, 1.0, 1.0, 1.0])  # ties: +1


@pytest.fixture(scope="module")
def programs(mlp):
    """Per method: the jitted client update and round (Adam 1.0: signs flip within a round;
    batch 3, 2 local epochs), compiled once for the whole module."""
    _, _, apply_fn = mlp
    out = {}
    for name, method in FEDERATED_METHODS.items():
        update = make_client_update(apply_fn, optax.adam(1.0), method, batch_size=3, local_epochs=2)
        out[name] = (jax.jit(update), jax.jit(make_federated_round(update, method)))
    return out


def test_identical_clients_give_identical_scores(mlp, programs):
    params0, mask, _ = mlp
    one = toy_clients(1)
    clients = ClientData(*(jnp.repeat(a, 3, axis=0) for a in one))
    key = jax.random.key(3)
    method = FEDERATED_METHODS["sign-mean"]
    update, round_fn = programs["sign-mean"]
    start = method.init(params0, mask)
    server, losses = round_fn(start, key, params0, mask, clients)
    assert bits(losses[1:]) == bits(losses[:2])  # the clients computed the same, bit for bit
    client, loss = update(start, params0, mask, jax.tree.map(lambda a: a[0], clients), key)  # one client alone
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), server, client)
    np.testing.assert_allclose(losses, [loss] * 3, rtol=1e-5)
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(server), jax.tree.leaves(start)))  # trained


@pytest.mark.parametrize("name", ["sign-mean", "binary"])
def test_round_vmaps_clients_as_a_loop_weighted_by_example_counts(mlp, programs, name):
    params0, mask, _ = mlp
    method = FEDERATED_METHODS[name]
    update, round_fn = programs[name]
    clients = toy_clients(3)
    start, key = method.init(params0, mask), jax.random.key(7)
    server, losses = round_fn(start, key, params0, mask, clients)
    loop = [update(start, params0, mask, jax.tree.map(lambda a: a[k], clients), key) for k in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[t for t, _ in loop])
    expected = method.aggregate(stacked, jnp.array([5.0, 7.0, 10.0]))  # weighted by the example counts
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), server, expected)
    np.testing.assert_allclose(losses, [l for _, l in loop], rtol=2e-5)


def test_padding_changes_nothing(mlp, programs):
    params0, mask, _ = mlp
    method = FEDERATED_METHODS["sign-mean"]
    update, _ = programs["sign-mean"]
    clients = toy_clients(3)
    client = jax.tree.map(lambda a: a[2], clients)  # 10 examples, no padding
    padded = ClientData(jnp.concatenate([client.x, 9 * jnp.ones((5, 6))]),
                        jnp.concatenate([client.y, jnp.ones(5, int)]), jnp.concatenate([client.weight, jnp.zeros(5)]))
    start = method.init(params0, mask)
    a, loss_a = update(start, params0, mask, client, jax.random.key(0))
    b, loss_b = update(start, params0, mask, padded, jax.random.key(0))  # the same batches, one more step of padding
    assert bits((a, loss_a)) == bits((b, loss_b))
    # a client of padding only does nothing
    empty = ClientData(padded.x, padded.y, jnp.zeros(15))
    assert bits(update(start, params0, mask, empty, jax.random.key(0))[0]) == bits(start)


def test_round_leaves_theta0_and_mask_alone(mlp, programs):
    params0, mask, _ = mlp
    before = bits((params0, mask))
    for name in ("sign-mean", "sign-vote", "binary"):
        method = FEDERATED_METHODS[name]
        server, _ = programs[name][1](method.init(params0, mask), jax.random.key(1), params0, mask, toy_clients(3))
        weights = method.weights(params0, mask, server)
        for w, w0, m in zip(jax.tree.leaves(weights), jax.tree.leaves(params0), jax.tree.leaves(mask)):
            assert bool(jnp.all((w == w0) | (w == -w0) | (w == 0))), name  # magnitudes come from θ0 only
            if name == "binary":
                assert int(jnp.sum(w != 0)) == int(jnp.sum(m & (w0 != 0))), name  # the count of each leaf kept
            else:
                assert bool(jnp.all(jnp.where(m, jnp.abs(w) == jnp.abs(w0), w == 0))), name
        if name == "sign-mean":
            assert any(bool(jnp.any(w != jnp.where(m, w0, 0))) for w, w0, m in
                       zip(jax.tree.leaves(weights), jax.tree.leaves(params0), jax.tree.leaves(mask)))  # signs moved
    assert bits((params0, mask)) == before


def test_rounds_scan_equals_a_loop_of_rounds(mlp, programs):
    params0, mask, _ = mlp
    method = FEDERATED_METHODS["sign-vote"]
    round_fn = programs["sign-vote"][1]
    clients, key = toy_clients(3), jax.random.key(5)
    evaluate = lambda s: jnp.sum(jnp.abs(method.weights(params0, mask, s)["output"]["kernel"]))
    scanned, rows = jax.jit(lambda s: run_rounds(round_fn, s, params0, mask, clients, key=key, num_rounds=3,
                                                 evaluate=evaluate))(method.init(params0, mask))
    state = method.init(params0, mask)
    for r in range(3):
        state, losses = round_fn(state, jax.random.fold_in(key, r), params0, mask, clients)
        np.testing.assert_allclose(rows["loss"][r], losses, rtol=2e-5)
    assert bits(scanned) == bits(state)  # sign votes: ±1 exactly
    assert rows["metrics"].shape == (3,)


def test_uplink_bits_of_each_method(mlp):
    params0, mask, _ = mlp
    kept = sum(int(m.sum()) for m in jax.tree.leaves(mask))
    total = sum(m.size for m in jax.tree.leaves(mask))
    got = {n: uplink_bits(m, mask, num_clients=10) for n, m in FEDERATED_METHODS.items()}
    assert got == {"sign-mean": 320 * kept, "sign-vote": 10 * kept, "binary": 320 * total, "dense": 320 * total}


# ---------------------------------------------------------------------------------------
# Splits.


@pytest.mark.parametrize("num_clients,k,classes", [(10, 2, 10), (7, 3, 10), (4, 1, 4), (5, 4, 4)])
def test_class_split_gives_exact_classes_and_assigns_every_example_once(num_clients, k, classes):
    labels = np.random.default_rng(0).integers(0, classes, 500)
    key = jax.random.key(11)
    owner = class_split(labels, num_clients=num_clients, classes_per_client=k, key=key)
    assert owner.shape == labels.shape and owner.min() >= 0 and owner.max() < num_clients  # one client each
    held = [set(labels[owner == c].tolist()) for c in range(num_clients)]
    assert all(len(h) == k for h in held)
    owned = np.bincount([c for h in held for c in h], minlength=classes)
    assert owned.max() - owned.min() <= 1 and owned.min() >= 1  # spread evenly, every class owned
    np.testing.assert_array_equal(owner, class_split(labels, num_clients=num_clients, classes_per_client=k, key=key))
    other = class_split(labels, num_clients=num_clients, classes_per_client=k, key=jax.random.key(12))
    assert (other != owner).any()
    data = client_data(np.arange(500, dtype=np.float32)[:, None], labels, owner, num_clients=num_clients)
    ids = data.x[..., 0][data.weight > 0]
    assert sorted(ids.tolist()) == list(range(500))  # the padded clients hold every example once


def test_dirichlet_split_is_deterministic_and_assigns_every_example_once():
    labels = np.repeat(np.arange(10), 60)
    key = jax.random.key(4)
    owner = dirichlet_split(labels, num_clients=8, alpha=0.1, key=key)
    assert owner.shape == labels.shape and owner.min() >= 0 and owner.max() < 8
    np.testing.assert_array_equal(owner, dirichlet_split(labels, num_clients=8, alpha=0.1, key=key))
    classes = [len(set(labels[owner == c].tolist())) for c in range(8)]
    iid = dirichlet_split(labels, num_clients=8, alpha=1000.0, key=key)
    assert np.mean(classes) < np.mean([len(set(labels[iid == c].tolist())) for c in range(8)]) == 10
    assert np.abs(np.bincount(iid, minlength=8) - 75).max() <= 10


# ---------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_argument_or_path(mlp):
    params0, mask, apply_fn = mlp
    ones = jax.tree.map(jnp.ones_like, params0)
    bad = {**ones, "fc0": {**ones["fc0"], "kernel": jnp.ones((8, 6))}}
    with pytest.raises(ValueError, match="scores leaf fc0/kernel has shape"):
        sign_supermask(params0, mask, bad)
    with pytest.raises(ValueError, match="mask leaf fc0/bias has dtype float32"):
        sign_supermask(params0, ones, ones)
    with pytest.raises(TypeError, match="scores leaf fc0/bias has dtype int32"):
        sign_supermask(params0, mask, jax.tree.map(lambda x: x.astype(jnp.int32), ones))
    with pytest.raises(ValueError, match=r"give one weight per client, shape \(3,\)"):
        weighted_mean({"s": jnp.ones((3, 2))}, jnp.ones(2))
    with pytest.raises(ValueError, match="client leaf t has shape"):
        sign_vote({"s": jnp.ones((3, 2)), "t": jnp.ones((2, 2))}, jnp.ones(3))
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        make_client_update(apply_fn, optax.sgd(1.0), FEDERATED_METHODS["dense"], batch_size=0, local_epochs=1)
    with pytest.raises(TypeError, match="method must be a FederatedMethod"):
        make_client_update(apply_fn, optax.sgd(1.0), "dense", batch_size=1, local_epochs=1)
    labels = np.arange(10) % 5
    with pytest.raises(ValueError, match=r"num_clients \* classes_per_client = 4 < 5 classes"):
        class_split(labels, num_clients=2, classes_per_client=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="classes_per_client=6 exceeds the 5 classes"):
        class_split(labels, num_clients=2, classes_per_client=6, key=jax.random.key(0))
    with pytest.raises(ValueError, match="class 0 has 2 examples but 3 clients"):
        class_split(labels, num_clients=15, classes_per_client=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D integer array"):
        class_split(labels.astype(float), num_clients=2, classes_per_client=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="alpha=0 must be a finite number > 0"):
        dirichlet_split(labels, num_clients=2, alpha=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"client_of has values outside \[0, 2\)"):
        client_data(np.ones((10, 1)), labels, np.arange(10) % 3, num_clients=2)
    with pytest.raises(ValueError, match="size=2 is below the largest client"):
        client_data(np.ones((10, 1)), labels, np.arange(10) % 2, num_clients=2, size=2)
    with pytest.raises(ValueError, match="num_clients=0 must be an int >= 1"):
        uplink_bits(FEDERATED_METHODS["dense"], mask, num_clients=0)
