"""Semantics a new user can rely on (issue 10, point 8): each test fails if the silent
behaviour it guards against comes back.

- pruning a state zeroes the weights *and* sets the optimizer's mask (mask_state);
- rates_by_layer refuses a tree without its output layer;
- density & co. refuse float masks and params trees;
- set_mask / prefix specs work on nnx.Optimizer and nnx.State, with short errors;
- nnx paths read 'l1/kernel'; specs that select nothing list the real paths;
- Equinox modules: a clear error, and the eqx.partition route end to end.
"""
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import lottojax as lj
from lottojax.train import TrainState


class MLP(nn.Module):
    head: str = "output"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc0")(x))
        return nn.Dense(3, name=self.head)(x)


X = jax.random.normal(jax.random.key(1), (32, 8))
Y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
PARAMS = MLP().init(jax.random.key(0), X)["params"]
TX = optax.chain(optax.sgd(0.1, momentum=0.9), lj.masked_updates())


def loss_fn(params):
    return optax.softmax_cross_entropy_with_integer_labels(MLP().apply({"params": params}, X), Y).mean()


def sgd_step(params, opt_state):
    updates, opt_state = TX.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def pruned_entries(params, mask):
    """The weights where the mask is False, all leaves together."""
    return np.concatenate([np.asarray(p)[~np.asarray(m)] for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))])


def assert_same_leaves(a, b):
    assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def trained_and_mask():
    params, opt_state = PARAMS, TX.init(PARAMS)
    for _ in range(3):
        params, opt_state = jax.jit(sgd_step)(params, opt_state)
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.5)
    return params, opt_state, mask


# 1. mask_state: one call prunes the weights and the optimizer together


def test_set_mask_alone_freezes_pruned_weights_at_nonzero_values_and_says_so():
    params, opt_state, mask = trained_and_mask()
    opt_state = lj.set_mask(opt_state, mask)
    for _ in range(3):
        params, opt_state = jax.jit(sgd_step)(params, opt_state)
    assert np.count_nonzero(pruned_entries(params, mask)) > 0  # the documented trap...
    with pytest.raises(ValueError, match=r"params leaf fc0/kernel has \d+ non-zero weights .*lottojax.mask_state"):
        lj.set_mask(opt_state, mask, params=params)  # ...which params= makes loud
    lj.set_mask(opt_state, mask, params=lj.apply_mask(params, mask))  # zeroed: accepted
    with pytest.raises(TypeError, match="cannot run under jit"):
        jax.jit(lambda p, s: lj.set_mask(s, mask, params=p))(params, opt_state)


def test_mask_state_on_a_params_opt_state_pair_under_jit():
    params, opt_state, mask = trained_and_mask()
    params, opt_state = jax.jit(lj.mask_state)((params, opt_state), mask)
    assert np.all(pruned_entries(params, mask) == 0)
    for _ in range(5):
        params, opt_state = jax.jit(sgd_step)(params, opt_state)
    assert np.all(pruned_entries(params, mask) == 0)
    assert_same_leaves(lj.get_mask(opt_state), mask)


def test_mask_state_on_lottojax_train_state():
    params, opt_state, mask = trained_and_mask()
    state = TrainState(params=params, model_state={}, opt_state=opt_state, step=jnp.array(3))
    new = jax.jit(lj.mask_state)(state, mask)
    assert isinstance(new, TrainState) and int(new.step) == 3
    assert np.all(pruned_entries(new.params, mask) == 0)
    params, opt_state = new.params, new.opt_state
    for _ in range(5):
        params, opt_state = jax.jit(sgd_step)(params, opt_state)
    assert np.all(pruned_entries(params, mask) == 0)


def test_mask_state_on_flax_train_state():
    ts = train_state.TrainState.create(apply_fn=MLP().apply, params=PARAMS, tx=TX)
    for _ in range(3):
        ts = ts.apply_gradients(grads=jax.grad(loss_fn)(ts.params))
    mask = lj.prune_layerwise(lj.magnitude(ts.params), lj.ones_like(ts.params), 0.5)
    ts = jax.jit(lj.mask_state)(ts, mask)
    for _ in range(5):
        ts = ts.apply_gradients(grads=jax.grad(loss_fn)(ts.params))
    assert np.all(pruned_entries(ts.params, mask) == 0)
    assert np.count_nonzero(pruned_entries(jax.tree.map(lambda x: x + 1, ts.params), mask)) > 0  # sanity


