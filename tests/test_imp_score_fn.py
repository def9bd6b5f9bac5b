"""run_imp's method: another score than the default magnitude changes the tickets, any
registered method runs inside the level, and checkpoints record the method (and resume
across processes: no memory addresses)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.data import Dataset
from lottojax.checkpoint import describe as _describe
from lottojax.imp import run_imp
from lottojax.models import create
from lottojax.train import make_trainer


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (300, 10))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (10, 4)), -1)
    data = Dataset(*(np.asarray(a) for a in (x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:])))
    model = create("mlp", input_shape=(10,), hidden=(16,), num_classes=4)
    trainer = make_trainer(model, optax.chain(optax.adam(5e-3), lj.masked_updates()), batch_size=20, eval_every=10)
    return trainer, data


def imp(setup, **kwargs):
    trainer, data = setup
    args = dict(seeds=[0, 1], rounds=1, fraction=0.5, num_steps=20, controls=(), progress=False)
    return run_imp(trainer, data, **{**args, **kwargs})


def anti_magnitude(params):
    """Prunes the largest weights first."""
    return jax.tree.map(lambda a: -jnp.abs(a), params)


def test_another_score_prunes_differently_and_checkpoints_tell_them_apart(setup, tmp_path):
    default = imp(setup, checkpoint_dir=str(tmp_path / "magnitude"))
    anti = imp(setup, method=anti_magnitude, checkpoint_dir=str(tmp_path / "anti"))
    np.testing.assert_array_equal(anti.density, default.density)  # same counts...
    np.testing.assert_array_equal(anti.history.val_loss[0], default.history.val_loss[0])  # same dense level
    assert not np.allclose(anti.history.val_loss[1], default.history.val_loss[1])  # ...other weights
    with pytest.raises(ValueError, match="other settings.*method"):
        imp(setup, method=anti_magnitude, checkpoint_dir=str(tmp_path / "magnitude"))


def test_run_signature_is_stable_and_tells_settings_apart():
    a = lj.rates_by_layer(conv=0.1, dense=0.2, output=0.1)
    b = lj.rates_by_layer(conv=0.1, dense=0.2, output=0.1)
    c = lj.rates_by_layer(conv=0.1, dense=0.3, output=0.1)
    assert a is not b and _describe(a) == _describe(b) != _describe(c)
    assert "0x" not in str(_describe(lj.snip)) and "0x" not in str(_describe(object()))
    assert _describe(lj.magnitude) == "lottojax.scores.magnitude"


@pytest.mark.parametrize("name", ["snip", "random"])
def test_registered_methods_prune_the_trained_ticket_with_exact_counts(setup, name):
    result = imp(setup, method=name, rounds=2)
    magnitude = imp(setup, rounds=2)
    np.testing.assert_array_equal(result.density, magnitude.density)  # global 50%: exact counts either way
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(result.masks[2]), jax.tree.leaves(magnitude.masks[2]))]
    assert any(changed), f"{name} picked the same weights as magnitude"
