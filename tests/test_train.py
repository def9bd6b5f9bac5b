"""Compiled training: data order, splitting a run, BatchNorm state, evaluation, vmap, no retrace."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.data import Dataset
from lottojax.models import Model, create
from lottojax.train import History, early_stop, make_trainer

N_TRAIN, BATCH = 50, 8  # 6 steps per epoch, 2 examples of each epoch's order dropped


def counting_model() -> Model:
    """A linear model whose state counts how often each training example (x[:, 0] is its id)
    was in a training batch: the data order becomes observable through the public API."""

    def init(key):
        return {"w": jax.random.normal(key, (2, 3))}, {"seen": jnp.zeros(N_TRAIN, jnp.int32)}

    def apply(params, state, x, train):
        logits = x @ params["w"]
        if train:
            ids = x[:, 0].astype(jnp.int32)
            state = {"seen": state["seen"].at[ids].add(1)}
        return logits, state

    return Model(init, apply)


def id_data() -> Dataset:
    x = jnp.stack([jnp.arange(N_TRAIN, dtype=jnp.float32), jnp.ones(N_TRAIN)], axis=1)
    y = jnp.arange(N_TRAIN) % 3
    return Dataset(x, y, x[:10], y[:10], x[:10], y[:10])


def test_each_epoch_sees_distinct_examples_and_reshuffles():
    trainer = make_trainer(counting_model(), optax.sgd(0.0), batch_size=BATCH, eval_every=6)
    state = trainer.init(jax.random.key(0))
    one_epoch, _ = trainer.run_steps(state, id_data(), jax.random.key(1), 0, 6)
    seen = np.asarray(one_epoch.model_state["seen"])
    assert sorted(set(seen.tolist())) == [0, 1] and seen.sum() == 48  # no example twice
    two_epochs, _ = trainer.run_steps(one_epoch, id_data(), jax.random.key(1), 6, 6)
    second = np.asarray(two_epochs.model_state["seen"]) - seen
    assert second.sum() == 48 and second.max() == 1
    assert not np.array_equal(second, seen), "the second epoch has its own order"


def test_split_run_matches_unsplit_run():
    model = create("mlp", input_shape=(6,), hidden=(16,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (40, 6))
    data = Dataset(x, jnp.arange(40) % 3, x[:8], jnp.arange(8) % 3, x[:8], jnp.arange(8) % 3)
    trainer = make_trainer(model, optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=7, eval_every=5)
    state = trainer.init(jax.random.key(1))
    whole, _ = trainer.run_steps(state, data, jax.random.key(2), 0, 13)
    part, _ = trainer.run_steps(state, data, jax.random.key(2), 0, 4)  # stops mid-epoch (5 steps/epoch)
    part, _ = trainer.run_steps(part, data, jax.random.key(2), 4, 9)
    chex.assert_trees_all_close(whole.params, part.params, rtol=1e-6)
    assert int(whole.step) == int(part.step) == 13


def test_train_history_rows_and_pruned_weights_stay_zero():
    model = create("mlp", input_shape=(6,), hidden=(16,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (40, 6))
    data = Dataset(x, jnp.arange(40) % 3, x[:8], jnp.arange(8) % 3, x[:9], jnp.arange(9) % 3)
    trainer = make_trainer(model, optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=8, eval_every=4)
    params, _ = model.init(jax.random.key(1))
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.7)
    state = trainer.init(jax.random.key(1), mask)
    state, history = jax.jit(trainer.train, static_argnames="num_steps")(state, data, jax.random.key(2), start=3, num_steps=10)
    assert history.step.tolist() == [7, 11, 13]
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    final = trainer.evaluate(state.params, state.model_state, data.x_test, data.y_test)
    assert float(history.test_accuracy[-1]) == pytest.approx(float(final.accuracy))
    assert float(final.accuracy) * 9 == pytest.approx(round(float(final.accuracy) * 9))


def test_chunked_evaluation_equals_one_batch():
    model = create("mlp", input_shape=(6,), hidden=(16,), num_classes=3)
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (23, 6))
    y = jnp.arange(23) % 3
    chunked = make_trainer(model, optax.sgd(0.1), batch_size=4, eval_every=1, eval_batch_size=5)
    whole = make_trainer(model, optax.sgd(0.1), batch_size=4, eval_every=1, eval_batch_size=100)
    a, b = chunked.evaluate(params, state, x, y), whole.evaluate(params, state, x, y)
    logits, _ = model.apply(params, state, x, False)
    expected_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    assert float(a.loss) == pytest.approx(expected_loss, rel=1e-5)
    assert float(b.loss) == pytest.approx(expected_loss, rel=1e-5)
    assert float(a.accuracy) == float(b.accuracy) == float(jnp.mean(jnp.argmax(logits, -1) == y))


def test_batchnorm_state_trains_and_evaluation_uses_running_stats():
    model = create("cnn1d", input_shape=(40,), channels=(4, 4))
    x = jax.random.normal(jax.random.key(0), (32, 40))
    data = Dataset(x, jnp.arange(32) % 10, x[:8], jnp.arange(8) % 10, x[:8], jnp.arange(8) % 10)
    trainer = make_trainer(model, optax.chain(optax.sgd(0.05, momentum=0.9), lj.masked_updates()), batch_size=8, eval_every=4)
    state = trainer.init(jax.random.key(1))
    trained, _ = trainer.run_steps(state, data, jax.random.key(2), 0, 4)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.model_state, trained.model_state)
    assert all(jax.tree.leaves(changed)), "running statistics update in training"
    m1 = trainer.evaluate(trained.params, trained.model_state, data.x_test, data.y_test)
    m2 = trainer.evaluate(trained.params, trained.model_state, data.x_test[:4], data.y_test[:4])
    logits, _ = model.apply(trained.params, trained.model_state, data.x_test[:4], False)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, data.y_test[:4]).mean()
    assert float(m2.loss) == pytest.approx(float(expected), rel=1e-5)  # per-example, not batch stats
    assert np.isfinite(float(m1.loss))


def test_vmapped_seeds_equal_per_seed_runs():
    model = create("mlp", input_shape=(6,), hidden=(16,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (40, 6))
    data = Dataset(x, jnp.arange(40) % 3, x[:8], jnp.arange(8) % 3, x[:8], jnp.arange(8) % 3)
    trainer = make_trainer(model, optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=8, eval_every=5)
    keys = jax.random.split(jax.random.key(0), 3)
    states = jax.vmap(trainer.init)(keys)
    train = lambda s, k: trainer.train(s, data, k, 0, 10)
    batched, hist = jax.jit(jax.vmap(train))(states, keys)
    for i in range(3):
        single, h = jax.jit(train)(jax.tree.map(lambda v: v[i], states), keys[i])
        chex.assert_trees_all_close(jax.tree.map(lambda v: v[i], batched.params), single.params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hist.val_loss[i], h.val_loss, rtol=1e-5)


def test_new_mask_does_not_retrace_training():
    model = create("mlp", input_shape=(6,), hidden=(16,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (40, 6))
    data = Dataset(x, jnp.arange(40) % 3, x[:8], jnp.arange(8) % 3, x[:8], jnp.arange(8) % 3)
    trainer = make_trainer(model, optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=8, eval_every=5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def level(state, key):
        return trainer.train(state, data, key, 0, 10)

    state = trainer.init(jax.random.key(1))
    mask = lj.ones_like(state.params)
    for _ in range(3):
        final, _ = level(state, jax.random.key(2))
        mask = lj.prune_layerwise(lj.magnitude(final.params), mask, 0.5)
        state = state._replace(params=lj.apply_mask(state.params, mask), opt_state=lj.set_mask(state.opt_state, mask))
    assert float(lj.density(mask)) == pytest.approx(((16 * 6 - 48 - 24 - 12) + (3 * 16 - 24 - 12 - 6)) / 144)


def test_early_stop_picks_minimum_validation_loss_per_run():
    history = History(
        step=jnp.array([[10, 20, 30], [10, 20, 30]]),
        train_loss=jnp.zeros((2, 3)),
        val_loss=jnp.array([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0]]),
        val_accuracy=jnp.zeros((2, 3)),
        test_loss=jnp.zeros((2, 3)),
        test_accuracy=jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]),
    )
    step, accuracy = early_stop(history)
    assert step.tolist() == [20, 30]
    np.testing.assert_allclose(accuracy, [0.2, 0.6])


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="batch_size"):
        make_trainer(counting_model(), optax.sgd(0.1), batch_size=0, eval_every=1)
    trainer = make_trainer(counting_model(), optax.sgd(0.1), batch_size=100, eval_every=1)
    with pytest.raises(ValueError, match="exceeds the 50 training examples"):
        trainer.run_steps(trainer.init(jax.random.key(0)), id_data(), jax.random.key(1), 0, 1)


def test_run_steps_until_freezes_the_state_from_that_step():
    x = jax.random.normal(jax.random.key(0), (64, 6))
    data = Dataset(x, jnp.arange(64) % 3, x[:8], jnp.arange(8) % 3, x[:8], jnp.arange(8) % 3)
    trainer = make_trainer(create("mlp", input_shape=(6,), hidden=(8,), num_classes=3),
                           optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=8, eval_every=4)
    state = trainer.init(jax.random.key(1))
    run = jax.jit(trainer.run_steps, static_argnames="num_steps")
    short, _ = run(state, data, jax.random.key(2), 3, num_steps=7)
    padded, _ = run(state, data, jax.random.key(2), 3, num_steps=12, until=10)
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(padded)):
        np.testing.assert_array_equal(a, b)
