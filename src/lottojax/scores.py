"""Score functions: params (and, where needed, a network, a batch or a key) → scores.

Higher scores are more important; the pruning functions in :mod:`lottojax.prune` remove
the lowest. Every score function returns a pytree with the structure of ``params`` and
takes ``params`` first and everything else by keyword:

- :func:`magnitude` ``|θ|`` and :func:`random_scores` (data-free);
- :func:`snip` and :func:`grasp`, the pruning-at-initialisation scores that need the
  network, as ``apply_fn(params, x) -> logits``, and a batch ``(x, y)``;
- :func:`synflow` (data-free, needs ``apply_fn`` and the input shape), and
  :func:`synflow_mask`, its iterative schedule, which returns a mask.

Each is a pure function: jit it, and vmap it over seeds (a leading axis of ``params``).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.masks import PyTree, Spec, apply_mask, ones_like, prunable_leaves
from lottojax.prune import remove_lowest_global

ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
Loss = Callable[[jax.Array, jax.Array], jax.Array]


def magnitude(params: PyTree) -> PyTree:
    """``|θ|``, the score of magnitude pruning (and of IMP).

    Examples:
      >>> magnitude({'w': jnp.array([-2., 0.5])})
      {'w': Array([2. , 0.5], dtype=float32)}
    """
    return jax.tree.map(jnp.abs, params)


def random_scores(params: PyTree, *, key: jax.Array) -> PyTree:
    """I.i.d. uniform scores: pruning by them is random pruning.

    Each leaf draws from its own key (``jax.random.split`` of ``key`` by leaf index).

    Examples:
      >>> s = random_scores({'w': jnp.zeros((2, 3))}, key=jax.random.key(0))
      >>> s['w'].shape, bool((s['w'] >= 0).all() & (s['w'] < 1).all())
      ((2, 3), True)
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
    )


def _mean_loss(apply_fn: ApplyFn, loss: Loss, batch, temperature=1.0) -> Callable[[PyTree], jax.Array]:
    x, y = _unpack_batch(batch)
    return lambda params: jnp.mean(loss(apply_fn(params, x) / temperature, y))


def _unpack_batch(batch) -> tuple[jax.Array, jax.Array]:
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"batch must be a pair (x, y) of inputs and integer labels; got {type(batch).__name__}"
        ) from None
    if jnp.shape(x)[:1] != jnp.shape(y)[:1]:
        raise ValueError(f"batch: x has {jnp.shape(x)[:1]} examples but y has {jnp.shape(y)[:1]}")
    return x, y


def _prunable_sum(tree: PyTree, prunable: Spec) -> jax.Array:
    _, leaves, _, flags = prunable_leaves(tree, prunable, name="params")
    return sum(jnp.sum(leaf) for leaf, flag in zip(leaves, flags) if flag)


def snip(
    params: PyTree,
    *,
    apply_fn: ApplyFn,
    batch,
    loss: Loss = optax.softmax_cross_entropy_with_integer_labels,
    prunable: Spec = None,
) -> PyTree:
    """SNIP connection sensitivity (Lee et al. 2019): ``|g ⊙ θ| / Σ|g ⊙ θ|``.

    ``g = ∂L/∂θ`` is the gradient of the mean loss on one minibatch (the paper uses ~100
    examples). The sum in the normaliser runs over the prunable leaves, so their scores sum
    to 1; other leaves are scored by the same formula (and ignored by the pruning
    functions). Keep the global top-k: ``prune_global(scores, mask, 1 - density)``.

    Args:
      params: the parameters (at initialisation, for pruning at init).
      apply_fn: ``(params, x) -> logits``, e.g. ``lambda p, x: model.apply(p, state, x, True)[0]``
        (BatchNorm in training mode, as the reference implementations run it).
      batch: ``(x, y)``, inputs and integer labels.
      loss: per-example ``(logits, labels) -> (batch,)`` loss; default softmax cross-entropy.
      prunable: the leaves the normaliser sums over (default: kernels, ``ndim >= 2``).

    Returns:
      A pytree like ``params`` of non-negative scores (higher = keep).

    Examples:
      >>> params = {'w': jnp.array([[1., -2.], [0.5, 3.]])}
      >>> apply_fn = lambda p, x: x @ p['w']
      >>> batch = (jnp.array([[1., 0.], [0., 1.]]), jnp.array([0, 1]))
      >>> s = snip(params, apply_fn=apply_fn, batch=batch)
      >>> bool(jnp.isclose(s['w'].sum(), 1.0)), s['w'].shape
      (True, (2, 2))
    """
    grads = jax.grad(_mean_loss(apply_fn, loss, batch))(params)
    saliency = jax.tree.map(lambda g, p: jnp.abs(g * p), grads, params)
    total = _prunable_sum(saliency, prunable)
    return jax.tree.map(lambda s: s / total, saliency)


