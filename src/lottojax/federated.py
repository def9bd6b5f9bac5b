"""HideNseek (Vallapuram et al.): federated learning of sign supermasks, and its baselines.

The server prunes θ0 once at initialisation (a data-free SynFlow mask ``m``) and sends θ0
and ``m``; every client learns real *scores* ``s`` whose signs flip kept weights, so the
network is ``θ0 ⊙ m ⊙ sign(s)`` and no weight magnitude ever changes; the server
aggregates the clients' scores. The pieces, each pure (jittable, vmappable):

- :func:`sign_supermask`: ``θ0 ⊙ m ⊙ sign(s)`` (``sign(0) = +1``) with the straight-through
  gradient ``∂L/∂s = ∂L/∂w ⊙ θ0 ⊙ m`` (the exact :func:`lottojax.straight_through`);
  :func:`binary_supermask` is the {0,1} baseline at the density of ``m``.
- :func:`weighted_mean` and :func:`sign_vote`: server aggregations over a leading client
  axis, weighted by the clients' example counts.
- :class:`FederatedMethod` and :data:`FEDERATED_METHODS`: what a client trains, how its
  forward weights are formed, how the server aggregates and how many bits a client sends.
- :func:`make_client_update`: ``local_epochs`` epochs of minibatch training on one
  client's (padded) data, as one ``lax.scan``; ``jax.vmap`` it over the client axis.
- :func:`make_federated_round`: one round (every client's update, then the aggregation)
  as a function ``(trainable, key, params0, mask, clients) -> (trainable, client_loss)``,
  so :func:`run_rounds` makes many rounds one ``lax.scan``.
- :func:`class_split`, :func:`dirichlet_split` and :func:`client_data`: non-IID client
  splits of any labelled data (``k`` classes per client, or Dirichlet(α) class
  proportions), deterministic by key, padded into one :class:`ClientData` with
  per-example weights (``0`` on padding).

Choices that are ours (the paper publishes no code; PAPERS.md §9 ✱): scores start at
``+1`` (the first round's net is ``θ0 ⊙ m``); the sign vote sends ``sign(s)`` (1 bit per
kept weight) and the server keeps the weighted majority sign (``+1`` on ties); the client
optimizer state is fresh every round; every client shuffles its own examples with the
round's key.

Examples:
  >>> params0 = {'w': jnp.array([0.5, -2.0, 3.0])}
  >>> mask = {'w': jnp.array([True, True, False])}
  >>> sign_supermask(params0, mask, {'w': jnp.array([0.3, -1.0, 1.0])})
  {'w': Array([0.5, 2. , 0. ], dtype=float32)}
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree, apply_mask, check_mask, check_same_shapes, leaves_with_paths
from lottojax.prune import lowest_alive
from lottojax.straight_through import straight_through
from lottojax.train import cross_entropy

#: Bits a client sends per float32 score or weight (mean aggregation, dense FedAvg).
FLOAT_BITS = 32


# ---------------------------------------------------------------------------------------
# Forward weights.


def _check_scores(params0: PyTree, mask: PyTree, scores: PyTree) -> None:
    check_mask(params0, mask, params_name="params0")
    check_same_shapes(params0, scores, a_name="params0", b_name="scores")
    for path, s in zip(*leaves_with_paths(scores)[:2]):
        if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
            raise TypeError(f"scores leaf {path} has dtype {jnp.result_type(s)}; scores are trained, so they must be "
                            "floating point (e.g. jax.tree.map(jnp.ones_like, params0))")


def signs(scores: PyTree) -> PyTree:
    """``sign(s)`` with ``sign(0) = +1`` (so every entry is ``±1``), in the scores' dtype.

    Examples:
      >>> signs(jnp.array([-0.5, 0.0, -0.0, 2.0]))
      Array([-1.,  1.,  1.,  1.], dtype=float32)
    """
    return jax.tree.map(lambda s: jnp.where(s >= 0, 1, -1).astype(jnp.result_type(s)), scores)


def sign_supermask(params0: PyTree, mask: PyTree, scores: PyTree) -> PyTree:
    """The HideNseek weights ``θ0 ⊙ m ⊙ sign(s)``, ``sign(0) = +1``, with a straight-through
    gradient to the scores.

    Forward, exactly ``apply_mask(params0, mask)`` with the sign of every kept entry set by
    its score (``s = +1`` everywhere gives ``apply_mask(params0, mask)`` bit for bit).
    Backward, ``∂L/∂s = ∂L/∂w ⊙ θ0 ⊙ m``: the sign passes the cotangent through unchanged
    (:func:`lottojax.straight_through`), so pruned entries get a zero gradient. θ0 and the
    mask get no gradient: close over them.

    Args:
      params0: the frozen weights θ0 (any pytree of float arrays).
      mask: the bool mask (structure and shapes of ``params0``).
      scores: float scores (structure and shapes of ``params0``; any float dtype).

    Returns:
      The forward weights, a pytree like ``params0`` in its dtypes.

    Raises:
      ValueError: a structure or shape differs (naming the tree path).
      TypeError: a mask leaf is not bool, or a score leaf not floating.

    Examples:
      >>> params0 = {'w': jnp.array([0.5, -2.0, 3.0])}
      >>> mask = {'w': jnp.array([True, True, False])}
      >>> scores = {'w': jnp.array([-0.1, 0.0, 4.0])}
      >>> sign_supermask(params0, mask, scores)
      {'w': Array([-0.5, -2. ,  0. ], dtype=float32)}
      >>> upstream = jnp.array([1.0, 2.0, 3.0])
      >>> jax.grad(lambda s: jnp.sum(upstream * sign_supermask(params0, mask, s)['w']))(scores)  # upstream * θ0 * m
      {'w': Array([ 0.5, -4. ,  0. ], dtype=float32)}
    """
    _check_scores(params0, mask, scores)
    flipped = straight_through(signs(scores), scores)
    return jax.tree.map(lambda w, f: w * f.astype(w.dtype), apply_mask(params0, mask), flipped)


def _top_entries(scores: jax.Array, keep: jax.Array) -> jax.Array:
    """Bool array marking the ``keep`` highest scores (ties: the higher flat index is dropped first)."""
    flat = jnp.ravel(scores)
    dropped = lowest_alive(flat, jnp.ones(flat.shape, bool), flat.size - keep)
    return (~dropped).reshape(jnp.shape(scores))


def binary_supermask(params0: PyTree, mask: PyTree, scores: PyTree) -> PyTree:
    """The {0,1} supermask at the density of ``mask``: ``θ0 ⊙ b``, where in every leaf ``b``
    keeps the highest-scoring entries, as many as ``mask`` keeps in that leaf (an
    edge-popup selection), with a straight-through gradient ``∂L/∂s = ∂L/∂w ⊙ θ0`` to
    *every* entry, so a dropped weight can come back.

    Scores equal to ``mask`` (``1`` kept, ``0`` pruned) select exactly ``mask``. Ties go
    to the lower flat index.

    Examples:
      >>> params0 = {'w': jnp.array([0.5, 2.0, -3.0, 1.0])}
      >>> mask = {'w': jnp.array([True, True, False, False])}
      >>> binary_supermask(params0, mask, {'w': jnp.array([1.0, 1.0, 0.0, 0.0])})  # scores = mask
      {'w': Array([0.5, 2. , 0. , 0. ], dtype=float32)}
      >>> binary_supermask(params0, mask, {'w': jnp.array([0.2, 0.1, 0.9, 0.5])})  # two entries, as in mask
      {'w': Array([ 0.,  0., -3.,  1.], dtype=float32)}
    """
    _check_scores(params0, mask, scores)
    chosen = jax.tree.map(lambda s, m: _top_entries(s, jnp.sum(m, dtype=jnp.int32)), scores, mask)
    surrogate = jax.tree.map(lambda w, s: (w * s).astype(w.dtype), params0, scores)  # d/ds = θ0
    return straight_through(apply_mask(params0, chosen), surrogate)


# ---------------------------------------------------------------------------------------
# Server aggregation.


def _client_weights(trees: PyTree, weights) -> jax.Array:
    weights = jnp.asarray(weights)
    leaves = jax.tree.leaves(trees)
    if not leaves:
        raise ValueError("nothing to aggregate: the client tree has no leaves")
    clients = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
    if weights.ndim != 1 or clients is None or weights.shape[0] != clients:
        raise ValueError(f"weights has shape {weights.shape}; give one weight per client, shape ({clients},) "
                         "(the leading axis of every client leaf)")
    for path, leaf in zip(*leaves_with_paths(trees)[:2]):
        if jnp.shape(leaf)[:1] != (clients,):
            raise ValueError(f"client leaf {path} has shape {jnp.shape(leaf)}: every leaf needs the client axis "
                             f"({clients}) first")
    return weights.astype(jnp.float32)


def weighted_mean(trees: PyTree, weights) -> PyTree:
    """The weighted mean over the leading client axis: ``Σ_k w_k t_k / Σ_k w_k``.

    Computed as ``t_0 + Σ_k w_k (t_k − t_0) / Σ_k w_k``, which is exactly ``t_0`` when every
    client sends the same tree. A client of weight 0 has no influence. Weights are
    non-negative with a positive sum (typically each client's example count); the result
    keeps every leaf's dtype.

    Raises:
      ValueError: ``weights`` is not one number per client, or a leaf lacks the client axis.

    Examples:
      >>> weighted_mean({'s': jnp.array([[1.0, 2.0], [5.0, -2.0]])}, jnp.array([3.0, 1.0]))
      {'s': Array([2., 1.], dtype=float32)}
    """
    w = _client_weights(trees, weights)
    w = w / jnp.sum(w)

    def mean(t):
        shift = t - t[:1]
        return (t[0] + jnp.tensordot(w.astype(t.dtype), shift, axes=1)).astype(t.dtype)

    return jax.tree.map(mean, trees)


def sign_vote(trees: PyTree, weights) -> PyTree:
    """The weighted majority of the clients' signs: ``sign(Σ_k w_k sign(t_k))``, ``±1`` with
    ``sign(0) = +1`` (ties and all-zero votes give ``+1``). What each client sends is one
    bit per entry.

    Examples:
      >>> sign_vote({'s': jnp.array([[0.1, -3.0, 2.0], [-5.0, -0.2, -1.0]])}, jnp.array([2.0, 1.0]))
      {'s': Array([ 1., -1.,  1.], dtype=float32)}
    """
    w = _client_weights(trees, weights)
    return jax.tree.map(lambda t: signs(jnp.tensordot(w, signs(t).astype(jnp.float32), axes=1)).astype(t.dtype),
                        trees)


# ---------------------------------------------------------------------------------------
# Methods.


def kept_entries(mask: PyTree) -> int:
    """Number of True entries of ``mask`` (all leaves), as a Python int (``mask`` concrete).

    Examples:
      >>> kept_entries({'w': jnp.array([True, False, True]), 'b': jnp.ones(2, bool)})
      4
    """
    return int(sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(mask)))


def all_entries(mask: PyTree) -> int:
    """Number of entries of ``mask`` (all leaves).

    Examples:
      >>> all_entries({'w': jnp.array([True, False, True]), 'b': jnp.ones(2, bool)})
      5
    """
    return int(sum(math.prod(jnp.shape(m)) for m in jax.tree.leaves(mask)))


class FederatedMethod(NamedTuple):
    """One federated learning method as a value.

    Attributes:
      name: a short name.
      init: ``(params0, mask) -> trainable``: the server's starting trainable pytree
        (scores, or the weights themselves).
      weights: ``(params0, mask, trainable) -> params``: the forward weights (the
        gradient flows into ``trainable`` only).
      aggregate: ``(client_trainables, client_weights) -> trainable``: the server's
        aggregation over the leading client axis.
      uplink: ``mask -> int``: the bits one client sends per round.
    """

    name: str
    init: Callable[[PyTree, PyTree], PyTree]
    weights: Callable[[PyTree, PyTree, PyTree], PyTree]
    aggregate: Callable[[PyTree, jax.Array], PyTree]
    uplink: Callable[[PyTree], int]


def _score_ones(params0, mask):
    return jax.tree.map(lambda w: jnp.ones(jnp.shape(w), jnp.float32), params0)


def _mask_scores(params0, mask):
    return jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), mask)


FEDERATED_METHODS = MappingProxyType({
    "sign-mean": FederatedMethod("sign-mean", _score_ones, sign_supermask, weighted_mean,
                                 lambda mask: FLOAT_BITS * kept_entries(mask)),
    "sign-vote": FederatedMethod("sign-vote", _score_ones, sign_supermask, sign_vote,
                                 lambda mask: kept_entries(mask)),
    "binary": FederatedMethod("binary", _mask_scores, binary_supermask, weighted_mean,
                              lambda mask: FLOAT_BITS * all_entries(mask)),
    "dense": FederatedMethod("dense", lambda params0, mask: params0, lambda params0, mask, theta: theta,
                             weighted_mean, lambda mask: FLOAT_BITS * all_entries(mask)),
})
"""The methods, by name (read-only; pass a :class:`FederatedMethod` value for another):

- ``'sign-mean'``: HideNseek, :func:`sign_supermask`, scores from ``+1``, weighted mean
  of the scores; a client sends one float32 per kept weight;
- ``'sign-vote'``: the same with :func:`sign_vote`: one bit per kept weight;
- ``'binary'``: :func:`binary_supermask` on θ0 at the density of ``m`` (scores start at
  ``m``, so the first net is ``θ0 ⊙ m`` as well), weighted mean of the scores; one float32
  per weight;
- ``'dense'``: FedAvg of the dense weights from θ0 (the mask is not used); one float32
  per weight."""


def uplink_bits(method: FederatedMethod, mask: PyTree, *, num_clients: int = 1) -> int:
    """Bits sent to the server in one round by ``num_clients`` clients.

    Examples:
      >>> mask = {'w': jnp.array([True, False, True, False]), 'b': jnp.ones(1, bool)}
      >>> [uplink_bits(FEDERATED_METHODS[n], mask, num_clients=10) for n in ('sign-mean', 'sign-vote', 'dense')]
      [960, 30, 1600]
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be an int >= 1")
    return int(num_clients) * int(method.uplink(mask))


# ---------------------------------------------------------------------------------------
# Clients.


class ClientData(NamedTuple):
    """The training data of every client, padded to a common size (a pytree).

    Attributes:
      x: inputs, ``(clients, size, *input_shape)``.
      y: int32 labels, ``(clients, size)``.
      weight: float32 per-example weights, ``(clients, size)``: ``1`` on a client's
        examples, ``0`` on padding (any non-negative weights are allowed).
    """

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray


def make_client_update(apply_fn: Callable, optimizer: optax.GradientTransformation, method: FederatedMethod, *,
                       batch_size: int, local_epochs: int, loss: Callable = cross_entropy) -> Callable:
    """One client's local training: ``update(trainable, params0, mask, client, key) ->
    (trainable, loss)``.

    ``client`` is one client's :class:`ClientData` row (``x (size, ...)``, ``y (size,)``,
    ``weight (size,)``). Every local epoch orders the client's own examples (weight > 0)
    ahead of the padding, shuffled by one uniform draw per position from
    ``fold_in(fold_in(key, epoch), position)`` (so the order does not depend on how much
    padding follows), and walks them in minibatches of ``batch_size``:
    ``ceil(n / batch_size)`` steps for a client with ``n`` examples, the last one partial.
    The minibatch loss is ``Σ w_i ℓ_i / Σ w_i``; a minibatch of padding only leaves the
    state unchanged, so ragged clients share one compiled program and a client's steps do
    not depend on the others' sizes. The optimizer starts fresh. The forward weights are
    ``method.weights(params0, mask, trainable)``; only ``trainable`` is differentiated.
    The second output is the weighted mean training loss of the steps taken (``0`` for a
    client without examples).

    Everything is one ``lax.scan`` (epochs × steps); vmap it over the client axis:
    ``jax.vmap(update, in_axes=(None, None, None, 0, None))``.

    Args:
      apply_fn: ``(params, x) -> logits``.
      optimizer: an optax transform on ``trainable``.
      method: a :class:`FederatedMethod` (its ``weights``).
      batch_size: local minibatch size.
      local_epochs: local epochs per round (``E``).
      loss: per-example loss ``(logits, labels) -> (batch,)``.

    Examples:
      >>> params0 = {'w': jnp.array([[1.0, -1.0]])}
      >>> method = FEDERATED_METHODS['sign-mean']
      >>> mask = {'w': jnp.ones((1, 2), bool)}
      >>> update = make_client_update(lambda p, x: x @ p['w'], optax.sgd(2.0), method, batch_size=2, local_epochs=1)
      >>> client = ClientData(jnp.ones((3, 1)), jnp.array([1, 1, 0]), jnp.array([1.0, 1.0, 0.0]))  # 2 examples
      >>> scores, loss = update(method.init(params0, mask), params0, mask, client, jax.random.key(0))
      >>> sign_supermask(params0, mask, scores)['w'], round(float(loss), 4)  # both signs flip: class 1 now wins
      (Array([[-1.,  1.]], dtype=float32), 2.1269)
    """
    for name, value in (("batch_size", batch_size), ("local_epochs", local_epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not isinstance(method, FederatedMethod):
        raise TypeError(f"method must be a FederatedMethod (e.g. FEDERATED_METHODS['sign-mean']), got "
                        f"{type(method).__name__}")

    def objective(trainable, params0, mask, x, y, w):
        logits = apply_fn(method.weights(params0, mask, trainable), x)
        weighted = jnp.where(w > 0, w * loss(logits, y), 0.0)  # padding adds exact zeros, finite loss or not
        return jnp.sum(weighted) / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)

    def update(trainable, params0, mask, client, key):
        x, y, weight = (jnp.asarray(a) for a in client)
        size = y.shape[0]
        steps = -(-size // batch_size)
        slots = steps * batch_size
        weight = jnp.concatenate([weight.astype(jnp.float32), jnp.zeros(slots - size, jnp.float32)])
        real = weight > 0

        def epoch(carry, epoch_key):
            draws = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(epoch_key, i)))(jnp.arange(slots))
            order = jnp.lexsort((draws, ~real)).reshape(steps, batch_size)  # examples first, in random order

            def step(carry, idx):
                trainable, opt_state = carry
                rows = jnp.minimum(idx, size - 1)  # padding slots past the data read row size-1, weight 0
                w = weight[idx]
                value, grads = jax.value_and_grad(objective)(trainable, params0, mask, x[rows], y[rows], w)
                updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
                live = jnp.sum(w) > 0
                new = (optax.apply_updates(trainable, updates), new_opt_state)
                carry = jax.tree.map(lambda n, o: jnp.where(live, n, o), new, carry)
                return carry, (value * jnp.sum(w), jnp.sum(w))

            return jax.lax.scan(step, carry, order)

        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(local_epochs))
        (trainable, _), (losses, seen) = jax.lax.scan(epoch, (trainable, optimizer.init(trainable)), keys)
        return trainable, jnp.sum(losses) / jnp.maximum(jnp.sum(seen), jnp.finfo(jnp.float32).tiny)

    return update


