"""Early-Bird core: distances by hand, the detector on crafted sequences and against an
independent reference, exact channel masks, the slimming penalty."""
import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lottojax.early_bird import (
    bn_scales,
    channel_mask,
    detect_early_bird,
    early_bird_detector,
    hamming_distance,
    is_bn_scale,
    mask_distance_matrix,
    slimming_penalty,
    weight_mask,
)


def b(*bits):
    return jnp.array(bits, bool)


# ---------------------------------------------------------------- distances


def test_hamming_distance_of_weight_masks_by_hand():
    a = {"fc0": {"kernel": jnp.array([[1, 0, 1], [1, 1, 0]], bool)}, "output": {"kernel": b(1, 1)}}
    c = {"fc0": {"kernel": jnp.array([[1, 1, 1], [0, 1, 0]], bool)}, "output": {"kernel": b(0, 1)}}
    # 3 of the 8 entries differ: fc0 (0,1), (1,0) and output[0]; a pooled fraction, not a mean of 2/6 and 1/2.
    assert float(hamming_distance(a, c)) == pytest.approx(3 / 8)
    assert float(jax.jit(hamming_distance)(a, c)) == pytest.approx(3 / 8)
    assert float(hamming_distance(a, a)) == 0.0


def test_hamming_distance_of_channel_masks_by_hand():
    a = {"bn0/scale": b(1, 1, 1, 0), "bn1/scale": b(1, 0)}
    c = {"bn0/scale": b(0, 1, 1, 1), "bn1/scale": b(0, 1)}
    assert float(hamming_distance(a, c)) == pytest.approx(4 / 6)
    flipped = jax.tree.map(jnp.logical_not, a)
    assert float(hamming_distance(a, flipped)) == 1.0


def test_hamming_distance_names_the_mismatching_leaf():
    with pytest.raises(ValueError, match="bn1/scale has shape"):
        hamming_distance({"bn1/scale": b(1, 0)}, {"bn1/scale": b(1, 0, 1)})


def test_distance_matrix_is_the_pairwise_distance():
    history = jax.random.bernoulli(jax.random.key(0), 0.5, (6, 4, 5))
    matrix = np.asarray(mask_distance_matrix({"w": history}))
    expected = np.array([[np.mean(np.asarray(history[i] != history[j])) for j in range(6)] for i in range(6)])
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 0)


# ---------------------------------------------------------------- the detector


def reference_detect(masks, window, eps):
    """The paper's rule in plain Python: a deque of the last `window` masks; fire at the first
    mask whose distances to all `window - 1` older masks are < eps."""
    queue = collections.deque(maxlen=window)
    for t, mask in enumerate(masks):
        queue.append(np.asarray(mask))
        if len(queue) == window:
            if all(np.mean(queue[-1] != old) < eps for old in list(queue)[:-1]):
                return t
    return -1


def run_detector(masks, window, eps):
    detector = early_bird_detector(window, eps)
    state = detector.init(masks[0])
    update = jax.jit(detector.update)
    epochs = []
    for t, mask in enumerate(masks):
        state = update(state, mask, t)
        epochs.append(int(state.epoch))
    return epochs, state


def test_detector_fires_exactly_when_the_window_is_all_below_eps():
    # 10 channels: one flipped channel is a distance of 0.1; eps = 0.25 allows two.
    base = np.ones(10, bool)

    def flip(*idx):
        m = base.copy()
        m[list(idx)] = False
        return jnp.asarray(m)

    masks = [
        flip(0, 1, 2, 3, 4, 5),  # t=0
        flip(0, 1, 2),  # t=1: the window (3) is not full yet
        flip(0, 1),  # t=2: 0.1 to t=1 but 0.4 to t=0
        flip(0),  # t=3: window t=1..3: 0.2 to t=1, 0.1 to t=2 -> all < 0.25: fires here
        flip(5, 6, 7),  # t=4: far from everything; the ticket stays at t=3
    ]
    epochs, state = run_detector(masks, window=3, eps=0.25)
    assert epochs == [-1, -1, -1, 3, 3]
    assert reference_detect(masks, 3, 0.25) == 3
    np.testing.assert_allclose(state.distances, [0.5, 0.4])  # t=4 vs t=2 and t=3


