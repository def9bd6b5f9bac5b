"""Channel tickets → physically smaller networks (network slimming's pruning step).

A channel mask (from :func:`lottojax.early_bird.channel_mask`: ``'bn{i}/scale' -> (C,) bool``)
describes which output channels of each convolution survive. :func:`channel_plan` turns it
into a :class:`ChannelPlan` for one of the BatchNorm reference models of
:mod:`lottojax.models`, relying on their layer names:

- ``'cnn1d'`` and ``'vgg*'`` (chains ``conv{i} -> bn{i} -> relu``, then ``output``): conv ``i``
  keeps its surviving output channels and the surviving input channels of layer ``i - 1``;
  BatchNorm parameters and statistics keep the surviving channels; the ``output`` layer keeps
  the rows of the surviving features (CNN1D flattens ``(length, channels)``, so a channel
  owns every ``length`` row ``l * C + c``; VGG average-pools, so one row per channel);
- ``'resnet*'``: only each block's inner channels (``conv0``'s outputs, normalised by ``bn0``,
  or ``bn1`` in pre-activation blocks, and ``conv1``'s inputs), which keeps every residual
  addition valid. Use :func:`channel_select` to draw masks over exactly those channels.

:func:`shrink` applies a plan to any tree shaped like the parameters or like one BatchNorm
statistics collection; :func:`shrink_train_state` shrinks a whole
:class:`lottojax.train.TrainState` (parameters, BatchNorm statistics, and every
parameter-shaped part of the optimizer state, e.g. momentum), so training can continue
from an Early-Bird checkpoint exactly where it stopped. :func:`zero_channels` is the
masked-network view of the same ticket: the full network with the pruned channels'
BatchNorm scale and shift set to 0 computes the same function as the shrunk one.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.early_bird import is_bn_scale
from lottojax.masks import PyTree, leaves_with_paths, path_str
from lottojax.train import TrainState

#: ``(axis, kept indices)`` pairs to take from one leaf.
Takes = tuple[tuple[int, np.ndarray], ...]


class ChannelPlan(NamedTuple):
    """How to cut a network down to the channels a mask keeps.

    Attributes:
      kept: BatchNorm layer path (``'bn1'``, ``'stage0_block2/bn0'``) -> surviving channel
        indices (sorted numpy int arrays).
      model_kwargs: constructor arguments of the narrower model, for
        :func:`lottojax.models.create` (``channels=``, ``widths=`` or ``inner_widths=``).
      takes: layer path -> leaf name (``'*'``: every leaf of the layer) -> ``(axis, indices)``
        pairs that :func:`shrink` takes from that leaf.
    """

    kept: dict[str, np.ndarray]
    model_kwargs: dict[str, Any]
    takes: dict[str, dict[str, Takes]]


_BLOCK = re.compile(r"stage(\d+)_block(\d+)$")


def _family(name: str) -> str:
    if name == "cnn1d":
        return "cnn1d"
    if name.startswith("vgg"):
        return "vgg"
    if name.startswith("resnet"):
        return "resnet"
    raise ValueError(f"channel pruning supports the models 'cnn1d', 'vgg*' and 'resnet*'; got {name!r}")


def resnet_blocks(params: PyTree) -> list[str]:
    """The residual blocks of a reference ResNet's params (``stage{i}_block{j}``), in order."""
    blocks = [k for k in params if _BLOCK.match(k)]
    return sorted(blocks, key=lambda k: tuple(int(g) for g in _BLOCK.match(k).groups()))


def inner_bn(params: PyTree) -> str:
    """The BatchNorm that normalises a block's inner channels: ``bn0`` (post-activation
    blocks) or ``bn1`` (pre-activation)."""
    return "bn1" if "bn_final" in params else "bn0"  # pre-activation ResNets end in bn_final


def channel_select(name: str, params: PyTree) -> Callable[[str, Any], bool]:
    """The BatchNorm scales whose channels :func:`channel_plan` can remove from model ``name``:
    every BN scale for ``'cnn1d'`` and ``'vgg*'``, each block's inner BN for ``'resnet*'``.

    Pass it as ``select=`` to :func:`lottojax.early_bird.channel_mask`.

    Examples:
      >>> from lottojax.models import create
      >>> params, _ = jax.eval_shape(create('resnet20', input_shape=(8, 8, 3)).init, jax.random.key(0))
      >>> select = channel_select('resnet20', params)
      >>> select('stage1_block0/bn0/scale', params['stage1_block0']['bn0']['scale']), select('bn0/scale', params['bn0']['scale'])
      (True, False)
    """
    if _family(name) != "resnet":
        return is_bn_scale
    inner = {f"{block}/{inner_bn(params)}/scale" for block in resnet_blocks(params)}
    return lambda path, leaf: path in inner


