"""Reprogramming a ticket to a new task: the pieces of Misra et al. as pure functions.

A frozen source network (a ticket, in evaluation mode) is reused for a target task by
training only a new head (*linear probing*) or only an input perturbation (*visual
prompting*: the target input is zero-padded into the source input shape and
``sigmoid(P)`` is added outside the image area; source classes are mapped to target
classes by :func:`frequency_label_mapping`). Calibration is measured by
:func:`expected_calibration_error` on probabilities; few-shot data by
:func:`n_shot_indices`.

The two ways are values of one type, :class:`Reprogram` (:func:`linear_probe`,
:func:`visual_prompting`), built on a frozen network's :func:`source_features` or
:func:`source_logits`; :func:`fit` trains either (only the head or the prompt: the frozen
weights are closed over, never an argument of ``jax.grad``) as one compiled loop that
recomputes the label mapping at the start of every epoch.

Examples:
  >>> import jax.numpy as jnp
  >>> pad_into(jnp.ones((1, 2, 2, 1)), (5, 5, 1))[0, :, :, 0].astype(int).tolist()
  [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree
from lottojax.robustness import head_features
from lottojax.train import cross_entropy, minibatch_scan, scan_periods


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


def source_logits(model, params, model_state) -> Callable[[jax.Array], jax.Array]:
    """``x -> logits`` of a frozen :class:`lottojax.models.Model` in evaluation mode
    (BatchNorm uses its running statistics, which never change)."""
    return lambda x: model.apply(params, model_state, x, False)[0]


def source_features(model, params, model_state, *, head: str = "output") -> Callable[[jax.Array], jax.Array]:
    """``x -> (N, F)`` features of a frozen linen-built model in evaluation mode: the input
    of its layer ``head`` (every model of :mod:`lottojax.models` names its last Dense layer
    ``'output'``; :func:`lottojax.robustness.head_features`).

    Examples:
      >>> from lottojax.models import create
      >>> model = create('mlp', input_shape=(40,), hidden=(8, 6))
      >>> params, state = model.init(jax.random.key(0))
      >>> source_features(model, params, state)(jnp.ones((3, 40))).shape
      (3, 6)
    """
    return lambda x: head_features(model, params, model_state, x, head=head)[0]


class Reprogram(NamedTuple):
    """One way of reusing a frozen source network for a target task: four pure functions.

    Attributes:
      prepare: target inputs ``(N, *target_shape)`` -> what ``logits`` takes, computed once
        before training (linear probing: the frozen features; visual prompting: the inputs).
      init: ``key -> trainable`` (the head, or the prompt), the only thing trained.
      logits: ``(trainable, prepared, mapping) -> (N, num_classes)`` target logits.
      mapping: ``(trainable, prepared, labels) -> (num_classes,)`` int32 label mapping,
        recomputed by :func:`fit` at the start of every epoch (the identity for a head).
    """

    prepare: Callable[[jax.Array], jax.Array]
    init: Callable[[jax.Array], PyTree]
    logits: Callable[[PyTree, jax.Array, jax.Array], jax.Array]
    mapping: Callable[[PyTree, jax.Array, jax.Array], jax.Array]


def linear_probe(features: Callable[[jax.Array], jax.Array], *, source_shape: Sequence[int],
                 num_classes: int) -> Reprogram:
    """Linear probing: a new linear head on the frozen ``features`` (e.g.
    :func:`source_features`) of the target input zero-padded into ``source_shape``. The
    head starts as PyTorch's ``nn.Linear`` does: ``U(-1/sqrt(F), 1/sqrt(F))``.

    Examples:
      >>> lp = linear_probe(lambda x: x[:, :3], source_shape=(5,), num_classes=2)
      >>> head = lp.init(jax.random.key(0))
      >>> head['kernel'].shape, lp.prepare(jnp.ones((1, 3))).tolist()  # padded (1 before), then features
      ((3, 2), [[0.0, 1.0, 1.0]])
    """
    source_shape = tuple(source_shape)
    num_features = jax.eval_shape(features, jax.ShapeDtypeStruct((1, *source_shape), jnp.float32)).shape[-1]

    def init(key):
        bound = 1.0 / np.sqrt(num_features)
        k_kernel, k_bias = jax.random.split(key)
        return {"kernel": jax.random.uniform(k_kernel, (num_features, num_classes), minval=-bound, maxval=bound),
                "bias": jax.random.uniform(k_bias, (num_classes,), minval=-bound, maxval=bound)}

    return Reprogram(
        prepare=lambda x: features(pad_into(x, source_shape)),
        init=init,
        logits=lambda head, f, mapping: f @ head["kernel"] + head["bias"],
        mapping=lambda head, f, labels: jnp.arange(num_classes, dtype=jnp.int32),
    )


def visual_prompting(logits: Callable[[jax.Array], jax.Array], *, source_shape: Sequence[int],
                     num_classes: int) -> Reprogram:
    """Visual prompting: the target input zero-padded into ``source_shape`` plus
    ``sigmoid(P)`` outside it (:func:`visual_prompt`), read through the frozen source
    ``logits`` (e.g. :func:`source_logits`) and :func:`frequency_label_mapping`. The prompt
    ``P`` starts at zero (a perturbation of 0.5).

    Examples:
      >>> vp = visual_prompting(lambda x: x[:, :3], source_shape=(5,), num_classes=2)
      >>> prompt = vp.init(jax.random.key(0))
      >>> vp.logits(prompt, jnp.ones((1, 3)), jnp.array([2, 0])).tolist()  # source classes 2 and 0
      [[1.0, 0.5]]
    """
    source_shape = tuple(source_shape)
    read = lambda prompt, x: logits(visual_prompt(prompt, x, source_shape))
    return Reprogram(
        prepare=lambda x: x,
        init=lambda key: jnp.zeros(source_shape, jnp.float32),
        logits=lambda prompt, x, mapping: mapped_logits(read(prompt, x), mapping),
        mapping=lambda prompt, x, labels: frequency_label_mapping(read(prompt, x), labels, num_classes),
    )


class ReprogramState(NamedTuple):
    """What :func:`fit` carries: the trainable (head or prompt), its optimizer state and
    the label mapping of the current epoch."""

    trainable: PyTree
    opt_state: PyTree
    mapping: jax.Array


class ReprogramHistory(NamedTuple):
    """One row per evaluation (every ``eval_every`` epochs and at the end): the step, the
    mean training loss since the previous row, and test loss, accuracy and ECE."""

    step: jax.Array
    train_loss: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    test_ece: jax.Array


class _Split(NamedTuple):  # what minibatch_scan reads
    x_train: jax.Array
    y_train: jax.Array


def evaluate(method: Reprogram, state: ReprogramState, prepared: jax.Array, labels: jax.Array) -> dict:
    """Loss, accuracy and ECE (:func:`expected_calibration_error`) of ``state`` on prepared
    inputs. Jittable."""
    logits = method.logits(state.trainable, prepared, state.mapping)
    probs = jax.nn.softmax(logits)
    return {"loss": jnp.mean(cross_entropy(logits, labels)),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "ece": expected_calibration_error(probs, labels)}


def fit(method: Reprogram, key: jax.Array, x_train, y_train, x_test, y_test, *,
        optimizer: optax.GradientTransformation, epochs: int, batch_size: int,
        eval_every: int = 1) -> tuple[ReprogramState, ReprogramHistory]:
    """Trains ``method``'s head or prompt on the target data, as one compiled loop.

    ``key`` draws the initial trainable (``fold_in(key, 0)``) and the data order
    (``fold_in(key, 1)``: a fresh permutation per epoch). Each epoch first recomputes the
    label mapping on the whole training split with the current trainable, then takes
    ``len(x_train) // batch_size`` steps of ``optimizer`` (its schedule counts steps) on the
    cross-entropy. Test loss, accuracy and ECE are recorded every ``eval_every`` epochs and
    after the last. Jittable (``epochs``, ``batch_size``, ``eval_every`` static) and
    vmappable over ``key`` (and over whatever the method closes over, e.g. per-seed weights).

    Examples:
      >>> x = jnp.concatenate([jnp.zeros((8, 2)), jnp.ones((8, 2))]); y = jnp.repeat(jnp.arange(2), 8)
      >>> lp = linear_probe(lambda x: x, source_shape=(2,), num_classes=2)
      >>> state, history = fit(lp, jax.random.key(0), x, y, x, y, optimizer=optax.adam(0.1), epochs=20,
      ...                      batch_size=4, eval_every=10)
      >>> history.step.tolist(), history.test_accuracy.tolist()
      ([40, 80], [1.0, 1.0])
    """
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs={epochs} and eval_every={eval_every} must be >= 1")
    if not 1 <= batch_size <= len(x_train):
        raise ValueError(f"batch_size={batch_size} must be in [1, {len(x_train)}] (the training examples)")
    steps_per_epoch = len(x_train) // batch_size
    prepared_train, prepared_test = method.prepare(jnp.asarray(x_train)), method.prepare(jnp.asarray(x_test))
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)
    split = _Split(prepared_train, y_train)
    order_key = jax.random.fold_in(key, 1)
    trainable = method.init(jax.random.fold_in(key, 0))
    state = ReprogramState(trainable, optimizer.init(trainable), method.mapping(trainable, prepared_train, y_train))

    def step(mapping):
        def one(carry, x, y):
            trainable, opt_state = carry
            value, grads = jax.value_and_grad(
                lambda t: jnp.mean(cross_entropy(method.logits(t, x, mapping), y)))(trainable)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), value
        return one

    def epoch(state, index):
        mapping = method.mapping(state.trainable, prepared_train, y_train)
        (trainable, opt_state), losses = minibatch_scan(
            step(mapping), (state.trainable, state.opt_state), split, order_key, index * steps_per_epoch,
            steps_per_epoch, batch_size=batch_size)
        return ReprogramState(trainable, opt_state, mapping), jnp.mean(losses)

    def period(state, first_epoch, length):
        state, losses = jax.lax.scan(epoch, state, first_epoch + jnp.arange(length))
        test = evaluate(method, state, prepared_test, y_test)
        end = jnp.asarray((first_epoch + length) * steps_per_epoch, jnp.int32)
        return state, ReprogramHistory(end, jnp.mean(losses), test["loss"], test["accuracy"], test["ece"])

    return scan_periods(period, state, 0, epochs, eval_every=eval_every)