def test_detector_never_fires_early_and_distance_equal_to_eps_does_not_count():
    ones = jnp.ones(10, bool)
    # All masks equal: distance 0 < eps from the start, so it fires as soon as the window fills.
    epochs, state = run_detector([ones] * 6, window=5, eps=0.1)
    assert epochs == [-1, -1, -1, -1, 4, 4]
    # Exactly eps apart (0.1 = one channel of 10) is not "< eps".
    alternating = [ones, ones.at[0].set(False)] * 4
    epochs, _ = run_detector(alternating, window=2, eps=0.1)
    assert epochs == [-1] * 8
    # One old mask in the window far away blocks firing until it has left the window.
    far = ones.at[:5].set(False)
    sequence = [ones, far, ones, ones, ones, ones]
    epochs, _ = run_detector(sequence, window=3, eps=0.1)
    assert epochs == [-1, -1, -1, -1, 4, 4]
    assert reference_detect(sequence, 3, 0.1) == 4


def test_detector_distances_are_nan_until_the_slots_fill():
    detector = early_bird_detector(window=4, eps=0.5)
    state = detector.init(b(1, 0))
    state = detector.update(state, b(1, 0), 0)
    assert np.isnan(state.distances).tolist() == [True, True, True]
    state = detector.update(state, b(0, 0), 1)
    assert np.isnan(state.distances).tolist() == [True, True, False]
    assert float(state.distances[-1]) == 0.5 and int(state.seen) == 2


@functools.lru_cache(maxsize=None)
def jitted_detect(window, eps):
    return jax.jit(lambda masks: detect_early_bird({"bn0/scale": masks}, window=window, eps=eps))


@settings(max_examples=30, deadline=None)
@given(
    bits=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=12, max_size=12),
    window=st.sampled_from([2, 5]),
    eps=st.sampled_from([0.2, 0.5]),
    settle=st.integers(0, 12),
)
def test_scan_detection_matches_the_reference(bits, window, eps, settle):
    masks = np.array(bits, bool)
    masks[settle:] = masks[min(settle, 11)]  # often settles, so firing is exercised too
    epoch, distances = jitted_detect(window, eps)(jnp.asarray(masks))
    assert int(epoch) == reference_detect(list(masks), window, eps)
    for t in range(len(masks)):
        for j in range(window - 1):  # slot j holds mask t - (window - 1) + j
            older = t - (window - 1) + j
            if older < 0:
                assert np.isnan(distances[t, j])
            else:
                assert float(distances[t, j]) == pytest.approx(np.mean(masks[t] != masks[older]), abs=1e-6)


def test_vmapped_detection_equals_per_seed_and_labels_epochs():
    histories = jax.random.bernoulli(jax.random.key(3), 0.9, (4, 10, 8))  # seeds, epochs, channels
    histories = histories.at[:, 6:].set(histories[:, 6:7])  # every seed settles from epoch 6
    histories = histories.at[2].set(True)  # seed 2 never changes
    labels = jnp.arange(1, 11)
    detect = jax.jit(lambda h: detect_early_bird({"m": h}, window=3, eps=0.1, epochs=labels))
    batched_epoch, batched_distances = jax.vmap(detect)(histories)
    for seed in range(4):
        epoch, distances = detect(histories[seed])
        assert int(batched_epoch[seed]) == int(epoch)
        chex.assert_trees_all_equal(batched_distances[seed], distances)
    assert int(batched_epoch[2]) == 3  # epochs are labelled 1..10: fires at the third mask
    assert np.all(np.asarray(batched_epoch) <= 9)  # two more identical masks suffice after epoch 7


