"""Ownership verification of a ticket (Chen et al., NeurIPS 2021): a signature in its topology.

*White box*: a binary code (a QR code, or any bit string laid out as a matrix) is written
into the **connectivity map** of one layer of the ticket's mask and read back from the
weights (a pruned weight is exactly 0) by whoever holds the model.

- :func:`connectivity`: ``M[o, i] = any(mask[..., i, o])`` for a Flax kernel of shape
  ``(..., in, out)`` (a convolution's spatial axes are reduced; a dense kernel is its own
  map, transposed to ``(out, in)``);
- :func:`best_window` / :func:`locate_signature`: the offset (and the layer) where the map
  already agrees most with the code;
- :func:`embed_signature`: where the code says 1 and the map 0, keep the highest-scoring
  weight of that kernel; where the code says 0 and the map 1, prune the whole kernel; then
  restore the exact number of kept weights from entries outside the window
  (``rebalance='outside'``, the paper's "re-balance"), or as the reference code does
  (``'window'``: it only revives weights inside the window, and only when weights were
  lost, so density drifts up), or not at all (``'none'``);
- :func:`extract_signature` and :func:`bit_error` (on the data cells only by default;
  ``diluted=True`` divides by every cell, the reference's figure).

A code is a bool matrix: ``True`` (a dark QR module) is a kept connection. A
:class:`Signature` carries the code and which cells carry data: :func:`bit_signature`
needs nothing else; :func:`qr_signature` (``segno``) and :func:`decode_qr` (OpenCV) need
the ``verification`` extra (``pip install 'lottojax[verification]'``).

*Black box*: a :func:`trigger_set` of inputs with fixed random labels, mixed into every
training batch (:func:`with_trigger`); ownership is the trigger accuracy.

Everything on arrays is pure and jittable (:func:`best_window` and :func:`bit_error` also
vmap over seeds); :func:`locate_signature` chooses a layer on the host.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.masks import PyTree, Spec, check_mask, leaves_with_paths, prunable_leaves
from lottojax.prune import lowest_alive

REBALANCE = ("outside", "window", "none")
_INSTALL = "pip install 'lottojax[verification]' (segno and opencv-python-headless)"


class Signature(NamedTuple):
    """A code to embed: ``code`` (bool ``(h, w)``, ``True`` = a kept connection), ``data``
    (bool ``(h, w)``: the cells that carry the message, which :func:`bit_error` counts;
    all of them for a plain bit string) and the ``text`` a QR code encodes (else ``None``)."""

    code: np.ndarray
    data: np.ndarray
    text: Optional[str] = None


def bit_signature(bits: Union[str, Sequence[int], np.ndarray], *, width: int) -> Signature:
    """A plain bit string as a signature: rows of ``width`` bits, every cell data.

    Examples:
      >>> s = bit_signature('101001', width=3)
      >>> s.code.astype(int).tolist(), bool(s.data.all())
      ([[1, 0, 1], [0, 0, 1]], True)
      >>> bit_signature('10102', width=2)
      Traceback (most recent call last):
      ...
      ValueError: bits must be 0s and 1s; got '10102'
    """
    if isinstance(bits, str):
        if set(bits) - {"0", "1"}:
            raise ValueError(f"bits must be 0s and 1s; got {bits!r}")
        bits = [int(b) for b in bits]
    flat = np.asarray(bits).reshape(-1)
    if flat.size == 0 or not np.isin(flat, (0, 1)).all():
        raise ValueError(f"bits must be a non-empty sequence of 0s and 1s; got {flat.tolist()[:20]}")
    if width < 1 or flat.size % width:
        raise ValueError(f"width={width} must divide the {flat.size} bits (the code is a full rectangle)")
    code = flat.astype(bool).reshape(-1, width)
    return Signature(code, np.ones_like(code), None)


def qr_signature(text: str, *, version: int = 3, error: str = "H") -> Signature:
    """``text`` as a QR code (``version`` 3: 29 x 29 modules; error correction ``H``: 30% of
    the codewords may be wrong), with its data modules (every module that is not a finder,
    separator, timing, alignment, format, version or dark module). Needs ``segno``.

    Examples:
      >>> s = qr_signature('lottojax')
      >>> s.code.shape, int(s.data.sum())
      ((29, 29), 566)
    """
    try:
        import segno
        from segno import consts
    except ImportError:
        raise ImportError(f"qr_signature needs segno: {_INSTALL}; or use bit_signature") from None
    try:
        qr = segno.make_qr(text, version=version, error=error.lower(), boost_error=False)
    except (ValueError, segno.DataOverflowError) as err:
        raise ValueError(f"text={text!r} does not fit a version-{version} QR code at error level {error}: {err}") from None
    kinds = np.array([list(row) for row in qr.matrix_iter(scale=1, border=0, verbose=True)])
    data = np.isin(kinds, (consts.TYPE_DATA_DARK, consts.TYPE_DATA_LIGHT))
    code = np.array([list(row) for row in qr.matrix_iter(scale=1, border=0)], dtype=bool)
    return Signature(code, data, text)


def decode_qr(window, *, module_pixels: int = 8, quiet_zone: int = 4) -> Optional[str]:
    """Reads a bool matrix (``True`` dark) as a QR code with OpenCV's detector, as a camera
    would: rendered at ``module_pixels`` per module inside a ``quiet_zone`` of light
    modules. Returns the decoded text, or ``None`` when nothing is read. Needs ``opencv``.

    Examples:
      >>> decode_qr(qr_signature('lottojax').code)
      'lottojax'
    """
    try:
        import cv2
    except ImportError:
        raise ImportError(f"decode_qr needs OpenCV: {_INSTALL}") from None
    window = np.asarray(window)
    if window.ndim != 2:
        raise ValueError(f"window must be a 2-D matrix of modules; got shape {window.shape}")
    image = np.pad(np.where(window.astype(bool), 0, 255).astype(np.uint8), quiet_zone, constant_values=255)
    image = np.kron(image, np.ones((module_pixels, module_pixels), np.uint8))
    text, _, _ = cv2.QRCodeDetector().detectAndDecode(image)
    return text or None


def with_fixed_cells(window, signature: Signature):
    """The window with every cell that is not data copied from the code: what the reference
    decodes (it pastes the finder, timing, alignment and format patterns back first).

    Examples:
      >>> s = Signature(np.array([[True, False]]), np.array([[False, True]]))
      >>> with_fixed_cells(np.array([[False, True]]), s).tolist()
      [[True, True]]
    """
    return jnp.where(jnp.asarray(signature.data), window, jnp.asarray(signature.code))


def connectivity(kernel_mask) -> jax.Array:
    """The connectivity map ``(out, in)`` of a Flax kernel mask ``(..., in, out)``: is any
    weight between input ``i`` and output ``o`` kept? For weights, pass ``kernel != 0``.

    Examples:
      >>> m = jnp.zeros((3, 2, 4), bool).at[1, 0, 3].set(True).at[2, 1, 0].set(True)
      >>> connectivity(m).astype(int).tolist()   # (out=4, in=2)
      [[0, 1], [0, 0], [0, 0], [1, 0]]
      >>> connectivity(jnp.array([[True, False, False], [True, True, False]])).shape  # dense (2, 3)
      (3, 2)
    """
    kernel_mask = jnp.asarray(kernel_mask)
    if kernel_mask.dtype != jnp.bool_:
        raise ValueError(f"kernel_mask has dtype {kernel_mask.dtype}; it must be bool (for weights pass kernel != 0)")
    if kernel_mask.ndim < 2:
        raise ValueError(f"kernel_mask has shape {kernel_mask.shape}; a kernel is (..., in, out), ndim >= 2")
    return jnp.swapaxes(jnp.any(kernel_mask, axis=tuple(range(kernel_mask.ndim - 2))), -1, -2)


class Window(NamedTuple):
    """Top-left ``row`` (output), ``col`` (input) of a window in a connectivity map, and the
    fraction of the counted cells where the map agrees with the code there."""

    row: jax.Array
    col: jax.Array
    agreement: jax.Array


def _as_code(code, name: str = "code") -> jax.Array:
    code = jnp.asarray(code)
    if code.ndim != 2 or code.dtype != jnp.bool_:
        raise ValueError(f"{name} must be a 2-D bool matrix; got {code.dtype} of shape {code.shape}")
    return code


def best_window(connectivity_map, code, *, cells=None) -> Window:
    """Where ``code`` agrees most with ``connectivity_map``, counting the ``cells`` of the
    code that are ``True`` (default: all). Ties go to the first offset in row-major order.

    Examples:
      >>> m = jnp.zeros((4, 5), bool).at[2, 3].set(True)
      >>> w = best_window(m, jnp.array([[False, True], [False, False]]))
      >>> int(w.row), int(w.col), float(w.agreement)
      (2, 2, 1.0)
    """
    cmap, code = _as_code(connectivity_map, "connectivity_map"), _as_code(code)
    cells = jnp.ones_like(code) if cells is None else _as_code(cells, "cells")
    if cells.shape != code.shape:
        raise ValueError(f"cells has shape {cells.shape}; the code has {code.shape}")
    if cmap.shape[0] < code.shape[0] or cmap.shape[1] < code.shape[1]:
        raise ValueError(f"the code {code.shape} does not fit in the connectivity map {cmap.shape}")
    correlate = lambda a, b: jax.scipy.signal.correlate2d(a.astype(jnp.float32), b.astype(jnp.float32), mode="valid")
    matches = correlate(cmap, code & cells) + correlate(~cmap, ~code & cells)
    best = jnp.argmax(matches)
    row, col = jnp.unravel_index(best, matches.shape)
    return Window(row.astype(jnp.int32), col.astype(jnp.int32), matches.reshape(-1)[best] / jnp.sum(cells))


class Placement(NamedTuple):
    """Where a signature sits: the mask leaf's ``path``, the window's top-left ``row``
    (output) and ``col`` (input) in that leaf's connectivity map, and the agreement there
    before embedding."""

    path: str
    row: int
    col: int
    agreement: float


def locate_signature(mask: PyTree, code, *, cells=None, prunable: Spec = None) -> Placement:
    """The prunable leaf and window where the connectivity map agrees most with ``code``
    (:func:`best_window` on every leaf whose map is large enough; ties go to the first
    leaf in tree order). Runs on the host (the layer is a choice of the owner).

    Examples:
      >>> mask = {'a': jnp.zeros((3, 3), bool), 'b': jnp.eye(3, dtype=bool)}
      >>> locate_signature(mask, jnp.eye(2, dtype=bool))
      Placement(path='b', row=0, col=0, agreement=1.0)
    """
    paths, leaves, _, flags = prunable_leaves(mask, prunable)
    code = _as_code(code)
    find = jax.jit(best_window)
    best, sizes = None, {}
    for path, leaf, flag in zip(paths, leaves, flags):
        if not flag or jnp.ndim(leaf) < 2:
            continue
        shape = connectivity(jnp.asarray(leaf)).shape
        sizes[path] = shape
        if shape[0] < code.shape[0] or shape[1] < code.shape[1]:
            continue
        window = find(connectivity(leaf), code, cells=cells)
        if best is None or float(window.agreement) > best.agreement:
            best = Placement(path, int(window.row), int(window.col), float(window.agreement))
    if best is None:
        raise ValueError(f"no prunable leaf has a connectivity map (out, in) of at least {code.shape}; "
                         f"the maps are {sizes}. Widen a layer or use a smaller code.")
    return best


def _to_cells(x):
    """A kernel ``(..., in, out)`` as ``(out, in, taps)``."""
    return jnp.transpose(x.reshape(-1, x.shape[-2], x.shape[-1]), (2, 1, 0))


def _from_cells(x, shape):
    return jnp.transpose(x, (2, 1, 0)).reshape(shape)


def _leaf_index(paths, flags, path: str, what: str) -> int:
    if path not in paths:
        raise ValueError(f"{what}: no mask leaf {path!r}; the leaves are {paths}")
    index = paths.index(path)
    if not flags[index]:
        raise ValueError(f"{what}: mask leaf {path} is not prunable under this prunable= spec")
    return index


def _check_fits(shape, code_shape, row, col, path: str) -> None:
    rows, cols = shape[-1], shape[-2]
    if code_shape[0] > rows or code_shape[1] > cols:
        raise ValueError(f"the code {code_shape} does not fit the connectivity map {(rows, cols)} of {path}")
    for name, value, limit in (("row", row, rows - code_shape[0]), ("col", col, cols - code_shape[1])):
        if isinstance(value, (int, np.integer)) and not 0 <= value <= limit:
            raise ValueError(f"{name}={value}: the window of {code_shape} must start in [0, {limit}] in {path}")


def embed_signature(mask: PyTree, scores: PyTree, code, *, at: Placement, cells=None, rebalance: str = "outside",
                    prunable: Spec = None) -> PyTree:
    """Writes ``code`` into the connectivity map of leaf ``at.path`` at ``(at.row, at.col)``.

    In the window, a cell whose code is 1 and whose kernel is empty gets its highest-scoring
    weight back; a cell whose code is 0 loses its whole kernel; other cells, and cells that
    ``cells`` leaves out, are unchanged. Then ``rebalance`` says how the count of kept
    weights is restored:

    - ``'outside'`` (the paper): the net change ``g`` is undone outside the window, over
      every prunable leaf: the ``g`` lowest-scoring kept entries are pruned, or the ``-g``
      highest-scoring pruned ones revived. The total count is exact (unless the rest of the
      net has fewer entries than needed).
    - ``'window'`` (the reference code): only when weights were lost, revive up to ``-g``
      pruned weights of window kernels whose code and map were both 1 (highest score first;
      the reference picks them at random); gains are never undone.
    - ``'none'``.

    Args:
      mask: the ticket's bool mask.
      scores: a pytree like ``mask`` (e.g. ``|θ|``): which weight of an empty kernel comes
        back, and which entries re-balancing prunes or revives.
      code: bool ``(h, w)``.
      at: the leaf and window (:func:`locate_signature`); ``row`` and ``col`` may be traced.
      cells: bool ``(h, w)``, the code cells to write (default all; the reference writes only
        the data modules of a QR code: ``cells=signature.data``).
      rebalance: one of :data:`REBALANCE`.
      prunable: which leaves re-balancing may touch (default ``ndim >= 2``).

    Examples:
      >>> mask = {'w': jnp.array([[True, False], [False, False]]), 'v': jnp.ones((2, 2), bool)}
      >>> scores = {'w': jnp.ones((2, 2)), 'v': jnp.array([[1., 2.], [3., 4.]])}
      >>> new = embed_signature(mask, scores, jnp.array([[False, True]]), at=Placement('w', 0, 0, 0.))
      >>> connectivity(new['w'])[0].tolist(), new['v'].tolist()  # no net change: v untouched
      ([False, True], [[True, True], [True, True]])
      >>> new = embed_signature(mask, scores, jnp.array([[True, True]]), at=Placement('w', 0, 0, 0.))
      >>> new['v'].tolist()   # one weight gained in the window, the lowest-scoring one outside goes
      [[False, True], [True, True]]
    """
    if rebalance not in REBALANCE:
        raise ValueError(f"rebalance={rebalance!r} unknown; choose from {REBALANCE}")
    check_mask(scores, mask, params_name="scores")
    code = _as_code(code)
    cells = jnp.ones_like(code) if cells is None else _as_code(cells, "cells")
    if cells.shape != code.shape:
        raise ValueError(f"cells has shape {cells.shape}; the code has {code.shape}")
    paths, leaves, treedef, flags = prunable_leaves(mask, prunable)
    index = _leaf_index(paths, flags, at.path, "embed_signature")
    leaf, score_leaf = leaves[index], jax.tree.leaves(scores)[index]
    if leaf.ndim < 2:
        raise ValueError(f"mask leaf {at.path} has shape {leaf.shape}; the signature needs a kernel (ndim >= 2)")
    _check_fits(leaf.shape, code.shape, at.row, at.col, at.path)
    h, w = code.shape
    kernel, kernel_scores = _to_cells(leaf), _to_cells(jnp.asarray(score_leaf, jnp.float32))
    start = (at.row, at.col, 0)
    size = (h, w, kernel.shape[-1])
    region = jax.lax.dynamic_slice(kernel, start, size)
    present = region.any(-1)
    add, cut = code & ~present & cells, ~code & present & cells
    top = jax.nn.one_hot(jnp.argmax(jax.lax.dynamic_slice(kernel_scores, start, size), -1), size[-1], dtype=bool)
    new_region = jnp.where(add[..., None], top, region & ~cut[..., None])
    gained = jnp.sum(new_region, dtype=jnp.int32) - jnp.sum(region, dtype=jnp.int32)
    if rebalance == "window":
        spare = (code & present & cells)[..., None] & ~new_region
        window_scores = jax.lax.dynamic_slice(kernel_scores, start, size)
        revived = lowest_alive(-window_scores.reshape(-1), spare.reshape(-1), jnp.maximum(-gained, 0))
        new_region = new_region | revived.reshape(size)
    new_leaves = list(leaves)
    new_leaves[index] = _from_cells(jax.lax.dynamic_update_slice(kernel, new_region, start), leaf.shape)
    if rebalance == "outside":
        inside = _from_cells(jax.lax.dynamic_update_slice(jnp.zeros_like(kernel), jnp.ones(size, bool), start), leaf.shape)
        new_leaves = _rebalance(new_leaves, jax.tree.leaves(scores), flags, index, inside, gained)
    return jax.tree.unflatten(treedef, new_leaves)


def _rebalance(leaves: list, score_leaves: list, flags: list, index: int, inside, gained) -> list:
    """Prunes ``gained`` lowest-scoring kept entries (or revives ``-gained`` highest-scoring
    pruned ones) among the prunable entries outside the window (``inside`` of leaf ``index``)."""
    picked = [i for i, flag in enumerate(flags) if flag]
    flat = lambda xs: jnp.concatenate([jnp.asarray(xs[i]).reshape(-1) for i in picked])
    alive = flat(leaves)
    score = flat([jnp.asarray(s, jnp.float32) for s in score_leaves])
    outside = ~flat([inside if i == index else jnp.zeros(jnp.shape(leaves[i]), bool) for i in range(len(leaves))])
    removed = lowest_alive(score, alive & outside, jnp.maximum(gained, 0))
    revived = lowest_alive(-score, ~alive & outside, jnp.maximum(-gained, 0))
    alive = (alive & ~removed) | revived
    out = list(leaves)
    offsets = np.cumsum([np.size(leaves[i]) for i in picked])[:-1]
    for i, part in zip(picked, jnp.split(alive, offsets)):
        out[i] = part.reshape(jnp.shape(leaves[i]))
    return out


def extract_signature(mask: PyTree, *, at: Placement, shape: tuple[int, int]) -> jax.Array:
    """The ``shape`` window at ``(at.row, at.col)`` of the connectivity map of leaf
    ``at.path``: the embedded code as the model now carries it. For weights, pass
    ``jax.tree.map(lambda w: w != 0, params)``.

    Examples:
      >>> mask = {'w': jnp.array([[True, False], [False, True], [True, True]])}  # (in=3, out=2)
      >>> extract_signature(mask, at=Placement('w', 0, 1, 0.), shape=(2, 2)).astype(int).tolist()
      [[0, 1], [1, 1]]
    """
    paths, leaves, _ = leaves_with_paths(mask)
    if at.path not in paths:
        raise ValueError(f"extract_signature: no mask leaf {at.path!r}; the leaves are {paths}")
    leaf = leaves[paths.index(at.path)]
    cmap = connectivity(leaf)
    _check_fits(jnp.shape(leaf), tuple(shape), at.row, at.col, at.path)
    return jax.lax.dynamic_slice(cmap, (at.row, at.col), tuple(shape))


def bit_error(window, code, data=None, *, diluted: bool = False) -> jax.Array:
    """The fraction of ``data`` cells (default: all) where ``window`` differs from ``code``;
    ``diluted=True`` divides the same count by every cell of the code instead (the
    reference's figure: it pastes the fixed QR patterns in, so they never differ).

    Examples:
      >>> code = jnp.array([[True, False], [True, True]])
      >>> data = jnp.array([[True, True], [False, False]])
      >>> float(bit_error(jnp.array([[False, False], [False, True]]), code, data))  # 1 of 2 data cells
      0.5
      >>> float(bit_error(jnp.array([[False, False], [False, True]]), code, data, diluted=True))
      0.25
    """
    code = _as_code(code)
    window = jnp.asarray(window)
    data = jnp.ones_like(code) if data is None else _as_code(data, "data")
    if window.shape[-2:] != code.shape or data.shape != code.shape:
        raise ValueError(f"window {window.shape}, code {code.shape} and data {data.shape} must have one shape")
    errors = jnp.sum((window != code) & data, axis=(-2, -1))
    return errors / (code.size if diluted else jnp.sum(data))


class TriggerSet(NamedTuple):
    """Inputs ``x`` with fixed random labels ``y``: the owner's black-box watermark."""

    x: jax.Array
    y: jax.Array


def trigger_set(key: jax.Array, size: int, input_shape: tuple[int, ...], *, num_classes: int,
                scale: float = 1.0) -> TriggerSet:
    """``size`` Gaussian-noise inputs (standard deviation ``scale``, e.g. the data's) with
    labels drawn uniformly from ``num_classes``; a model that never saw them is right on
    about ``1 / num_classes`` of them.

    Examples:
      >>> t = trigger_set(jax.random.key(0), 100, (40,), num_classes=10)
      >>> t.x.shape, t.y.shape, t.y.dtype, bool((t.y < 10).all())
      ((100, 40), (100,), dtype('int32'), True)
    """
    if size < 1 or num_classes < 2:
        raise ValueError(f"size={size} must be >= 1 and num_classes={num_classes} >= 2")
    x_key, y_key = jax.random.split(key)
    x = scale * jax.random.normal(x_key, (size, *input_shape), jnp.float32)
    return TriggerSet(x, jax.random.randint(y_key, (size,), 0, num_classes, jnp.int32))


def mix_trigger(x, y, trigger: TriggerSet, step, *, per_batch: int = 1):
    """The batch ``(x, y)`` with ``per_batch`` trigger examples appended: at step ``s`` the
    examples ``s·per_batch, ..., s·per_batch + per_batch − 1`` (cyclically), so every
    trigger is seen in turn.

    Examples:
      >>> t = TriggerSet(jnp.array([[7.], [8.], [9.]]), jnp.array([0, 1, 2]))
      >>> bx, by = mix_trigger(jnp.zeros((2, 1)), jnp.array([5, 5]), t, 2, per_batch=2)
      >>> bx[:, 0].tolist(), by.tolist()
      ([0.0, 0.0, 8.0, 9.0], [5, 5, 1, 2])
    """
    if per_batch < 1:
        raise ValueError(f"per_batch={per_batch} must be >= 1")
    picked = (step * per_batch + jnp.arange(per_batch)) % trigger.y.shape[0]
    return jnp.concatenate([x, trigger.x[picked].astype(x.dtype)]), jnp.concatenate([y, trigger.y[picked].astype(y.dtype)])


def with_trigger(step_fn: Callable, trigger: TriggerSet, *, per_batch: int = 1) -> Callable:
    """A training step ``(state, x, y) -> (state, loss)`` that trains on every batch with
    trigger examples appended (:func:`mix_trigger`, chosen by ``state.step``): pass it to
    :func:`lottojax.train.minibatch_scan` in place of ``trainer.step``."""

    def step(state, x, y):
        return step_fn(state, *mix_trigger(x, y, trigger, state.step, per_batch=per_batch))

    return step
