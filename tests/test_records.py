"""One training record type: the epoch loop records the same History as the step loop,
and an epoch of the epoch loop equals `Trainer.train` over that epoch's steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lottojax as lj
from lottojax.data import Dataset
from lottojax.eb_train import make_epoch_loop
from lottojax.models import create
from lottojax.train import History, make_trainer


def test_epoch_loop_records_a_history_equal_to_the_step_loops():
    x = jax.random.normal(jax.random.key(0), (96, 12))
    y = jnp.argmax(x[:, :3], -1)
    data = jax.device_put(Dataset(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:]))
    steps_per_epoch = 64 // 16
    trainer = make_trainer(create("mlp", input_shape=(12,), hidden=(8,), num_classes=3),
                           optax.chain(optax.adam(1e-2), lj.masked_updates()), batch_size=16, eval_every=steps_per_epoch)
    loop = make_epoch_loop(trainer, batch_size=16, num_epochs=3)
    keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    state = jax.jit(lambda k: loop.init(jax.vmap(trainer.init)(k)))(keys)
    epochs = jax.jit(loop.run)(state, data, keys, 3)
    assert isinstance(epochs.record, History)
    np.testing.assert_array_equal(epochs.record.step, [[4, 8, 12]] * 2)

    def steps(key):
        return trainer.train(trainer.init(key), data, key, start=0, num_steps=3 * steps_per_epoch)[1]

    by_steps = jax.jit(jax.vmap(steps))(keys)
    for name in History._fields:
        np.testing.assert_allclose(getattr(epochs.record, name), getattr(by_steps, name), rtol=2e-5, err_msg=name)