def grasp(
    params: PyTree,
    *,
    apply_fn: ApplyFn,
    batch,
    temperature: float = 200.0,
    loss: Loss = optax.softmax_cross_entropy_with_integer_labels,
    prunable: Spec = None,
) -> PyTree:
    """GraSP (Wang et al. 2020), signed so that removing the *lowest* does the paper's thing.

    With ``L`` the mean loss of ``logits / temperature`` on ``batch`` (the paper: a
    class-balanced sample, see :func:`class_balanced_sample`, and ``T = 200``), ``g = ∇L``
    restricted to the prunable weights (kernels: the paper scores conv and dense weights
    only) and ``Hg = ∇θ(stop_grad(g)ᵀ∇θ L)``, the paper's score is ``S = −θ ⊙ Hg`` and it
    prunes the *largest* ``S`` (removing those weights reduces the gradient flow least).
    This function returns ``−S = θ ⊙ Hg``, so :func:`lottojax.prune_global` (which removes
    the lowest scores) removes exactly the paper's choice. ``Hg`` is a forward-over-reverse
    product (``jax.jvp`` of ``jax.grad``); the Hessian is never materialised. Scores of
    non-prunable leaves follow the same formula (with the same restricted ``g``).

    Args:
      params: the parameters.
      apply_fn: ``(params, x) -> logits``.
      batch: ``(x, y)``, inputs and integer labels.
      temperature: divides the logits before the loss (``T = 200`` in the paper).
      loss: per-example ``(logits, labels) -> (batch,)`` loss; default softmax cross-entropy.
      prunable: the leaves ``g`` is restricted to (default: kernels, ``ndim >= 2``).

    Returns:
      A pytree like ``params``: ``θ ⊙ Hg`` (signed; higher = keep).

    Examples:
      >>> params = {'w': jnp.array([[1., -2.], [0.5, 3.]])}
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p['w'])
      >>> batch = (jnp.array([[1., 0.], [0., 1.]]), jnp.array([0, 1]))
      >>> grasp(params, apply_fn=apply_fn, batch=batch)['w'].shape
      (2, 2)
    """
    objective = _mean_loss(apply_fn, loss, batch, temperature)
    flags = prunable_leaves(params, prunable, name="params")[3]
    leaves, treedef = jax.tree.flatten(jax.grad(objective)(params))
    direction = jax.tree.unflatten(
        treedef, [g if flag else jnp.zeros_like(g) for g, flag in zip(leaves, flags)]
    )
    direction = jax.lax.stop_gradient(direction)
    _, hessian_grad = jax.jvp(jax.grad(objective), (params,), (direction,))
    return jax.tree.map(lambda p, hg: p * hg, params, hessian_grad)


