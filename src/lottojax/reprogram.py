"""Reprogramming a ticket to a new task: the pieces of Misra et al. as pure functions.

A frozen source network (a ticket, in evaluation mode) is reused for a target task by
training only a new head (*linear probing*) or only an input perturbation (*visual
prompting*: the target input is zero-padded into the source input shape and
``sigmoid(P)`` is added outside the image area; source classes are mapped to target
classes by :func:`frequency_label_mapping`). Calibration is measured by
:func:`expected_calibration_error` on probabilities; few-shot data by
:func:`n_shot_indices`.

Examples:
  >>> import jax.numpy as jnp
  >>> pad_into(jnp.ones((1, 2, 2, 1)), (5, 5, 1))[0, :, :, 0].astype(int).tolist()
  [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_shapes(target_shape: Sequence[int], source_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis the zero padding ``(before, after)`` that centres ``target`` in ``source``;
    an odd difference puts the extra row/column after."""
    target_shape, source_shape = tuple(target_shape), tuple(source_shape)
    if len(target_shape) != len(source_shape) or any(t > s for t, s in zip(target_shape, source_shape)):
        raise ValueError(f"target input shape {target_shape} must fit inside source input shape {source_shape} "
                         "(same rank, no larger along any axis)")
    return [((s - t) // 2, s - t - (s - t) // 2) for t, s in zip(target_shape, source_shape)]


def pad_into(x: jax.Array, source_shape: Sequence[int]) -> jax.Array:
    """Zero-pads a batch ``x`` of shape ``(N, *target_shape)`` into ``(N, *source_shape)``,
    the target centred (an odd difference leaves the extra row or column after it)."""
    return jnp.pad(x, [(0, 0)] + _check_shapes(x.shape[1:], source_shape))


def prompt_area(target_shape: Sequence[int], source_shape: Sequence[int]) -> np.ndarray:
    """Bool ``source_shape``: True outside the padded target input (where the prompt acts).

    Examples:
      >>> prompt_area((1,), (4,)).tolist()
      [True, False, True, True]
    """
    pads = _check_shapes(target_shape, source_shape)
    inside = np.zeros(tuple(source_shape), bool)
    inside[tuple(slice(before, s - after) for (before, after), s in zip(pads, source_shape))] = True
    return ~inside


def visual_prompt(prompt: jax.Array, x: jax.Array, source_shape: Sequence[int]) -> jax.Array:
    """``pad_into(x) + sigmoid(prompt)`` outside the image area; ``prompt`` has
    ``source_shape`` (its entries inside the image area have no effect)."""
    if tuple(prompt.shape) != tuple(source_shape):
        raise ValueError(f"prompt has shape {prompt.shape}; it must have the source input shape {tuple(source_shape)}")
    area = jnp.asarray(prompt_area(x.shape[1:], source_shape))
    return pad_into(x, source_shape) + jnp.where(area, jax.nn.sigmoid(prompt), 0.0)


def label_counts(source_logits: jax.Array, labels: jax.Array, num_target: int) -> jax.Array:
    """``counts[s, t]``: target-class-``t`` examples whose source prediction is ``s``."""
    predicted = jnp.argmax(source_logits, axis=-1)
    return jnp.zeros((source_logits.shape[-1], num_target), jnp.int32).at[predicted, labels].add(1)


def frequency_label_mapping(source_logits: jax.Array, labels: jax.Array, num_target: int) -> jax.Array:
    """Greedy frequency label mapping: ``mapping[t]`` is the source class read as target
    class ``t``. Repeatedly takes the largest entry of :func:`label_counts` (ties: the lowest
    source class, then the lowest target class), assigns that target to that source, and
    removes both. Jittable (``num_target`` static).

    Examples:
      >>> # label_counts [[5, 1], [4, 0], [0, 3]] (source x target), as in PAPERS.md §10
      >>> logits = np.eye(3)[np.repeat([0, 0, 1, 2], [5, 1, 4, 3])]
      >>> labels = np.repeat([0, 1, 0, 1], [5, 1, 4, 3])
      >>> frequency_label_mapping(logits, labels, 2).tolist()
      [0, 2]
    """
    num_source = source_logits.shape[-1]
    if num_target > num_source:
        raise ValueError(f"num_target={num_target} exceeds the {num_source} source classes: "
                         "a one-to-one mapping needs at least as many source classes")
    counts = label_counts(source_logits, labels, num_target)

    def assign(i, carry):
        counts, mapping = carry
        best = jnp.argmax(counts.reshape(-1))  # first maximum in (source, target) order
        s, t = best // num_target, best % num_target
        counts = counts.at[s, :].set(-1).at[:, t].set(-1)
        return counts, mapping.at[t].set(s)

    _, mapping = jax.lax.fori_loop(0, num_target, assign, (counts, jnp.zeros((num_target,), jnp.int32)))
    return mapping


def mapped_logits(source_logits: jax.Array, mapping: jax.Array) -> jax.Array:
    """Target logits: the source logits of the mapped classes, ``(N, num_target)``."""
    return jnp.take(source_logits, mapping, axis=-1)


def expected_calibration_error(probs: jax.Array, labels: jax.Array, num_bins: int = 15) -> jax.Array:
    """ECE on softmax *probabilities*: examples binned by confidence (the top probability)
    into ``num_bins`` equal bins of ``(0, 1]``; the mean over examples of
    ``|accuracy − confidence|`` of their bin, i.e. ``Σ_b |B_b| / N · |acc_b − conf_b|``.

    Concrete inputs are checked to be probabilities (the reference code passes logits).

    Examples:
      >>> expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1])).round(4)
      Array(0.4, dtype=float32)
    """
    probs = jnp.asarray(probs)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs {probs.shape} must be (N, classes) and labels {labels.shape} (N,)")
    if not isinstance(probs, jax.core.Tracer):
        values = np.asarray(probs)
        if values.min() < 0 or not np.allclose(values.sum(-1), 1.0, atol=1e-3):
            raise ValueError("probs must be probabilities (non-negative rows summing to 1): "
                             "pass jax.nn.softmax(logits), not logits")
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(jnp.float32)
    bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    gap = jnp.zeros(num_bins).at[bins].add(correct - confidence)  # |B_b| (acc_b − conf_b) per bin
    return jnp.sum(jnp.abs(gap)) / probs.shape[0]


def n_shot_indices(key: jax.Array, labels, n: int) -> np.ndarray:
    """Indices of ``n`` examples of every class, drawn without replacement by ``key``,
    sorted. ``labels`` may be a list or an array of class indices.

    Examples:
      >>> n_shot_indices(jax.random.key(0), [0, 1, 0, 1, 1, 0], 2).size
      4
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or n < 1:
        raise ValueError(f"labels must be a non-empty 1-D list or array and n >= 1 (got shape {labels.shape}, n={n})")
    chosen = []
    for k, c in enumerate(np.unique(labels)):
        members = np.flatnonzero(labels == c)
        if members.size < n:
            raise ValueError(f"class {c} has {members.size} examples; n={n} shots need at least n per class")
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, k), members.size))
        chosen.append(members[order[:n]])
    return np.sort(np.concatenate(chosen))
