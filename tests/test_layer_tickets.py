"""Layer tickets: block scores, which blocks go, and the shallower ResNet they build."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lottojax as lj
from lottojax.layer_tickets import (block_scores, random_block_scores, removable_blocks, remove_blocks,
                                   remove_lowest_blocks, traced_flops)
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


def test_remove_lowest_blocks_orders_by_the_given_totals_and_breaks_ties_by_position(resnet):
    _, _, params, state, _ = resnet
    totals = {"stage0_block0": 1.0, "stage0_block1": 1.0, "stage0_block2": 1.0, "stage1_block0": -5.0,
              "stage1_block1": 0.5}
    ticket = remove_lowest_blocks(params, state, totals, count=3)
    # stage1_block0 is lowest but next to downsampling; among the three tied at 1.0 the earlier go first.
    assert ticket.removed == ("stage0_block0", "stage0_block1", "stage1_block1")
    assert ticket.stage_sizes == (1, 1) and ticket.block_scores == totals
    chex.assert_trees_all_equal(ticket.params["stage0_block0"], params["stage0_block2"])
    chex.assert_trees_all_equal(ticket.model_state["batch_stats"]["stage0_block0"],
                                state["batch_stats"]["stage0_block2"])
    # remove_blocks is remove_lowest_blocks on block_scores of the per-weight scores.
    scores = lj.magnitude(params)
    by_scores = remove_blocks(params, state, scores, count=2)
    by_totals = remove_lowest_blocks(params, state, block_scores(scores), count=2)
    assert by_scores.removed == by_totals.removed and by_scores.stage_sizes == by_totals.stage_sizes
    with pytest.raises(ValueError, match=r"totals has no score for blocks \['stage1_block1'\]"):
        remove_lowest_blocks(params, state, {k: v for k, v in totals.items() if k != "stage1_block1"}, count=1)
    with pytest.raises(ValueError, match="count=-1"):
        remove_lowest_blocks(params, state, totals, count=-1)


def test_random_block_scores_pick_every_removable_block_alike(resnet):
    _, _, params, state, _ = resnet
    draws = random_block_scores(params, key=jax.random.key(3))
    assert sorted(draws) == ["stage0_block0", "stage0_block1", "stage0_block2", "stage1_block0", "stage1_block1"]
    again = random_block_scores(params, key=jax.random.key(3))
    assert {k: float(v) for k, v in draws.items()} == {k: float(v) for k, v in again.items()}
    # One draw per block, whatever its size: over 400 keys each of the 4 removable blocks is the
    # one removed about equally often (the 16-channel stage-0 blocks are 4x smaller than stage1_block1).
    keys = jax.random.split(jax.random.key(0), 400)
    draws = jax.vmap(lambda k: jnp.stack(list(random_block_scores(params, key=k).values())))(keys)
    removable = [0, 1, 2, 4]  # stage1_block0 (index 3) sits next to downsampling
    picked = np.asarray(jnp.argmin(draws[:, removable], axis=1))
    frequency = np.bincount(picked, minlength=4) / len(keys)
    np.testing.assert_allclose(frequency, 0.25, atol=0.07)
    totals = {k: float(v) for k, v in random_block_scores(params, key=keys[0]).items()}
    names = ["stage0_block0", "stage0_block1", "stage0_block2", "stage1_block1"]
    assert remove_lowest_blocks(params, state, totals, count=1).removed == (names[picked[0]],)


def resnet_flops(stage_sizes, height, channels_in=1, width=16, classes=10) -> float:
    """Forward FLOPs per example of the post-activation CIFAR ResNet, counted by hand: 2 per
    multiply-add of every convolution (SAME padding, stride 2 opening stages 1, 2, ...) and the classifier."""
    flops = 2 * height * height * 9 * channels_in * width  # stem
    c = width
    for s, n in enumerate(stage_sizes):
        out = width * 2 ** s
        for b in range(n):
            if s > 0 and b == 0:
                height = -(-height // 2)
                flops += 2 * height * height * out * (9 * c + 9 * out + c)  # conv0 (stride 2), conv1, 1x1 shortcut
            else:
                flops += 2 * height * height * out * (9 * c + 9 * out)
            c = out
    return float(flops + 2 * c * classes)


@pytest.mark.parametrize("stage_sizes, height", [((2, 1), 6), ((0, 2, 1), 7)])
def test_traced_flops_of_a_resnet_equal_a_hand_count(stage_sizes, height):
    model = from_linen(ResNet(stage_sizes=stage_sizes), input_shape=(height, height, 1))
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    x = jnp.zeros((1, height, height, 1))
    for train in (False, True):  # BatchNorm statistics add no FLOPs
        assert traced_flops(lambda p, s, x: model.apply(p, s, x, train)[0], params, state, x) == \
            resnet_flops(stage_sizes, height)
    # Per example: a batch of 3 costs 3x.
    x3 = jnp.zeros((3, height, height, 1))
    assert traced_flops(lambda p, s, x: model.apply(p, s, x, False)[0], params, state, x3) == \
        3 * resnet_flops(stage_sizes, height)


def test_traced_flops_count_scans_by_length_and_a_cond_by_its_dearest_branch():
    w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
    one = 2 * 2 * 4 * 4  # one (2, 4) @ (4, 4)
    scanned = lambda w, x: jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]
    assert traced_flops(scanned, w, x) == 5 * one
    branches = lambda w, x: jax.lax.cond(x.sum() > 0, lambda: (x @ w) @ w, lambda: x @ w)
    assert traced_flops(branches, w, x) == 2 * one
    assert traced_flops(jax.jit(lambda w, x: x @ w + 1.0), w, x) == one  # nested jit, elementwise not counted
    looped = lambda w, x: jax.lax.while_loop(lambda h: h.sum() < 10, lambda h: h @ w, x)
    with pytest.raises(ValueError, match="while loop"):
        traced_flops(looped, w, x)
