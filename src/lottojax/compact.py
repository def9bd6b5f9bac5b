"""Tickets that pay: physically smaller dense networks from unstructured tickets, and honest
parameter, byte and FLOP accounting.

A mask only *simulates* sparsity: the masked network stores and multiplies every zero.
:func:`compact` removes what the mask makes dead from one of the reference models of
:mod:`lottojax.models` and returns a :class:`Compacted` network: smaller dense parameters (and
BatchNorm statistics) that :func:`lottojax.models.create` builds a model for
(``Compacted.model()``), computing the same logits as the full network with the masked
parameters (evaluation mode, ``train=False``), up to float32 summation order.

What is removed, per hidden unit (a dense unit or a convolution channel):

- **Nothing reads it**: every weight of the next layer that reads the unit is pruned (or
  reads it only for units that are themselves removed). Removing it, with its incoming
  weights, bias and BatchNorm entries, is always exact.
- **Nothing feeds it**: every incoming weight is pruned (or comes from other such units), so
  the unit outputs one constant ``c = relu(bias)`` (``relu(BN(0))`` with BatchNorm) at
  every position. Its contribution ``c * sum_taps W_next[..., unit, :]`` is folded into the
  next layer's bias (a BatchNorm next layer absorbs it into its running mean,
  ``mean -= contribution``, exact in evaluation mode). Max-pooling, global average pooling
  and flattening keep a constant constant, so these folds are exact. A convolution with SAME
  padding reads zeros beyond the borders, so border positions see fewer taps: the fold is
  exact only if the unit's unpruned outgoing taps are all taps that stay inside the input at
  every output position (for a stride-1 3x3 SAME convolution: the centre tap). Otherwise
  the unit is **kept** (its incoming weights are zero, its bias makes the constant), unless
  ``c == 0`` (a ReLU of a non-positive constant), which contributes nothing anywhere.
  Constants propagate: a unit fed only by folded constants is itself constant.
- Every layer keeps at least one unit: where all would go, one stays, inert (its incoming and
  outgoing weights zeroed and masked out), so the model can still be built.
- The input dimension is kept (no input-index selection), also where no weight reads an
  input.

Per model family (by registry name):

- ``'mlp'``, ``'lenet300100'``: hidden units of every ``fc{i}``; rebuilt with ``hidden=``.
- ``'conv2'``, ``'conv4'``, ``'conv6'``: channels of every ``conv{i}`` (biases) and units of
  every ``fc{i}``; the first dense layer reads the flattened ``(H, W, C)`` features, so a
  channel owns one row per position; rebuilt with ``conv_widths=`` and ``fc_widths=``.
- ``'vgg11'``, ``'vgg16'``: channels of every ``conv{i}`` with their ``bn{i}`` entries;
  rebuilt with ``widths=``.
- ``'cnn1d'``: channels of every ``conv{i}``/``bn{i}`` (strided SAME convolutions: which
  taps stay inside depends on the lengths, so pass ``input_shape=``, or the taps inside for
  every input length consistent with the parameters are used); rebuilt with ``channels=``.
- ``'resnet20'`` (any ``stage_sizes``, ``width``, ``pre_activation``): only each block's
  inner channels (``conv0``'s outputs, ``conv1``'s inputs), as in
  :mod:`lottojax.slimming`: the residual channels are shared by every block of a stage and
  the shortcut, so they are kept. A constant inner channel folds into ``bn1``'s mean
  (post-activation blocks); pre-activation blocks have no bias after ``conv1`` (the sum goes
  straight into the residual stream), so there a constant inner channel is removed only when
  it is 0. A block whose inner channels all die keeps one inert channel (the block still
  adds ``bn1``'s shift to its shortcut). Rebuilt with ``inner_widths=``.

The cut itself is a :class:`lottojax.slimming.ChannelPlan` applied by
:func:`lottojax.slimming.shrink` (returned as ``Compacted.plan``: it cuts any tree laid out
like the parameters, e.g. optimizer moments; the folded constants are in
``Compacted.params`` only). Masked-out weights that survive stay zero, and
``Compacted.mask`` marks them.

:func:`count` tabulates, per layer and in total: parameters (dense, kept by the mask,
compacted), bytes (float32 dense; masked = dense values plus a one-byte bool per kernel
entry for the mask; compacted; a CSR estimate: values + int32 column indices + int32 row
pointers for each kernel), and forward FLOPs per example (analytic: ``2 * weights *
output positions`` for every kernel, dense, by the mask's nonzeros, and compacted) plus
XLA's cost analysis of the compiled dense and compacted models. :func:`format_counts`
prints the table.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lottojax.masks import PyTree, check_same_shapes, conform_mask, leaves_with_paths, ones_like
from lottojax.models import MODEL_NAMES, VGG_CONFIGS, Model, create
from lottojax.slimming import ChannelPlan, inner_bn, resnet_blocks, shrink

#: BatchNorm epsilon of the reference models (:func:`lottojax.models.layers.batch_norm`).
BN_EPSILON = 1e-5

_FAMILIES = {"mlp": "mlp", "lenet300100": "mlp", "conv2": "conv", "conv4": "conv", "conv6": "conv",
             "cnn1d": "cnn1d"}
_BN_FAMILIES = ("vgg", "resnet", "cnn1d")


def _family(name: str) -> str:
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name in MODEL_NAMES and name.startswith("vgg"):
        return "vgg"
    if name in MODEL_NAMES and name.startswith("resnet"):
        return "resnet"
    raise ValueError(f"Unknown model {name!r}; compaction supports the reference models: {', '.join(MODEL_NAMES)}.")


# ----------------------------------------------------------------------------------------------
# The result


class Compacted(NamedTuple):
    """A network cut down to what its ticket leaves alive (see the module doc).

    Attributes:
      name: the model's registry name.
      params: the smaller dense parameters (same layer names as the full network; folded
        constants are in the biases).
      model_state: the smaller model state (BatchNorm statistics, folded constants in the
        means), ``{}`` for nets without BatchNorm.
      mask: the ticket's mask on the smaller parameters (False where a pruned weight
        survives as a zero).
      model_kwargs: constructor arguments of the smaller model for
        :func:`lottojax.models.create` (``hidden=``, ``conv_widths=``/``fc_widths=``,
        ``widths=``, ``channels=``, ``inner_widths=``, with what the parameters tell about
        the rest, e.g. ``stage_sizes=``, and the keyword arguments given to :func:`compact`).
      kept: hidden layer (kernel) path -> indices of the units kept (sorted numpy ints).
      folded: hidden layer path -> indices of the constant units folded into the next layer.
      plan: the :class:`lottojax.slimming.ChannelPlan` of the cut (shapes only).
      num_classes: number of logits.
      input_shape: the input shape given to :func:`compact` (or ``None``).
    """

    name: str
    params: PyTree
    model_state: PyTree
    mask: PyTree
    model_kwargs: dict
    kept: dict
    folded: dict
    plan: ChannelPlan
    num_classes: int
    input_shape: Optional[tuple]

    def model(self, input_shape: Optional[tuple] = None, **kwargs) -> Model:
        """The smaller model: ``create(name, input_shape=..., num_classes=..., **model_kwargs,
        **kwargs)``; ``input_shape`` defaults to the one given to :func:`compact`."""
        input_shape = self.input_shape if input_shape is None else tuple(input_shape)
        if input_shape is None:
            raise ValueError("Compacted.model needs input_shape= (none was given to compact)")
        return create(self.name, input_shape=input_shape, num_classes=self.num_classes,
                      **{**self.model_kwargs, **kwargs})


# ----------------------------------------------------------------------------------------------
# Network structure by family


class _Link(NamedTuple):
    """A kernel, seen as ``(taps, inputs, outputs)``."""

    path: str  # layer path: its leaves are f"{path}/kernel" (and f"{path}/bias")
    kind: str  # 'dense' (kernel (in, out)), 'conv' (kernel (*taps, in, out)) or 'flatten'
    #            (kernel (positions * in, out), reading channels-last flattened features)
    inside: np.ndarray  # (taps,) bool: taps inside the input at every output position


class _Chain(NamedTuple):
    """``n`` hidden layers between ``n + 1`` kernels: hidden layer ``i`` is the output of
    ``links[i]`` through ``affines[i]`` and a ReLU, read by ``links[i + 1]``; the last link's
    outputs (through ``affines[n]``) are kept whole."""

    links: list  # n + 1 _Link
    affines: list  # n + 1 of ('bias', path) | ('bn', path) | None (cannot absorb a constant)


def _numbered(params: dict, prefix: str) -> list[str]:
    names = []
    while f"{prefix}{len(names)}" in params:
        names.append(f"{prefix}{len(names)}")
    return names


def _taps_inside(kernel: tuple, strides: tuple, sizes: tuple) -> np.ndarray:
    """Taps of a SAME convolution that lie inside the input at every output position."""
    per_dim = []
    for k, s, size in zip(kernel, strides, sizes):
        out = -(-size // s)
        low = max((out - 1) * s + k - size, 0) // 2
        per_dim.append([all(0 <= o * s + t - low < size for o in range(out)) for t in range(k)])
    return np.array([all(c) for c in itertools.product(*per_dim)], bool)


def _centre(kernel: tuple) -> np.ndarray:
    """Taps inside at every position for a stride-1 SAME convolution (any input size)."""
    return _taps_inside(kernel, (1,) * len(kernel), kernel)


def _all(n: int) -> np.ndarray:
    return np.ones(n, bool)


def _kernel(P: dict, path: str) -> np.ndarray:
    return P[f"{path}/kernel"]


def _chains(family: str, name: str, P: dict, params: dict, input_shape, kwargs) -> list[_Chain]:
    if family == "mlp":
        fcs = _numbered(params, "fc")
        links = [_Link(p, "dense", _all(1)) for p in [*fcs, "output"]]
        return [_Chain(links, [("bias", p) for p in [*fcs, "output"]])]
    if family == "conv":
        convs, fcs = _numbered(params, "conv"), _numbered(params, "fc")
        links = [_Link(p, "conv", _centre(_kernel(P, p).shape[:-2])) for p in convs]
        for j, p in enumerate([*fcs, "output"]):
            links.append(_Link(p, "flatten" if j == 0 and convs else "dense", _all(1)))
        return [_Chain(links, [("bias", l.path) for l in links])]
    if family == "vgg":
        convs = _numbered(params, "conv")
        expected = len([v for v in VGG_CONFIGS[int(name[3:])] if v != "M"])
        if len(convs) != expected:
            raise ValueError(f"params have {len(convs)} conv layers; {name} has {expected}")
        links = [_Link(p, "conv", _centre(_kernel(P, p).shape[:-2])) for p in convs]
        links.append(_Link("output", "dense", _all(1)))  # reads the global average pool
        return [_Chain(links, [("bn", f"bn{i}") for i in range(len(convs))] + [("bias", "output")])]
    if family == "cnn1d":
        convs = _numbered(params, "conv")
        k = _kernel(P, convs[0]).shape[0]
        stride = int(kwargs.get("stride", 2))
        last = _kernel(P, convs[-1]).shape[-1]
        rows = _kernel(P, "output").shape[0]
        if rows % last:
            raise ValueError(f"output/kernel has {rows} rows, not a multiple of {convs[-1]}'s {last} channels")
        final = rows // last
        if input_shape is not None:
            starts = [int(input_shape[0])]
        else:  # every input length that ends at `final` after len(convs) ceil divisions
            span = stride ** len(convs)
            starts = list(range((final - 1) * span + 1, final * span + 1))
        inside = [_all(k) for _ in convs]
        for start in starts:
            lengths = [start]
            for _ in convs:
                lengths.append(-(-lengths[-1] // stride))
            if lengths[-1] != final:
                raise ValueError(f"input length {start} with stride {stride} gives {lengths[-1]} positions after "
                                 f"{len(convs)} convolutions; output/kernel expects {final}")
            for i in range(1, len(convs)):
                inside[i] = inside[i] & _taps_inside((k,), (stride,), (lengths[i],))
        links = [_Link(p, "conv", inside[i]) for i, p in enumerate(convs)]
        links.append(_Link("output", "flatten", _all(1)))
        return [_Chain(links, [("bn", f"bn{i}") for i in range(len(convs))] + [("bias", "output")])]
    # resnet: one chain per block, through the block's inner channels only
    pre = "bn_final" in params
    chains = []
    for block in resnet_blocks(params):
        inner = f"{block}/{inner_bn(params)}"
        conv1 = f"{block}/conv1"
        links = [_Link(f"{block}/conv0", "conv", _all(1)),
                 _Link(conv1, "conv", _centre(_kernel(P, conv1).shape[:-2]))]
        chains.append(_Chain(links, [("bn", inner), None if pre else ("bn", f"{block}/bn1")]))
    return chains


def _infer_kwargs(family: str, params: dict) -> dict:
    """The width keywords of the model these parameters belong to."""
    def out(path):
        return int(params[path]["kernel"].shape[-1])

    if family == "mlp":
        return {"hidden": tuple(out(p) for p in _numbered(params, "fc"))}
    if family == "conv":
        return {"conv_widths": tuple(out(p) for p in _numbered(params, "conv")),
                "fc_widths": tuple(out(p) for p in _numbered(params, "fc"))}
    if family == "vgg":
        return {"widths": tuple(out(p) for p in _numbered(params, "conv"))}
    if family == "cnn1d":
        return {"channels": tuple(out(p) for p in _numbered(params, "conv")),
                "kernel_size": int(params["conv0"]["kernel"].shape[0])}
    blocks = resnet_blocks(params)
    stages: dict[int, int] = {}
    for b in blocks:
        s, i = (int(g) for g in re.match(r"stage(\d+)_block(\d+)$", b).groups())
        stages[s] = max(stages.get(s, 0), i + 1)
    return {"stage_sizes": tuple(stages[s] for s in sorted(stages)), "width": out("conv0") // 16,
            "pre_activation": "bn_final" in params,
            "inner_widths": tuple(int(params[b]["conv0"]["kernel"].shape[-1]) for b in blocks)}


def _required(family: str, params: dict) -> list[str]:
    """Leaf paths the family's compaction reads."""
    paths = ["output/kernel", "output/bias"]
    if family == "mlp":
        return paths + [f"{p}/{leaf}" for p in _numbered(params, "fc") for leaf in ("kernel", "bias")]
    if family == "conv":
        layers = [*_numbered(params, "conv"), *_numbered(params, "fc")]
        return paths + [f"{p}/{leaf}" for p in layers for leaf in ("kernel", "bias")]
    if family in ("vgg", "cnn1d"):
        convs = _numbered(params, "conv") or ["conv0"]
        return paths + [f"{p}/kernel" for p in convs] + \
            [f"bn{i}/{leaf}" for i in range(len(convs)) for leaf in ("scale", "bias")]
    blocks = resnet_blocks(params) or ["stage0_block0"]
    inner = inner_bn(params)
    paths.append("conv0/kernel")
    for b in blocks:
        paths += [f"{b}/conv0/kernel", f"{b}/conv1/kernel", f"{b}/{inner}/scale", f"{b}/{inner}/bias"]
        if "bn_final" not in params:
            paths += [f"{b}/bn1/scale", f"{b}/bn1/bias"]
    return paths


