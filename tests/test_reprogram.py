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