def class_balanced_sample(
    x: jax.Array, y: jax.Array, *, per_class: int, key: jax.Array, num_classes: Optional[int] = None
) -> tuple[jax.Array, jax.Array]:
    """``per_class`` random examples of every class, grouped by class (GraSP's sample).

    Jittable and vmappable over ``key``. With concrete labels a class with fewer than
    ``per_class`` examples raises; under ``jit`` (labels traced) such a class repeats its
    examples instead, so a label never comes from another class.

    Args:
      x: inputs, examples on the first axis.
      y: integer labels in ``[0, num_classes)``.
      per_class: examples drawn from each class (the paper: 10).
      key: the random key.
      num_classes: needed when ``y`` is traced; default ``max(y) + 1``.

    Returns:
      ``(x, y)`` with ``num_classes * per_class`` examples, class 0 first.

    Examples:
      >>> xs, ys = class_balanced_sample(jnp.arange(8.), jnp.array([0, 1, 1, 0, 1, 0, 1, 1]),
      ...                                per_class=2, key=jax.random.key(0))
      >>> ys.tolist(), bool(jnp.all(jnp.array([0, 1, 1, 0, 1, 0, 1, 1])[xs.astype(int)] == ys))
      ([0, 0, 1, 1], True)
    """
    if per_class < 1:
        raise ValueError(f"per_class={per_class} must be >= 1")
    if num_classes is None:
        try:
            num_classes = int(np.max(np.asarray(y))) + 1
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            raise ValueError("class_balanced_sample needs num_classes= when y is traced (under jit)") from None
    y = jnp.asarray(y)
    classes = jnp.arange(num_classes)
    counts = jnp.sum(y[None, :] == classes[:, None], axis=1)
    if not isinstance(counts, jax.core.Tracer) and bool(jnp.any(counts < per_class)):
        short = {int(c): int(n) for c, n in enumerate(counts) if n < per_class}
        raise ValueError(
            f"class_balanced_sample: classes with fewer than per_class={per_class} examples "
            f"(class: count) {short}; lower per_class or pass more data"
        )
    order = jnp.lexsort((jax.random.uniform(key, y.shape), y))  # by class, random within class
    starts = jnp.cumsum(counts) - counts
    within = jnp.minimum(jnp.arange(per_class)[None, :], jnp.maximum(counts[:, None] - 1, 0))
    index = order[(starts[:, None] + within).reshape(-1)]
    return jnp.asarray(x)[index], y[index]


def check_dtype(dtype) -> None:
    """Raises unless ``dtype`` (a SynFlow computation dtype) is usable as it is: float64
    needs 64-bit JAX."""
    if dtype is not None and jax.dtypes.canonicalize_dtype(dtype) != jnp.dtype(dtype):
        raise ValueError(
            f"dtype={jnp.dtype(dtype).name} needs 64-bit JAX: run "
            "jax.config.update('jax_enable_x64', True) first (or use `with jax.enable_x64(True):`)"
        )


def synflow(params: PyTree, *, apply_fn: Callable[[PyTree, jax.Array], jax.Array], input_shape, dtype=None) -> PyTree:
    """SynFlow (Tanaka et al. 2020): data-free synaptic saliency ``|θ ⊙ ∂R/∂θ|``.

    Every parameter is replaced by ``|θ|`` (biases and norm parameters too), the network
    runs on one all-ones input, ``R = Σ outputs``, and the score is ``|θ| ⊙ ∂R/∂|θ|``.
    Pass the parameters already masked (``apply_mask(params, mask)``) to score a pruned
    net: pruned entries then score 0. Higher = keep. :func:`synflow_mask` runs the
    paper's iterative schedule.

    ``apply_fn`` must run BatchNorm in evaluation mode (running statistics), e.g.
    ``lambda p, x: model.apply(p, state, x, False)[0]``; at initialisation the running
    statistics are (0, 1), so BatchNorm is the affine map ``|γ| x + |β|`` up to ``1/√(1+ε)``.

    Overflow: ``R`` grows geometrically with depth (each layer multiplies it by about
    ``√fan_in`` at He/Glorot init). In float32 (max 3.4e38) this is fine for the MLPs and
    conv nets of :mod:`lottojax.models`, VGG-16 (``R`` ≈ 5e16 at init on CIFAR-shaped input)
    and ResNet-20 (≈ 1.5e25), but ResNet-32 and deeper overflow to ``inf``: check
    ``jnp.isfinite`` of the scores, or compute in float64 as the paper does,
    ``dtype=jnp.float64`` with 64-bit JAX enabled (``with jax.enable_x64(True):``).

    Args:
      params: the parameters (masked, for a pruned net).
      apply_fn: ``(params, x) -> outputs`` (logits), BatchNorm in evaluation mode.
      input_shape: the shape of one example (no batch axis), e.g. ``(40,)``.
      dtype: compute in this dtype (parameters and input are cast); default: the
        parameters' dtype and a float32 input.

    Returns:
      A pytree like ``params`` of non-negative scores.

    Examples:
      >>> params = {'w0': jnp.array([[1., -2.]]), 'w1': jnp.array([[3.], [0.5]])}
      >>> apply_fn = lambda p, x: jax.nn.relu(x @ p['w0']) @ p['w1']
      >>> s = synflow(params, apply_fn=apply_fn, input_shape=(1,))
      >>> s['w0'].tolist(), s['w1'].tolist()  # paths 1*3 and 2*0.5; each layer sums to R = 4
      ([[3.0, 1.0]], [[3.0], [1.0]])
    """
    check_dtype(dtype)
    linear = jax.tree.map(lambda p: jnp.abs(p).astype(dtype or jnp.result_type(p)), params)
    ones = jnp.ones((1, *tuple(input_shape)), dtype or jnp.float32)
    grads = jax.grad(lambda p: jnp.sum(apply_fn(p, ones)))(linear)
    return jax.tree.map(lambda p, g: jnp.abs(p * g), linear, grads)


