"""Tickets out of JAX: PyTorch ``state_dict``, safetensors files, and N:M compressed form.

A ticket (a mask and the weights it prunes) of one of the reference models of
:mod:`lottojax.models` becomes

- a **PyTorch state dict** (:func:`to_state_dict`, numpy arrays, no torch needed) in the
  layouts and names of the ``torch.nn.Module`` that :func:`torch_model` builds (needs the
  optional ``torch`` extra: ``pip install 'lottojax[torch]'``); in evaluation mode that
  module computes the logits of the lottojax model with the masked parameters
  (``apply(params, state, x, False)``) up to float32 rounding;
- a **safetensors file** (:func:`save_safetensors`, :func:`load_safetensors`; the ``export``
  extra, ``pip install 'lottojax[export]'``, no torch needed) holding that state dict, the
  masks, and string metadata (model name, density per layer, lottojax version);
- for N:M tickets (:func:`lottojax.structured.prune_nm`), **values and indices**
  (:func:`compress_nm`, :func:`decompress_nm`): the ``n`` kept entries of every group of
  ``m`` and their positions in the group, as sparse tensor cores store 2:4 weights.

Names and layouts of the state dict. A layer's key is its lottojax path with ``/`` turned
into ``.`` (``fc0.weight``, ``stage1_block0.shortcut_bn.running_var``):

- dense ``kernel (in, out)`` -> ``Linear.weight (out, in)``; ``bias`` -> ``bias``;
- convolution ``kernel (h, w, in, out)`` (NHWC) -> ``Conv2d.weight (out, in, h, w)``, 1-D
  ``(k, in, out)`` -> ``Conv1d.weight (out, in, k)``;
- BatchNorm ``scale``/``bias`` -> ``weight``/``bias``, the ``batch_stats`` ``mean``/``var``
  -> ``running_mean``/``running_var``, plus ``num_batches_tracked`` (int64 0: Flax does not
  count batches; PyTorch reads it only with ``momentum=None``);
- the dense layer that reads flattened convolution features (``fc0`` of Conv-2/4/6,
  ``output`` of the 1-D CNN) has its input rows permuted: Flax flattens ``(H, W, C)``
  feature maps channels-last, PyTorch flattens ``(C, H, W)`` channels-first;
- pruned entries are exact zeros (the mask applied). With ``include_masks=True`` every
  kernel is written as ``torch.nn.utils.prune`` stores a pruned weight: ``<layer>.weight_orig``
  (the masked weight) and ``<layer>.weight_mask`` (1.0 kept, 0.0 pruned, in the weight's
  dtype), the state dict of ``torch_model(..., pruned=True)``.

The PyTorch modules take inputs in PyTorch's layouts: images NCHW (``x.transpose(0, 3, 1,
2)`` of lottojax's NHWC), 1-D signals ``(N, L)`` or ``(N, C, L)``; the MLPs flatten whatever
they get, as lottojax's do (for one-channel images NCHW and NHWC flatten alike; otherwise
pass lottojax's layout or pre-flattened rows). SAME padding is reproduced exactly as XLA
pads (the odd element at the end, e.g. the stride-2 convolutions of the ResNets pad
``(0, 1)``, where ``Conv2d(padding=1)`` would pad ``(1, 1)``); BatchNorm has eps ``1e-5``
and momentum ``0.1`` (lottojax's decay 0.9); max-pools are 2x2, stride 2, floor; the VGGs
and ResNets average over all positions.

Supported models (registry names, any constructor arguments of :func:`lottojax.models.create`,
so narrowed or compacted nets too, see :func:`lottojax.compact.compact`): ``'mlp'``,
``'lenet300100'``, ``'conv2'``, ``'conv4'``, ``'conv6'``, ``'vgg11'``, ``'vgg16'``,
``'resnet20'`` (post- and pre-activation, any ``stage_sizes``, ``width``, ``inner_widths``)
and ``'cnn1d'``.

A mask whose non-kernel leaves (biases, BatchNorm) prune entries zeroes them in the export;
only kernels get ``weight_mask`` entries.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import atomic_path
from lottojax.masks import PyTree, Spec, conform_mask, leaves_with_paths, path_str, prunable_flags
from lottojax.models import MODEL_NAMES, VGG_CONFIGS
from lottojax.models.core import from_linen
from lottojax.models.registry import linen_module

#: ``format`` entry of the metadata of the safetensors files :func:`save_safetensors` writes.
FORMAT = "lottojax.export"
#: Version of that layout.
VERSION = 1

_FAMILIES = {"mlp": "mlp", "lenet300100": "mlp", "conv2": "conv", "conv4": "conv", "conv6": "conv",
             "vgg11": "vgg", "vgg16": "vgg", "resnet20": "resnet", "cnn1d": "cnn1d"}
_CONV_NDIM = {"mlp": None, "conv": 4, "vgg": 4, "resnet": 4, "cnn1d": 3}
_BN_FAMILIES = ("vgg", "resnet", "cnn1d")
_KERNEL_SUFFIXES = (".weight", ".weight_orig")


def _family(name: str) -> str:
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model {name!r}; expected one of: {', '.join(MODEL_NAMES)}.")
    return _FAMILIES[name]


def _numbered(names, prefix: str) -> list[str]:
    found = []
    while f"{prefix}{len(found)}" in names:
        found.append(f"{prefix}{len(found)}")
    return found


def _flatten_layer(family: str, layers) -> Optional[str]:
    """The dense layer that reads flattened convolution features, if the family has one."""
    if family == "conv":
        fcs = _numbered(layers, "fc")
        return fcs[0] if fcs else "output"
    if family == "cnn1d":
        return "output"
    return None


def _plain(array) -> np.ndarray:
    """A numpy array; dtypes numpy lacks natively (bfloat16) widen to float32."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


