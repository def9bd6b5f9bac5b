"""SuperTickets pieces: the pruning schedule's values, exact global density after each
pruning event, the FLOPs-weighted and warmed-up slimming penalty's gradient ρ(t)·π_l·sign(γ),
channel removal by |γ| and its running average, and mask reactivation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.early_bird import slimming_penalty
from lottojax.masks import leaves_with_paths
from lottojax.models import create
from lottojax.slimming import channel_plan, shrink
from lottojax.supertickets import (event_due, flops_weights, prune_to_sparsity, pruning_sparsity, rebuilt_mask,
                                   removable_channels, shrink_averages, update_scale_averages)


def test_pruning_schedule_values_python_and_traced():
    expected = [0.0, 0.0] + [0.1] * 3 + [0.2] * 3 + [0.3] * 3 + [0.4]  # one step per 3 epochs, from epoch 2
    assert [pruning_sparsity(e, every=3, step=0.1, target=0.9) for e in range(12)] == pytest.approx(expected)
    traced = jax.jit(lambda e: pruning_sparsity(e, every=3, step=0.1, target=0.9))(jnp.arange(12))
    np.testing.assert_allclose(traced, expected, rtol=1e-6)
    assert pruning_sparsity(41, every=3, step=0.1, target=0.9) == 0.9  # 14 events, capped
    assert pruning_sparsity(24, every=25, step=0.1, target=0.5) == 0.1  # the reference's 25-epoch steps
    with pytest.raises(ValueError, match="every=0"):
        pruning_sparsity(3, every=0, step=0.1, target=0.9)


def test_exact_global_density_after_each_pruning_event():
    """Each event of the schedule prunes the survivors (by |θ|) to exactly round(s_e * N) of
    the N kernel entries, a pruned weight never returns, and the result is the global
    magnitude mask drawn from scratch (pruned weights are 0, the smallest magnitudes)."""
    net = create("cnn1d", input_shape=(40,), num_classes=10, channels=(8, 8))
    params = net.init(jax.random.key(0))[0]
    kernels = lambda tree: [x for p, x in zip(*leaves_with_paths(tree)[:2]) if p.endswith("kernel")]
    total = sum(x.size for x in kernels(params))
    mask = lj.ones_like(params)
    event = jax.jit(prune_to_sparsity, static_argnums=2)
    for epoch in range(12):
        sparsity = pruning_sparsity(epoch, every=3, step=0.1, target=0.9)
        new = event(params, mask, sparsity)
        assert sum(int(m.sum()) for m in kernels(new)) == total - round(sparsity * total), epoch
        assert all(bool(jnp.all(n <= m)) for n, m in zip(jax.tree.leaves(new), jax.tree.leaves(mask)))  # only shrinks
        reference = lj.prune_global(lj.magnitude(params), lj.ones_like(params), sparsity, prunable=lambda p, x: p.endswith("kernel"))
        assert all(bool(jnp.array_equal(a, b)) for a, b in zip(kernels(new), kernels(reference))), epoch
        mask = new
        params = lj.apply_mask(params, mask)
    # A mask that already prunes more than the schedule asks is left alone (nothing regrows).
    sparse = prune_to_sparsity(params, mask, 0.2)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(sparse), jax.tree.leaves(mask)))
    with pytest.raises(ValueError, match="sparsity=1.0"):
        prune_to_sparsity(params, mask, 1.0)


def test_flops_weighted_warmed_up_penalty_gradient_is_rho_t_pi_sign_gamma():
    params = {"bn0": {"scale": jnp.array([0.5, -2.0, 0.0]), "bias": jnp.ones(3)},
              "bn1": {"scale": jnp.array([-1.0, 3.0]), "bias": jnp.ones(2)}}
    weights = {"bn0/scale": 0.25, "bn1/scale": 0.5}
    rho = optax.linear_schedule(0.0, 0.2, transition_steps=4)
    tx = slimming_penalty(rho, layer_weights=weights)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    for t in range(6):
        updates, state = update(zero, state, params)
        r = 0.2 * min(t, 4) / 4
        np.testing.assert_allclose(updates["bn0"]["scale"], r * 0.25 * np.array([1, -1, 0]), rtol=1e-6)
        np.testing.assert_allclose(updates["bn1"]["scale"], r * 0.5 * np.array([-1, 1]), rtol=1e-6)
        assert float(jnp.abs(updates["bn0"]["bias"]).sum()) == 0.0
    # The same gradient as autodiff of ρ Σ_l π_l Σ|γ_l| (γ away from 0).
    penalty = lambda p: 0.2 * sum(w * jnp.abs(p[k.split("/")[0]]["scale"]).sum() for k, w in weights.items())
    grads = jax.grad(penalty)(params)
    np.testing.assert_allclose(updates["bn1"]["scale"], grads["bn1"]["scale"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"missing \['bn1/scale'\]"):
        slimming_penalty(0.1, layer_weights={"bn0/scale": 1.0}).init(params)


def test_flops_weights_are_each_layers_per_channel_share():
    net = create("cnn1d", input_shape=(40,), num_classes=10, channels=(4, 8, 2))
    params = net.init(jax.random.key(0))[0]
    w = flops_weights(params, "cnn1d", input_shape=(40,), channels=(4, 8, 2))
    # lengths 40 -> 20 -> 10 -> 5; conv FLOPs 2*k*cin*cout*L; output 2*(5*2)*10
    conv = [2 * 5 * 1 * 4 * 20, 2 * 5 * 4 * 8 * 10, 2 * 5 * 8 * 2 * 5]
    total = sum(conv) + 2 * 10 * 10
    assert w == pytest.approx({f"bn{i}/scale": c / width / total for i, (c, width) in enumerate(zip(conv, (4, 8, 2)))})


def test_channel_removal_needs_both_gamma_and_its_average_small():
    params = {"bn0": {"scale": jnp.array([1.0, 0.5, 0.5, 0.5]), "bias": jnp.zeros(4)}}
    averages = update_scale_averages(None, params)
    for _ in range(3):  # γ of channels 1 and 2 collapse; their averages decay more slowly
        params["bn0"]["scale"] = jnp.array([1.0, 0.0, 0.0, 0.5])
        averages = update_scale_averages(averages, params, decay=0.1)
    averages["bn0/scale"] = averages["bn0/scale"].at[2].set(0.01)  # channel 2's average still above 1e-3
    keep = removable_channels(params, averages, threshold=1e-3)["bn0/scale"]
    assert keep.tolist() == [True, False, True, True]
    dead = {"bn0": {"scale": jnp.zeros(4).at[3].set(1e-5), "bias": jnp.zeros(4)}}
    assert removable_channels(dead, update_scale_averages(None, dead))["bn0/scale"].tolist() == [False] * 3 + [True]
    with pytest.raises(ValueError, match="rebuilt"):
        update_scale_averages({"bn0/scale": jnp.zeros(3)}, params)


def test_rebuilt_layers_reactivate_or_keep_their_masks():
    params = {"conv0": {"kernel": jnp.arange(12.0).reshape(1, 3, 4)}, "bn0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
              "conv1": {"kernel": jnp.ones((1, 4, 2))}, "bn1": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
              "output": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    mask = jax.tree.map(lambda x: jnp.arange(x.size).reshape(x.shape) % 3 != 0, params)
    plan = channel_plan("cnn1d", {"bn0/scale": jnp.array([True, False, True, True])}, params)
    shrunk = shrink(plan, mask)
    kept = rebuilt_mask(mask, shrunk, reactivate=False)
    back = rebuilt_mask(mask, shrunk, reactivate=True)
    assert kept is shrunk
    for layer in ("conv0", "conv1"):  # rebuilt (shape changed): all ones
        assert bool(back[layer]["kernel"].all()) and not bool(kept[layer]["kernel"].all())
    for layer in ("output",):  # same shape: keeps its mask
        assert bool(jnp.array_equal(back[layer]["kernel"], mask[layer]["kernel"]))
    np.testing.assert_array_equal(kept["conv0"]["kernel"], np.asarray(mask["conv0"]["kernel"])[..., [0, 2, 3]])
    with pytest.raises(ValueError, match="same tree structure"):
        rebuilt_mask({"a": mask["conv0"]}, shrunk, reactivate=True)


def test_running_averages_follow_the_channels_a_plan_keeps():
    averages = {"bn0/scale": jnp.array([0.1, 0.2, 0.3, 0.4]), "bn1/scale": jnp.array([1.0, 2.0])}
    out = shrink_averages({"bn0": np.array([1, 3]), "bn1": np.array([0, 1])}, averages)
    np.testing.assert_allclose(out["bn0/scale"], [0.2, 0.4])
    np.testing.assert_allclose(out["bn1/scale"], [1.0, 2.0])
    with pytest.raises(ValueError, match="no layer 'bn1'"):
        shrink_averages({"bn0": np.array([0])}, averages)


def test_event_epochs():
    assert [e for e in range(1, 43) if event_due(e, every=6, start=4, stop=28)] == [4, 10, 16, 22, 28]
    assert [e for e in range(1, 10) if event_due(e, every=3)] == [3, 6, 9]  # pruning events of the small config
    with pytest.raises(ValueError, match="every=0"):
        event_due(3, every=0)