def make_federated_round(client_update: Callable, method: FederatedMethod) -> Callable:
    """One round: ``round_fn(trainable, key, params0, mask, clients) -> (trainable, losses)``.

    Every client starts from the server's ``trainable`` and runs ``client_update`` (vmapped
    over the client axis of ``clients``, a :class:`ClientData`, all with the round's
    ``key``); the server then aggregates with ``method.aggregate``, each client weighted by
    the sum of its example weights (its example count). ``losses`` are the clients' mean
    training losses, shape ``(clients,)``. θ0 and the mask are inputs only: the round
    returns nothing else. Pure, so ``lax.scan`` over round keys runs many rounds
    (:func:`run_rounds`).
    """

    def round_fn(trainable, key, params0, mask, clients):
        updated, losses = jax.vmap(client_update, in_axes=(None, None, None, 0, None))(
            trainable, params0, mask, clients, key)
        return method.aggregate(updated, jnp.sum(jnp.asarray(clients.weight), axis=1)), losses

    return round_fn


def run_rounds(round_fn: Callable, trainable: PyTree, params0: PyTree, mask: PyTree, clients: ClientData, *,
               key: jax.Array, num_rounds: int, evaluate: Callable = None):
    """``num_rounds`` rounds as one ``lax.scan``; round ``r`` uses ``fold_in(key, r)``.

    Returns ``(trainable, rows)``: ``rows`` stacks, per round, the clients' losses and
    (with ``evaluate``, a function ``trainable -> metrics``) the metrics after it.

    Examples:
      >>> method = FEDERATED_METHODS['sign-vote']
      >>> params0 = {'w': jnp.array([[1.0, -1.0]])}
      >>> update = make_client_update(lambda p, x: x @ p['w'], optax.sgd(2.0), method, batch_size=1, local_epochs=1)
      >>> clients = ClientData(jnp.ones((2, 1, 1)), jnp.array([[1], [1]]), jnp.ones((2, 1)))
      >>> scores, rows = run_rounds(make_federated_round(update, method), method.init(params0, None), params0,
      ...                           {'w': jnp.ones((1, 2), bool)}, clients, key=jax.random.key(0), num_rounds=3)
      >>> scores['w'], rows['loss'].shape
      (Array([[-1., -1.]], dtype=float32), (3, 2))
    """
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, (int, np.integer)) or num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds!r} must be an int >= 1")

    def body(trainable, r):
        trainable, losses = round_fn(trainable, jax.random.fold_in(key, r), params0, mask, clients)
        row = {"loss": losses}
        if evaluate is not None:
            row["metrics"] = evaluate(trainable)
        return trainable, row

    return jax.lax.scan(body, trainable, jnp.arange(num_rounds))