# ----------------------------------------------------------------------------------------------
# Layout conversions (kernel <-> weight)


def _kernel_to_weight(kernel: np.ndarray, channels: Optional[int]) -> np.ndarray:
    """Flax kernel -> PyTorch weight; ``channels``: permute the rows of a flatten layer."""
    if kernel.ndim == 2:
        if channels:
            positions = kernel.shape[0] // channels
            kernel = kernel.reshape(positions, channels, -1).transpose(1, 0, 2).reshape(kernel.shape)
        return np.ascontiguousarray(kernel.T)
    return np.ascontiguousarray(np.moveaxis(kernel, (-1, -2), (0, 1)))


def _weight_to_kernel(weight: np.ndarray, channels: Optional[int]) -> np.ndarray:
    """PyTorch weight -> Flax kernel (the inverse of :func:`_kernel_to_weight`)."""
    if weight.ndim == 2:
        kernel = weight.T
        if channels:
            positions = kernel.shape[0] // channels
            kernel = kernel.reshape(channels, positions, -1).transpose(1, 0, 2).reshape(kernel.shape)
        return np.ascontiguousarray(kernel)
    return np.ascontiguousarray(np.moveaxis(weight, (0, 1), (-1, -2)))


def _layers(paths: list[str], what: str) -> dict[str, dict[str, int]]:
    """layer path -> {leaf name: index into paths}; every leaf must sit inside a layer."""
    layers: dict[str, dict[str, int]] = {}
    for i, path in enumerate(paths):
        layer, _, leaf = path.rpartition("/")
        if not layer:
            raise ValueError(f"{what} leaf {path!r} is not inside a layer; expected paths like 'fc0/kernel'")
        layers.setdefault(layer, {})[leaf] = i
    return layers


def _check_kernel(name: str, family: str, path: str, kernel: np.ndarray) -> None:
    layer = path.rpartition("/")[0].rpartition("/")[2]
    expected = 2 if (family == "mlp" or not layer.startswith(("conv", "shortcut_conv"))) else _CONV_NDIM[family]
    if kernel.ndim != expected:
        raise ValueError(
            f"{name!r}: params leaf {path} has shape {kernel.shape}; expected a {expected}-D kernel "
            f"(a batch of tickets with a leading seed axis? export one seed at a time)")


def _flatten_channels(name: str, family: str, kernels: dict[str, np.ndarray]) -> tuple[Optional[str], int]:
    """(the flatten layer, the channels of the features it reads) from layer -> kernel."""
    top = {path for path in kernels if "/" not in path}
    layer = _flatten_layer(family, top)
    if layer is None:
        return None, 0
    convs = _numbered(top, "conv")
    if not convs:
        raise ValueError(f"{name!r}: no convolution layers (conv0, ...) among the layers {sorted(kernels)}")
    if layer not in kernels:
        raise ValueError(f"{name!r}: no layer {layer!r} (the dense layer after the convolutions) among "
                         f"the layers {sorted(kernels)}")
    channels = int(kernels[convs[-1]].shape[-1])
    if kernels[layer].shape[0] % channels:
        raise ValueError(f"{name!r}: layer {layer!r} reads {kernels[layer].shape[0]} features, not a multiple "
                         f"of the {channels} channels of {convs[-1]!r}")
    return layer, channels


# ----------------------------------------------------------------------------------------------
# State dicts


