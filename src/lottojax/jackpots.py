"""Lottery Jackpots (Zhang et al.): search a mask on a *frozen* pre-trained network.

No weight is trained: only float *scores* ``m`` (one per weight) are, and the mask ``b``
follows them under a per-layer budget that never changes. The pieces, each a small pure
function (jittable, vmappable over a leading seed axis):

- :func:`jackpot_init`: the starting point (§4 steps 1-2). One global magnitude threshold
  over the *searched* leaves (the prunable ones except those kept dense, the classifier
  by default) keeps exactly ``round(density * N)`` of their ``N`` weights; that fixes each
  layer's pruned count ``⌊r_l n_l⌋`` (``r_l`` the fraction of layer ``l`` under the
  threshold). Scores start at ``0.99`` on the pruned entries, ``1`` elsewhere.
- :func:`short_restriction`: after every optimizer step, per layer: with ``p`` pruned
  entries, ``τ`` the ``p``-th smallest score, the revive set ``R`` (pruned, ``m > τ``) and
  the drop set ``D`` (kept, ``m ≤ τ``), swap ``k = ⌈rate · |R|⌉``: the ``k`` highest-scoring
  of ``R`` come in, the ``k`` lowest-scoring of ``D`` go out. Every layer keeps its count
  exactly. Ties are broken by flat index (the lower index is revived, or dropped, first);
  ``skip_on_tie=True`` reproduces the reference code, which leaves a layer alone for that
  step when ties at ``τ`` make ``|D| > |R|``.
- :func:`restriction_rate`: the swap rate over the search: ``'constant'`` (≡ 1 in both
  reference scripts), ``'quartic'`` ``(1 − e/E)^4`` and ``'cosine'`` ``½(1 + cos πe/E)``.
- :func:`jackpot_params`: the forward weights ``w ⊙ straight_through(b, m)``: exactly the
  masked weights forward, and ``∂L/∂m = ∂L/∂w_eff ⊙ w`` backward for *every* entry, pruned
  ones included (the exact :func:`lottojax.straight_through`, a ``custom_vjp``).
- :func:`jackpot_optimizer`: SGD on the scores as in PyTorch (weight decay added to the
  gradient before momentum 0.9), cosine learning rate.
- :func:`make_searcher`: the search as a set of pure functions, like
  :class:`lottojax.train.Trainer`: ``run_steps`` is one ``lax.scan`` over steps (a
  gradient step on the scores, then one restriction), ``search`` adds evaluations. The
  weights are never differentiated (they are not an argument of ``jax.grad``) and come out
  of the search bit for bit as they went in; model state (BatchNorm running statistics)
  updates as in training.

A search from a pre-trained ``params`` (one seed)::

    scores, mask = jackpot_init(params, density=0.1)
    searcher = make_searcher(model, jackpot_optimizer(0.1, num_steps=1500), batch_size=256,
                             rate=restriction_rate('cosine', num_steps=1500), eval_every=100)
    state = searcher.init(params, scores, mask, model_state)
    state, history = jax.jit(searcher.search, static_argnames='num_steps')(
        state, data, key, start=0, num_steps=1500)
    # state.mask: the jackpot; state.params is params, unchanged

Examples:
  >>> params = {'fc0': {'kernel': jnp.array([[0.5, -0.1], [2.0, 0.3]])},
  ...           'output': {'kernel': jnp.array([[1.0], [0.01]])}}
  >>> scores, mask = jackpot_init(params, density=0.5)
  >>> mask['fc0']['kernel'].tolist(), mask['output']['kernel'].tolist()  # the classifier stays dense
  ([[True, False], [True, False]], [[True], [True]])
  >>> scores['fc0']['kernel'].tolist()
  [[1.0, 0.9900000095367432], [1.0, 0.9900000095367432]]
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import (
    PyTree,
    Spec,
    apply_mask,
    check_mask,
    check_same_shapes,
    leaves_with_paths,
    prunable_leaves,
    resolve_spec,
)
from lottojax.models.core import Model
from lottojax.prune import lowest_alive
from lottojax.straight_through import straight_through
from lottojax.train import Metrics, cross_entropy, make_trainer, minibatch_scan, scan_periods

#: The starting scores of :func:`jackpot_init` (§4 step 2): kept entries, pruned entries.
KEPT_SCORE = 1.0
PRUNED_SCORE = 0.99

#: The restriction-rate schedules of :func:`restriction_rate`.
RATE_SCHEDULES = ("constant", "quartic", "cosine")

KeepDense = Union[str, Spec, None]


# ---------------------------------------------------------------------------------------
# Which leaves are searched.


def _show(paths) -> str:
    paths = list(paths)
    return repr(paths[:10])[:-1] + (", ...]" if len(paths) > 10 else "]")


def searched_flags(tree: PyTree, *, prunable: Spec = None, keep_dense: KeepDense = "output",
                   name: str = "params") -> list[bool]:
    """One static bool per leaf of ``tree``: is its mask searched?

    A leaf is searched when it is prunable (``prunable``: default kernels, ``ndim >= 2``)
    and not kept dense. ``keep_dense`` is a layer name (a leaf is kept dense when a
    component of its path equals it: the default ``'output'`` is the classifier of the
    library's models), ``None`` (nothing kept dense), or a spec like ``prunable`` (a prefix
    pytree of bools or a rule ``(path, leaf) -> bool``).

    Raises:
      ValueError: a name that matches no prunable leaf (listing the prunable paths), or
        no leaf left to search.

    Examples:
      >>> params = {'fc0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}, 'output': {'kernel': jnp.ones((2, 1))}}
      >>> searched_flags(params)  # leaves in flatten order: fc0/bias, fc0/kernel, output/kernel
      [False, True, False]
      >>> searched_flags(params, keep_dense=None)
      [False, True, True]
      >>> searched_flags(params, keep_dense='head')
      Traceback (most recent call last):
      ...
      ValueError: keep_dense='head' names no prunable leaf: no prunable leaf's path has a component 'head'; the prunable paths are ['fc0/kernel', 'output/kernel']. Pass keep_dense= the classifier's name, a spec, or None to search every prunable leaf.
    """
    paths, leaves, _, flags = prunable_leaves(tree, prunable, name=name)
    if keep_dense is None:
        dense = [False] * len(paths)
    elif isinstance(keep_dense, str):
        dense = [keep_dense in path.split("/") for path in paths]
        if not any(d and f for d, f in zip(dense, flags)):
            raise ValueError(
                f"keep_dense={keep_dense!r} names no prunable leaf: no prunable leaf's path has a component {keep_dense!r}; "
                f"the prunable paths are {_show(p for p, f in zip(paths, flags) if f)}. Pass keep_dense= the "
                "classifier's name, a spec, or None to search every prunable leaf."
            )
    else:
        dense = resolve_spec(keep_dense, tree, name="keep_dense", default=None)
        for path, d in zip(paths, dense):
            if not isinstance(d, (bool, np.bool_)):
                raise TypeError(f"keep_dense must resolve to Python bools per leaf; got {d!r} for leaf {path}")
    searched = [bool(f and not d) for f, d in zip(flags, dense)]
    if not any(searched):
        raise ValueError(
            f"no leaf of the {name} is left to search: every prunable leaf is kept dense (keep_dense={keep_dense!r}); "
            f"the prunable paths are {_show(p for p, f in zip(paths, flags) if f)}"
        )
    return searched


def _flag_spec(tree: PyTree, flags: list[bool]) -> Callable[[str, object], bool]:
    by_path = dict(zip(leaves_with_paths(tree)[0], flags))
    return lambda path, leaf: by_path[path]


# ---------------------------------------------------------------------------------------
# Steps 1-2: the starting mask and scores.


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_fraction(value, name: str, *, low_open: bool) -> None:
    if not _is_concrete(value):
        return
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        v = None
    if v is None or v.shape != ():
        raise ValueError(f"{name} must be one number, got {type(value).__name__}")
    ok = (0.0 < float(v) <= 1.0) if low_open else (0.0 <= float(v) <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={float(v)} is outside {interval}")


def jackpot_scores(mask: PyTree, *, prunable: Spec = None, keep_dense: KeepDense = "output",
                   kept: float = KEPT_SCORE, pruned: float = PRUNED_SCORE) -> PyTree:
    """Starting scores for a mask: ``kept`` (1) where it is True, ``pruned`` (0.99) where it
    is False, on the searched leaves; ``kept`` on every other leaf (never searched). Float32.

    Examples:
      >>> jackpot_scores({'w': jnp.array([[True, False]])}, keep_dense=None)['w'].tolist()
      [[1.0, 0.9900000095367432]]
    """
    check_mask(mask, mask, params_name="mask")
    flags = searched_flags(mask, prunable=prunable, keep_dense=keep_dense, name="mask")
    leaves, treedef = jax.tree.flatten(mask)
    out = [jnp.where(m, jnp.float32(kept), jnp.float32(pruned)) if f else jnp.full(jnp.shape(m), kept, jnp.float32)
           for m, f in zip(leaves, flags)]
    return jax.tree.unflatten(treedef, out)


def jackpot_init(params: PyTree, *, density, prunable: Spec = None,
                 keep_dense: KeepDense = "output") -> tuple[PyTree, PyTree]:
    """The starting ``(scores, mask)`` of a jackpot search (§4 steps 1-2).

    Over the searched leaves (prunable, minus ``keep_dense``: see :func:`searched_flags`),
    ``K = round(density * N)`` of the ``N`` weights are kept (float32 product, halves to
    even): those of largest ``|w|``, by one global threshold (ties: the earlier leaf in
    flatten order, then the lower flat index, is pruned first). Layer ``l`` thereby prunes
    ``⌊r_l n_l⌋`` of its ``n_l`` entries, ``r_l`` its fraction under the threshold: the
    smallest-``|w|`` ones. Scores are ``0.99`` on the pruned entries and ``1`` elsewhere
    (:func:`jackpot_scores`); leaves that are not searched are all kept, with scores 1.

    Pure: jittable (``density`` may be traced) and vmappable over a leading seed axis.

    Args:
      params: the (pre-trained) weights.
      density: the fraction of the searched weights kept, in ``(0, 1]`` (0.1 is "90%
        sparsity").
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``).
      keep_dense: the leaves that stay dense (default ``'output'``, the classifier).

    Returns:
      ``(scores, mask)``: a float32 pytree and a bool pytree shaped like ``params``.

    Examples:
      >>> w = {'a': {'kernel': jnp.array([[0.1, -5., 0.3, 2.]])}, 'b': {'kernel': jnp.array([[4., 0.2], [-0.05, 3.]])}}
      >>> scores, mask = jackpot_init(w, density=0.5, keep_dense=None)  # 4 of 8 kept: |w| >= 2
      >>> mask['a']['kernel'].tolist(), mask['b']['kernel'].tolist()  # r_a = 3/4, r_b = 2/4
      ([[False, True, False, True]], [[True, False], [False, True]])
      >>> jackpot_init(w, density=0.0, keep_dense=None)
      Traceback (most recent call last):
      ...
      ValueError: density=0.0 is outside (0, 1]
    """
    _check_fraction(density, "density", low_open=True)
    flags = searched_flags(params, prunable=prunable, keep_dense=keep_dense)
    paths, leaves, treedef = leaves_with_paths(params)
    for path, leaf, flag in zip(paths, leaves, flags):
        if flag and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"params leaf {path} has dtype {jnp.result_type(leaf)}; weights must be floating point")
    picked = [i for i, f in enumerate(flags) if f]
    magnitudes = jnp.concatenate([jnp.abs(jnp.asarray(leaves[i], jnp.float32)).reshape(-1) for i in picked])
    total = int(magnitudes.size)
    keep = jnp.round(jnp.asarray(density, jnp.float32) * jnp.float32(total)).astype(jnp.int32)
    pruned = lowest_alive(magnitudes, jnp.ones(total, bool), jnp.int32(total) - jnp.clip(keep, 0, total))
    sizes = np.cumsum([int(np.prod(jnp.shape(leaves[i]))) for i in picked])[:-1]
    mask_leaves = [jnp.ones(jnp.shape(x), bool) for x in leaves]
    for i, part in zip(picked, jnp.split(~pruned, sizes)):
        mask_leaves[i] = part.reshape(jnp.shape(leaves[i]))
    mask = jax.tree.unflatten(treedef, mask_leaves)
    return jackpot_scores(mask, prunable=_flag_spec(params, flags), keep_dense=None), mask


# ---------------------------------------------------------------------------------------
# Step 5: the short restriction.


def _restrict_leaf(scores: jax.Array, mask: jax.Array, rate, skip_on_tie: bool) -> jax.Array:
    s = jnp.asarray(scores, jnp.float32).reshape(-1)
    m = mask.reshape(-1)
    n = m.size
    p = jnp.int32(n) - jnp.sum(m, dtype=jnp.int32)  # pruned entries: the budget, never changed
    smallest = lowest_alive(s, jnp.ones(n, bool), p)
    tau = jnp.max(jnp.where(smallest, s, -jnp.inf))  # the p-th smallest score (-inf when p = 0)
    revive_set = ~m & (s > tau)
    drop_set = m & (s <= tau)
    n_revive = jnp.sum(revive_set, dtype=jnp.int32)
    n_drop = jnp.sum(drop_set, dtype=jnp.int32)  # >= n_revive: equal unless ties at tau
    k = jnp.ceil(jnp.asarray(rate, jnp.float32) * n_revive.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.clip(k, 0, n_revive)
    if skip_on_tie:
        k = jnp.where(n_drop > n_revive, 0, k)
    revive = lowest_alive(-s, revive_set, k)  # the k highest scores of R (ties: lower index)
    drop = lowest_alive(s, drop_set, k)  # the k lowest scores of D (ties: lower index)
    return ((m | revive) & ~drop).reshape(mask.shape)


def short_restriction(scores: PyTree, mask: PyTree, rate=1.0, *, prunable: Spec = None,
                      skip_on_tie: bool = False) -> PyTree:
    """One short restriction (§4 step 5): the new mask, every leaf's kept count unchanged.

    Per prunable leaf, with ``p`` its pruned entries and ``τ`` its ``p``-th smallest score:
    the revive set ``R`` = pruned entries with ``m > τ``, the drop set ``D`` = kept entries
    with ``m ≤ τ`` (``|D| ≥ |R|``, equal unless scores tie at ``τ``); ``k = ⌈rate · |R|⌉``
    (float32 product) of each are swapped: the ``k`` highest scores of ``R`` are revived,
    the ``k`` lowest of ``D`` pruned. Among equal scores the lower flat index goes first
    (in both sets). With ``rate = 1`` and no ties this keeps the top-``K`` scores of every
    leaf; with ``rate = 0`` nothing changes.

    ``skip_on_tie=True`` is the reference code's rule: a leaf with ``|D| > |R|`` is left as
    it is for this step.

    Scores are compared in float32 and should be finite. Pure: jittable (``rate`` may be
    traced) and vmappable. Non-prunable leaves are returned unchanged; an all-True leaf
    (the dense classifier) has nothing to swap.

    Args:
      scores: float pytree shaped like the mask (higher = keep).
      mask: the current bool mask.
      rate: the swap rate in ``[0, 1]`` (see :func:`restriction_rate`).
      prunable: which leaves are restricted (default: ``ndim >= 2``).
      skip_on_tie: skip a leaf whose ties at ``τ`` make ``|D| > |R|`` (reference code).

    Examples:
      The hand-worked case of PAPERS.md §4 (p = 2, τ = .5, R = {4, 5}, D = {0, 2}):

      >>> m = jnp.array([[.5, .9, .3, .8, .6, .95]])
      >>> kept = jnp.array([[True, True, True, True, False, False]])
      >>> [short_restriction(m, kept, r).astype(int).tolist() for r in (1.0, 0.5, 0.0)]
      [[[0, 1, 0, 1, 1, 1]], [[1, 1, 0, 1, 0, 1]], [[1, 1, 1, 1, 0, 0]]]

      Ties at τ (two kept entries at .5, p = 1): ``|D| = 2 > |R| = 1``; the lower index is
      dropped first, or the step is skipped:

      >>> m, kept = jnp.array([[.5, .5, .9, .7]]), jnp.array([[True, True, True, False]])
      >>> short_restriction(m, kept).tolist(), short_restriction(m, kept, skip_on_tie=True).tolist()
      ([[False, True, True, True]], [[True, True, True, False]])
      >>> short_restriction(m, kept, 2.0)
      Traceback (most recent call last):
      ...
      ValueError: rate=2.0 is outside [0, 1]
    """
    _check_fraction(rate, "rate", low_open=False)
    check_mask(scores, mask, params_name="scores")
    paths, leaves, _ = leaves_with_paths(scores)
    for path, s in zip(paths, leaves):
        if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
            raise TypeError(f"scores leaf {path} has dtype {jnp.result_type(s)}; scores must be floating point")
    _, mask_leaves, treedef, flags = prunable_leaves(mask, prunable)
    out = [_restrict_leaf(s, m, rate, skip_on_tie) if f else m for s, m, f in zip(leaves, mask_leaves, flags)]
    return jax.tree.unflatten(treedef, out)


def restriction_rate(kind: str = "constant", *, num_steps: Optional[int] = None, value: float = 1.0,
                     steps_per_epoch: Optional[int] = None) -> Callable[[jax.Array], jax.Array]:
    """The swap rate of :func:`short_restriction` at each search step: ``step -> rate``.

    - ``'constant'``: ``value`` (1 in both reference scripts: then a restriction keeps the
      per-layer top-``K`` scores, magnitude-initialised edge-popup);
    - ``'quartic'``: ``value · (1 − e/E)^4``;
    - ``'cosine'``: ``value · ½(1 + cos(π e/E))``;

    with ``e = step``, ``E = num_steps`` (per step), or with ``steps_per_epoch``
    ``e = step // steps_per_epoch``, ``E = ⌈num_steps / steps_per_epoch⌉`` (per epoch, as
    the paper's dead code). Jittable; ``step`` may be traced.

    Examples:
      >>> quartic = restriction_rate('quartic', num_steps=4)
      >>> [float(quartic(s)) for s in range(4)]
      [1.0, 0.31640625, 0.0625, 0.00390625]
      >>> cosine = restriction_rate('cosine', num_steps=10, steps_per_epoch=5)  # E = 2 epochs
      >>> [round(float(cosine(s)), 3) for s in (0, 4, 5, 9)]
      [1.0, 1.0, 0.5, 0.5]
      >>> restriction_rate('linear', num_steps=10)
      Traceback (most recent call last):
      ...
      ValueError: kind='linear' unknown; the restriction-rate schedules are ('constant', 'quartic', 'cosine')
    """
    if kind not in RATE_SCHEDULES:
        raise ValueError(f"kind={kind!r} unknown; the restriction-rate schedules are {RATE_SCHEDULES}")
    _check_fraction(value, "value", low_open=False)
    if kind == "constant":
        return lambda step: jnp.full((), value, jnp.float32)
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"restriction_rate({kind!r}) needs num_steps= the search length (an int >= 1), got {num_steps!r}")
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, (int, np.integer)) or steps_per_epoch < 1):
        raise ValueError(f"steps_per_epoch={steps_per_epoch!r} must be an int >= 1 or None")
    per = int(steps_per_epoch or 1)
    total = math.ceil(num_steps / per)

    def rate(step):
        fraction = jnp.minimum((jnp.asarray(step, jnp.int32) // per).astype(jnp.float32) / total, 1.0)
        shape = (1.0 - fraction) ** 4 if kind == "quartic" else 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
        return jnp.float32(value) * shape

    return rate


# ---------------------------------------------------------------------------------------
# Steps 3-4: the forward weights and the optimizer.


def jackpot_params(params: PyTree, scores: PyTree, mask: PyTree, *, prunable: Spec = None,
                   keep_dense: KeepDense = "output") -> PyTree:
    """The forward weights of the search: ``w ⊙ straight_through(mask, scores)`` on the
    searched leaves, ``w`` where ``mask`` (else 0) on the others.

    Forward it is the masked network exactly (``w · 1.0`` and ``w · 0.0``); backward the
    scores get ``∂L/∂m = ∂L/∂w_eff ⊙ w`` on every searched entry, pruned ones included.
    Scores of leaves that are not searched get a zero gradient.

    Examples:
      >>> w = {'w': jnp.array([[2., -3., 4.]])}
      >>> s, b = {'w': jnp.array([[1., .5, .9]])}, {'w': jnp.array([[True, False, True]])}
      >>> jackpot_params(w, s, b, keep_dense=None)['w'].tolist()
      [[2.0, -0.0, 4.0]]
      >>> jax.grad(lambda s: jnp.sum(jackpot_params(w, s, b, keep_dense=None)['w']))(s)['w'].tolist()  # = w
      [[2.0, -3.0, 4.0]]
    """
    check_mask(params, mask)
    check_same_shapes(params, scores, a_name="params", b_name="scores")
    flags = searched_flags(params, prunable=prunable, keep_dense=keep_dense)
    p_leaves, treedef = jax.tree.flatten(params)
    out = []
    for w, s, m, f in zip(p_leaves, jax.tree.leaves(scores), jax.tree.leaves(mask), flags):
        if f:
            out.append(w * straight_through(m, jnp.asarray(s, jnp.result_type(w))))
        else:
            out.append(jnp.where(m, w, jnp.zeros_like(w)))
    return jax.tree.unflatten(treedef, out)


def cosine_learning_rate(learning_rate: float, num_steps: int, *,
                         steps_per_epoch: Optional[int] = None) -> Callable[[jax.Array], jax.Array]:
    """``lr · ½(1 + cos(π e/E))``: per step (``e = step``, ``E = num_steps``), or per epoch
    with ``steps_per_epoch`` (PyTorch's ``CosineAnnealingLR`` stepped once an epoch).

    Examples:
      >>> lr = cosine_learning_rate(0.1, 100)
      >>> [round(float(lr(s)), 4) for s in (0, 50, 100)]
      [0.1, 0.05, 0.0]
    """
    return lambda step: jnp.float32(learning_rate) * restriction_rate(
        "cosine", num_steps=num_steps, steps_per_epoch=steps_per_epoch)(step)


def jackpot_optimizer(learning_rate=0.1, *, num_steps: int, momentum: float = 0.9, weight_decay: float = 5e-4,
                      steps_per_epoch: Optional[int] = None) -> optax.GradientTransformation:
    """SGD on the scores as PyTorch runs it: ``d = g + wd · m`` (decay *before* momentum),
    ``buf = momentum · buf + d``, ``m -= lr · buf``, with the cosine learning rate of
    :func:`cosine_learning_rate` over ``num_steps`` (pass an optax schedule or a float as
    ``learning_rate`` to use it as is: then ``num_steps`` is not used).

    Examples:
      >>> tx = jackpot_optimizer(0.1, num_steps=10)
      >>> m = {'w': jnp.array([1.0])}
      >>> updates, _ = tx.update({'w': jnp.array([0.5])}, tx.init(m), m)
      >>> round(float(updates['w'][0]), 6)  # -0.1 * (0.5 + 5e-4 * 1)
      -0.05005
    """
    if callable(learning_rate):
        schedule = learning_rate
    else:
        schedule = cosine_learning_rate(float(learning_rate), num_steps, steps_per_epoch=steps_per_epoch)
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*decay, optax.sgd(schedule, momentum=momentum or None))


# ---------------------------------------------------------------------------------------
# The search.


class SearchState(NamedTuple):
    """What a search carries from step to step.

    Attributes:
      params: the frozen weights: returned bit for bit as given.
      scores: the trainable scores (float32, shaped like ``params``).
      mask: the current bool mask.
      model_state: the model state (BatchNorm running statistics update in training mode).
      opt_state: the optimizer state of the scores.
      step: search steps applied so far.
      start_mask: the mask the search started from (for :attr:`SearchHistory.overlap`).
    """

    params: PyTree
    scores: PyTree
    mask: PyTree
    model_state: PyTree
    opt_state: PyTree
    step: jax.Array
    start_mask: PyTree


class SearchHistory(NamedTuple):
    """One row per evaluation (every ``eval_every`` steps and at the end of the call)."""

    step: jax.Array  # the global search step of the row
    train_loss: jax.Array  # mean training loss over the steps since the previous row
    val_loss: jax.Array
    val_accuracy: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    overlap: jax.Array  # fraction of the searched weights kept now that were kept at the start


class Searcher(NamedTuple):
    """Pure functions of a jackpot search (see :func:`make_searcher`)."""

    init: Callable[..., SearchState]
    step: Callable[..., tuple[SearchState, jax.Array]]
    run_steps: Callable[..., tuple[SearchState, jax.Array]]
    evaluate: Callable[..., Metrics]
    search: Callable[..., tuple[SearchState, SearchHistory]]
    overlap: Callable[[SearchState], jax.Array]


def make_searcher(
    model: Model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    eval_every: int,
    rate: Union[float, Callable[[jax.Array], jax.Array]] = 1.0,
    prunable: Spec = None,
    keep_dense: KeepDense = "output",
    skip_on_tie: bool = False,
    eval_batch_size: int = 1000,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> Searcher:
    """The search of §4 as pure functions (compare :func:`lottojax.train.make_trainer`).

    - ``init(params, scores, mask, model_state)`` → :class:`SearchState`;
    - ``step(state, x, y)`` → ``(state, loss)``: one optimizer step on the scores (the loss
      of the network with weights :func:`jackpot_params`, in training mode; the gradient
      reaches the searched scores only, other scores never change), then one
      :func:`short_restriction` at ``rate(state.step)``;
    - ``run_steps(state, data, key, start, num_steps)`` → ``(state, losses)``: global steps
      ``[start, start + num_steps)`` in one ``lax.scan``, with the minibatches of
      :class:`lottojax.train.Trainer` (epoch order ``permutation(fold_in(key, epoch))``,
      the last ``n_train % batch_size`` examples of each epoch dropped);
    - ``evaluate(state, x, y)`` → :class:`lottojax.train.Metrics` of the masked network in
      evaluation mode;
    - ``search(state, data, key, start, num_steps)`` → ``(state, SearchHistory)``:
      ``run_steps`` with an evaluation every ``eval_every`` steps and at the end;
    - ``overlap(state)``: the fraction of the searched weights kept now that were kept
      at the start.

    ``num_steps`` is static; ``start`` may be traced. Everything vmaps over a leading seed
    axis of the state and the key (``lottojax.map_seeds``).

    Args:
      model: a :class:`lottojax.models.core.Model`.
      optimizer: the scores' optimizer, e.g. :func:`jackpot_optimizer`.
      batch_size: search minibatch size.
      eval_every: steps between evaluations in ``search``.
      rate: the swap rate, a number or ``step -> rate`` (:func:`restriction_rate`); ``step``
        is the global search step (0 for the first).
      prunable, keep_dense: which leaves are searched (:func:`searched_flags`).
      skip_on_tie: the reference's rule in :func:`short_restriction`.
      eval_batch_size: chunk size of evaluations.
      loss: per-example loss ``(logits, labels) -> (batch,)``.
    """
    if batch_size < 1 or eval_every < 1 or eval_batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}), eval_every ({eval_every}) and eval_batch_size "
                         f"({eval_batch_size}) must be positive")
    rate_fn = rate if callable(rate) else (lambda step: jnp.asarray(rate, jnp.float32))
    if not callable(rate):
        _check_fraction(rate, "rate", low_open=False)
    evaluator = make_trainer(model, optax.identity(), batch_size=batch_size, eval_every=eval_every,
                             eval_batch_size=eval_batch_size, loss=loss)

    def flags_of(tree):
        return searched_flags(tree, prunable=prunable, keep_dense=keep_dense)

    def labels(scores):
        flags = flags_of(scores)
        leaves, treedef = jax.tree.flatten(scores)
        return jax.tree.unflatten(treedef, ["search" if f else "frozen" for f in flags])

    tx = optax.multi_transform({"search": optimizer, "frozen": optax.set_to_zero()}, labels)

    def init(params: PyTree, scores: PyTree, mask: PyTree, model_state: PyTree) -> SearchState:
        check_mask(params, mask)
        check_same_shapes(params, scores, a_name="params", b_name="scores")
        flags_of(params)  # names the paths if nothing is searched
        scores = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), scores)
        return SearchState(params, scores, mask, model_state, tx.init(scores), jnp.zeros((), jnp.int32), mask)

    def restrict(scores, mask, step):
        spec = _flag_spec(mask, flags_of(mask))
        return short_restriction(scores, mask, rate_fn(step), prunable=spec, skip_on_tie=skip_on_tie)

    def step(state: SearchState, x: jax.Array, y: jax.Array) -> tuple[SearchState, jax.Array]:
        def objective(scores):
            weights = jackpot_params(state.params, scores, state.mask, prunable=prunable, keep_dense=keep_dense)
            logits, model_state = model.apply(weights, state.model_state, x, True)
            return jnp.mean(loss(logits, y)), model_state

        (value, model_state), grads = jax.value_and_grad(objective, has_aux=True)(state.scores)
        updates, opt_state = tx.update(grads, state.opt_state, state.scores)
        scores = optax.apply_updates(state.scores, updates)
        mask = restrict(scores, state.mask, state.step)
        return state._replace(scores=scores, mask=mask, model_state=model_state, opt_state=opt_state,
                              step=state.step + 1), value

    def run_steps(state: SearchState, data, key: jax.Array, start, num_steps: int):
        return minibatch_scan(step, state, data, key, start, num_steps, batch_size=batch_size)

    def evaluate(state: SearchState, x: jax.Array, y: jax.Array) -> Metrics:
        weights = apply_mask(state.params, state.mask)
        return evaluator.evaluate(weights, state.model_state, x, y)

    def overlap(state: SearchState) -> jax.Array:
        flags = flags_of(state.mask)
        now, before = jax.tree.leaves(state.mask), jax.tree.leaves(state.start_mask)
        both = sum(jnp.sum(a & b, dtype=jnp.int32) for a, b, f in zip(now, before, flags) if f)
        kept = sum(jnp.sum(b, dtype=jnp.int32) for b, f in zip(before, flags) if f)
        return both.astype(jnp.float32) / jnp.maximum(kept, 1).astype(jnp.float32)

    def search(state: SearchState, data, key: jax.Array, start, num_steps: int):
        def period(state, period_start, length):
            state, losses = run_steps(state, data, key, period_start, length)
            val = evaluate(state, data.x_val, data.y_val)
            test = evaluate(state, data.x_test, data.y_test)
            row = SearchHistory(jnp.asarray(period_start + length, jnp.int32), jnp.mean(losses), val.loss,
                                val.accuracy, test.loss, test.accuracy, overlap(state))
            return state, row

        return scan_periods(period, state, start, num_steps, eval_every=eval_every)

    return Searcher(init, step, run_steps, evaluate, search, overlap)