# ---------------------------------------------------------------------------------------
# Non-IID client splits.


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array (class indices), got dtype {labels.dtype} "
                         f"and shape {labels.shape}")
    return labels


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return int(value)


def _generator(key) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a JAX key (typed or raw uint32): host-side
    draws of data-dependent sizes, deterministic by key, with no compilation per shape."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def class_split(labels, *, num_clients: int, classes_per_client: int, key: jax.Array) -> np.ndarray:
    """Assigns every example to one client so that each client holds exactly
    ``classes_per_client`` classes (the pathological non-IID split of McMahan et al.).

    Clients pick their classes in turn: the ``k`` classes owned by the fewest clients so
    far, ties broken at random, so the classes are spread as evenly as possible (each
    owned ``⌊Kk/C⌋`` or ``⌈Kk/C⌉`` times) and every class has an owner. Each class's
    examples are shuffled and dealt to its owners in near-equal parts. Deterministic by
    ``key`` (a NumPy generator seeded by its bits draws everything).

    Args:
      labels: int class indices, shape ``(N,)``; the classes are the values present.
      num_clients: ``K``.
      classes_per_client: ``k``, at most the number of classes ``C``, with ``K k >= C``.
      key: a JAX key.

    Returns:
      int32 ``(N,)``: the client of every example.

    Raises:
      ValueError: bad labels or counts, ``K k < C`` (a class would have no owner), or a
        class with fewer examples than owners.

    Examples:
      >>> labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])
      >>> client = class_split(labels, num_clients=3, classes_per_client=2, key=jax.random.key(0))
      >>> [sorted(set(labels[client == c].tolist())) for c in range(3)]  # two classes each
      [[1, 2], [0, 1], [0, 2]]
    """
    labels = _labels(labels)
    num_clients = _check_count("num_clients", num_clients)
    k = _check_count("classes_per_client", classes_per_client)
    classes = np.unique(labels)
    if k > classes.size:
        raise ValueError(f"classes_per_client={k} exceeds the {classes.size} classes in labels")
    if num_clients * k < classes.size:
        raise ValueError(f"num_clients * classes_per_client = {num_clients * k} < {classes.size} classes: some class "
                         "would have no client; raise either")
    rng = _generator(key)
    owners = np.zeros(classes.size, np.int64)
    chosen = []
    for client in range(num_clients):
        picked = np.lexsort((rng.random(classes.size), owners))[:k]
        owners[picked] += 1
        chosen.append(set(picked.tolist()))
    out = np.empty(labels.shape, np.int32)
    for c, cls in enumerate(classes):
        members = [client for client in range(num_clients) if c in chosen[client]]
        where = np.flatnonzero(labels == cls)
        if where.size < len(members):
            raise ValueError(f"class {cls} has {where.size} examples but {len(members)} clients to share it: "
                             "lower num_clients or classes_per_client")
        where = rng.permutation(where)
        for client, part in zip(members, np.array_split(where, len(members))):
            out[part] = client
    return out