def to_state_dict(name: str, params: PyTree, mask: Optional[PyTree] = None,
                  model_state: Optional[PyTree] = None, *, include_masks: bool = False) -> dict[str, np.ndarray]:
    """A ticket as a PyTorch ``state_dict`` of numpy arrays (PyTorch names and layouts).

    The keys and shapes are those of ``torch_model(name, ...)`` (or, with
    ``include_masks=True``, of ``torch_model(name, ..., pruned=True)``); see the module doc
    for the layouts. PyTorch's ``load_state_dict`` wants tensors: the modules of
    :func:`torch_model` convert numpy arrays themselves, for others use
    ``{k: torch.from_numpy(v) for k, v in state_dict.items()}``.

    Args:
      name: the model's registry name (:data:`lottojax.models.MODEL_NAMES`).
      params: the parameters (the full net's, or a compacted net's
        :attr:`lottojax.compact.Compacted.params`).
      mask: the ticket's bool mask (``None``: dense); pruned entries become exact zeros.
      model_state: ``{'batch_stats': ...}`` for the models with BatchNorm (VGG, ResNet,
        1-D CNN).
      include_masks: write every kernel as ``<layer>.weight_orig`` and
        ``<layer>.weight_mask`` (1.0/0.0 in the weight's dtype), ``torch.nn.utils.prune``'s
        names, instead of ``<layer>.weight``.

    Returns:
      ``{key: contiguous numpy array}``; parameters keep their dtype (bfloat16 widens to
      float32), ``num_batches_tracked`` is an int64 scalar.

    Raises:
      ValueError: an unknown model (listing the known ones), a leaf that does not fit the
        model (naming its path), missing BatchNorm statistics, a mask that does not
        describe ``params``.

    Examples:
      >>> import numpy as np
      >>> params = {'fc0': {'kernel': np.arange(6, dtype=np.float32).reshape(3, 2), 'bias': np.zeros(2, np.float32)},
      ...           'output': {'kernel': np.ones((2, 1), np.float32), 'bias': np.zeros(1, np.float32)}}
      >>> mask = {'fc0': {'kernel': np.array([[1, 0], [1, 1], [0, 1]], bool), 'bias': np.ones(2, bool)},
      ...         'output': {'kernel': np.ones((2, 1), bool), 'bias': np.ones(1, bool)}}
      >>> state_dict = to_state_dict('mlp', params, mask)
      >>> sorted(state_dict)
      ['fc0.bias', 'fc0.weight', 'output.bias', 'output.weight']
      >>> state_dict['fc0.weight']  # Linear.weight is (out, in); pruned entries are 0
      array([[0., 2., 0.],
             [0., 3., 5.]], dtype=float32)
      >>> pruned = to_state_dict('mlp', params, mask, include_masks=True)
      >>> sorted(pruned)
      ['fc0.bias', 'fc0.weight_mask', 'fc0.weight_orig', 'output.bias', 'output.weight_mask', 'output.weight_orig']
      >>> pruned['fc0.weight_mask']
      array([[1., 1., 0.],
             [0., 1., 1.]], dtype=float32)
      >>> to_state_dict('lenet5', params)
      Traceback (most recent call last):
      ...
      ValueError: Unknown model 'lenet5'; expected one of: mlp, lenet300100, conv2, ...
    """
    family = _family(name)
    paths, leaves, _ = leaves_with_paths(params)
    leaves = [_plain(x) for x in leaves]
    if mask is not None:
        masks = [np.asarray(m, bool) for m in jax.tree.leaves(conform_mask(params, mask))]
    else:
        masks = [np.ones(x.shape, bool) for x in leaves]
    leaves = [np.where(m, x, np.zeros((), x.dtype)) for x, m in zip(leaves, masks)]
    layers = _layers(paths, "params")

    stats: dict[str, np.ndarray] = {}
    if model_state and "batch_stats" in model_state:
        s_paths, s_leaves, _ = leaves_with_paths(model_state["batch_stats"])
        stats = {p: _plain(x) for p, x in zip(s_paths, s_leaves)}
    bn_layers = [layer for layer, names in layers.items() if "scale" in names]
    if bn_layers and family not in _BN_FAMILIES:
        raise ValueError(f"{name!r} has no BatchNorm, but params has {bn_layers[0]}/scale")
    missing = [f"{layer}/{leaf}" for layer in bn_layers for leaf in ("mean", "var") if f"{layer}/{leaf}" not in stats]
    if missing:
        raise ValueError(f"{name!r} has BatchNorm: model_state['batch_stats'] needs {missing[0]} (the running "
                         "statistics, {'batch_stats': ...}), which evaluation mode normalizes with")
    extra = sorted({p.rpartition("/")[0] for p in stats} - set(bn_layers))
    if extra:
        raise ValueError(f"model_state['batch_stats'] has statistics for {extra[0]!r}, which params has no "
                         "BatchNorm layer for")

    kernels = {}
    for layer, names in layers.items():
        if "kernel" in names:
            kernel = leaves[names["kernel"]]
            _check_kernel(name, family, f"{layer}/kernel", kernel)
            kernels[layer] = kernel
    flat_layer, channels = _flatten_channels(name, family, kernels)

    state_dict: dict[str, np.ndarray] = {}
    for layer, names in layers.items():
        prefix = layer.replace("/", ".")
        unknown = sorted(set(names) - ({"scale", "bias"} if "scale" in names else {"kernel", "bias"}))
        if unknown or not ({"scale", "kernel"} & set(names)):
            bad = f"{layer}/{unknown[0]}" if unknown else f"{layer}/bias"
            raise ValueError(f"{name!r}: params leaf {bad} fits no layer of the model (expected kernel and bias "
                             "of a dense or convolution layer, or scale and bias of a BatchNorm)")
        if "scale" in names:
            state_dict[f"{prefix}.weight"] = np.ascontiguousarray(leaves[names["scale"]])
            if "bias" in names:
                state_dict[f"{prefix}.bias"] = np.ascontiguousarray(leaves[names["bias"]])
            state_dict[f"{prefix}.running_mean"] = np.ascontiguousarray(stats[f"{layer}/mean"])
            state_dict[f"{prefix}.running_var"] = np.ascontiguousarray(stats[f"{layer}/var"])
            state_dict[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)
            continue
        permute = channels if layer == flat_layer else None
        weight = _kernel_to_weight(kernels[layer], permute)
        if include_masks:
            state_dict[f"{prefix}.weight_orig"] = weight
            state_dict[f"{prefix}.weight_mask"] = _kernel_to_weight(masks[names["kernel"]], permute).astype(weight.dtype)
        else:
            state_dict[f"{prefix}.weight"] = weight
        if "bias" in names:
            state_dict[f"{prefix}.bias"] = np.ascontiguousarray(leaves[names["bias"]])
    return state_dict


