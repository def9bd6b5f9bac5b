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

# name -> (model, modes checked): BatchNorm in training mode (batch statistics, updated running
# statistics) is the same code in every model, so the larger nets check evaluation mode only.
NETS = {
    "cnn1d": (dict(name="cnn1d", input_shape=(24,), channels=(6, 5, 7)), (False, True)),
    "vgg11": (dict(name="vgg11", input_shape=(16, 16, 3), widths=(4, 6, 8, 8, 5, 8, 6, 7)), (False,)),
    "resnet": (dict(name="resnet20", input_shape=(8, 8, 3), stage_sizes=(1, 1, 1)), (False, True)),  # identity + projection
    "preresnet": (dict(name="resnet20", input_shape=(8, 8, 3), stage_sizes=(1, 1, 1), pre_activation=True), (False,)),
}


def random_variables(shapes, key):
    """Random (parameters, BatchNorm statistics, input) of the given shapes from one draw (a draw
    per leaf, as the models' initialisers make, takes far longer to compile than the test):
    kernels N(0, 0.2^2), scales and shifts N(0, 1) (some scales near 0), running means and
    variances in (0.5, 2), inputs N(0, 1)."""
    leaves, treedef = jax.tree.flatten(shapes)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    parts = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
    kinds = jax.tree.leaves(jax.tree.map(lambda _: "param", shapes[0])) + \
        jax.tree.leaves(jax.tree.map(lambda _: "stat", shapes[1])) + ["input"]
    scale = {"stat": lambda v, x: 1.25 + 0.75 * jnp.tanh(v), "input": lambda v, x: v,
             "param": lambda v, x: v * (0.2 if len(x.shape) > 1 else 1.0)}
    values = [scale[kind](part, x).reshape(x.shape) for kind, part, x in zip(kinds, parts, leaves)]
    return jax.tree.unflatten(treedef, values)


@pytest.mark.parametrize("net", list(NETS))
def test_shrunk_network_computes_the_masked_full_network(net):
    spec, modes = NETS[net]
    spec = dict(spec)
    name = spec.pop("name")
    model = create(name, **spec)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    select = channel_select(name, shapes[0])

    x_shape = jax.ShapeDtypeStruct((6, *spec["input_shape"]), jnp.float32)

    @jax.jit
    def ticket(key):
        params, state, x = random_variables((*shapes, x_shape), key)
        return params, state, x, channel_mask(params, 0.5, select=select)

    params, state, x, mask = ticket(jax.random.key(0))
    plan = channel_plan(name, mask, params)
    small = create(name, **{**spec, **plan.model_kwargs})
    kept = sum(len(k) for k in plan.kept.values())
    assert kept == sum(int(m.sum()) for m in mask.values()) < sum(m.size for m in mask.values())

    @jax.jit
    def outputs(params, state, x):
        small_params, small_state = shrink(plan, params), {c: shrink(plan, t) for c, t in state.items()}
        masked = zero_channels(params, mask)
        out = {"small": (small_params, small_state)}
        for train in modes:
            full, full_state = model.apply(masked, state, x, train)
            cut, cut_state = small.apply(small_params, small_state, x, train)
            out["train" if train else "eval"] = (full, cut, {c: shrink(plan, t) for c, t in full_state.items()}, cut_state)
        return out

    out = outputs(params, state, x)
    chex.assert_trees_all_equal_shapes(jax.eval_shape(small.init, jax.random.key(0)), out["small"])
    for mode in ("train" if train else "eval" for train in modes):
        full, cut, full_state, cut_state = out[mode]
        # Equal up to float32 summation order (dropping zero terms reorders the sums).
        np.testing.assert_allclose(cut, full, rtol=1e-5, atol=1e-5 * float(np.abs(full).max()), err_msg=mode)
        chex.assert_trees_all_close(cut_state, full_state, rtol=1e-5, atol=1e-5)
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
    x = jax.random.normal(jax.random.key(0), (8, 16))
    y = jnp.arange(8) % 10
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(optax.linear_schedule(0.1, 0.0, 100), momentum=0.9),
                     lj.masked_updates())
    trainer = make_trainer(model, tx, batch_size=8, eval_every=4)

    @jax.jit
    def five_steps(state):
        return jax.lax.fori_loop(0, 5, lambda _, s: trainer.step(s, x, y)[0], state)

    state = five_steps(jax.jit(trainer.init)(jax.random.key(1)))
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
