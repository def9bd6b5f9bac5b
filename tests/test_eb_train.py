"""Early-Bird detection inside the compiled epoch loop: stopping, tickets, vmapped seeds,
one compile, checkpoint/resume, and the low-precision search on MNIST-1D."""
import functools
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.data import Dataset
from lottojax.early_bird import channel_mask, detect_early_bird
from lottojax.checkpoint import Checkpointer
from lottojax.eb_train import make_epoch_loop
from lottojax.experiments.early_bird import _Phase
from lottojax.models import create
from lottojax.train import make_trainer

BATCH, EPOCHS, RATIOS = 16, 8, (0.25, 0.5)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (96, 16))
    y = jnp.argmax(x[:, :12].reshape(96, 3, 4).sum(-1), -1)
    data = jax.device_put(Dataset(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:]))
    model = create("cnn1d", input_shape=(16,), channels=(4, 4), num_classes=3)
    tx = optax.chain(lj.slimming_penalty(1e-3), optax.sgd(0.1, momentum=0.9), lj.masked_updates())
    trainer = make_trainer(model, tx, batch_size=BATCH, eval_every=4)
    return trainer, data


def loop_for(trainer, **kwargs):
    args = dict(batch_size=BATCH, num_epochs=EPOCHS, mask_fn=channel_mask, ratios=RATIOS, window=3, eps=0.3)
    return make_epoch_loop(trainer, **{**args, **kwargs})


def start(trainer, loop, seeds):
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.jit(lambda k: loop.init(jax.vmap(trainer.init)(k)))(keys), jax.vmap(jax.random.fold_in, (0, None))(keys, 7)


@pytest.fixture(scope="module")
def runs(setup):
    trainer, data = setup
    full_loop = loop_for(trainer, record_masks=True, evaluate=False)
    stop_loop = loop_for(trainer, stop_at_eb=True, evaluate=False)
    state, keys = start(trainer, full_loop, [0, 1, 2])
    full = jax.jit(full_loop.run)(state, data, keys, EPOCHS)
    state, keys = start(trainer, stop_loop, [0, 1, 2])
    stopped = jax.jit(stop_loop.run)(state, data, keys, EPOCHS)
    return full, stopped, keys


def test_in_loop_detection_matches_a_scan_over_the_recorded_masks(runs):
    full, _, _ = runs
    eb = np.asarray(full.detector.epoch)
    assert (eb > 0).any(), "no ticket drawn: the test would prove nothing"
    assert int(full.epoch) == EPOCHS and np.all(np.asarray(full.stopped) == -1)
    for s in range(3):
        for r in range(len(RATIOS)):
            history = jax.tree.map(lambda m: m[s, :, r], full.masks)
            epoch, _ = detect_early_bird(history, window=3, eps=0.3, epochs=jnp.arange(1, EPOCHS + 1))
            assert int(epoch) == eb[s, r]
            assert eb[s, r] == -1 or eb[s, r] >= 3  # never before the window is full


def test_stopping_run_draws_the_same_tickets_and_freezes_finished_seeds(setup, runs):
    trainer, data = setup
    full, stopped, keys = runs
    eb = np.asarray(full.detector.epoch)
    np.testing.assert_array_equal(stopped.detector.epoch, eb)
    done = np.all(eb > 0, axis=1)
    expected_stop = np.where(done, eb.max(axis=1), -1)
    np.testing.assert_array_equal(stopped.stopped, expected_stop)
    assert int(stopped.epoch) == (EPOCHS if not done.all() else eb.max())
    train_one = jax.jit(trainer.run_steps, static_argnums=4)
    for s in range(3):
        for r in range(len(RATIOS)):
            if eb[s, r] < 0:
                continue
            chex.assert_trees_all_equal(jax.tree.map(lambda x: x[s, r], stopped.ticket.params),
                                        jax.tree.map(lambda x: x[s, r], full.ticket.params))
            # The ticket is the state after exactly eb[s, r] epochs of plain training.
            init = jax.jit(trainer.init)(jax.random.key(s))
            plain, _ = train_one(init, data, keys[s], 0, int(eb[s, r]) * 4)
            chex.assert_trees_all_close(jax.tree.map(lambda x: x[s, r], stopped.ticket.params), plain.params,
                                        rtol=1e-5, atol=1e-6)
        if done[s]:  # frozen at its stop: its state is the ticket of its last ratio to fire
            last = int(np.argmax(eb[s]))
            chex.assert_trees_all_equal(jax.tree.map(lambda x: x[s], stopped.train.params),
                                        jax.tree.map(lambda x: x[s, last], stopped.ticket.params))
            assert int(stopped.train.step[s]) == eb[s].max() * 4
            assert np.isnan(np.asarray(stopped.record.train_loss)[s, eb[s].max():]).all()


