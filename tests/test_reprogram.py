"""Reprogramming pieces: frequency label mapping on hand-worked counts (ties included), ECE
at its two extremes and against a direct per-bin reference, prompt padding geometry with odd
differences, and n-shot sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax.reprogram import (expected_calibration_error, frequency_label_mapping, label_counts, mapped_logits,
                                n_shot_indices, pad_into, prompt_area, visual_prompt)


def _from_counts(counts):
    """Logits and labels whose label_counts are ``counts`` (source x target)."""
    counts = np.asarray(counts)
    sources, targets = np.nonzero(counts)
    reps = counts[sources, targets]
    logits = np.eye(counts.shape[0], dtype=np.float32)[np.repeat(sources, reps)]
    return jnp.asarray(logits), jnp.asarray(np.repeat(targets, reps))


@pytest.mark.parametrize("counts, expected", [
    ([[5, 1], [4, 0], [0, 3]], [0, 2]),  # PAPERS.md §10
    ([[2, 2], [2, 2]], [0, 1]),  # all tied: (source 0, target 0) first, then (1, 1)
    ([[0, 3, 0], [3, 0, 0], [0, 0, 1], [0, 0, 2]], [1, 0, 3]),  # target 2 takes the larger of 1 and 2
    ([[4, 4, 0], [0, 0, 0], [0, 0, 0]], [0, 1, 2]),  # the tie goes to the lowest target; leftovers pair in order
])
def test_frequency_label_mapping_by_hand(counts, expected):
    logits, labels = _from_counts(counts)
    np.testing.assert_array_equal(label_counts(logits, labels, len(counts[0])), counts)
    mapping = jax.jit(frequency_label_mapping, static_argnums=2)(logits, labels, len(counts[0]))
    assert mapping.tolist() == expected
    assert len(set(mapping.tolist())) == len(expected), "one-to-one"
    np.testing.assert_array_equal(mapped_logits(logits, mapping), np.asarray(logits)[:, expected])


def test_frequency_label_mapping_needs_enough_source_classes():
    with pytest.raises(ValueError, match="num_target=3 exceeds the 2 source classes"):
        frequency_label_mapping(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), 3)


def test_ece_is_zero_when_calibrated_and_one_when_confidently_wrong():
    # Calibrated: in every bin, the fraction correct equals the confidence (0.6 and 0.8 here).
    probs = np.array([[0.6, 0.4]] * 5 + [[0.2, 0.8]] * 5, np.float32)
    labels = np.array([0, 0, 0, 1, 1] + [1, 1, 1, 1, 0])
    assert float(expected_calibration_error(probs, labels)) == pytest.approx(0.0, abs=1e-6)
    wrong = np.array([[1.0, 0.0, 0.0]] * 4, np.float32)
    assert float(expected_calibration_error(wrong, np.array([1, 2, 1, 2]))) == pytest.approx(1.0)


def test_ece_matches_a_per_bin_reference():
    logits = jax.random.normal(jax.random.key(0), (300, 5)) * 3
    probs = np.asarray(jax.nn.softmax(logits))
    labels = np.asarray(jax.random.randint(jax.random.key(1), (300,), 0, 5))
    conf, correct = probs.max(1), probs.argmax(1) == labels
    ref = 0.0
    for b in range(15):
        in_bin = (conf > b / 15) & (conf <= (b + 1) / 15)
        if in_bin.any():
            ref += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert float(jax.jit(expected_calibration_error)(jnp.asarray(probs), jnp.asarray(labels))) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="not logits"):
        expected_calibration_error(np.asarray(logits), labels)


def test_prompt_padding_geometry_with_odd_differences():
    x = jnp.arange(1, 1 + 2 * 3 * 1, dtype=jnp.float32).reshape(1, 2, 3, 1)
    padded = pad_into(x, (5, 6, 1))  # height: 1 before, 2 after; width: 1 before, 2 after
    assert padded.shape == (1, 5, 6, 1)
    np.testing.assert_array_equal(padded[0, 1:3, 1:4, 0], x[0, :, :, 0])
    assert float(jnp.abs(padded).sum()) == float(x.sum())
    area = prompt_area((2, 3, 1), (5, 6, 1))
    assert area.sum() == 30 - 6 and not area[1:3, 1:4].any()
    # 14 x 14 inside 28 x 28: 7 on each side; the prompt adds sigmoid(P) only outside
    prompt = jnp.zeros((28, 28, 1))
    out = visual_prompt(prompt, jnp.ones((2, 14, 14, 1)), (28, 28, 1))
    np.testing.assert_array_equal(out[:, 7:21, 7:21], 1.0)
    assert float(out[0, 0, 0, 0]) == 0.5 and float(out[1, 27, 27, 0]) == 0.5
    grad = jax.grad(lambda p: visual_prompt(p, jnp.ones((1, 14, 14, 1)), (28, 28, 1)).sum())(prompt)
    assert float(jnp.abs(grad[7:21, 7:21]).sum()) == 0.0 and float(grad[0, 0, 0]) == 0.25
    with pytest.raises(ValueError, match="must fit inside"):
        pad_into(jnp.ones((1, 30, 3, 1)), (28, 28, 1))
    with pytest.raises(ValueError, match="source input shape"):
        visual_prompt(jnp.zeros((28, 28)), jnp.ones((1, 14, 14, 1)), (28, 28, 1))


@pytest.mark.parametrize("as_list", [True, False])
def test_n_shot_takes_exactly_n_per_class(as_list):
    labels = np.repeat(np.arange(4), [7, 3, 5, 9])
    np.random.default_rng(0).shuffle(labels)
    picked = n_shot_indices(jax.random.key(5), labels.tolist() if as_list else labels, 3)
    assert np.bincount(labels[picked]).tolist() == [3, 3, 3, 3] and len(set(picked.tolist())) == 12
    np.testing.assert_array_equal(picked, n_shot_indices(jax.random.key(5), labels, 3))
    assert not np.array_equal(picked, n_shot_indices(jax.random.key(6), labels, 3))
    with pytest.raises(ValueError, match="class 1 has 3 examples"):
        n_shot_indices(jax.random.key(0), labels, 4)


# --- the trainable pieces: fit, linear probing, visual prompting -----------------------------

import optax  # noqa: E402

from lottojax.models import create  # noqa: E402
from lottojax.reprogram import (fit, linear_probe, source_features, source_logits,  # noqa: E402
                                visual_prompting)


def test_frequency_label_mapping_is_greedy_not_the_best_assignment():
    # The optimal one-to-one assignment (target 0 <- 1, target 1 <- 0) would cover 8 + 9 = 17
    # examples; greedy takes the largest count (10, source 0 -> target 0) first and leaves
    # target 1 the only source left, whose count is 0: 10 in all.
    logits, labels = _from_counts([[10, 9], [8, 0]])
    assert frequency_label_mapping(logits, labels, 2).tolist() == [0, 1]


def test_ece_hand_worked():
    # 15 bins: confidences 0.9, 0.9 share a bin (accuracy 1/2: |0.5 - 0.9| x 2/4 = 0.2);
    # 0.6 alone, correct (|1 - 0.6| x 1/4 = 0.1); 0.7 alone, correct (|1 - 0.7| x 1/4 = 0.075).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 0, 1])
    assert float(expected_calibration_error(probs, labels)) == pytest.approx(0.375, abs=1e-6)
    # One bin only: all four land in (0.6, 2/3]: |3/4 - 0.65| = 0.1; with 2 bins they split.
    probs = np.array([[0.65, 0.35]] * 4, np.float32)
    assert float(expected_calibration_error(probs, np.array([0, 0, 0, 1]))) == pytest.approx(0.1, abs=1e-6)


def test_n_shot_exact_counts_for_ten_classes():
    labels = np.asarray(jax.random.randint(jax.random.key(3), (500,), 0, 10))
    picked = n_shot_indices(jax.random.key(1), labels, 10)
    assert picked.shape == (100,) and (np.diff(picked) > 0).all()
    assert np.bincount(labels[picked], minlength=10).tolist() == [10] * 10


def _blobs(key, n_per_class, num_classes, dim, spread, noise=1):
    """Gaussian clusters around centres drawn by ``key``; ``noise`` picks the draw around them."""
    centres = jax.random.normal(jax.random.fold_in(key, 0), (num_classes, dim)) * 3
    y = jnp.repeat(jnp.arange(num_classes), n_per_class)
    x = centres[y] + spread * jax.random.normal(jax.random.fold_in(key, noise), (len(y), dim))
    return x, y


def test_linear_probe_on_separable_features_reaches_high_accuracy():
    x, y = _blobs(jax.random.key(0), 60, 4, 6, 0.3)
    x_test, y_test = _blobs(jax.random.key(0), 20, 4, 6, 0.3, noise=2)  # same centres, fresh noise
    lp = linear_probe(lambda z: z, source_shape=(6,), num_classes=4)
    state, history = fit(lp, jax.random.key(1), x, y, x_test, y_test, optimizer=optax.adam(0.05), epochs=30,
                         batch_size=40)
    assert float(history.test_accuracy[-1]) >= 0.97
    assert float(history.test_loss[-1]) < float(history.test_loss[0])
    assert state.mapping.tolist() == [0, 1, 2, 3]  # a head needs no label mapping
    assert set(state.trainable) == {"kernel", "bias"} and state.trainable["kernel"].shape == (6, 4)


def test_visual_prompting_finds_the_relabelling_and_the_prompt_stays_outside():
    # Source "network": the logits are the middle three entries of the 5-long input (where a
    # 3-long target lands); target class c is the one-hot e_c, relabelled by a permutation.
    # The frequency mapping must read target label perm[c] from source class c.
    perm = np.array([2, 0, 1])
    x = jnp.asarray(np.eye(3, dtype=np.float32)[np.repeat(np.arange(3), 10)])
    y = jnp.asarray(perm[np.repeat(np.arange(3), 10)])
    vp = visual_prompting(lambda z: 5.0 * z[:, 1:4], source_shape=(5,), num_classes=3)
    state, history = fit(vp, jax.random.key(0), x, y, x, y, optimizer=optax.adam(0.1), epochs=3, batch_size=10)
    assert state.mapping.tolist() == np.argsort(perm).tolist()
    assert history.test_accuracy.tolist() == [1.0, 1.0, 1.0]
    # This source ignores the prompt area: no gradient reaches the prompt at all.
    np.testing.assert_array_equal(state.trainable, np.zeros(5))


def test_fit_trains_only_the_head_or_prompt_of_a_frozen_batchnorm_net():
    model = create("cnn1d", input_shape=(40,), channels=(4, 4))
    params, model_state = model.init(jax.random.key(0))
    # Non-trivial running statistics, so that evaluation mode is visible.
    model_state = jax.tree.map(lambda s: s + 0.5 * jax.random.uniform(jax.random.key(1), s.shape), model_state)
    frozen = jax.tree.map(np.array, (params, model_state))  # copies
    x, y = _blobs(jax.random.key(2), 20, 3, 30, 1.0)
    logits = source_logits(model, params, model_state)
    # Evaluation mode: a row's logits do not depend on the rest of the batch.
    padded = jnp.pad(x, ((0, 0), (5, 5)))
    np.testing.assert_allclose(logits(padded[:1]), logits(padded)[:1], rtol=1e-5, atol=1e-6)
    area = prompt_area((30,), (40,))
    for method in (linear_probe(source_features(model, params, model_state), source_shape=(40,), num_classes=3),
                   visual_prompting(logits, source_shape=(40,), num_classes=3)):
        state, history = jax.jit(lambda key: fit(method, key, x, y, x, y, optimizer=optax.adam(0.05), epochs=4,
                                                 batch_size=15))(jax.random.key(3))
        for before, after in zip(jax.tree.leaves(frozen), jax.tree.leaves((params, model_state))):
            np.testing.assert_array_equal(before, after)  # bitwise: nothing of the backbone moved
        assert np.isfinite(np.asarray(history.train_loss)).all()
        if isinstance(state.trainable, dict):  # linear probing: the head is all that was trained
            assert state.trainable["kernel"].shape == (4 * 10, 3)  # 4 channels x length 10
        else:  # visual prompting: only the area outside the image moved; inside it stays 0
            prompt = np.asarray(state.trainable)
            assert prompt.shape == (40,)
            assert (prompt[~area] == 0).all() and (prompt[area] != 0).all()
            np.testing.assert_array_equal(visual_prompt(state.trainable, x, (40,))[:, 5:35], x)