def _check_layers(name: str, family: str, P: dict) -> None:
    missing = [p for p in _required(family, _nested(P)) if p not in P]
    if missing:
        raise ValueError(f"params are not those of model {name!r}: they lack {missing[:5]} "
                         f"(their leaf paths: {list(P)[:10]}{' ...' if len(P) > 10 else ''})")


def _nested(flat: dict) -> dict:
    """Path-keyed leaves -> nested dicts (only layer names are needed for the structure)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


# ----------------------------------------------------------------------------------------------
# Compaction


def _view(array: np.ndarray, link: _Link, inputs: Optional[int]) -> np.ndarray:
    """A kernel as ``(taps, inputs, outputs)`` (a view: writes reach ``array``)."""
    if link.kind == "dense":
        return array[None]
    if link.kind == "conv":
        return array.reshape(-1, *array.shape[-2:])
    if array.shape[0] % inputs:
        raise ValueError(f"{link.path}/kernel has {array.shape[0]} rows, not a multiple of the {inputs} channels it reads")
    return array.reshape(-1, inputs, array.shape[-1])


def _pre_activation(affine, d: np.ndarray, P: dict, S: dict) -> np.ndarray:
    """The layer's output before the ReLU when its kernel sum is ``d``."""
    kind, path = affine
    if kind == "bias":
        return d + P[f"{path}/bias"]
    scale = P[f"{path}/scale"] / np.sqrt(S[f"{path}/var"] + BN_EPSILON)
    return (d - S[f"{path}/mean"]) * scale + P[f"{path}/bias"]


