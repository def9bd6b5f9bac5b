"""IMP driver: exact densities per level, controls, vmapped seeds, one compile, resume."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.data import Dataset
from lottojax.imp import run_imp
from lottojax.models import create
from lottojax.train import make_trainer

RATES = lj.rates_by_layer(conv=0.1, dense=0.5, output=0.25)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (400, 10))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (10, 4)), -1)
    data = Dataset(*(np.asarray(a) for a in (x[:240], y[:240], x[240:320], y[240:320], x[320:], y[320:])))
    model = create("mlp", input_shape=(10,), hidden=(32,), num_classes=4)
    trainer = make_trainer(model, optax.chain(optax.adam(5e-3), lj.masked_updates()), batch_size=24, eval_every=10)
    return trainer, data


def imp(setup, **kwargs):
    trainer, data = setup
    args = dict(seeds=[0, 1], rounds=2, fraction=RATES, num_steps=40, progress=False)
    return run_imp(trainer, data, **{**args, **kwargs})


def test_levels_have_exact_per_layer_density_and_controls_behave(setup):
    result = imp(setup)
    # fc0 kernel 10x32 = 320 at 50%/round; output 32x4 = 128 at 25%/round.
    expected = [(320 + 128) / 448, (160 + 96) / 448, (80 + 72) / 448]
    np.testing.assert_allclose(result.density, np.array([expected, expected]).T, rtol=1e-6)
    assert result.arms == ("ticket", "reinit", "shuffle")
    # At level 0 the mask is dense: shuffling it changes nothing, so the runs are identical.
    np.testing.assert_array_equal(result.history.val_loss[0, :, 0], result.history.val_loss[0, :, 2])
    assert not np.array_equal(result.history.val_loss[0, :, 0], result.history.val_loss[0, :, 1])
    assert result.history.step[0, 0, 0].tolist() == [10, 20, 30, 40]
    assert set(np.unique(result.early_stop_step)) <= {10, 20, 30, 40}
    assert np.all((result.final_accuracy > 0.3) & (result.final_accuracy <= 1.0))
    # The returned mask is the one trained at the last level, per seed.
    for seed in range(2):
        mask = jax.tree.map(lambda m: m[seed], result.masks[-1])
        assert float(lj.density(mask)) == pytest.approx(result.density[-1, seed])


def test_vmapped_seeds_match_a_single_seed_run(setup):
    both = imp(setup, seeds=[0, 1])
    alone = imp(setup, seeds=[1])
    np.testing.assert_array_equal(both.density[:, 1], alone.density[:, 0])
    np.testing.assert_allclose(both.history.val_loss[:, 1], alone.history.val_loss[:, 0], rtol=1e-4, atol=1e-5)


def test_arms_are_mapped_like_seeds(setup):
    """'map' (the CPU default: a batched Conv-2 step costs 2x a single one) trains each arm
    unbatched; 'vmap' batches them; both give the same run up to float rounding."""
    trainer, data = setup
    tracer_types = {}

    def recording(strategy):
        def train(state, *args, **kwargs):
            tracer_types[strategy] = {type(leaf).__name__ for leaf in jax.tree.leaves(state.params)}
            return trainer.train(state, *args, **kwargs)
        return trainer._replace(train=train)

    mapped = run_imp(recording("map"), data, seeds=[0], rounds=1, fraction=RATES, num_steps=20, progress=False,
                     seed_strategy="map")
    batched = run_imp(recording("vmap"), data, seeds=[0], rounds=1, fraction=RATES, num_steps=20, progress=False,
                      seed_strategy="vmap")
    assert "BatchTracer" not in tracer_types["map"] and "BatchTracer" in tracer_types["vmap"]
    np.testing.assert_array_equal(mapped.density, batched.density)
    np.testing.assert_allclose(mapped.history.val_loss, batched.history.val_loss, rtol=1e-4, atol=1e-5)


def test_all_levels_share_one_compiled_program(setup):
    trainer, data = setup
    traces = []

    def counting_train(*args, **kwargs):
        traces.append(1)
        return trainer.train(*args, **kwargs)

    counted = trainer._replace(train=counting_train)
    after_each_level = []
    run_imp(counted, data, seeds=[0, 1], rounds=3, fraction=RATES, num_steps=20, progress=False,
            on_level=lambda level, _: after_each_level.append(len(traces)))
    assert after_each_level[0] >= 1
    assert after_each_level == [after_each_level[0]] * 4, "a later level traced the training again"


def test_resume_after_interrupt_matches_uninterrupted_run(setup, tmp_path):
    full = imp(setup, checkpoint_dir=str(tmp_path / "full"))

    def crash_after_level_1(level, _):
        if level == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imp(setup, checkpoint_dir=str(tmp_path / "killed"), on_level=crash_after_level_1)
    resumed_levels = []
    resumed = imp(setup, checkpoint_dir=str(tmp_path / "killed"), on_level=lambda level, _: resumed_levels.append(level))
    assert resumed_levels == [2], "levels 0 and 1 come from the checkpoint"
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_other_settings_is_refused(setup, tmp_path):
    imp(setup, rounds=0, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        imp(setup, rounds=0, num_steps=30, checkpoint_dir=str(tmp_path))


def test_one_shot_global_prunes_dense_weights_to_each_level(setup):
    result = imp(setup, scope="global", fraction=0.3, one_shot=True, rounds=3, controls=())
    total = 448
    for level in range(4):
        kept = total - int(np.round(np.float32(1 - 0.7**level) * np.float32(total)))
        np.testing.assert_allclose(result.density[level], kept / total, rtol=1e-6)
    assert result.arms == ("ticket",)


def test_rewind_step_trains_from_k(setup):
    result = imp(setup, rewind_step=15, rounds=1)
    assert result.history.step[0, 0, 0].tolist() == [25, 35, 40]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(controls=("reinit", "lottery")), "controls"),
        (dict(scope="per-neuron"), "scope"),
        (dict(rewind_step=40), "rewind_step"),
        (dict(fraction=1.0), r"outside \[0, 1\)"),
        (dict(scope="global", fraction=RATES), "one float"),
    ],
)
def test_bad_arguments_are_named(setup, kwargs, message):
    with pytest.raises(ValueError, match=message):
        imp(setup, **kwargs)


def test_checkpoint_of_another_optimizer_is_refused_never_reused(setup, tmp_path):
    """A run resumed with only the learning rate changed must not hand back the old numbers."""
    trainer, data = setup
    model = create("mlp", input_shape=(10,), hidden=(32,), num_classes=4)
    other = make_trainer(model, optax.chain(optax.adam(0.5), lj.masked_updates()), batch_size=24, eval_every=10)
    imp(setup, rounds=0, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="other settings.*program"):
        run_imp(other, data, seeds=[0, 1], rounds=0, fraction=RATES, num_steps=40, progress=False,
                checkpoint_dir=str(tmp_path))
    changed = data._replace(x_test=data.x_test + 1.0)
    with pytest.raises(ValueError, match="other settings.*data"):
        imp((trainer, changed), rounds=0, checkpoint_dir=str(tmp_path))


def test_every_level_keeps_its_ticket_and_a_finished_run_extends(setup, tmp_path):
    three = imp(setup, rounds=2, checkpoint_dir=str(tmp_path / "a"))
    assert len(three.masks) == 3
    np.testing.assert_allclose([np.mean([float(lj.density(jax.tree.map(lambda m: m[s], mask)))
                                         for s in range(2)]) for mask in three.masks],
                               three.density.mean(1), rtol=1e-6)
    assert all(np.all(m) for m in jax.tree.leaves(three.masks[0])), "level 0 trains the dense network"
    for earlier, later in zip(three.masks, three.masks[1:]):  # masks only shrink
        assert all(np.all(b <= a) for a, b in zip(jax.tree.leaves(earlier), jax.tree.leaves(later)))
    mask, theta = three.ticket(2, seed_index=1)
    assert jax.tree.structure(mask) == jax.tree.structure(theta)
    np.testing.assert_array_equal(jax.tree.leaves(three.rewind_params)[0], jax.tree.leaves(three.init_params)[0])

    two = imp(setup, rounds=1, checkpoint_dir=str(tmp_path / "b"))
    computed = []
    extended = imp(setup, rounds=2, checkpoint_dir=str(tmp_path / "b"), on_level=lambda level, _: computed.append(level))
    assert computed == [2], "levels 0 and 1 came from the shorter run"
    for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(extended)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(two.masks) == 2


def test_imp_starts_from_given_weights(setup):
    trainer, _ = setup
    given = jax.tree.map(lambda x: jnp.full(x.shape, 0.05, x.dtype), trainer.init(jax.random.key(9)).params)
    result = imp(setup, rounds=0, controls=(), init_params=given)
    for leaf in jax.tree.leaves(result.init_params):
        np.testing.assert_array_equal(leaf, np.full(leaf.shape, 0.05, leaf.dtype))
    with pytest.raises(ValueError, match=r"init_params leaf fc0/bias has shape \(1,\); expected \(32,\) or \(2, 32\)"):
        imp(setup, rounds=0, init_params=jax.tree.map(lambda x: x[:1], given))


def test_retraining_modes_start_where_renda_et_al_say(setup):
    """Weight rewinding, learning-rate rewinding and fine-tuning, checked against the same
    runs rebuilt by hand from the trainer: level 1 starts from (θ_k, opt_k), (θ_T, opt_k)
    and (θ_T, opt_T), each masked by level 1's ticket mask, and trains steps [k, T)."""
    _, data = setup
    schedule = optax.piecewise_constant_schedule(5e-3, {25: 0.1})  # so replaying the schedule matters
    model = create("mlp", input_shape=(10,), hidden=(32,), num_classes=4)
    trainer = make_trainer(model, optax.chain(optax.adam(schedule), lj.masked_updates()), batch_size=24, eval_every=10)
    k, total = 10, 40
    results = {mode: run_imp(trainer, data, seeds=[3], rounds=1, fraction=RATES, num_steps=total, rewind_step=k,
                             controls=(), retrain=mode, progress=False) for mode in lj.imp.RETRAINING}

    init_key, data_key = (lj.seeds.seed_keys([3], stream)[0] for stream in ("init", "data"))
    data = jax.tree.map(jnp.asarray, data)
    rewound, _ = trainer.run_steps(trainer.init(init_key), data, data_key, start=0, num_steps=k)
    trained, _ = trainer.train(rewound, data, data_key, start=k, num_steps=total - k)
    mask = jax.tree.map(lambda m: m[0], results["weights"].masks[1])
    starts = {"weights": (rewound.params, rewound), "lr": (trained.params, rewound), "finetune": (trained.params, trained)}
    for mode, (params, state) in starts.items():
        result = results[mode]
        np.testing.assert_array_equal(result.history.val_loss[0], results["weights"].history.val_loss[0])  # level 0
        start = state._replace(params=lj.apply_mask(params, mask), opt_state=lj.set_mask(state.opt_state, mask))
        _, history = trainer.train(start, data, data_key, start=k, num_steps=total - k)
        np.testing.assert_allclose(result.history.val_loss[1, 0, 0], history.val_loss, rtol=1e-5, atol=1e-6)
    level1 = [tuple(results[m].history.val_loss[1, 0, 0]) for m in results]
    assert len(set(level1)) == 3


def test_unknown_retraining_mode_is_named(setup):
    with pytest.raises(ValueError, match="retrain='rewind'.*'weights', 'lr', 'finetune'"):
        imp(setup, retrain="rewind")