@pytest.mark.parametrize("strategy", ["map", "vmap"])
def test_stacked_seeds_equal_single_seed_runs_and_one_compile_serves_all_chunks(setup, runs, strategy):
    trainer, data = setup
    full, _, _ = runs  # seed_strategy='auto': 'map' on CPU
    loop = loop_for(trainer, record_masks=True, evaluate=False, seed_strategy=strategy)
    traces = []

    def run(*args):
        traces.append(1)
        return loop.run(*args)

    run = jax.jit(run)
    state, keys = start(trainer, loop, [1])
    for until in (3, 5, EPOCHS):  # three chunks, one program
        state = run(state, data, keys, until)
    assert len(traces) == 1
    np.testing.assert_array_equal(state.detector.epoch[0], full.detector.epoch[1])
    np.testing.assert_allclose(state.detector.distances[0], full.detector.distances[1], atol=1e-6)
    chex.assert_trees_all_equal(jax.tree.map(lambda m: m[0], state.masks), jax.tree.map(lambda m: m[1], full.masks))
    same = chex.assert_trees_all_equal if strategy == "map" else functools.partial(chex.assert_trees_all_close, rtol=1e-5, atol=1e-6)
    same(jax.tree.map(lambda x: x[0], state.train.params), jax.tree.map(lambda x: x[1], full.train.params))