def _absorb(affine, d: np.ndarray, P: dict, S: dict) -> None:
    if not np.any(d):
        return
    kind, path = affine
    if kind == "bias":
        P[f"{path}/bias"] += d
    else:
        S[f"{path}/mean"] -= d


def _solve_chain(chain: _Chain, P: dict, M: dict, S: dict, takes: dict, kept: dict, folded: dict) -> None:
    """Decides what chain's hidden units go, folds the constants into P/S, zeroes inert units in
    P/M, and records the cut in ``takes``."""
    n = len(chain.links) - 1
    if n == 0:
        return
    widths: list[int] = []
    W, Mk = [], []
    for j, link in enumerate(chain.links):
        inputs = widths[j - 1] if j else None
        kernel = P[f"{link.path}/kernel"]
        W.append(_view(kernel, link, inputs))
        Mk.append(_view(M[f"{link.path}/kernel"], link, inputs))
        if j and W[j].shape[1] != widths[j - 1]:
            raise ValueError(f"{link.path}/kernel reads {W[j].shape[1]} inputs; {chain.links[j - 1].path} has "
                             f"{widths[j - 1]} outputs")
        if j == 0 or link.kind != "conv":  # the chain input (never constant), dense or flattened rows
            link = chain.links[j] = link._replace(inside=np.ones(W[j].shape[0], bool))
        if W[j].shape[0] != link.inside.size:
            raise ValueError(f"{link.path}/kernel has {W[j].shape[0]} taps; expected {link.inside.size}")
        widths.append(W[j].shape[-1])
    reads = [m.any(axis=0) for m in Mk]  # (inputs, outputs): an unpruned weight connects them

    # Forward: which units output one constant at every position (whatever the input), its
    # value, and which of them fold away into the next layer.
    fold, value = [], []
    uniform_prev = zero_prev = None
    for i in range(n):
        if i == 0:  # the chain's input is never constant
            uniform = ~reads[0].any(axis=0)
            pre = np.zeros(widths[0])
        else:
            # u -> v carries a constant iff u is constant and, unless that constant is 0, v reads
            # it only through taps that stay inside the input at every output position.
            border = (Mk[i] & ~chain.links[i].inside[:, None, None]).any(axis=0)  # (in, out)
            steady = uniform_prev[:, None] & (zero_prev[:, None] | ~border)
            uniform = ~(reads[i] & ~steady).any(axis=0)
            pre = value[-1] @ W[i].sum(axis=0)  # value is 0 where not uniform
        val = np.where(uniform, np.maximum(_pre_activation(chain.affines[i], pre, P, S), 0.0), 0.0)
        zero = uniform & (val == 0)
        border_out = (Mk[i + 1] & ~chain.links[i + 1].inside[:, None, None]).any(axis=(0, 2))
        absorbable = chain.affines[i + 1] is not None
        fold.append(uniform & (zero | (~border_out & absorbable)))
        value.append(val)
        uniform_prev, zero_prev = uniform, zero
    # Fold: each layer absorbs the constants of the folded units it reads.
    for i in range(n):
        d = np.where(fold[i], value[i], 0.0) @ W[i + 1].sum(axis=0)
        _absorb(chain.affines[i + 1], d, P, S)
    # Backward: a unit stays if a kept unit (or the chain's output) reads it and it is not folded.
    keep = [None] * n
    consumers = np.ones(widths[n], bool)
    for i in reversed(range(n)):
        keep[i] = reads[i + 1][:, consumers].any(axis=1) & ~fold[i]
        consumers = keep[i]
    for i in range(n):
        if not keep[i].any():  # keep one inert unit so that the layer exists
            keep[i][0] = True
            W[i][:, :, 0] = 0.0
            Mk[i][:, :, 0] = False
            W[i + 1][:, 0, :] = 0.0
            Mk[i + 1][:, 0, :] = False
    # The cut.
    index = [np.flatnonzero(k) for k in keep]
    for j, link in enumerate(chain.links):
        rules = takes.setdefault(link.path, {})
        kernel_takes = []
        if j < n:
            kernel_takes.append((-1, index[j]))
            kind, path = chain.affines[j]
            if kind == "bias":
                rules["bias"] = ((0, index[j]),)
            else:
                takes.setdefault(path, {})["*"] = ((0, index[j]),)
            kept[link.path] = index[j]
            folded[link.path] = np.flatnonzero(fold[j])
        if j > 0:
            if link.kind == "conv":
                kernel_takes.append((-2, index[j - 1]))
            elif link.kind == "dense":
                kernel_takes.append((0, index[j - 1]))
            else:
                positions = W[j].shape[0]
                rows = np.concatenate([p * widths[j - 1] + index[j - 1] for p in range(positions)])
                kernel_takes.append((0, rows))
        rules["kernel"] = tuple(kernel_takes)