def test_mask_state_rejects_what_it_cannot_prune():
    with pytest.raises(TypeError, match=r"\(params, opt_state\) pair"):
        lj.mask_state({"params": PARAMS}, lj.ones_like(PARAMS))
    ts = train_state.TrainState.create(apply_fn=MLP().apply, params=PARAMS, tx=TX)
    with pytest.raises(ValueError, match=r"pass its \.opt_state"):
        lj.set_mask(ts, lj.ones_like(PARAMS))


# 2. rates_by_layer refuses a tree without its output layer


@pytest.mark.parametrize("head", ["head", "out", "Dense_1"])
def test_rates_by_layer_errors_when_no_path_has_the_output_name(head):
    params = MLP(head=head).init(jax.random.key(0), X)["params"]
    rates = lj.rates_by_layer(conv=0.1, dense=0.2, output=0.1)
    kernels = re.escape(str(sorted(["fc0/kernel", f"{head}/kernel"])))
    message = rf"no leaf path has a component named 'output'.*the kernel paths are {kernels}.*output_name="
    with pytest.raises(ValueError, match=message):
        lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), rates)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda p: lj.prune_layerwise(lj.magnitude(p), lj.ones_like(p), rates))(params)
    named = lj.rates_by_layer(conv=0.1, dense=0.5, output=0.25, output_name=head)
    mask = jax.jit(lambda p: lj.prune_layerwise(lj.magnitude(p), lj.ones_like(p), named))(params)
    assert lj.layer_report(mask) == {"fc0/kernel": (64, 128), f"{head}/kernel": (36, 48)}


# 3. density & co. take bool masks only


@pytest.mark.parametrize("fn", [lj.density, lj.sparsity, lj.layer_report])
def test_density_sparsity_report_reject_float_masks_and_params(fn):
    floats = jax.tree.map(lambda m: m.astype(jnp.float32), lj.ones_like(PARAMS))
    with pytest.raises(ValueError, match="mask leaf fc0/bias has dtype float32; masks are bool"):
        fn(floats)
    with pytest.raises(ValueError, match="mask leaf fc0/bias has dtype float32"):
        fn(PARAMS)
    ints = jax.tree.map(lambda m: m.astype(jnp.int32), lj.ones_like(PARAMS))
    with pytest.raises(ValueError, match="has dtype int32"):
        fn(ints)
    fn(lj.ones_like(PARAMS))


def test_density_of_bool_mask_still_jits():
    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    assert float(jax.jit(lj.density)(mask)) == pytest.approx(float(lj.density(mask)))
    with pytest.raises(ValueError, match="has dtype float32"):
        jax.jit(lj.density)(PARAMS)


# 4 and 5. nnx: Optimizer, State, paths


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l1(x)))


def nnx_setup():
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), lj.masked_updates()), wrt=nnx.Param)
    return model, optimizer


@nnx.jit
def nnx_step(model, optimizer):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean())(model)
    optimizer.update(model, grads)


def nnx_params(model):
    return nnx.state(model, nnx.Param)


def test_nnx_paths_read_like_linen_and_predicates_on_them_work():
    params = nnx_params(NNXNet(nnx.Rngs(0)))
    assert lj.masks.leaves_with_paths(params)[0] == ["head/bias", "head/kernel", "l1/bias", "l1/kernel"]
    mask = lj.ones_like(params)
    assert lj.layer_report(mask, lambda path, leaf: path.endswith("kernel")) == {"head/kernel": (48, 48), "l1/kernel": (128, 128)}


def test_selecting_nothing_lists_the_real_paths():
    mask = lj.ones_like(nnx_params(NNXNet(nnx.Rngs(0))))
    weight = lambda path, leaf: path.endswith("weight")
    listed = r"\['head/bias', 'head/kernel', 'l1/bias', 'l1/kernel'\]"
    for call in (
        lambda: lj.density(mask, weight),
        lambda: lj.prune_layerwise(mask, mask, 0.5, prunable=weight),
        lambda: lj.prune_global(mask, mask, 0.5, prunable=weight),
    ):
        with pytest.raises(ValueError, match=f"no leaf of the mask is prunable under this prunable= spec; its leaf paths are {listed}"):
            call()
    with pytest.raises(ValueError, match=r"by default \(leaves with ndim >= 2\); its leaf paths are \['head/bias'\]"):
        lj.density({"head": {"bias": jnp.ones(3, bool)}})


def test_prefix_specs_describe_an_nnx_state():
    params = nnx_params(NNXNet(nnx.Rngs(0)))
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), {"l1": 0.5, "head": 0.25})
    assert lj.layer_report(mask) == {"head/kernel": (36, 48), "l1/kernel": (64, 128)}
    assert float(lj.density(mask, {"l1": True, "head": False})) == pytest.approx((64 + 16) / (128 + 16))  # with l1/bias
    with pytest.raises(ValueError, match=r"no entry for leaf head/bias .*\['l1'\]"):
        lj.density(mask, {"l1": True})
    with pytest.raises(ValueError, match="entry output matches no leaf"):
        lj.density(mask, {"l1": True, "head": False, "output": True})


