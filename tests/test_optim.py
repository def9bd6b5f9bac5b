"""masked_updates: pruned weights stay exactly 0 under every optimizer; no recompilation."""
import collections
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

import lottojax as lj


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc0")(x))
        return nn.Dense(3, name="output")(x)


X = jax.random.normal(jax.random.key(1), (32, 8))
Y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
PARAMS = MLP().init(jax.random.key(0), X)["params"]


def loss_fn(params):
    logits = MLP().apply({"params": params}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "sgd+momentum": optax.sgd(0.1, momentum=0.9),
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pruned_weights_stay_exactly_zero(name):
    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.6)
    params = lj.apply_mask(PARAMS, mask)
    tx = optax.chain(OPTIMIZERS[name], lj.masked_updates(mask))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = params
    for _ in range(25):
        params, state = step(params, state)
    for path_leaf, p, p0, m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params), jax.tree.leaves(start), jax.tree.leaves(mask)
    ):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0), path_leaf[0]
        assert np.any(np.asarray(p)[np.asarray(m)] != np.asarray(p0)[np.asarray(m)]), "survivors must train"


def compiled_kernels(tx, params):
    """How many of each kind of operation the compiled train step runs, apart from moving
    buffers (parameters, copies, tuples, bitcasts): the passes over memory it makes."""
    def step(params, state):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    moves = {"parameter", "copy", "tuple", "get-tuple-element", "bitcast", "constant"}
    return collections.Counter(op for op in re.findall(r" = \S+ ([a-z][\w-]*)\(", entry) if op not in moves)


@pytest.mark.parametrize("name", ["sgd+momentum", "adam", "adamw"])
def test_masking_adds_no_pass_over_the_weights(name):
    # XLA folds the mask's select into the update the optimizer already computes: the
    # masked step has exactly the dense step's kernels, so the mask costs one extra
    # (1-byte) read per weight and nothing else
    dense = compiled_kernels(OPTIMIZERS[name], PARAMS)
    masked = compiled_kernels(optax.chain(OPTIMIZERS[name], lj.masked_updates()), PARAMS)
    assert sum(dense.values()) > 5 and masked == dense


def test_set_mask_does_not_recompile_and_takes_effect():
    tx = optax.chain(optax.adam(1e-2), lj.masked_updates())
    params = PARAMS
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    mask = lj.ones_like(params)
    for _ in range(3):
        params, state = step(params, state)
        mask = lj.prune_layerwise(lj.magnitude(params), mask, 0.3)
        params = lj.apply_mask(params, mask)
        state = lj.set_mask(state, mask)
    params, state = step(params, state)
    chex.assert_trees_all_equal(lj.get_mask(state), mask)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_flax_train_state_unchanged():
    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    ts = train_state.TrainState.create(
        apply_fn=MLP().apply,
        params=lj.apply_mask(PARAMS, mask),
        tx=optax.chain(optax.sgd(0.1, momentum=0.9), lj.masked_updates(mask)),
    )
    for _ in range(5):
        ts = ts.apply_gradients(grads=jax.grad(loss_fn)(ts.params))
    new_mask = lj.prune_layerwise(lj.magnitude(ts.params), mask, 0.5)
    ts = ts.replace(params=lj.apply_mask(ts.params, new_mask), opt_state=lj.set_mask(ts.opt_state, new_mask))
    ts = ts.apply_gradients(grads=jax.grad(loss_fn)(ts.params))
    for p, m in zip(jax.tree.leaves(ts.params), jax.tree.leaves(new_mask)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_set_mask_finds_state_inside_wrappers():
    inner = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), lj.masked_updates())
    tx = optax.MultiSteps(inner, every_k_schedule=2)
    state = tx.init(PARAMS)
    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    chex.assert_trees_all_equal(lj.get_mask(lj.set_mask(state, mask)), mask)


def test_vmapped_seeds_keep_their_own_masks():
    tx = optax.chain(optax.adam(1e-2), lj.masked_updates())
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k: MLP().init(k, X)["params"])(keys)
    masks = jax.vmap(lambda p: lj.prune_layerwise(lj.magnitude(p), lj.ones_like(p), 0.5))(params)
    params = jax.vmap(lj.apply_mask)(params, masks)
    states = jax.vmap(lambda p, m: lj.set_mask(tx.init(p), m))(params, masks)

    def step(p, s):
        updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, updates), s

    params, states = jax.jit(jax.vmap(step))(params, states)
    for i in range(3):
        p_i, s_i = jax.tree.map(lambda x: x[i], (params, states))
        chex.assert_trees_all_equal(lj.get_mask(s_i), jax.tree.map(lambda x: x[i], masks))
        for p, m in zip(jax.tree.leaves(p_i), jax.tree.leaves(lj.get_mask(s_i))):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="masked_updates"):
        lj.set_mask(optax.adam(1e-2).init(PARAMS), lj.ones_like(PARAMS))
    state = optax.chain(optax.sgd(0.1), lj.masked_updates()).init(PARAMS)
    bad = lj.ones_like(PARAMS)
    bad["fc0"]["kernel"] = jnp.ones((16, 8), bool)
    with pytest.raises(ValueError, match=r"fc0/kernel has shape \(16, 8\)"):
        lj.set_mask(state, bad)
    with pytest.raises(ValueError, match="fc0/kernel"):
        optax.chain(optax.sgd(0.1), lj.masked_updates(bad)).init(PARAMS)


def test_masked_updates_lays_its_mask_out_like_the_params():
    from flax.core import FrozenDict

    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    tx = optax.chain(optax.sgd(0.1), lj.masked_updates(FrozenDict(mask)))
    state = tx.init(PARAMS)
    assert jax.tree.structure(lj.get_mask(state)) == jax.tree.structure(mask)
    state = lj.set_mask(state, FrozenDict(lj.ones_like(PARAMS)))
    assert jax.tree.structure(lj.get_mask(state)) == jax.tree.structure(mask)
    assert jax.tree.structure(lj.get_mask(state, like=FrozenDict(PARAMS))) == jax.tree.structure(FrozenDict(mask))


def test_set_mask_params_check_names_the_unzeroed_leaf():
    state = optax.chain(optax.sgd(0.1), lj.masked_updates()).init(PARAMS)
    mask = lj.prune_layerwise(lj.magnitude(PARAMS), lj.ones_like(PARAMS), 0.5)
    with pytest.raises(ValueError, match=r"params leaf fc0/kernel has 64 non-zero weights where the new mask is False"):
        lj.set_mask(state, mask, params=PARAMS)
    lj.set_mask(state, mask, params=lj.apply_mask(PARAMS, mask))