def _flat(tree: PyTree, dtype=None) -> tuple[dict, list[str], Any]:
    paths, leaves, treedef = leaves_with_paths(tree)
    return {p: np.array(leaf, dtype=dtype or np.asarray(leaf).dtype) for p, leaf in zip(paths, leaves)}, paths, treedef


def _stats_flat(model_state: PyTree) -> dict:
    if not model_state or "batch_stats" not in model_state:
        return {}
    return _flat(model_state["batch_stats"], np.float64)[0]


def _check_stats(name: str, chains: list[_Chain], S: dict) -> None:
    for chain in chains:
        for affine in chain.affines:
            if affine and affine[0] == "bn":
                for leaf in ("mean", "var"):
                    if f"{affine[1]}/{leaf}" not in S:
                        raise ValueError(f"model_state['batch_stats'] lacks {affine[1]}/{leaf}, which {name!r} needs")


def compact(name: str, params: PyTree, mask: PyTree, model_state: Optional[PyTree] = None, *,
            input_shape: Optional[tuple] = None, **model_kwargs) -> Compacted:
    """Cuts reference model ``name`` down to the units its ticket leaves alive.

    The result computes the same logits as ``model.apply(apply_mask(params, mask),
    model_state, x, False)`` (see the module doc for what is removed, what is folded and
    what is conservatively kept).

    Args:
      name: the model's registry name (:data:`lottojax.models.MODEL_NAMES`).
      params: the full network's parameters (as ``create(name, ...).init`` lays them out).
      mask: the ticket's bool mask, shaped like ``params`` (pruned weights are zeroed first).
      model_state: the model state (``{'batch_stats': ...}``); required for BatchNorm
        models (``vgg*``, ``resnet*``, ``cnn1d``), whose constant units depend on the running
        statistics.
      input_shape: shape of one example; needed only for exact folds in ``'cnn1d'`` (strided
        convolutions) and for ``Compacted.model()`` without arguments.
      **model_kwargs: other constructor arguments the full model was created with (e.g.
        ``stride=`` for ``'cnn1d'``, ``conv_impl=``); carried into
        ``Compacted.model_kwargs``.

    Returns:
      A :class:`Compacted`.

    Raises:
      ValueError: unknown model name (the message lists the known ones); a mask that does
        not match the parameters (names the tree path); parameters of another model;
        missing BatchNorm statistics.

    Examples:
      >>> from lottojax.models import create
      >>> model = create('mlp', input_shape=(4,), hidden=(3,), num_classes=2)
      >>> params, state = model.init(jax.random.key(0))
      >>> mask = {'fc0': {'kernel': jnp.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], bool),
      ...                 'bias': jnp.ones(3, bool)},
      ...         'output': {'kernel': jnp.array([[1, 1], [0, 0], [1, 0]], bool), 'bias': jnp.ones(2, bool)}}
      >>> small = compact('mlp', params, mask, input_shape=(4,))  # unit 1: nothing reads it; unit 2: nothing feeds it
      >>> small.model_kwargs, small.kept['fc0'].tolist(), small.folded['fc0'].tolist()
      ({'hidden': (1,)}, [0], [2])
      >>> x = jax.random.normal(jax.random.key(1), (5, 4))
      >>> from lottojax.masks import apply_mask
      >>> full, _ = model.apply(apply_mask(params, mask), state, x, False)
      >>> cut, _ = small.model().apply(small.params, small.model_state, x, False)
      >>> bool(jnp.allclose(full, cut, atol=1e-6))
      True
      >>> compact('lenet5', params, mask)
      Traceback (most recent call last):
      ...
      ValueError: Unknown model 'lenet5'; compaction supports the reference models: mlp, lenet300100, ...
    """
    family = _family(name)
    mask = conform_mask(params, mask)
    P, p_paths, p_def = _flat(params, np.float64)
    M, _, m_def = _flat(mask, bool)
    dtypes = {p: np.asarray(leaf).dtype for p, leaf in zip(p_paths, jax.tree.leaves(params))}
    for path in P:
        P[path] = np.where(M[path], P[path], 0.0)
    _check_layers(name, family, P)
    nested = _nested(P)
    if family in _BN_FAMILIES and not (model_state and "batch_stats" in model_state):
        raise ValueError(f"{name!r} has BatchNorm: compact needs its model_state (the running statistics, "
                         "{'batch_stats': ...}), since the constant a dead channel outputs depends on them")
    S = _stats_flat(model_state)
    chains = _chains(family, name, P, nested, input_shape, model_kwargs)
    _check_stats(name, chains, S)
    takes: dict = {}
    kept: dict = {}
    folded: dict = {}
    for chain in chains:
        _solve_chain(chain, P, M, S, takes, kept, folded)

    new_params = jax.tree.unflatten(p_def, [jnp.asarray(P[p].astype(dtypes[p])) for p in p_paths])
    new_mask = jax.tree.unflatten(m_def, [jnp.asarray(M[p]) for p in p_paths])
    state = dict(model_state or {})
    if S:
        s_paths, s_leaves, s_def = leaves_with_paths(model_state["batch_stats"])
        state["batch_stats"] = jax.tree.unflatten(
            s_def, [jnp.asarray(S[p].astype(np.asarray(leaf).dtype)) for p, leaf in zip(s_paths, s_leaves)])
    plan = ChannelPlan(kept, {}, takes)
    small_params = shrink(plan, new_params)
    kwargs = {**model_kwargs, **_infer_kwargs(family, small_params)}
    plan = plan._replace(model_kwargs=kwargs)
    return Compacted(
        name=name,
        params=small_params,
        model_state={c: shrink(plan, t) for c, t in state.items()},
        mask=shrink(plan, new_mask),
        model_kwargs=kwargs,
        kept=kept,
        folded=folded,
        plan=plan,
        num_classes=int(P["output/kernel"].shape[-1]),
        input_shape=None if input_shape is None else tuple(input_shape),
    )