def test_detectors_vmap_over_ratios_in_one_carry():
    gammas = jax.random.normal(jax.random.key(0), (5, 12))  # five epochs of 12 BN scales
    ratios = jnp.array([0.25, 0.5, 0.75])
    detector = early_bird_detector(window=2, eps=0.5)
    masks = jax.vmap(lambda g: jax.vmap(lambda r: channel_mask({"bn0": {"scale": g}}, r))(ratios))(gammas)
    state = jax.vmap(detector.init)(jax.tree.map(lambda m: m[0], masks))
    for t in range(5):
        state = jax.vmap(detector.update, (0, 0, None))(state, jax.tree.map(lambda m: m[t], masks), t)
    for r in range(3):
        epoch, _ = detect_early_bird(jax.tree.map(lambda m: m[:, r], masks), window=2, eps=0.5)
        assert int(state.epoch[r]) == int(epoch)


def test_detector_rejects_bad_settings_and_masks():
    with pytest.raises(ValueError, match="window"):
        early_bird_detector(window=1)
    with pytest.raises(ValueError, match="eps"):
        early_bird_detector(eps=0.0)
    detector = early_bird_detector(window=2)
    state = detector.init({"a": b(1, 0)})
    with pytest.raises(ValueError, match="a has shape"):
        detector.update(state, {"a": b(1, 0, 1)}, 0)
    with pytest.raises(ValueError, match="epochs has shape"):
        detect_early_bird(jnp.ones((3, 2), bool), epochs=jnp.arange(4))


# ---------------------------------------------------------------- masks


def bn_params(*scales):
    params = {}
    for i, s in enumerate(scales):
        s = jnp.asarray(s, jnp.float32)
        params[f"conv{i}"] = {"kernel": jnp.ones((3, 2, s.shape[0]))}
        params[f"bn{i}"] = {"scale": s, "bias": jnp.zeros_like(s)}
    params["output"] = {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}
    return params


def test_channel_mask_by_hand_with_a_tie():
    params = bn_params([0.5, -0.1, 0.3], [0.2, 0.2, -0.9, 0.05])
    # 7 channels, ratio 0.4: round(2.8) = 3 go: 0.05, |-0.1|, and of the tied 0.2s the first (bn1[0]).
    mask = channel_mask(params, 0.4)
    assert list(mask) == ["bn0/scale", "bn1/scale"]
    np.testing.assert_array_equal(mask["bn0/scale"], [True, False, True])
    np.testing.assert_array_equal(mask["bn1/scale"], [False, True, True, False])


SIZES = (3, 5, 8, 1)
exact_channel_mask = jax.jit(lambda gammas, ratio: channel_mask(bn_params(*gammas), ratio))


@settings(max_examples=30, deadline=None)
@given(ratio=st.floats(0.0, 0.95), seed=st.integers(0, 999))
def test_channel_mask_keeps_the_exact_count_over_all_layers(ratio, seed):
    keys = jax.random.split(jax.random.key(seed), len(SIZES))
    # Scales on a coarse grid: many exact ties across layers.
    gammas = [jnp.round(jax.random.normal(k, (n,)) * 2) / 2 for k, n in zip(keys, SIZES)]
    mask = exact_channel_mask(gammas, ratio)
    total = sum(SIZES)
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == total - int(np.round(np.float32(ratio) * np.float32(total)))
    # Every kept |gamma| is >= every pruned one (one global threshold).
    flat_gammas = np.abs(np.concatenate([np.asarray(g) for g in gammas]))
    flat = np.concatenate([np.asarray(mask[f"bn{i}/scale"]) for i in range(len(SIZES))])
    if flat.any() and (~flat).any():
        assert flat_gammas[flat].min() >= flat_gammas[~flat].max()