def dirichlet_split(labels, *, num_clients: int, alpha: float, key: jax.Array) -> np.ndarray:
    """Assigns every example to one client with Dirichlet(α) class proportions (Hsu et al.
    2019): for each class, ``p ~ Dir(α · 1_K)``, and its shuffled examples are cut at
    ``round(cumsum(p) · n_c)``. Small ``α`` is very skewed, large ``α`` near IID; a client
    may end up with no examples (its aggregation weight is then 0). Deterministic by ``key``.

    Returns:
      int32 ``(N,)``: the client of every example.

    Examples:
      >>> labels = np.repeat(np.arange(4), 50)
      >>> client = dirichlet_split(labels, num_clients=5, alpha=100.0, key=jax.random.key(0))
      >>> np.bincount(client, minlength=5).tolist()  # large α: near-equal clients
      [42, 40, 40, 40, 38]
    """
    labels = _labels(labels)
    num_clients = _check_count("num_clients", num_clients)
    if isinstance(alpha, bool) or not np.isscalar(alpha) or not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0 (small: skewed clients, large: near IID)")
    rng = _generator(key)
    out = np.empty(labels.shape, np.int32)
    for cls in np.unique(labels):
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        where = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(proportions)[:-1] * where.size).astype(np.int64)
        for client, part in enumerate(np.split(where, np.clip(cuts, 0, where.size))):
            out[part] = client
    return out