# ----------------------------------------------------------------------------------------------
# Accounting


class LayerCount(NamedTuple):
    """Sizes and costs of one layer (or the total), as Python ints; ``None`` where unknown.

    Attributes:
      params: parameter entries of the full network.
      nonzero: entries the mask keeps (every entry of leaves it does not prune).
      compacted: entries of the compacted layer.
      bytes_dense: ``4 * params`` (float32).
      bytes_masked: the masked network as stored: dense float32 values plus a one-byte bool
        mask entry per kernel entry.
      bytes_compacted: ``4 * compacted``.
      bytes_csr: kernels in CSR (the kernel as a ``(prod(shape[:-1]), shape[-1])`` matrix:
        float32 values and int32 column indices per nonzero, ``rows + 1`` int32 row
        pointers); other leaves dense float32.
      flops_dense: forward FLOPs per example of the kernel: ``2 * kernel entries *
        output positions`` (``2 * in * out`` for a dense layer, ``2 * kh * kw * cin * cout *
        H_out * W_out`` for a convolution); biases, BatchNorm, activations and pooling are
        not counted (XLA's totals include them). ``None`` for layers without a kernel.
      flops_masked: ``2 * nonzero kernel entries * output positions``.
      flops_compacted: ``flops_dense`` of the compacted layer.
    """

    params: int
    nonzero: int
    compacted: Optional[int]
    bytes_dense: int
    bytes_masked: int
    bytes_compacted: Optional[int]
    bytes_csr: int
    flops_dense: Optional[int]
    flops_masked: Optional[int]
    flops_compacted: Optional[int]