def test_channel_mask_vmaps_over_ratios_and_is_deterministic_on_ties():
    params = bn_params(jnp.ones(4), jnp.ones(4))  # all tied: the earliest channels in tree order go first
    masks = jax.jit(jax.vmap(lambda r: channel_mask(params, r)))(jnp.array([0.25, 0.5, 0.75]))
    np.testing.assert_array_equal(masks["bn0/scale"], [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(masks["bn1/scale"], [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])


def test_bn_scale_selection_and_its_errors():
    params = bn_params([1.0, 2.0])
    assert list(bn_scales(params)) == ["bn0/scale"]
    assert is_bn_scale("stage0_block0/shortcut_bn/scale", jnp.ones(3))
    assert is_bn_scale("BatchNorm_0/scale", jnp.ones(3))
    assert not is_bn_scale("LayerNorm_0/scale", jnp.ones(3))
    with pytest.raises(ValueError, match="select= picks no leaf"):
        channel_mask({"fc0": {"kernel": jnp.ones((2, 2))}}, 0.5)
    with pytest.raises(ValueError, match="outside"):
        channel_mask(params, 1.0)
    custom = channel_mask({"ln": {"scale": jnp.array([1.0, 3.0])}}, 0.5, select=lambda p, x: p == "ln/scale")
    np.testing.assert_array_equal(custom["ln/scale"], [False, True])


def test_weight_mask_counts_only_prunable_leaves():
    params = bn_params([1.0, 2.0], [3.0])
    params["conv0"]["kernel"] = jnp.arange(6.0).reshape(3, 2, 1) - 2.5  # |w| = 2.5 1.5 .5 .5 1.5 2.5
    params["conv1"]["kernel"] = jnp.arange(6.0).reshape(3, 2, 1) * 10
    glob = weight_mask(params, 0.5)
    assert set(glob) == {"conv0/kernel", "conv1/kernel", "output/kernel"}
    assert sum(int(m.sum()) for m in glob.values()) == (6 + 6 + 8) // 2
    layer = weight_mask(params, 0.5, scope="layerwise")
    assert int(layer["conv0/kernel"].sum()) == 3 and int(layer["output/kernel"].sum()) == 4
    np.testing.assert_array_equal(layer["conv0/kernel"].reshape(-1), [1, 0, 0, 0, 1, 1])  # tied 1.5s: index 1 first
    with pytest.raises(ValueError, match="scope"):
        weight_mask(params, 0.5, scope="per-channel")


# ---------------------------------------------------------------- slimming penalty


def test_slimming_penalty_adds_s_sign_gamma_only_to_bn_scales():
    params = bn_params([0.5, -2.0, 0.0], [1.0])
    params["bn0"]["bias"] = jnp.array([1.0, -1.0, 2.0])
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.25), params)
    penalty = slimming_penalty(1e-4)
    updates, _ = jax.jit(penalty.update)(grads, penalty.init(params), params)
    for path_updates, path_grads, path in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree_util.tree_flatten_with_path(params)[0]):
        name = jax.tree_util.keystr(path[0])
        if name.endswith("['scale']"):
            expected = path_grads + 1e-4 * np.sign(np.asarray(path[1]))
            np.testing.assert_array_equal(path_updates, expected.astype(np.float32))
        else:
            np.testing.assert_array_equal(path_updates, path_grads)
    assert float(updates["bn0"]["scale"][2]) == 0.25  # sign(0) = 0


def test_slimming_penalty_composes_in_a_chain():
    params = bn_params([0.5, -2.0])
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = optax.chain(slimming_penalty(0.01), optax.sgd(0.5, momentum=0.9))
    state = tx.init(params)
    updates, state = tx.update(zero, state, params)
    np.testing.assert_allclose(updates["bn0"]["scale"], [-0.005, 0.005])
    updates, state = tx.update(zero, state, params)  # momentum carries the penalty on
    np.testing.assert_allclose(updates["bn0"]["scale"], [-0.005 * 1.9, 0.005 * 1.9], rtol=1e-6)
    assert float(jnp.abs(updates["conv0"]["kernel"]).max()) == 0.0
    with pytest.raises(ValueError, match="needs params"):
        slimming_penalty().update(zero, state[0])
    with pytest.raises(ValueError, match="select= picks no leaf"):
        slimming_penalty().init({"w": jnp.ones((2, 2))})