def test_set_mask_and_mask_state_on_nnx_optimizer():
    model, optimizer = nnx_setup()
    for _ in range(3):
        nnx_step(model, optimizer)
    params = nnx_params(model)
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.5)
    # the pure route: swap the optimizer's mask, given a mask of Params (it holds OptVariables)
    optimizer.opt_state = lj.set_mask(optimizer.opt_state, mask)
    assert_same_leaves(lj.get_mask(optimizer.opt_state), mask)
    assert jax.tree.structure(lj.get_mask(optimizer.opt_state, like=params)) == jax.tree.structure(mask)
    with pytest.raises(ValueError, match="params leaf .* non-zero weights"):
        lj.set_mask(optimizer.opt_state, mask, params=params)
    # the one call: zero the weights and set the mask, in place
    assert lj.mask_state((model, optimizer), mask) == (model, optimizer)
    assert np.all(pruned_entries(nnx_params(model), mask) == 0)
    before = jax.tree.map(np.asarray, nnx_params(model))
    for _ in range(5):
        nnx_step(model, optimizer)
    after = nnx_params(model)
    assert np.all(pruned_entries(after, mask) == 0)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_mask_state_on_nnx_optimizer_alone_asks_for_the_model():
    _, optimizer = nnx_setup()
    with pytest.raises(TypeError, match=r"mask_state\(\(model, optimizer\), mask\)"):
        lj.mask_state(optimizer, lj.ones_like(nnx_params(NNXNet(nnx.Rngs(0)))))
    with pytest.raises(ValueError, match=r"pass its \.opt_state"):
        lj.set_mask(optimizer, lj.ones_like(nnx_params(NNXNet(nnx.Rngs(0)))))


def test_nnx_errors_are_short_and_name_the_path():
    model, optimizer = nnx_setup()
    mask = lj.ones_like(nnx_params(model))
    mask["l1"]["kernel"] = nnx.Param(jnp.ones((16, 8), bool))
    with pytest.raises(ValueError, match=r"mask leaf l1/kernel has shape \(16, 8\) but the current mask leaf has \(8, 16\)") as err:
        lj.set_mask(optimizer.opt_state, mask)
    assert len(str(err.value)) < 300 and "PyTreeDef" not in str(err.value)
    held = lj.get_mask(optimizer.opt_state)  # OptVariables, where the params hold Params
    with pytest.raises(ValueError, match="same leaf paths, but at the node holding head/bias params has a node of type Param and mask has a node of type OptVariable") as err:
        lj.check_mask(nnx_params(model), held)
    assert len(str(err.value)) < 300 and "PyTreeDef" not in str(err.value)
    with pytest.raises(ValueError, match="no entry for leaf head/bias") as err:
        lj.prune_layerwise(held, held, {"l1": 0.5})
    assert "PyTreeDef" not in str(err.value)


# 6. Equinox


def eqx_model():
    return eqx.nn.MLP(8, 3, 16, 2, key=jax.random.key(0))


def test_equinox_module_with_functions_is_refused_with_the_partition_hint():
    model = eqx_model()
    hint = r"leaf activation is a .*not an array.*eqx.partition\(model, eqx.is_array\)"
    with pytest.raises(TypeError, match=hint):
        lj.ones_like(model)
    with pytest.raises(TypeError, match=hint):
        lj.prune_layerwise(model, model, 0.5)
    with pytest.raises(TypeError, match=hint):
        lj.density(model)


def test_equinox_partition_route_end_to_end():
    params, static = eqx.partition(eqx_model(), eqx.is_array)
    mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 0.5)
    assert lj.layer_report(mask) == {"layers/0/weight": (64, 128), "layers/1/weight": (128, 256), "layers/2/weight": (24, 48)}
    tx = optax.chain(optax.adam(1e-2), lj.masked_updates())
    params, opt_state = lj.mask_state((params, tx.init(params)), mask)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = jax.vmap(eqx.combine(p, static))(X)
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    start = params
    for _ in range(5):
        params, opt_state = step(params, opt_state)
    assert np.all(pruned_entries(params, mask) == 0)
    assert np.count_nonzero(pruned_entries(params, jax.tree.map(jnp.logical_not, mask))) > 0
    assert not np.array_equal(params.layers[0].weight, start.layers[0].weight)