class Counts(NamedTuple):
    """What :func:`count` returns.

    Attributes:
      layers: layer path (``'fc0'``, ``'stage0_block1/bn0'``) -> :class:`LayerCount`.
      total: the sums (a FLOP total is ``None`` if any kernel's count is unknown).
      xla_flops: XLA's cost analysis of the compiled forward pass, per example:
        ``{'dense': ..., 'masked': ..., 'compacted': ...}`` (``masked`` equals ``dense``: a
        masked network runs the dense computation); empty without ``name`` and
        ``input_shape``. XLA counts only convolution taps inside the input, so its totals
        can be below the analytic ones.
      compacted: the :class:`Compacted` network counted, if ``name`` was given.
    """

    layers: dict
    total: LayerCount
    xla_flops: dict
    compacted: Optional[Compacted]


def _positions(model: Model, params: PyTree, state: PyTree, input_shape: tuple) -> dict:
    """Output positions (product of the spatial output sizes) of every module, by path."""
    found: dict = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape") and len(out.shape) >= 2:
            found["/".join(context.module.path)] = int(np.prod(out.shape[1:-1]))
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, s, x: model.apply(p, s, x, False)[0], params, state, x)
    return found


def _xla_flops(model: Model, params: PyTree, state: PyTree, input_shape: tuple) -> Optional[float]:
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), (params, state))
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    compiled = jax.jit(lambda p, s, x: model.apply(p, s, x, False)[0]).lower(*shapes, x).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _default_state(params: dict) -> dict:
    """BatchNorm statistics at their initial values (mean 0, variance 1)."""
    stats: dict = {}
    for path, leaf in zip(*leaves_with_paths(params)[:2]):
        layer, _, leaf_name = path.rpartition("/")
        if leaf_name == "scale" and "bn" in layer.rpartition("/")[2]:
            node = stats
            for part in layer.split("/"):
                node = node.setdefault(part, {})
            node["mean"] = jnp.zeros(jnp.shape(leaf), jnp.float32)
            node["var"] = jnp.ones(jnp.shape(leaf), jnp.float32)
    return {"batch_stats": stats}