def from_state_dict(name: str, state_dict: dict) -> tuple[PyTree, Optional[PyTree], PyTree]:
    """The inverse of :func:`to_state_dict`: ``(params, mask, model_state)`` in lottojax's layouts.

    Args:
      name: the model's registry name.
      state_dict: numpy arrays or torch tensors under the keys :func:`to_state_dict` writes
        (with or without masks), e.g. what :func:`load_safetensors` returns or a module's
        ``state_dict()``.

    Returns:
      ``params`` (nested dicts of jax arrays), ``mask`` (bool, from the ``weight_mask``
      entries, all-True for other leaves; ``None`` if there are no masks) and
      ``model_state`` (``{'batch_stats': ...}``, or ``{}`` without BatchNorm).

    Raises:
      ValueError: an unknown model or a key that fits no layer.

    Examples:
      >>> import numpy as np
      >>> params = {'fc0': {'kernel': np.arange(6, dtype=np.float32).reshape(3, 2), 'bias': np.zeros(2, np.float32)},
      ...           'output': {'kernel': np.ones((2, 1), np.float32), 'bias': np.zeros(1, np.float32)}}
      >>> back, mask, state = from_state_dict('mlp', to_state_dict('mlp', params))
      >>> back['fc0']['kernel'].tolist(), mask, state
      ([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], None, {})
    """
    family = _family(name)
    arrays = {str(k): _plain(v) for k, v in state_dict.items()}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        prefix, _, leaf = key.rpartition(".")
        if not prefix:
            raise ValueError(f"state_dict key {key!r} is not inside a layer; expected keys like 'fc0.weight'")
        groups.setdefault(prefix, {})[leaf] = value
    kernels = {}
    for prefix, leaves in groups.items():
        if "running_mean" in leaves:
            continue
        weight = leaves.get("weight_orig", leaves.get("weight"))
        if weight is None:
            raise ValueError(f"state_dict layer {prefix!r} has {sorted(leaves)}: no weight or weight_orig")
        kernels[prefix.replace(".", "/")] = _weight_to_kernel(weight, None)
    flat_layer, channels = _flatten_channels(name, family, kernels)

    params: dict = {}
    mask: dict = {}
    stats: dict = {}
    has_masks = False

    def put(tree, path, value):
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = jnp.asarray(value)

    for prefix, leaves in groups.items():
        layer = prefix.replace(".", "/")
        if "running_mean" in leaves:
            allowed = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
            targets = {"weight": (params, "scale"), "bias": (params, "bias"),
                       "running_mean": (stats, "mean"), "running_var": (stats, "var")}
        else:
            allowed = {"weight", "weight_orig", "weight_mask", "bias"}
            targets = {"bias": (params, "bias")}
        unknown = sorted(set(leaves) - allowed)
        if unknown:
            raise ValueError(f"state_dict key {prefix}.{unknown[0]} fits no layer of {name!r}")
        for leaf, (tree, target) in targets.items():
            if leaf in leaves:
                put(tree, f"{layer}/{target}", leaves[leaf])
                if tree is params:
                    put(mask, f"{layer}/{target}", np.ones(leaves[leaf].shape, bool))
        if "running_mean" not in leaves:
            permute = channels if layer == flat_layer else None
            weight = leaves.get("weight_orig", leaves.get("weight"))
            put(params, f"{layer}/kernel", _weight_to_kernel(weight, permute))
            if "weight_mask" in leaves:
                has_masks = True
                put(mask, f"{layer}/kernel", _weight_to_kernel(leaves["weight_mask"], permute) != 0)
            else:
                put(mask, f"{layer}/kernel", np.ones(_weight_to_kernel(weight, permute).shape, bool))
    return params, (mask if has_masks else None), ({"batch_stats": stats} if stats else {})


# ----------------------------------------------------------------------------------------------
# PyTorch modules


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError("torch_model needs PyTorch, an optional dependency of lottojax: "
                          "pip install 'lottojax[torch]' (or pip install torch)") from e
    return torch