def synflow_mask(
    params: PyTree,
    *,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    input_shape,
    density,
    rounds: int = 100,
    prunable: Spec = None,
    dtype=None,
) -> PyTree:
    """The SynFlow mask at ``density``: ``rounds`` rounds of scoring the masked net and
    pruning globally, with the exponential schedule of the paper.

    Round ``k = 1..n`` rescores the currently masked network with :func:`synflow` and keeps
    exactly ``round(d^(k/n) * N)`` of the ``N`` prunable entries (computed in float32; the
    last round keeps ``round(d * N)``). The rounds are one ``lax.fori_loop``, so the whole
    schedule compiles once; ``density`` may be traced (vmap over densities and seeds).

    Args:
      params: the parameters at initialisation.
      apply_fn: ``(params, x) -> outputs``, BatchNorm in evaluation mode.
      input_shape: the shape of one example (no batch axis).
      density: fraction of the prunable entries to keep, in ``(0, 1]``.
      rounds: ``n`` (the paper: 100; 1 is one-shot SynFlow).
      prunable: which leaves may be pruned (default: kernels, ``ndim >= 2``).
      dtype: computation dtype of the scores (see :func:`synflow`). Scores wider than
        float32 are divided by their maximum before ranking (the pruning functions rank
        in float32), so relative differences below float32's range are lost.

    Returns:
      A bool mask like ``params``.

    Examples:
      >>> params = {'w0': jnp.array([[1., -2., 0.1]]), 'w1': jnp.array([[3.], [0.5], [4.]])}
      >>> apply_fn = lambda p, x: jax.nn.relu(x @ p['w0']) @ p['w1']
      >>> m = synflow_mask(params, apply_fn=apply_fn, input_shape=(1,), density=1 / 3, rounds=3)
      >>> m['w0'].tolist(), m['w1'].tolist()  # rescoring drops w1[1] once w0[1] is gone
      ([[True, False, False]], [[True], [False], [False]])
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    _check_density(density)
    check_dtype(dtype)
    flags = prunable_leaves(params, prunable, name="params")[3]
    total = sum(int(np.prod(jnp.shape(p))) for p, flag in zip(jax.tree.leaves(params), flags) if flag)
    density = jnp.asarray(density, jnp.float32)
    wide = dtype is not None and jnp.dtype(dtype).itemsize > 4

    def one_round(k, mask):
        scores = synflow(apply_mask(params, mask), apply_fn=apply_fn, input_shape=input_shape, dtype=dtype)
        if wide:
            top = jnp.max(jnp.stack([jnp.max(s) for s in jax.tree.leaves(scores)]))
            scores = jax.tree.map(lambda s: (s / top).astype(jnp.float32), scores)
        target = jnp.where(k == rounds, density, density ** (k / rounds))
        keep = jnp.round(target * total).astype(jnp.int32)
        return remove_lowest_global(scores, mask, lambda alive: alive - keep, prunable=prunable)

    return jax.lax.fori_loop(1, rounds + 1, one_round, ones_like(params))


def _check_density(density) -> None:
    try:
        value = float(np.asarray(density, np.float64))
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced
    if not 0.0 < value <= 1.0:
        raise ValueError(f"density={value} must be in (0, 1]: it is the fraction of prunable weights kept")