def _full_model(name: str, family: str, params: PyTree, input_shape: tuple, model_kwargs: dict) -> Model:
    P = _flat(params)[0]
    _check_layers(name, family, P)
    kwargs = {**model_kwargs, **_infer_kwargs(family, _nested(P))}
    model = create(name, input_shape=tuple(input_shape), num_classes=int(P["output/kernel"].shape[-1]), **kwargs)
    expected = jax.eval_shape(model.init, jax.random.key(0))[0]
    check_same_shapes(expected, params, a_name=f"{name} built for input_shape={tuple(input_shape)}", b_name="params")
    return model


def _layer_sizes(params: PyTree) -> dict:
    """layer path -> {leaf name: (shape, leaf path)}; a leaf at the root is its own layer."""
    layers: dict = {}
    for path, leaf in zip(*leaves_with_paths(params)[:2]):
        layer, _, leaf_name = path.rpartition("/")
        layers.setdefault(layer or path, {})[leaf_name] = (tuple(jnp.shape(leaf)), path)
    return layers


def _csr_bytes(shape: tuple, nonzero: int) -> int:
    return 8 * nonzero + 4 * (int(np.prod(shape[:-1])) + 1)


def count(params: PyTree, mask: Optional[PyTree] = None, *, name: Optional[str] = None,
          input_shape: Optional[tuple] = None, model_state: Optional[PyTree] = None, xla: bool = True,
          **model_kwargs) -> Counts:
    """Parameters, bytes and forward FLOPs per layer and in total: dense, masked, compacted, CSR.

    Args:
      params: the network's parameters.
      mask: the ticket's bool mask (``None``: dense).
      name: the registry name of the model; enables the compacted columns (through
        :func:`compact`), convolution FLOPs (with ``input_shape``) and XLA's totals.
        Without it, 2-D kernels are counted as dense layers applied once per example and
        convolution FLOPs are unknown.
      input_shape: shape of one example (inferred for ``'mlp'``/``'lenet300100'``).
      model_state: the BatchNorm statistics, for the compaction of BatchNorm models; if
        ``None`` their initial values (mean 0, variance 1) are used, which only matters for
        channels whose constant output is exactly 0.
      xla: compile the dense and compacted forward passes for XLA's FLOP counts.
      **model_kwargs: other constructor arguments of the full model (``stride=``, ...).

    Returns:
      :class:`Counts`.

    Examples:
      >>> params = {'fc0': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)},
      ...           'output': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
      >>> mask = {'fc0': {'kernel': jnp.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], bool),
      ...                 'bias': jnp.ones(3, bool)},
      ...         'output': {'kernel': jnp.array([[1, 1], [0, 0], [1, 0]], bool), 'bias': jnp.ones(2, bool)}}
      >>> table = count(params, mask, name='mlp', xla=False)
      >>> table.layers['fc0']
      LayerCount(params=15, nonzero=8, compacted=5, bytes_dense=60, bytes_masked=72, bytes_compacted=20,
                 bytes_csr=72, flops_dense=24, flops_masked=10, flops_compacted=8)
      >>> table.total.flops_dense, table.total.flops_masked, table.total.flops_compacted
      (36, 16, 12)
    """
    mask = ones_like(params) if mask is None else conform_mask(params, mask)
    compacted, positions, xla_flops = None, {}, {}
    if name is not None:
        family = _family(name)
        flat = _flat(params)[0]
        if input_shape is None and family == "mlp" and "fc0/kernel" in flat:
            input_shape = (int(flat["fc0/kernel"].shape[0]),)
        state = model_state
        if family in _BN_FAMILIES and not state:
            state = _default_state(params)
        compacted = compact(name, params, mask, state, input_shape=input_shape, **model_kwargs)
        if input_shape is not None:
            full = _full_model(name, family, params, input_shape, model_kwargs)
            state = state or {}
            positions = _positions(full, params, state, tuple(input_shape))
            if xla:
                dense = _xla_flops(full, params, state, tuple(input_shape))
                small = _xla_flops(compacted.model(input_shape), compacted.params, compacted.model_state,
                                   tuple(input_shape))
                xla_flops = {"dense": dense, "masked": dense, "compacted": small}
    small_layers = _layer_sizes(compacted.params) if compacted else {}
    mask_paths, mask_leaves, _ = leaves_with_paths(mask)
    kept = dict(zip(mask_paths, (int(np.sum(np.asarray(m))) for m in mask_leaves)))

    layers: dict = {}
    has_kernel = []
    for layer, leaves in _layer_sizes(params).items():
        sizes = {leaf: int(np.prod(shape)) for leaf, (shape, _) in leaves.items()}
        entries = sum(sizes.values())
        nonzero = sum(kept[path] for _, path in leaves.values())
        kernel_entries = sum(sizes[leaf] for leaf, (shape, _) in leaves.items() if len(shape) >= 2)
        csr = sum(_csr_bytes(shape, kept[path]) if len(shape) >= 2 else 4 * sizes[leaf]
                  for leaf, (shape, path) in leaves.items())
        small = small_layers.get(layer)
        small_entries = sum(int(np.prod(shape)) for shape, _ in small.values()) if small else None
        flops = (None, None, None)
        if "kernel" in leaves:
            has_kernel.append(layer)
            shape, path = leaves["kernel"]
            where = positions.get(layer, 1 if len(shape) == 2 else None)
            if where is not None:
                small_kernel = int(np.prod(small["kernel"][0])) if small else None
                flops = (2 * sizes["kernel"] * where, 2 * kept[path] * where,
                         None if small_kernel is None else 2 * small_kernel * where)
        layers[layer] = LayerCount(
            params=entries, nonzero=nonzero, compacted=small_entries,
            bytes_dense=4 * entries, bytes_masked=4 * entries + kernel_entries,
            bytes_compacted=None if small_entries is None else 4 * small_entries, bytes_csr=csr,
            flops_dense=flops[0], flops_masked=flops[1], flops_compacted=flops[2])

    def total(field):
        counted = has_kernel if field.startswith("flops") else list(layers)
        values = [getattr(layers[layer], field) for layer in counted]
        return None if any(v is None for v in values) else sum(values)

    return Counts(layers, LayerCount(*(total(f) for f in LayerCount._fields)), xla_flops, compacted)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,}"