def _same_pads(sizes, kernel, strides) -> list[tuple[int, int]]:
    """XLA's SAME padding per spatial dimension: ``ceil(size / stride)`` outputs, odd element last."""
    pads = []
    for size, k, s in zip(sizes, kernel, strides):
        out = -(-int(size) // s)
        total = max((out - 1) * s + k - int(size), 0)
        pads.append((total // 2, total - total // 2))
    return pads


@functools.lru_cache(maxsize=None)
def _torch_classes():
    """The PyTorch module classes, defined on first use (so importing lottojax needs no torch)."""
    torch = _import_torch()
    from torch import nn
    from torch.nn import functional as F

    class _SamePadding:
        """A ``Conv1d``/``Conv2d`` that pads as XLA pads ``'SAME'`` (computed per input size)."""

        def forward(self, x):
            pads = _same_pads(x.shape[2:], self.kernel_size, self.stride)
            flat = [p for pair in reversed(pads) for p in pair]
            if any(flat):
                x = F.pad(x, flat)
            return self._conv_forward(x, self.weight, self.bias)

    class SameConv1d(_SamePadding, nn.Conv1d):
        """``nn.Conv1d`` with XLA's ``'SAME'`` padding."""

    class SameConv2d(_SamePadding, nn.Conv2d):
        """``nn.Conv2d`` with XLA's ``'SAME'`` padding."""

    class BasicBlock(nn.Module):
        """A ResNet basic block (post- or pre-activation), as :class:`lottojax.models.BasicBlock`."""

        def __init__(self, pre_activation: bool):
            super().__init__()
            self.pre_activation = pre_activation

        def forward(self, x):
            projection = hasattr(self, "shortcut_conv")
            if self.pre_activation:
                h = F.relu(self.bn0(x))
                shortcut = self.shortcut_conv(h) if projection else x
                return self.conv1(F.relu(self.bn1(self.conv0(h)))) + shortcut
            y = F.relu(self.bn0(self.conv0(x)))
            y = self.bn1(self.conv1(y))
            if projection:
                x = self.shortcut_bn(self.shortcut_conv(x))
            return F.relu(y + x)

    class LottoModel(nn.Module):
        """A lottojax reference model in PyTorch: same layer names, same logits (eval mode).

        ``load_state_dict`` also takes numpy arrays, and a state dict with
        ``weight_orig``/``weight_mask`` entries into a module that is not pruned (the weight
        is ``weight_orig * weight_mask``).
        """

        def __init__(self, name: str, family: str, spec: dict):
            super().__init__()
            self.model_name, self.family, self.spec = name, family, spec

        def add_layer(self, path: str, module) -> None:
            parent = self
            *parents, last = path.split("/")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, BasicBlock(self.spec.get("pre_activation", False)))
                parent = getattr(parent, part)
            parent.add_module(last, module)

        def layer(self, path: str):
            return self.get_submodule(path.replace("/", "."))

        def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
            own = set(self.state_dict())
            converted = {}
            for key, value in state_dict.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.from_numpy(np.array(value))
                converted[key] = value
            for key in [k for k in converted if k.endswith(".weight_orig")]:
                prefix = key[: -len("_orig")]
                if key not in own and prefix in own:
                    weight = converted.pop(key)
                    mask = converted.pop(f"{prefix}_mask", None)
                    converted[prefix] = weight if mask is None else weight * mask
            return super().load_state_dict(converted, strict=strict, **kwargs)

        def forward(self, x):
            spec, family = self.spec, self.family
            if family == "mlp":
                x = x.flatten(1)
                for fc in spec["fcs"]:
                    x = F.relu(self.layer(fc)(x))
                return self.layer("output")(x)
            if family == "conv":
                for i, conv in enumerate(spec["convs"]):
                    x = F.relu(self.layer(conv)(x))
                    if i % 2 == 1:
                        x = F.max_pool2d(x, 2)
                x = x.flatten(1)
                for fc in spec["fcs"]:
                    x = F.relu(self.layer(fc)(x))
                return self.layer("output")(x)
            if family == "vgg":
                i = 0
                for op in spec["config"]:
                    if op == "M":
                        x = F.max_pool2d(x, 2)
                    else:
                        x = F.relu(self.layer(f"bn{i}")(self.layer(f"conv{i}")(x)))
                        i += 1
                return self.layer("output")(x.mean((2, 3)))
            if family == "resnet":
                x = self.layer("conv0")(x)
                if not spec["pre_activation"]:
                    x = F.relu(self.layer("bn0")(x))
                for block in spec["blocks"]:
                    x = self.layer(block)(x)
                if spec["pre_activation"]:
                    x = F.relu(self.layer("bn_final")(x))
                return self.layer("output")(x.mean((2, 3)))
            # cnn1d
            if x.ndim == 2:
                x = x[:, None, :]
            for i, conv in enumerate(spec["convs"]):
                x = F.relu(self.layer(f"bn{i}")(self.layer(conv)(x)))
            return self.layer("output")(x.flatten(1))

        def extra_repr(self) -> str:
            return f"name={self.model_name!r}"

    return {"SameConv1d": SameConv1d, "SameConv2d": SameConv2d, "BasicBlock": BasicBlock,
            "LottoModel": LottoModel}


def torch_model(name: str, *, input_shape: tuple[int, ...], num_classes: int = 10, pruned: bool = False,
                **kwargs):
    """The PyTorch twin of ``lottojax.models.create(name, input_shape=..., num_classes=..., **kwargs)``.

    Its ``load_state_dict(to_state_dict(name, params, mask, model_state))`` works with
    ``strict=True`` (numpy arrays are converted), after which it computes, in evaluation
    mode, the logits of the lottojax model with the masked parameters, up to float32
    rounding. Inputs are in PyTorch's layouts (NCHW images; see the module doc). The
    module is returned in evaluation mode (``.train()`` to fine-tune); its layers carry the
    lottojax names (``model.fc0``, ``model.stage0_block1.conv0``). Layer sizes come from the
    lottojax model's parameter shapes, so every constructor argument of
    :func:`lottojax.models.create` (``hidden=``, ``conv_widths=``, ``widths=``,
    ``inner_widths=``, a compacted net's ``model_kwargs``) builds the matching twin;
    ``conv_impl`` is accepted and ignored.

    Needs the optional ``torch`` extra: ``pip install 'lottojax[torch]'``.

    Args:
      name: the model's registry name (see the module doc for the supported ones).
      input_shape: shape of one lottojax example, without the batch axis (NHWC images:
        ``(32, 32, 3)``).
      num_classes: number of logits.
      pruned: apply ``torch.nn.utils.prune.identity`` to every ``Linear``/``Conv`` weight,
        so that the state dict has ``weight_orig``/``weight_mask`` entries and loads
        ``to_state_dict(..., include_masks=True)``; the masks then hold pruned weights at
        zero while training in PyTorch.
      **kwargs: the model's constructor arguments, as for :func:`lottojax.models.create`.

    Returns:
      A ``torch.nn.Module`` (float32, evaluation mode).

    Raises:
      ImportError: PyTorch is not installed.
      ValueError: an unknown model.

    Examples:
      >>> import jax, numpy as np
      >>> from lottojax.models import create
      >>> model = create('conv2', input_shape=(8, 8, 3), conv_widths=(4, 4), fc_widths=(8,))
      >>> params, state = model.init(jax.random.key(0))
      >>> net = torch_model('conv2', input_shape=(8, 8, 3), conv_widths=(4, 4), fc_widths=(8,))  # doctest: +SKIP
      >>> net.load_state_dict(to_state_dict('conv2', params))  # doctest: +SKIP
      <All keys matched successfully>
      >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
      >>> import torch  # doctest: +SKIP
      >>> logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()  # doctest: +SKIP
      >>> np.allclose(logits, model.apply(params, state, x, False)[0], atol=1e-5)  # doctest: +SKIP
      True
    """
    family = _family(name)
    classes = _torch_classes()
    from torch import nn

    module = linen_module(name, num_classes=num_classes, **kwargs)
    shapes = jax.eval_shape(from_linen(module, tuple(input_shape)).init, jax.random.key(0))[0]
    paths, leaves, _ = leaves_with_paths(shapes)
    layers = _layers(paths, "params")
    shape = {p: tuple(x.shape) for p, x in zip(paths, leaves)}
    top = sorted({p.split("/")[0] for p in layers})

    if family == "mlp":
        spec = {"fcs": _numbered(top, "fc")}
    elif family == "conv":
        spec = {"convs": _numbered(top, "conv"), "fcs": _numbered(top, "fc")}
    elif family == "vgg":
        spec = {"config": list(VGG_CONFIGS[module.depth])}
    elif family == "resnet":
        blocks = sorted((p for p in top if re.fullmatch(r"stage\d+_block\d+", p)),
                        key=lambda p: tuple(int(v) for v in re.findall(r"\d+", p)))
        spec = {"pre_activation": bool(module.pre_activation), "blocks": blocks}
    else:
        spec = {"convs": _numbered(top, "conv")}

    def strides(layer: str) -> int:
        if family == "cnn1d":
            return int(module.stride)
        match = re.fullmatch(r"stage(\d+)_block(\d+)/(conv0|shortcut_conv)", layer)
        return 2 if match and int(match.group(1)) > 0 and int(match.group(2)) == 0 else 1

    net = classes["LottoModel"](name, family, spec)
    for layer, names in layers.items():
        if "scale" in names:
            features = shape[f"{layer}/scale"][0]
            bn = nn.BatchNorm1d if family == "cnn1d" else nn.BatchNorm2d
            net.add_layer(layer, bn(features, eps=1e-5, momentum=0.1))
            continue
        kernel = shape[f"{layer}/kernel"]
        bias = "bias" in names
        if len(kernel) == 2:
            net.add_layer(layer, nn.Linear(kernel[0], kernel[1], bias=bias))
        else:
            conv = classes["SameConv2d" if len(kernel) == 4 else "SameConv1d"]
            net.add_layer(layer, conv(kernel[-2], kernel[-1], tuple(kernel[:-2]), stride=strides(layer),
                                      padding=0, bias=bias))
    if pruned:
        from torch.nn.utils import prune
        for sub in net.modules():
            if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                prune.identity(sub, "weight")
    return net.eval()


# ----------------------------------------------------------------------------------------------
# safetensors


def _import_safetensors():
    try:
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError as e:  # pragma: no cover - exercised only without safetensors
        raise ImportError("safetensors export needs the safetensors package: pip install 'lottojax[export]' "
                          "(or pip install safetensors)") from e
    return safe_open, save_file


def _densities(params: PyTree, mask: Optional[PyTree]) -> tuple[Optional[float], dict]:
    """Overall and per-kernel density (default prunable leaves), keyed by PyTorch weight key."""
    paths, leaves, _ = leaves_with_paths(params)
    masks = (jax.tree.leaves(conform_mask(params, mask)) if mask is not None
             else [np.ones(np.shape(x), bool) for x in leaves])
    flags = prunable_flags(params)
    kept_all = total_all = 0
    layers = {}
    for path, m, flag in zip(paths, masks, flags):
        if not flag:
            continue
        kept, total = int(np.sum(np.asarray(m))), int(np.size(m))
        kept_all, total_all = kept_all + kept, total_all + total
        layers[path.rpartition("/")[0].replace("/", ".") + ".weight"] = {
            "kept": kept, "total": total, "density": kept / total if total else None}
    return (kept_all / total_all if total_all else None), layers


def save_safetensors(path, name: str, params: PyTree, mask: Optional[PyTree] = None,
                     model_state: Optional[PyTree] = None, metadata: Optional[dict] = None, *,
                     include_masks: bool = True) -> str:
    """Writes a ticket as a safetensors file: the PyTorch state dict, masks and metadata.

    The tensors are ``to_state_dict(name, params, mask, model_state,
    include_masks=include_masks)``: with masks (the default) ``<layer>.weight_orig`` and
    ``<layer>.weight_mask`` per kernel, which ``torch_model(..., pruned=True)`` loads as is
    (and the plain ``torch_model(...)``, whose ``load_state_dict`` multiplies them out);
    pruned entries are exact zeros. Written with ``safetensors.numpy`` (no torch needed),
    to a temporary name moved into place, so a killed save leaves no half file.

    The metadata (safetensors stores strings) holds ``format`` (``'lottojax.export'``),
    ``format_version``, ``model`` (the registry name), ``lottojax_version``, ``layout``
    (``'pytorch'``), ``masks`` (``'weight_orig/weight_mask'`` or ``'none'``), ``density``
    (of the kernels, as ``repr`` of a float, or ``'null'``) and ``layers`` (JSON:
    ``{weight key: {"kept", "total", "density"}}``), plus the caller's ``metadata``: string
    values as given, other values JSON-encoded.

    Args:
      path: the file to write (``.safetensors`` is the usual suffix; none is added).
      name, params, mask, model_state: as for :func:`to_state_dict`.
      metadata: the caller's entries (keys strings, not one of the above).
      include_masks: write the masks (``weight_orig``/``weight_mask``) or plain
        ``weight`` entries.

    Returns:
      ``path``, as a string.

    Raises:
      ImportError: safetensors is not installed (``pip install 'lottojax[export]'``).
      ValueError: as :func:`to_state_dict`; a metadata key clashing with one of the above
        or a value that is not JSON-serializable.

    Examples:
      >>> import numpy as np, os, tempfile
      >>> params = {'fc0': {'kernel': np.arange(6, dtype=np.float32).reshape(3, 2), 'bias': np.zeros(2, np.float32)},
      ...           'output': {'kernel': np.ones((2, 1), np.float32), 'bias': np.zeros(1, np.float32)}}
      >>> mask = {'fc0': {'kernel': np.array([[1, 0], [1, 1], [0, 1]], bool), 'bias': np.ones(2, bool)},
      ...         'output': {'kernel': np.ones((2, 1), bool), 'bias': np.ones(1, bool)}}
      >>> path = os.path.join(tempfile.mkdtemp(), 'ticket.safetensors')
      >>> _ = save_safetensors(path, 'mlp', params, mask, metadata={'level': 3})
      >>> tensors, meta = load_safetensors(path)
      >>> tensors['fc0.weight_orig']
      array([[0., 2., 0.],
             [0., 3., 5.]], dtype=float32)
      >>> meta['model'], meta['density'], meta['level']
      ('mlp', '0.75', '3')
      >>> json.loads(meta['layers'])['fc0.weight']
      {'kept': 4, 'total': 6, 'density': 0.6666666666666666}
    """
    _, save_file = _import_safetensors()
    from lottojax import __version__

    path = os.fspath(path)
    tensors = to_state_dict(name, params, mask, model_state, include_masks=include_masks)
    density, layers = _densities(params, mask)
    info = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "model": name,
        "lottojax_version": __version__,
        "layout": "pytorch",
        "masks": "weight_orig/weight_mask" if include_masks else "none",
        "density": "null" if density is None else repr(float(density)),
        "layers": json.dumps(layers),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings; got {key!r}")
        if key in info:
            raise ValueError(f"metadata key {key!r} is one save_safetensors writes itself: "
                             f"{', '.join(info)}")
        if isinstance(value, str):
            info[key] = value
        else:
            try:
                info[key] = json.dumps(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata[{key!r}] is neither a string nor JSON-serializable: {e}") from None

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=info)
    return path


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file: ``(tensors, metadata)``, numpy arrays and strings.

    For a file of :func:`save_safetensors`, ``from_state_dict(metadata['model'], tensors)``
    gives the ticket back in lottojax's layouts, and ``json.loads(metadata['layers'])``
    the per-layer densities. Needs no torch.

    Examples:
      >>> import numpy as np, os, tempfile
      >>> params = {'fc0': {'kernel': np.ones((3, 2), np.float32), 'bias': np.zeros(2, np.float32)},
      ...           'output': {'kernel': np.ones((2, 1), np.float32), 'bias': np.zeros(1, np.float32)}}
      >>> path = save_safetensors(os.path.join(tempfile.mkdtemp(), 't.safetensors'), 'mlp', params,
      ...                         include_masks=False)
      >>> tensors, meta = load_safetensors(path)
      >>> sorted(tensors), meta['masks']
      (['fc0.bias', 'fc0.weight', 'output.bias', 'output.weight'], 'none')
    """
    safe_open, _ = _import_safetensors()
    with safe_open(os.fspath(path), framework="np") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: np.array(f.get_tensor(key)) for key in f.keys()}
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# N:M compressed form


class NMCompressed(NamedTuple):
    """One N:M leaf in compressed form (a pytree node of two arrays).

    Attributes:
      values: the leaf's kept entries, ``n`` per group of ``m`` along the grouped axis, in
        the order of their positions; that axis has length ``length // m * n``. A group
        with fewer than ``n`` kept entries is padded with zeros at its first pruned
        positions.
      indices: ``uint8``, same shape: each value's position within its group, in ``[0, m)``,
        increasing within a group.
    """

    values: Any
    indices: Any


def _check_nm(n, m) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"n={n!r}, m={m!r}: need integers with 1 <= n <= m (2:4 is n=2, m=4)")
    if m > 256:
        raise ValueError(f"m={m}: positions are stored as uint8, so m can be at most 256")


def _group_axis(axis: int, ndim: int, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for leaf {path} with {ndim} dimensions")
    return axis % ndim


def compress_nm(params: PyTree, mask: PyTree, *, n: int, m: int, axis: int = -2,
                prunable: Spec = None) -> PyTree:
    """An N:M ticket in compressed form: per group of ``m``, the ``n`` kept values and their positions.

    Every prunable leaf (default: kernels, ``ndim >= 2``) becomes an :class:`NMCompressed`
    ``(values, indices)``: groups are ``m`` consecutive entries along ``axis`` (default
    ``-2``, the input axis of Flax kernels, as :func:`lottojax.structured.prune_nm` groups
    them); ``values`` keeps the ``n`` kept entries of each group (the axis shrinks from
    ``length`` to ``length // m * n``) and ``indices`` (``uint8``) their positions in the
    group. Each group's mask must keep at most ``n`` entries (what ``prune_nm`` makes); a
    group with fewer is padded with zeros at its first pruned positions. Other leaves stay
    dense numpy arrays with the mask applied. :func:`decompress_nm` inverts it.

    Args:
      params: the parameters.
      mask: the N:M bool mask, structure and shapes of ``params``.
      n, m: entries kept per group and the group size (``1 <= n <= m <= 256``).
      axis: the axis along which groups run.
      prunable: which leaves are compressed (a prunable spec, see :mod:`lottojax.masks`).

    Returns:
      A pytree like ``params`` with :class:`NMCompressed` (numpy arrays) at the prunable
      leaves.

    Raises:
      ValueError: invalid ``n``/``m``; a prunable leaf whose axis length is not a multiple
        of ``m``, or whose mask keeps more than ``n`` entries in a group (naming the leaf
        path and the first such group); a mask that does not describe ``params``.

    Examples:
      >>> import numpy as np
      >>> w = np.array([[4., 1.], [-3., 2.], [0.5, 3.], [2., -4.]], np.float32)  # (in=4, out=2)
      >>> keep = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)                # 2:4 along 'in'
      >>> packed = compress_nm({'w': w}, {'w': keep}, n=2, m=4)['w']
      >>> packed.values
      array([[ 4.,  3.],
             [-3., -4.]], dtype=float32)
      >>> packed.indices
      array([[0, 2],
             [1, 3]], dtype=uint8)
      >>> params, mask = decompress_nm({'w': packed}, n=2, m=4)
      >>> bool(np.array_equal(params['w'], np.where(keep, w, 0))), bool(np.array_equal(mask['w'], keep))
      (True, True)
      >>> compress_nm({'w': w}, {'w': np.ones((4, 2), bool)}, n=2, m=4)
      Traceback (most recent call last):
      ...
      ValueError: leaf w is not 2:4 along axis -2: the group [0:4, 0] keeps 4 entries, more than 2 ...
    """
    _check_nm(n, m)
    mask = conform_mask(params, mask)
    paths, leaves, treedef = leaves_with_paths(params)
    masks = jax.tree.leaves(mask)
    flags = prunable_flags(params, prunable)
    out = []
    for path, leaf, keep, flag in zip(paths, leaves, masks, flags):
        leaf, keep = _plain(leaf), np.asarray(keep, bool)
        if not flag:
            out.append(np.where(keep, leaf, np.zeros((), leaf.dtype)))
            continue
        ax = _group_axis(axis, leaf.ndim, path)
        length = leaf.shape[ax]
        if length % m:
            raise ValueError(f"leaf {path} has shape {leaf.shape}: its axis {axis} has length {length}, not a "
                             f"multiple of m={m}; choose another axis= or leave the leaf out with prunable=")
        moved = np.moveaxis(leaf, ax, -1)
        kept = np.moveaxis(keep, ax, -1)
        grouped_shape = (*moved.shape[:-1], length // m, m)
        values, kept = moved.reshape(grouped_shape), kept.reshape(grouped_shape)
        counts = kept.sum(-1)
        if np.any(counts > n):
            where = tuple(int(i) for i in np.argwhere(counts > n)[0])
            index = [str(i) for i in where[:-1]]
            group = where[-1]
            index.insert(ax, f"{group * m}:{group * m + m}")
            raise ValueError(
                f"leaf {path} is not {n}:{m} along axis {axis}: the group [{', '.join(index)}] keeps "
                f"{int(counts[where])} entries, more than {n} ({int(np.sum(counts > n))} such groups); "
                f"prune it with lottojax.structured.prune_nm(..., n={n}, m={m}, axis={axis}) first")
        # The kept positions first (increasing), then pruned ones as padding; sorted by position.
        chosen = np.sort(np.argsort(~kept, axis=-1, kind="stable")[..., :n], axis=-1)
        picked = np.take_along_axis(values, chosen, -1)
        picked = np.where(np.take_along_axis(kept, chosen, -1), picked, np.zeros((), leaf.dtype))
        flat_shape = (*moved.shape[:-1], length // m * n)
        out.append(NMCompressed(
            values=np.ascontiguousarray(np.moveaxis(picked.reshape(flat_shape), -1, ax)),
            indices=np.ascontiguousarray(np.moveaxis(chosen.astype(np.uint8).reshape(flat_shape), -1, ax))))
    return jax.tree.unflatten(treedef, out)


def decompress_nm(compressed: PyTree, *, n: int, m: int, axis: int = -2) -> tuple[PyTree, PyTree]:
    """The inverse of :func:`compress_nm`: dense ``(params, mask)`` numpy trees.

    Every :class:`NMCompressed` leaf is scattered back (pruned entries exact zeros, the
    values bitwise as stored); its mask marks the stored positions (so a group that
    :func:`compress_nm` padded marks its padding as kept, with value 0). Other leaves pass
    through with an all-True mask. ``n``, ``m`` and ``axis`` must be those of the
    compression.

    Raises:
      ValueError: values and indices of different shapes, an axis length not a multiple of
        ``n``, positions outside ``[0, m)`` or repeated within a group (naming the path).

    Examples:
      >>> import numpy as np
      >>> packed = NMCompressed(values=np.array([[1., 2.]], np.float32), indices=np.array([[0, 3]], np.uint8))
      >>> params, mask = decompress_nm({'w': packed}, n=2, m=4, axis=-1)
      >>> params['w'], mask['w']
      (array([[1., 0., 0., 2.]], dtype=float32), array([[ True, False, False,  True]]))
    """
    _check_nm(n, m)
    flat, treedef = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=lambda x: isinstance(x, NMCompressed))
    params, masks = [], []
    for key_path, leaf in flat:
        path = path_str(key_path)
        if not isinstance(leaf, NMCompressed):
            leaf = _plain(leaf)
            params.append(leaf)
            masks.append(np.ones(leaf.shape, bool))
            continue
        values, indices = _plain(leaf.values), np.asarray(leaf.indices)
        if values.shape != indices.shape:
            raise ValueError(f"leaf {path}: values have shape {values.shape} but indices {indices.shape}")
        ax = _group_axis(axis, values.ndim, path)
        stored = values.shape[ax]
        if stored % n:
            raise ValueError(f"leaf {path} has shape {values.shape}: its axis {axis} has length {stored}, not a "
                             f"multiple of n={n} (compressed with other n, m or axis?)")
        moved_v = np.moveaxis(values, ax, -1)
        grouped_shape = (*moved_v.shape[:-1], stored // n, n)
        v = moved_v.reshape(grouped_shape)
        i = np.moveaxis(indices, ax, -1).reshape(grouped_shape).astype(np.int64)
        if np.any((i < 0) | (i >= m)):
            raise ValueError(f"leaf {path}: indices outside [0, {m}) (compressed with another m?)")
        if n > 1 and np.any(np.diff(np.sort(i, axis=-1), axis=-1) == 0):
            raise ValueError(f"leaf {path}: a group repeats a position in its indices")
        dense = np.zeros((*grouped_shape[:-1], m), values.dtype)
        keep = np.zeros(dense.shape, bool)
        np.put_along_axis(dense, i, v, -1)
        np.put_along_axis(keep, i, True, -1)
        full_shape = (*moved_v.shape[:-1], stored // n * m)
        params.append(np.ascontiguousarray(np.moveaxis(dense.reshape(full_shape), -1, ax)))
        masks.append(np.ascontiguousarray(np.moveaxis(keep.reshape(full_shape), -1, ax)))
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, masks)


__all__ = [
    "FORMAT",
    "NMCompressed",
    "VERSION",
    "compress_nm",
    "decompress_nm",
    "from_state_dict",
    "load_safetensors",
    "save_safetensors",
    "to_state_dict",
    "torch_model",
]