def client_data(x, y, client_of, *, num_clients: int, size: int = None) -> ClientData:
    """Gathers each client's examples (in their original order) into one padded
    :class:`ClientData`: ``size`` slots per client (default: the largest client),
    padding with weight 0.

    Examples:
      >>> x = np.arange(5, dtype=np.float32)[:, None]; y = np.array([0, 1, 0, 1, 1])
      >>> data = client_data(x, y, np.array([1, 0, 1, 1, 0]), num_clients=2)
      >>> data.x[..., 0].tolist(), data.weight.tolist()
      ([[1.0, 4.0, 0.0], [0.0, 2.0, 3.0]], [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    """
    x, y, client_of = np.asarray(x), _labels(y), np.asarray(client_of)
    num_clients = _check_count("num_clients", num_clients)
    if x.shape[:1] != y.shape or client_of.shape != y.shape:
        raise ValueError(f"x, y and client_of need one entry per example: got {x.shape[:1]}, {y.shape} and "
                         f"{client_of.shape}")
    if client_of.size and (client_of.min() < 0 or client_of.max() >= num_clients):
        raise ValueError(f"client_of has values outside [0, {num_clients}): every example needs a client index")
    counts = np.bincount(client_of, minlength=num_clients)
    largest = max(int(counts.max()), 1)
    size = largest if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < largest:
        raise ValueError(f"size={size!r} is below the largest client ({largest} examples)")
    xs = np.zeros((num_clients, size, *x.shape[1:]), x.dtype)
    ys = np.zeros((num_clients, size), np.int32)
    weight = np.zeros((num_clients, size), np.float32)
    for client in range(num_clients):
        rows = np.flatnonzero(client_of == client)
        xs[client, :rows.size], ys[client, :rows.size], weight[client, :rows.size] = x[rows], y[rows], 1.0
    return ClientData(xs, ys, weight)