def test_phase_resumes_from_its_checkpoint(setup, tmp_path):
    trainer, data = setup
    loop = loop_for(trainer, evaluate=True)
    state, keys = start(trainer, loop, [0, 1])
    initial = lambda: state
    phase = lambda name, make_initial: _Phase(Checkpointer(str(tmp_path / name), {"epochs": EPOCHS}), loop, make_initial)
    phase("split", initial).run(data, keys, num_epochs=3, chunk=2, seeds=2)  # "killed" after epoch 3
    resumed, _ = phase("split", initial).run(data, keys, num_epochs=EPOCHS, chunk=2, seeds=2)
    whole, seconds = phase("whole", lambda: state).run(data, keys, num_epochs=EPOCHS, chunk=EPOCHS, seeds=2)
    assert int(resumed.epoch) == int(whole.epoch) == EPOCHS and seconds > 0
    chex.assert_trees_all_close(resumed.train.params, whole.train.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(resumed.detector.epoch, whole.detector.epoch)
    np.testing.assert_allclose(resumed.record.test_accuracy, whole.record.test_accuracy)
    assert not np.isnan(np.asarray(whole.record.val_accuracy)).any()


SHARDED_LOOP = """
import chex, jax, jax.numpy as jnp, numpy as np, optax
import lottojax as lj
from lottojax.data import Dataset
from lottojax.early_bird import channel_mask
from lottojax.eb_train import make_epoch_loop
from lottojax.models import create
from lottojax.seeds import pad_seeds, put_seeded
from lottojax.train import make_trainer

x = jax.random.normal(jax.random.key(0), (96, 16))
y = jnp.argmax(x[:, :12].reshape(96, 3, 4).sum(-1), -1)
data = Dataset(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:])
tx = optax.chain(lj.slimming_penalty(1e-3), optax.sgd(0.1, momentum=0.9), lj.masked_updates())
trainer = make_trainer(create("cnn1d", input_shape=(16,), channels=(4, 4), num_classes=3), tx, batch_size=16, eval_every=4)
SEEDS = [0, 1, 2, 3, 4]

def run(devices):
    loop = make_epoch_loop(trainer, batch_size=16, num_epochs=8, mask_fn=channel_mask, ratios=(0.25, 0.5), window=3,
                           eps=0.15, stop_at_eb=True, seed_strategy="map", devices=devices)
    slots = pad_seeds(SEEDS, jax.device_count() if devices else 1)
    keys = put_seeded(jax.vmap(jax.random.key)(jnp.asarray(slots, jnp.uint32)), devices, stacked=True)
    state = jax.jit(lambda k: loop.init(jax.vmap(trainer.init)(k)))(keys)
    data_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 7)
    return jax.jit(loop.run)(state, put_seeded(data, devices, stacked=False), data_keys, 8)

sharded, plain = run("all"), run(None)
stops = np.asarray(plain.stopped)
assert (stops > 0).any() and len(set(stops.tolist())) > 1, f"seeds must stop at different epochs: {stops}"
own = lambda tree: jax.tree.map(lambda a: np.asarray(a)[:len(SEEDS)], tree)
assert int(sharded.epoch) == int(plain.epoch)
for name in ("stopped", "detector", "ticket", "train"):
    chex.assert_trees_all_equal(own(getattr(sharded, name)), own(getattr(plain, name)))
chex.assert_trees_all_close(own(sharded.record), own(plain.record), rtol=1e-6)
print(sharded.train.step.sharding.spec, sharded.epoch.sharding.spec, stops.tolist())
"""


def test_seeds_sharded_over_4_devices_stop_and_draw_tickets_as_unsharded(cpu_devices_env):
    """Seeds on different devices stop at different epochs; every device runs until the
    last one stops, so states, tickets and records equal the one-device run's."""
    env = cpu_devices_env(4)
    done = subprocess.run([sys.executable, "-c", SHARDED_LOOP], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("P('seeds',) P() "), done.stdout


def test_loop_arguments_are_checked(setup):
    trainer, _ = setup
    with pytest.raises(ValueError, match="need a mask_fn"):
        make_epoch_loop(trainer, batch_size=BATCH, num_epochs=3, stop_at_eb=True)
    with pytest.raises(ValueError, match="at least one pruning ratio"):
        make_epoch_loop(trainer, batch_size=BATCH, num_epochs=3, mask_fn=channel_mask)


def test_low_precision_search_finds_early_bird_tickets_on_mnist1d():
    from lottojax.data import load
    from lottojax.experiments.early_bird import EarlyBirdConfig, make_eb_optimizer
    from lottojax.quantize import low_precision

    data = jax.device_put(load("mnist1d"))
    config = EarlyBirdConfig(epochs=12, batch_size=256)
    steps = data.x_train.shape[0] // config.batch_size
    model = low_precision(create("cnn1d", input_shape=(40,), channels=(8, 8, 8)), bits=8)
    trainer = make_trainer(model, make_eb_optimizer(config, steps, 1e-4), batch_size=config.batch_size, eval_every=steps)
    loop = make_epoch_loop(trainer, batch_size=config.batch_size, num_epochs=config.epochs, mask_fn=channel_mask,
                           ratios=(0.3, 0.5), stop_at_eb=True, evaluate=False)
    initial, keys = start(trainer, loop, [0])
    state = jax.jit(loop.run)(initial, data, keys, config.epochs)
    eb = np.asarray(state.detector.epoch[0])
    assert np.all((eb >= 5) & (eb <= 12)), eb  # drawn, and only once the window (5) had filled
    assert int(state.stopped[0]) == eb.max()
    # Every step drew new rounding noise from the key in the model state.
    assert not np.array_equal(state.train.model_state.rounding_key, initial.train.model_state.rounding_key)
