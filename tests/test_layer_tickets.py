"""Layer tickets: block scores, which blocks go, and the shallower ResNet they build."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lottojax as lj
from lottojax.layer_tickets import block_scores, remove_blocks, removable_blocks
from lottojax.models import ResNet, from_linen

INPUT = (8, 8, 3)


@pytest.fixture(scope="module", params=[False, True], ids=["post-activation", "pre-activation"])
def resnet(request):
    pre = request.param
    model = from_linen(ResNet(stage_sizes=(3, 2), pre_activation=pre, num_classes=4), input_shape=INPUT)
    params, state = jax.jit(model.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, *INPUT))
    return pre, model._replace(apply=jax.jit(model.apply, static_argnums=3)), params, state, x


def constant_block_scores(params, values: dict):
    """Scores of 1 per weight outside blocks, and ``values[block]`` per weight inside."""
    return {k: jax.tree.map(lambda p, v=values.get(k, 1.0): jnp.full(p.shape, v), sub) for k, sub in params.items()}


def neutralised(params, blocks, pre_activation):
    """The original net with the given blocks turned into the identity (an independent
    construction of what removing them means): post-activation relu(bn1(.) + x) with
    bn1 = 0 gives relu(x) = x (x >= 0 there); pre-activation conv1(.) + x with conv1 = 0."""
    out = jax.tree.map(lambda a: a, params)
    for name in blocks:
        block = dict(out[name])
        if pre_activation:
            block["conv1"] = {"kernel": jnp.zeros_like(block["conv1"]["kernel"])}
        else:
            block["bn1"] = {"scale": jnp.zeros_like(block["bn1"]["scale"]), "bias": jnp.zeros_like(block["bn1"]["bias"])}
        out[name] = block
    return out


def test_removable_blocks_exclude_those_next_to_downsampling(resnet):
    _, _, params, _, _ = resnet
    assert removable_blocks(params) == ["stage0_block0", "stage0_block1", "stage0_block2", "stage1_block1"]


def test_block_scores_sum_the_prunable_weights_of_each_block(resnet):
    _, _, params, _, _ = resnet
    totals = block_scores(constant_block_scores(params, {"stage1_block0": 2.0}))
    kernels = lambda name: sum(p.size for p in jax.tree.leaves(params[name]) if p.ndim >= 2)
    assert float(totals["stage0_block1"]) == kernels("stage0_block1") == 2 * 9 * 16 * 16
    assert float(totals["stage1_block0"]) == 2.0 * kernels("stage1_block0")


def test_removing_nothing_reproduces_the_network(resnet):
    _, model, params, state, x = resnet
    ticket = remove_blocks(params, state, lj.magnitude(params), count=0)
    assert ticket.stage_sizes == (3, 2) and ticket.removed == ()
    chex.assert_trees_all_equal(ticket.params, params)
    chex.assert_trees_all_equal(ticket.model_state, state)
    for train in (False, True):
        np.testing.assert_array_equal(model.apply(ticket.params, ticket.model_state, x, train)[0],
                                      model.apply(params, state, x, train)[0])


def test_lowest_removable_blocks_go_and_the_shallow_net_equals_identity_blocks(resnet):
    pre, model, params, state, x = resnet
    values = {"stage0_block0": 0.5, "stage0_block1": 3.0, "stage0_block2": 0.1, "stage1_block0": 0.0, "stage1_block1": 2.0}
    ticket = remove_blocks(params, state, constant_block_scores(params, values), count=2)
    # stage1_block0 scores lowest but sits next to downsampling: it stays.
    assert ticket.removed == ("stage0_block0", "stage0_block2")
    assert ticket.stage_sizes == (1, 2)
    shallow = from_linen(ResNet(stage_sizes=ticket.stage_sizes, pre_activation=pre, num_classes=4), input_shape=INPUT)
    fresh_params, fresh_state = jax.eval_shape(shallow.init, jax.random.key(0))
    assert jax.tree.structure(ticket.params) == jax.tree.structure(fresh_params)
    assert jax.tree.map(jnp.shape, ticket.params) == jax.tree.map(lambda s: s.shape, fresh_params)
    assert jax.tree.structure(ticket.model_state) == jax.tree.structure(fresh_state)
    # The kept blocks carry their weights: new stage0_block0 is the old stage0_block1.
    chex.assert_trees_all_equal(ticket.params["stage0_block0"], params["stage0_block1"])
    reference = neutralised(params, ticket.removed, pre)
    shallow_apply = jax.jit(shallow.apply, static_argnums=3)
    for train in (False, True):
        np.testing.assert_allclose(shallow_apply(ticket.params, ticket.model_state, x, train)[0],
                                   model.apply(reference, state, x, train)[0], rtol=2e-5, atol=2e-5)


def test_snip_layer_ticket_end_to_end(resnet):
    _, model, params, state, x = resnet
    y = jnp.arange(5) % 4
    scores = jax.jit(lambda p: lj.snip(p, apply_fn=lambda q, xx: model.apply(q, state, xx, True)[0], batch=(x, y)))(params)
    ticket = remove_blocks(params, state, scores, count=1)
    removable = removable_blocks(params)
    lowest = min(removable, key=lambda k: ticket.block_scores[k])
    assert ticket.removed == (lowest,)
    assert sum(ticket.stage_sizes) == 4


def test_bad_input_errors_are_clear(resnet):
    _, _, params, state, _ = resnet
    with pytest.raises(ValueError, match=r"count=5: this network has 4 removable blocks"):
        remove_blocks(params, state, lj.magnitude(params), count=5)
    with pytest.raises(ValueError, match="no residual blocks named"):
        block_scores({"fc0": {"kernel": jnp.ones((3, 3))}})
