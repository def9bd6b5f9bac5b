"""Channel tickets cut into smaller networks: the shrunk net computes exactly what the full
net computes with the pruned channels switched off; optimizer state follows; clear errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.early_bird import channel_mask
from lottojax.models import create
from lottojax.slimming import channel_plan, channel_select, shrink, shrink_train_state, zero_channels
from lottojax.train import make_trainer

NETS = {
    "cnn1d": dict(name="cnn1d", input_shape=(24,), channels=(6, 5, 7)),
    "vgg11": dict(name="vgg11", input_shape=(16, 16, 3), widths=(4, 6, 8, 8, 5, 8, 6, 7)),
    "resnet": dict(name="resnet20", input_shape=(8, 8, 3), stage_sizes=(1, 1, 1)),  # identity and projection shortcuts
    "preresnet": dict(name="resnet20", input_shape=(8, 8, 3), stage_sizes=(1, 1, 1), pre_activation=True),
}


def randomised_bn(params, state, key):
    """Scales, shifts and running statistics far from their initial values (some scales near 0)."""
    leaves, treedef = jax.tree.flatten(params)
    paths = [lj.masks.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    keys = jax.random.split(key, len(leaves) + 1)
    new = [jax.random.normal(k, x.shape) if p.endswith(("scale", "bias")) and x.ndim == 1 else x
           for p, x, k in zip(paths, leaves, keys)]
    stats = jax.tree.map(lambda x: jax.random.uniform(keys[-1], x.shape, minval=0.5, maxval=2.0), state)
    return jax.tree.unflatten(treedef, new), stats


@pytest.mark.parametrize("net", list(NETS))
def test_shrunk_network_computes_the_masked_full_network(net):
    spec = dict(NETS[net])
    name = spec.pop("name")
    model = create(name, **spec)
    shapes = jax.eval_shape(model.init, jax.random.key(0))[0]
    select = channel_select(name, shapes)

    @jax.jit
    def ticket(key):
        params, state = randomised_bn(*model.init(key), jax.random.fold_in(key, 1))
        return params, state, channel_mask(params, 0.5, select=select)

    params, state, mask = ticket(jax.random.key(0))
    plan = channel_plan(name, mask, params)
    small = create(name, **{**spec, **plan.model_kwargs})
    kept = sum(len(k) for k in plan.kept.values())
    assert kept == sum(int(m.sum()) for m in mask.values()) < sum(m.size for m in mask.values())
    x = jax.random.normal(jax.random.key(2), (6, *spec["input_shape"]))

    @jax.jit
    def outputs(params, state, x):
        small_params, small_state = shrink(plan, params), {c: shrink(plan, t) for c, t in state.items()}
        masked = zero_channels(params, mask)
        out = {"small": (small_params, small_state)}
        for mode, train in (("eval", False), ("train", True)):
            full, full_state = model.apply(masked, state, x, train)
            cut, cut_state = small.apply(small_params, small_state, x, train)
            out[mode] = (full, cut, {c: shrink(plan, t) for c, t in full_state.items()}, cut_state)
        return out

    out = outputs(params, state, x)
    chex.assert_trees_all_equal_shapes(jax.eval_shape(small.init, jax.random.key(0)), out["small"])
    for mode in ("eval", "train"):
        full, cut, full_state, cut_state = out[mode]
        np.testing.assert_allclose(cut, full, rtol=2e-5, atol=2e-5, err_msg=mode)
        chex.assert_trees_all_close(cut_state, full_state, rtol=2e-5, atol=2e-5)
    pruned_scales = np.concatenate([np.asarray(params_at(params, k))[~np.asarray(m)] for k, m in mask.items()])
    assert np.abs(pruned_scales).min() > 0, "the pruned channels must matter (else the test proves nothing)"


def params_at(params, path):
    for part in path.split("/"):
        params = params[part]
    return params


def test_cnn1d_plan_by_hand():
    params, _ = jax.eval_shape(create("cnn1d", input_shape=(8,), channels=(3, 4)).init, jax.random.key(0))
    mask = {"bn0/scale": jnp.array([1, 0, 1], bool), "bn1/scale": jnp.array([0, 1, 0, 1], bool)}
    plan = channel_plan("cnn1d", mask, params)
    assert plan.model_kwargs == {"channels": (2, 2)}
    (out_axis, out_idx), (in_axis, in_idx) = plan.takes["conv1"]["kernel"]
    assert (out_axis, out_idx.tolist(), in_axis, in_idx.tolist()) == (-1, [1, 3], -2, [0, 2])
    # Length 8 -> 4 -> 2: the flattened features are (l, c) -> l * 4 + c.
    assert plan.takes["output"]["kernel"][0][1].tolist() == [1, 3, 5, 7]


def test_shrink_train_state_cuts_momentum_and_keeps_counters():
    model = create("cnn1d", input_shape=(16,), channels=(4, 6))
    x = jax.random.normal(jax.random.key(0), (32, 16))
    y = jnp.arange(32) % 10
    data = lj_data(x, y)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(optax.linear_schedule(0.1, 0.0, 100), momentum=0.9),
                     lj.masked_updates())
    trainer = make_trainer(model, tx, batch_size=8, eval_every=4)
    state, _ = jax.jit(trainer.run_steps, static_argnums=4)(trainer.init(jax.random.key(1)), data, jax.random.key(2), 0, 5)
    mask = channel_mask(state.params, 0.4)
    plan = channel_plan("cnn1d", mask, state.params)
    small = shrink_train_state(plan, state)
    small_trainer = make_trainer(create("cnn1d", input_shape=(16,), **plan.model_kwargs), tx, batch_size=8, eval_every=4)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(small_trainer.init, jax.random.key(0)), small)
    momentum = state.opt_state[1][0].trace["conv1"]["kernel"]
    k0, k1 = plan.kept["bn0"], plan.kept["bn1"]
    np.testing.assert_array_equal(small.opt_state[1][0].trace["conv1"]["kernel"], momentum[:, k0][:, :, k1])
    assert int(small.step) == 5 and int(small.opt_state[1][1].count) == 5
    assert all(bool(m.all()) for m in jax.tree.leaves(lj.get_mask(small.opt_state)))
    # Training goes on from there in the small network.
    jax.jit(small_trainer.run_steps, static_argnums=4)(small, data, jax.random.key(2), 5, 2)


def lj_data(x, y):
    from lottojax.data import Dataset

    return Dataset(x, y, x[:8], y[:8], x[:8], y[:8])


def test_errors_name_the_problem():
    params, _ = jax.eval_shape(create("cnn1d", input_shape=(8,), channels=(3, 2)).init, jax.random.key(0))
    with pytest.raises(ValueError, match="prunes every channel of bn1"):
        channel_plan("cnn1d", {"bn0/scale": np.ones(3, bool), "bn1/scale": np.zeros(2, bool)}, params)
    with pytest.raises(ValueError, match="has shape"):
        channel_plan("cnn1d", {"bn0/scale": np.ones(4, bool)}, params)
    with pytest.raises(ValueError, match="no prunable BatchNorm layer"):
        channel_plan("cnn1d", {"bn7/scale": np.ones(3, bool)}, params)
    with pytest.raises(ValueError, match="supports the models"):
        channel_plan("mlp", {}, params)
    resnet, _ = jax.eval_shape(create("resnet20", input_shape=(8, 8, 3), stage_sizes=(1, 1, 1)).init, jax.random.key(0))
    all_bn = channel_mask(jax.tree.map(jnp.ones_like, resnet), 0.3)
    with pytest.raises(ValueError, match="inner channels"):
        channel_plan("resnet20", all_bn, resnet)
    with pytest.raises(ValueError, match="names layers that params lacks"):
        zero_channels(params, {"bn9/scale": np.ones(2, bool)})
    with pytest.raises(ValueError, match="inner_widths has 1 entries; this ResNet has 3 blocks"):
        jax.eval_shape(create("resnet20", input_shape=(8, 8, 3), stage_sizes=(1, 1, 1), inner_widths=(3,)).init,
                       jax.random.key(0))