def _kept(channel_mask: dict, layer: str, width: int) -> np.ndarray:
    key = f"{layer}/scale"
    if key not in channel_mask:
        return np.arange(width)
    mask = np.asarray(channel_mask[key])
    if mask.shape != (width,) or mask.dtype != np.bool_:
        raise ValueError(f"channel_mask[{key!r}] has shape {mask.shape} and dtype {mask.dtype}; the layer has {width} channels (bool)")
    kept = np.flatnonzero(mask)
    if kept.size == 0:
        raise ValueError(
            f"channel_mask prunes every channel of {layer}: the network would be cut in two. "
            "Use a smaller pruning ratio (or keep at least one channel per layer)."
        )
    return kept


def _check_keys(channel_mask: dict, known: set[str]) -> None:
    unknown = sorted(set(channel_mask) - known)
    if unknown:
        raise ValueError(f"channel_mask has entries for no prunable BatchNorm layer of this model: {unknown[:5]}")


def _chain_plan(family: str, channel_mask: dict, params: PyTree) -> ChannelPlan:
    count = sum(1 for k in params if re.fullmatch(r"conv\d+", k))
    _check_keys(channel_mask, {f"bn{i}/scale" for i in range(count)})
    kept = {f"bn{i}": _kept(channel_mask, f"bn{i}", params[f"bn{i}"]["scale"].shape[0]) for i in range(count)}
    takes: dict[str, dict[str, Takes]] = {}
    for i in range(count):
        inputs = ((-2, kept[f"bn{i - 1}"]),) if i else ()
        takes[f"conv{i}"] = {"kernel": ((-1, kept[f"bn{i}"]), *inputs)}
        takes[f"bn{i}"] = {"*": ((0, kept[f"bn{i}"]),)}
    last = kept[f"bn{count - 1}"]
    channels = params[f"bn{count - 1}"]["scale"].shape[0]
    features = params["output"]["kernel"].shape[0]
    if features % channels:
        raise ValueError(f"output/kernel has {features} rows, not a multiple of the last layer's {channels} channels")
    rows = np.concatenate([l * channels + last for l in range(features // channels)])  # (length, channels) flattened
    takes["output"] = {"kernel": ((0, rows),)}
    widths = tuple(len(kept[f"bn{i}"]) for i in range(count))
    return ChannelPlan(kept, {"channels" if family == "cnn1d" else "widths": widths}, takes)


def _resnet_plan(channel_mask: dict, params: PyTree) -> ChannelPlan:
    blocks, inner = resnet_blocks(params), inner_bn(params)
    prunable = {f"{b}/{inner}/scale" for b in blocks}
    pruned_elsewhere = [k for k, m in channel_mask.items() if k not in prunable and not np.all(np.asarray(m))]
    if pruned_elsewhere:
        raise ValueError(
            f"channel_mask prunes channels of {pruned_elsewhere[:4]}, but a ResNet can only lose its blocks' "
            f"inner channels ({inner} of each block) without breaking the residual additions. Draw the mask "
            "with select=lottojax.slimming.channel_select(name, params)."
        )
    kept, takes = {}, {}
    for b in blocks:
        k = _kept(channel_mask, f"{b}/{inner}", params[b][inner]["scale"].shape[0])
        kept[f"{b}/{inner}"] = k
        takes[f"{b}/conv0"] = {"kernel": ((-1, k),)}
        takes[f"{b}/{inner}"] = {"*": ((0, k),)}
        takes[f"{b}/conv1"] = {"kernel": ((-2, k),)}
    return ChannelPlan(kept, {"inner_widths": tuple(len(kept[f"{b}/{inner}"]) for b in blocks)}, takes)


def channel_plan(name: str, channel_mask: dict, params: PyTree) -> ChannelPlan:
    """The plan that cuts model ``name`` with these ``params`` down to ``channel_mask``.

    Args:
      name: the model's name in :func:`lottojax.models.create` (``'cnn1d'``, ``'vgg11'``,
        ``'vgg16'``, ``'resnet20'``, ...).
      channel_mask: ``'<bn layer>/scale' -> (C,) bool`` (concrete; True keeps). BatchNorm
        layers missing from it keep all their channels.
      params: the full network's parameters (only shapes and names are read).

    Examples:
      >>> from lottojax.models import create
      >>> params, _ = jax.eval_shape(create('cnn1d', input_shape=(40,), channels=(4, 3)).init, jax.random.key(0))
      >>> plan = channel_plan('cnn1d', {'bn0/scale': jnp.array([1, 0, 1, 1], bool),
      ...                               'bn1/scale': jnp.array([0, 1, 1], bool)}, params)
      >>> plan.model_kwargs, plan.kept['bn1'].tolist(), plan.takes['output']['kernel'][0][1][:4].tolist()
      ({'channels': (3, 2)}, [1, 2], [1, 2, 4, 5])
    """
    channel_mask = {k: np.asarray(v) for k, v in channel_mask.items()}
    family = _family(name)
    if family == "resnet":
        return _resnet_plan(channel_mask, params)
    return _chain_plan(family, channel_mask, params)


def shrink(plan: ChannelPlan, tree: PyTree) -> PyTree:
    """Takes the surviving channels from every leaf of ``tree`` that ``plan`` cuts.

    ``tree`` is laid out like the parameters (``conv1/kernel``: params, momentum, masks)
    or like one BatchNorm statistics collection (``bn1/mean``); other leaves pass through.

    Examples:
      >>> plan = ChannelPlan({'bn0': np.array([0, 2])}, {}, {'bn0': {'*': ((0, np.array([0, 2])),)}})
      >>> shrink(plan, {'bn0': {'mean': jnp.array([1., 2., 3.])}, 'output': {'bias': jnp.ones(2)}})
      {'bn0': {'mean': Array([1., 3.], dtype=float32)}, 'output': {'bias': Array([1., 1.], dtype=float32)}}
    """
    paths, leaves, treedef = leaves_with_paths(tree)
    out = []
    for path, leaf in zip(paths, leaves):
        layer, _, name = path.rpartition("/")
        rules = plan.takes.get(layer, {})
        for axis, index in rules.get(name, rules.get("*", ())):
            full = jnp.shape(leaf)[axis]
            if index.size and index.max() >= full:
                raise ValueError(f"{path} has {full} entries on axis {axis}; the plan keeps index {index.max()}")
            leaf = jnp.take(leaf, jnp.asarray(index), axis=axis)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _shrink_params_like(plan: ChannelPlan, tree: PyTree, params: PyTree) -> PyTree:
    """Shrinks every subtree of ``tree`` (an optimizer state) shaped like ``params``."""
    params_def = jax.tree.structure(params)

    def is_params_like(node) -> bool:
        return not jax.tree_util.treedef_is_leaf(jax.tree.structure(node)) and jax.tree.structure(node) == params_def

    return jax.tree.map(lambda node: shrink(plan, node) if is_params_like(node) else node, tree, is_leaf=is_params_like)


def shrink_train_state(plan: ChannelPlan, state: TrainState) -> TrainState:
    """Cuts a full network's :class:`lottojax.train.TrainState` down to the plan's channels.

    Parameters, each BatchNorm statistics collection of the model state (a dict of
    collections, as :func:`lottojax.models.from_linen` returns), and every part of the
    optimizer state shaped like the parameters (momentum, Adam moments, the mask of
    :func:`lottojax.masked_updates`) are cut; counters (the step, schedule counts) are kept,
    so a learning-rate schedule goes on where it was.
    """
    model_state = {collection: shrink(plan, tree) for collection, tree in state.model_state.items()}
    return TrainState(
        params=shrink(plan, state.params),
        model_state=model_state,
        opt_state=_shrink_params_like(plan, state.opt_state, state.params),
        step=state.step,
    )


def zero_channels(params: PyTree, channel_mask: dict) -> PyTree:
    """The full network with the pruned channels switched off: BatchNorm scale and shift 0.

    A switched-off channel is 0 after its BatchNorm (in training and in evaluation mode)
    and after the ReLU, so it contributes nothing downstream: the result computes the same
    function as the network that :func:`shrink` cuts down.

    Examples:
      >>> params = {'bn0': {'scale': jnp.array([1., 2.]), 'bias': jnp.array([3., 4.])}}
      >>> zero_channels(params, {'bn0/scale': jnp.array([True, False])})
      {'bn0': {'bias': Array([3., 0.], dtype=float32), 'scale': Array([1., 0.], dtype=float32)}}
    """
    layers = {key.rpartition("/")[0]: np.asarray(m) for key, m in channel_mask.items()}

    def switch_off(path, leaf):
        layer, _, name = path_str(path).rpartition("/")
        if layer in layers and name in ("scale", "bias"):
            return jnp.where(layers[layer], leaf, jnp.zeros_like(leaf))
        return leaf

    found = {path.rpartition("/")[0] for path in leaves_with_paths(params)[0]}
    missing = sorted(set(layers) - found)
    if missing:
        raise ValueError(f"channel_mask names layers that params lacks: {missing[:5]}")
    return jax.tree_util.tree_map_with_path(switch_off, params)