def format_counts(table: Counts) -> str:
    """The table of :func:`count` as text: one row per layer and a total, then XLA's totals.

    Examples:
      >>> params = {'fc0': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)},
      ...           'output': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
      >>> mask = {'fc0': {'kernel': jnp.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], bool),
      ...                 'bias': jnp.ones(3, bool)},
      ...         'output': {'kernel': jnp.array([[1, 1], [0, 0], [1, 0]], bool), 'bias': jnp.ones(2, bool)}}
      >>> print(format_counts(count(params, mask, name='mlp', xla=False)))
      layer   params  nonzero  compact  B dense  B masked  B compact  B csr  F dense  F masked  F compact
      fc0         15        8        5       60        72         20     72       24        10          8
      output       8        5        4       32        38         16     48       12         6          4
      total       23       13        9       92       110         36    120       36        16         12
      FLOPs: forward, per example (2 per kernel weight per output position).
      Bytes: float32 values; masked = dense values + a bool per kernel entry; csr = values + int32 column indices + row pointers.
    """
    header = ["layer", "params", "nonzero", "compact", "B dense", "B masked", "B compact", "B csr",
              "F dense", "F masked", "F compact"]
    rows = [[layer, *(_fmt(v) for v in c)] for layer, c in [*table.layers.items(), ("total", table.total)]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    lines.append("FLOPs: forward, per example (2 per kernel weight per output position).")
    lines.append("Bytes: float32 values; masked = dense values + a bool per kernel entry; "
                 "csr = values + int32 column indices + row pointers.")
    if table.xla_flops:
        x = table.xla_flops
        lines.append(f"XLA cost analysis, FLOPs per example: dense {_fmt(_int(x.get('dense')))} (the masked net runs "
                     f"the same computation), compacted {_fmt(_int(x.get('compacted')))}.")
    return "\n".join(lines)


def _int(value):
    return None if value is None else int(round(value))
