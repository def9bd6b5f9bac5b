"""Sparse inference export: a ticket as a model that runs faster, layer by layer, when it does.

A masked network multiplies every zero. :func:`export_inference` first cuts the ticket down
with :func:`lottojax.compact.compact` (dead units removed, constants folded), then stores
each dense (fully connected) layer of the smaller network in one of five formats:

- ``'dense'``: the compacted kernel, ``y = x @ W + b`` (zeros the mask left inside it are
  still multiplied);
- ``'bcsr'``: ``W.T`` as a :class:`jax.experimental.sparse.BCSR` matrix (rows = output
  units, only the ticket's nonzeros stored), ``y = (W.T @ x.T).T + b``;
- ``'bcoo'``: the same as a :class:`jax.experimental.sparse.BCOO` matrix;
- ``'gather'``: this module's kernel (:func:`gather_matmul`): per output unit a list of the
  input indices it reads and their weights, padded to the longest list ``K`` with index 0
  and weight 0; ``y[:, o] = sum_k x[:, index[o, k]] * value[o, k] + b[o]``. Small products
  (``batch * outputs * K <= 2**16``) run as one fused gather and sum; larger ones as a loop
  over ``k`` on the transposed input, where each step gathers whole contiguous batch rows;
- ``'csr'``: ``W.T`` in CSR form for :func:`lottojax.native.csr_matmul`, a C++ kernel
  (XLA FFI, CPU only, compiled on first use) that adds each stored weight times a block of
  64 batch columns in registers, bias and ReLU fused; consecutive ``'csr'`` layers run as
  one call (:func:`lottojax.native.csr_chain`). Where it cannot be built (no compiler,
  another backend), ``'auto'`` skips it and says why in ``Exported.skipped``.

Which format is fastest depends on the layer's shape, its density, the batch size and the
machine: with ``formats='auto'`` every candidate is compiled for that layer's weights and a
``(batch_size, inputs)`` input and timed side by side with :func:`lottojax.timing.interleaved`
(the layer's bias and ReLU included), and the fastest median wins. The timings are kept on
the result (``Exported.measurements``), so a choice can be checked. Layer timings need not
compose, so ``'auto'`` then times the whole network with those choices against it with every
measured layer dense, and every one ``'csr'``, and exports the fastest
(``Exported.network_choice``). A dict of layer path -> format forces choices (layers it
leaves out, or maps to ``'auto'``, are measured).

Supported models (by registry name): ``'mlp'`` and ``'lenet300100'`` (every layer may be
sparse), and ``'conv2'``, ``'conv4'``, ``'conv6'``, whose dense head (``fc{i}``, ``output``)
may be in any format and whose convolutions (compacted: dead channels removed) are stored
``'dense'`` or ``'csr'`` (:func:`lottojax.native.csr_conv`; :data:`CONV_FORMATS`). Timing a
convolution needs its input's size, so ``'auto'`` measures convolutions only when
``input_shape=`` is given (otherwise they stay dense, and ``Exported.skipped`` says so).
Other models raise ``ValueError``.

:func:`apply` runs the exported network under ``jax.jit`` (one compiled program per layer
layout and input shape) and returns the same logits as the masked network, ``model.apply(
apply_mask(params, mask), state, x, False)``, up to float32 summation order.
:func:`format_export` tabulates the layers, the formats chosen and the timings behind them.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse

from lottojax import native
from lottojax.compact import Compacted, compact
from lottojax.masks import PyTree, ones_like
from lottojax.models.convolution import conv, max_pool
from lottojax.timing import Timing, format_seconds, interleaved

#: Storage formats of a dense layer, in the order candidates are tried (ties go to the first).
FORMATS: tuple[str, ...] = ("dense", "bcsr", "bcoo", "gather", "csr")

#: Storage formats of a convolution (``'csr'``: :func:`lottojax.native.csr_conv`).
CONV_FORMATS: tuple[str, ...] = ("dense", "csr")

#: Models :func:`export_inference` supports.
SUPPORTED: tuple[str, ...] = ("mlp", "lenet300100", "conv2", "conv4", "conv6")

#: Formats ``'auto'`` also times for every measured layer at once, against its per-layer choices.
NETWORK_RIVALS: tuple[str, ...] = ("dense", "csr")

#: ``batch * outputs * K`` up to which :func:`gather_matmul` runs as one fused gather and sum.
FUSED_GATHER_LIMIT = 1 << 16

Measure = Callable[[Mapping[str, Callable[[], object]]], Mapping[str, Union[Timing, float]]]


# ----------------------------------------------------------------------------------------------
# Layer kernels


def gather_matmul(x: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
    """``y[b, o] = sum_k x[b, index[o, k]] * value[o, k]``: a sparse ``x @ W`` from padded lists.

    Args:
      x: ``(batch, inputs)``.
      index: ``(outputs, K)`` int32: the inputs each output unit reads (padding: any index
        with value 0).
      value: ``(outputs, K)``: their weights.

    Returns:
      ``(batch, outputs)``.

    Examples:
      >>> x = jnp.array([[1., 2., 3.]])
      >>> index = jnp.array([[0, 2], [1, 0]])          # unit 0 reads inputs 0, 2; unit 1 input 1
      >>> value = jnp.array([[10., 100.], [1., 0.]])   # (unit 1's second entry is padding)
      >>> gather_matmul(x, index, value)
      Array([[310.,   2.]], dtype=float32)
    """
    x, index, value = jnp.asarray(x), jnp.asarray(index), jnp.asarray(value)
    outputs, k = index.shape
    batch = x.shape[0]
    if batch * outputs * k <= FUSED_GATHER_LIMIT:
        return jnp.sum(x[:, index] * value, axis=-1)
    xt = x.T  # (inputs, batch): each gathered row is one input across the whole batch

    def step(j, acc):
        return acc + xt[index[:, j]] * value[:, j, None]

    acc = lax.fori_loop(0, k, step, jnp.zeros((outputs, batch), jnp.result_type(x, value)), unroll=min(k, 4))
    return acc.T


def _product(fmt: str, weights: dict, x: jax.Array) -> jax.Array:
    if fmt == "dense":
        return x @ weights["kernel"]
    if fmt in ("bcsr", "bcoo"):
        return (weights["kernel"] @ x.T).T
    return gather_matmul(x, weights["index"], weights["value"])


def _layer(kind: str, fmt: str, relu: bool, conv_impl: str, weights: dict, x: jax.Array) -> jax.Array:
    """One layer (product, bias, ReLU; a convolution's pooling is not part of it)."""
    if fmt == "csr":  # the kernel adds the bias and applies the ReLU itself
        w = {k: v for k, v in weights.items() if k != "kernel_size"}
        if kind == "conv":
            return native.csr_conv(x, **w, kernel_size=weights["kernel_size"].shape[:2], relu=relu)
        return native.csr_matmul(x, **w, relu=relu)
    if kind == "conv":
        y = conv(x, weights["kernel"], 1, "SAME", impl=conv_impl) + weights["bias"]
    else:
        y = _product(fmt, weights, x) + weights["bias"]
    return jax.nn.relu(y) if relu else y


@functools.lru_cache(maxsize=None)
def _layer_program(kind: str, fmt: str, relu: bool, conv_impl: str):
    """The jitted layer of one format (one object per format, so compilations are cached)."""
    return jax.jit(functools.partial(_layer, kind, fmt, relu, conv_impl))


def _pack(fmt: str, kernel: np.ndarray, bias: np.ndarray) -> dict:
    """The weights of one layer (dense kernel ``(inputs, outputs)``, convolution kernel
    ``(kh, kw, inputs, outputs)``) in format ``fmt``."""
    bias = jnp.asarray(bias, jnp.float32)
    kernel = np.asarray(kernel, np.float32)
    if fmt == "dense":
        return {"kernel": jnp.asarray(kernel), "bias": bias}
    if kernel.ndim == 4:  # 'csr', the only sparse format of a convolution
        arrays = dict(zip(("indptr", "channel", "dy", "dx", "values"), native.conv_csr_arrays(kernel)))
        # kernel_size travels as the shape of an empty array: static under jit, a leaf of the weights
        return {**{k: jnp.asarray(v) for k, v in arrays.items()}, "bias": bias,
                "kernel_size": jnp.zeros(kernel.shape[:2] + (0,), jnp.float32)}
    wt = kernel.T  # (outputs, inputs): one row per output unit
    if fmt == "csr":
        indptr, indices, values = native.csr_arrays(wt)
        return {"indptr": jnp.asarray(indptr), "indices": jnp.asarray(indices), "values": jnp.asarray(values),
                "bias": bias}
    rows, cols = np.nonzero(wt)
    if rows.size == 0:  # an all-zero layer: one explicit zero keeps the formats well formed
        rows, cols = np.zeros(1, np.int64), np.zeros(1, np.int64)
    data = jnp.asarray(wt[rows, cols])
    if fmt == "bcsr":
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=wt.shape[0]))])
        matrix = sparse.BCSR((data, jnp.asarray(cols, jnp.int32), jnp.asarray(indptr, jnp.int32)),
                             shape=wt.shape, indices_sorted=True, unique_indices=True)
        return {"kernel": matrix, "bias": bias}
    if fmt == "bcoo":
        matrix = sparse.BCOO((data, jnp.asarray(np.stack([rows, cols], axis=1), jnp.int32)),
                             shape=wt.shape, indices_sorted=True, unique_indices=True)
        return {"kernel": matrix, "bias": bias}
    counts = np.bincount(rows, minlength=wt.shape[0])
    k = max(int(counts.max()), 1)
    slot = np.arange(rows.size) - np.concatenate([[0], np.cumsum(counts)])[rows]  # position within its row
    index = np.zeros((wt.shape[0], k), np.int32)
    value = np.zeros((wt.shape[0], k), np.float32)
    index[rows, slot] = cols
    value[rows, slot] = wt[rows, cols]
    return {"index": jnp.asarray(index), "value": jnp.asarray(value), "bias": bias}


def _bytes(weights: dict) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(weights)))


# ----------------------------------------------------------------------------------------------
# The exported network


class ExportedLayer(NamedTuple):
    """One layer of an :class:`Exported` network, in forward order.

    Attributes:
      path: the layer's name in the parameters (``'conv0'``, ``'fc1'``, ``'output'``).
      kind: ``'conv'`` or ``'dense'``.
      format: how it is stored (one of :data:`FORMATS`; of :data:`CONV_FORMATS` for convolutions).
      shape: the compacted kernel's shape (``(inputs, outputs)`` for dense layers).
      nonzero: kernel entries the ticket keeps.
      bytes: bytes of the stored weights in this format (values, indices, bias).
      relu: a ReLU follows.
      pool: a 2x2 max-pool follows (convolutions).
    """

    path: str
    kind: str
    format: str
    shape: tuple
    nonzero: int
    bytes: int
    relu: bool
    pool: bool = False

    @property
    def density(self) -> float:
        return self.nonzero / max(math.prod(self.shape), 1)


class Exported(NamedTuple):
    """A ticket exported for inference (see the module doc); run it with :func:`apply`.

    Attributes:
      name: the model's registry name.
      layers: the :class:`ExportedLayer` of every layer, in forward order.
      weights: layer path -> that layer's stored arrays (``{'kernel', 'bias'}`` with a dense
        array or a ``BCSR``/``BCOO`` matrix of ``W.T``; ``{'index', 'value', 'bias'}`` for
        ``'gather'``; ``{'indptr', 'indices', 'values', 'bias'}`` for a ``'csr'`` dense layer,
        ``{'indptr', 'channel', 'dy', 'dx', 'values', 'bias', 'kernel_size'}`` for a ``'csr'``
        convolution): a pytree, passed to the compiled forward pass.
      measurements: layer path -> candidate format -> its median seconds per call (or the
        :class:`lottojax.timing.Timing` an injected ``measure`` returned), for every layer
        whose format was measured.
      compacted: the :class:`lottojax.compact.Compacted` network the layers come from.
      batch_size: the batch size the formats were measured at.
      conv_impl: how convolutions run (see :mod:`lottojax.models.convolution`).
      skipped: layer path -> candidate format -> why ``'auto'`` did not time it.
      network_seconds: the whole-network check of ``'auto'`` (``check_network``): median
        seconds per call of the network with the per-layer choices (``'chosen'``) and with
        every measured layer in one format (``'dense'``, ``'csr'``: :data:`NETWORK_RIVALS`);
        empty when it did not run.
      network_choice: which of those networks was exported ('' when the check did not run).
    """

    name: str
    layers: tuple
    weights: dict
    measurements: dict
    compacted: Compacted
    batch_size: int
    conv_impl: str = "auto"
    skipped: dict = {}
    network_seconds: dict = {}
    network_choice: str = ""

    @property
    def formats(self) -> dict:
        """Layer path -> the chosen format."""
        return {layer.path: layer.format for layer in self.layers}

    @property
    def seconds(self) -> dict:
        """Layer path -> format -> median seconds of the measurements."""
        return {path: {fmt: _median(t) for fmt, t in timings.items()} for path, timings in self.measurements.items()}

    @property
    def spec(self) -> tuple:
        """The static layout the compiled forward pass is specialised on."""
        return (self.conv_impl, tuple((l.path, l.kind, l.format, l.relu, l.pool) for l in self.layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        return apply(self, x)


def _median(t) -> float:
    return t.median if isinstance(t, Timing) else float(t)


def _steps(layers: tuple) -> list[tuple]:
    """The layers grouped into steps of the forward pass: consecutive ``'csr'`` dense layers
    form one step (one :func:`lottojax.native.csr_chain` call), every other layer its own."""
    chained = lambda layer: layer[1:3] == ("dense", "csr")  # (path, kind, format, relu, pool)
    steps = []
    for layer in layers:
        if chained(layer) and steps and chained(steps[-1][-1]):
            steps[-1] += (layer,)
        else:
            steps.append((layer,))
    return steps


@functools.partial(jax.jit, static_argnums=0)
def _forward(spec: tuple, weights: dict, x: jax.Array) -> jax.Array:
    conv_impl, layers = spec
    for step in _steps(layers):
        path, kind, fmt, relu, pool = step[0]
        if kind == "dense":
            x = x.reshape((x.shape[0], -1))
        if len(step) > 1:
            x = native.csr_chain(x, [weights[p] for p, *_ in step], relu=[r for _, _, _, r, _ in step])
            continue
        x = _layer(kind, fmt, relu, conv_impl, weights[path], x)
        if pool:
            x = max_pool(x, 2, impl=conv_impl)
    return x


def apply(exported: Exported, x: jax.Array) -> jax.Array:
    """The logits of an exported network, computed by one jitted program.

    Args:
      exported: from :func:`export_inference`.
      x: a batch of inputs shaped like the model's (``(batch, *input_shape)``).

    Returns:
      ``(batch, num_classes)`` float32 logits, equal (up to float32 summation order) to the
      masked network's.

    Examples:
      >>> from lottojax.models import create
      >>> from lottojax.masks import apply_mask
      >>> model = create('mlp', input_shape=(6,), hidden=(8,), num_classes=3)
      >>> params, state = model.init(jax.random.key(0))
      >>> mask = jax.tree.map(lambda p: jax.random.uniform(jax.random.key(1), p.shape) < 0.3, params)
      >>> exported = export_inference('mlp', params, mask, formats='gather')
      >>> x = jax.random.normal(jax.random.key(2), (4, 6))
      >>> masked, _ = model.apply(apply_mask(params, mask), state, x, False)
      >>> bool(jnp.allclose(apply(exported, x), masked, atol=1e-5))
      True
    """
    return _forward(exported.spec, exported.weights, jnp.asarray(x))


def compile_apply(exported: Exported, input_shape: tuple, dtype=jnp.float32) -> Callable[[jax.Array], jax.Array]:
    """:func:`apply` compiled ahead of time for inputs of one shape, the weights built into the
    program as constants: a call skips tracing, the cache lookup and passing a dozen weight
    arrays, which at batch 1 costs about as much as the layers themselves (what a deployment
    runs, and what a benchmark should time).

    Args:
      exported: from :func:`export_inference`.
      input_shape: the full input shape, batch axis included.
      dtype: the input dtype.

    Examples:
      >>> from lottojax.models import create
      >>> params, _ = create('mlp', input_shape=(6,), hidden=(8,)).init(jax.random.key(0))
      >>> run = compile_apply(export_inference('mlp', params, formats='bcsr'), (2, 6))
      >>> x = jnp.ones((2, 6))
      >>> bool(jnp.allclose(run(x), apply(export_inference('mlp', params, formats='dense'), x), atol=1e-5))
      True
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    return jax.jit(lambda x: _forward(exported.spec, exported.weights, x)).lower(x).compile()


# ----------------------------------------------------------------------------------------------
# Export


def _layout(name: str, params: dict) -> list[tuple[str, str, bool, bool]]:
    """(path, kind, relu, pool) of every layer of the (compacted) network, in forward order."""
    def numbered(prefix):
        names = []
        while f"{prefix}{len(names)}" in params:
            names.append(f"{prefix}{len(names)}")
        return names

    layers = []
    if name in ("conv2", "conv4", "conv6"):
        layers += [(p, "conv", True, i % 2 == 1) for i, p in enumerate(numbered("conv"))]
    layers += [(p, "dense", True, False) for p in numbered("fc")]
    layers.append(("output", "dense", False, False))
    return layers


def _resolve_formats(formats, layout: list, candidates: tuple) -> dict:
    """Layer path -> a format or ``'auto'``; validates every name."""
    choices = f"one of {FORMATS} or 'auto' (measured among candidates={candidates})"
    paths = [path for path, *_ in layout]
    kinds = {path: kind for path, kind, *_ in layout}
    if isinstance(formats, str):
        if formats != "auto" and formats not in FORMATS:
            raise ValueError(f"formats={formats!r} for every dense layer ({', '.join(p for p in paths if kinds[p] == 'dense')}) "
                             f"is not a known format; choose {choices}")
        return {p: formats if kinds[p] == "dense" or formats in ("auto", *CONV_FORMATS) else "dense" for p in paths}
    if not isinstance(formats, Mapping):
        raise TypeError(f"formats must be 'auto', a format name or a dict of layer -> format; got {type(formats).__name__}")
    unknown = [p for p in formats if p not in kinds]
    if unknown:
        raise ValueError(f"formats names layers {unknown} that the compacted network does not have; its layers: {paths}")
    resolved = {}
    for path in paths:
        fmt = formats.get(path, "auto")
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"formats[{path!r}]={fmt!r} is not a known format for layer {path!r}; choose {choices}")
        if kinds[path] == "conv" and fmt not in ("auto", *CONV_FORMATS):
            raise ValueError(f"formats[{path!r}]={fmt!r}: layer {path!r} is a convolution, stored as one of "
                             f"{CONV_FORMATS}; the other formats apply to the dense layers "
                             f"{[p for p in paths if kinds[p] == 'dense']}")
        resolved[path] = fmt
    return resolved


def _calls(fn: Callable[[], object], calls: int) -> None:
    for _ in range(calls):
        jax.block_until_ready(fn())


def _default_measure(repeats: int, seconds_per_repeat: float = 1e-3) -> Measure:
    """Interleaved repeats, each calling a candidate often enough in a row (each call waiting
    for its result) to take about ``seconds_per_repeat``: one call of a small layer is tens
    of microseconds, within the clock's and the dispatcher's jitter. Seconds per call."""
    def measure(fns):
        once = interleaved(fns, repeats=1, warmup=1)
        calls = max(1, min(1000, round(seconds_per_repeat / max(min(t.median for t in once.values()), 1e-7))))
        timed = interleaved({f: functools.partial(_calls, fn, calls) for f, fn in fns.items()}, repeats=repeats,
                            warmup=0)
        return {f: t.median / calls for f, t in timed.items()}
    return measure


def _temp_bytes(compiled) -> Optional[int]:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # backends without memory analysis
        return None


def _measure_layer(kind: str, relu: bool, conv_impl: str, packs: dict, x: jax.Array, measure: Measure,
                   max_temp_bytes: Optional[int]) -> tuple[dict, dict]:
    """(candidate format -> its timing, skipped format -> why) for one layer on the input ``x``."""
    batch_size = x.shape[0]
    fns, skipped = {}, {}
    for fmt, weights in packs.items():
        compiled = _layer_program(kind, fmt, relu, conv_impl).lower(weights, x).compile()
        temp = _temp_bytes(compiled)
        if max_temp_bytes is not None and temp is not None and temp > max_temp_bytes and fmt != "dense":
            skipped[fmt] = f"needs {temp / 2**20:.0f} MiB of temporaries (max_temp_bytes={max_temp_bytes})"
            continue
        fns[fmt] = functools.partial(compiled, weights, x)
    if not fns:
        raise ValueError(f"every candidate of this layer needs more temporary memory than max_temp_bytes={max_temp_bytes} "
                         f"at batch {batch_size} ({skipped}); add 'dense' to candidates or raise max_temp_bytes")
    timings = dict(measure(fns))
    missing = set(fns) - set(timings)
    if missing:
        raise ValueError(f"measure returned no timing for {sorted(missing)}")
    return {fmt: timings[fmt] for fmt in fns}, skipped


def export_inference(name: str, params: PyTree, mask: Optional[PyTree] = None, model_state: Optional[PyTree] = None,
                     *, formats: Union[str, Mapping[str, str]] = "auto", batch_size: int = 1,
                     candidates: Sequence[str] = FORMATS, repeats: int = 15, measure: Optional[Measure] = None,
                     max_temp_bytes: Optional[int] = 2**30, input_shape: Optional[tuple] = None, seed: int = 0,
                     check_network: bool = True, **model_kwargs) -> Exported:
    """Exports a ticket for inference: compacted, then each dense layer in its fastest format.

    Args:
      name: the model's registry name, one of :data:`SUPPORTED`.
      params: the full network's parameters.
      mask: the ticket's bool mask like ``params`` (``None``: dense).
      model_state: the model state (unused by the supported models, passed to
        :func:`lottojax.compact.compact`).
      formats: ``'auto'`` (measure every layer), one of :data:`FORMATS` for every layer that
        has it (convolutions: :data:`CONV_FORMATS`, else ``'dense'``), or a dict layer path ->
        format or ``'auto'`` (layers left out are measured).
      batch_size: the batch size the candidates are timed at (the crossover depends on it:
        export once per batch size that matters).
      candidates: the formats ``'auto'`` chooses among.
      repeats: timed repeats per candidate (after a warm-up call), interleaved; each repeat
        calls the layer enough times in a row to last about a millisecond (a whole network
        of ``check_network``: ten milliseconds).
      measure: replaces the timing: called once per measured layer with ``{format:
        zero-argument callable}`` (each runs the compiled layer once), it returns ``{format:
        Timing or seconds}``; the smallest median wins (ties: the earlier candidate); then
        once for ``check_network``. Default:
        :func:`lottojax.timing.interleaved` with ``repeats``, in seconds per call.
      max_temp_bytes: ``'auto'`` skips a sparse candidate whose compiled layer needs more
        temporary memory than this at ``batch_size`` (XLA's memory analysis; BCOO's product
        materialises ``nonzeros x batch`` values), recorded in ``Exported.skipped``;
        ``None``: no limit.
      input_shape: shape of one example (for ``Exported.compacted.model()`` and to time the
        convolutions' formats).
      seed: seeds the random inputs of the measurements.
      check_network: after choosing layer by layer, time the whole network with those choices
        (``'chosen'``) against it with every measured layer in one format of
        :data:`NETWORK_RIVALS` that is a candidate (``measure`` gets ``{'chosen': ...,
        'dense': ..., 'csr': ...}``, each running the network compiled by
        :func:`compile_apply`), and export the fastest (``Exported.network_choice``):
        per-layer timings need not compose (layouts and caches change between layers,
        consecutive ``'csr'`` layers run as one kernel call). Runs when the input's shape
        is known (``input_shape=``; MLPs: their first layer's inputs).
      **model_kwargs: constructor arguments the full model was created with (e.g.
        ``conv_impl=``), as for :func:`lottojax.compact.compact`.

    Returns:
      An :class:`Exported`; its ``formats`` are the choices, ``measurements`` the timings.

    Raises:
      ValueError: an unsupported model; an unknown format (the message names the layer and
        lists the formats); a format a convolution does not have; a layer name the
        network does not have; an unknown candidate; ``batch_size < 1``.

    Examples:
      >>> from lottojax.models import create
      >>> from lottojax.masks import apply_mask
      >>> from lottojax.timing import Timing
      >>> model = create('lenet300100', input_shape=(4, 4, 1), hidden=(16, 8))
      >>> params, state = model.init(jax.random.key(0))
      >>> mask = jax.tree.map(lambda p: jax.random.uniform(jax.random.key(1), p.shape) < 0.2, params)
      >>> fake = {'dense': 3e-6, 'bcsr': 2e-6, 'bcoo': 5e-6, 'gather': 1e-6, 'csr': 4e-6,  # a fake clock
      ...         'chosen': 2e-6}  # the whole network with the per-layer choices
      >>> exported = export_inference('lenet300100', params, mask, batch_size=1,
      ...                             measure=lambda fns: {f: Timing((fake[f],), (0.0,)) for f in fns})
      >>> exported.formats, exported.network_choice
      ({'fc0': 'gather', 'fc1': 'gather', 'output': 'gather'}, 'chosen')
      >>> x = jax.random.normal(jax.random.key(2), (3, 4, 4, 1))
      >>> masked, _ = model.apply(apply_mask(params, mask), state, x, False)
      >>> bool(jnp.allclose(exported(x), masked, atol=1e-5))
      True
      >>> export_inference('lenet300100', params, mask, formats={'fc1': 'csc'})
      Traceback (most recent call last):
      ...
      ValueError: formats['fc1']='csc' is not a known format for layer 'fc1'; choose one of ('dense', 'bcsr', 'bcoo', 'gather', 'csr') or 'auto' ...
    """
    if name not in SUPPORTED:
        raise ValueError(f"export_inference supports the models {SUPPORTED}; got {name!r} "
                         "(use lottojax.compact.compact for a smaller dense network of any reference model)")
    candidates = tuple(candidates)
    bad = [c for c in candidates if c not in FORMATS]
    if bad or not candidates:
        raise ValueError(f"candidates={candidates}: {bad or 'none'} unknown; choose from {FORMATS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if mask is None:
        mask = ones_like(params)
    small = compact(name, params, mask, model_state, input_shape=input_shape, **model_kwargs)
    layout = _layout(name, small.params)
    chosen = _resolve_formats(formats, layout, candidates)
    unavailable = {}  # candidate -> why it cannot run here
    if not native.available():
        why = f"native kernel unavailable: {native.unavailable_reason()}"
        forced = [path for path, fmt in chosen.items() if fmt == "csr"]
        if forced:
            raise RuntimeError(f"formats asks for 'csr' for layers {forced}, but the {why}; choose another format")
        unavailable = {"csr": why} if "csr" in candidates else {}
    candidates = tuple(c for c in candidates if c not in unavailable)
    if not candidates:
        raise ValueError(f"no candidate format is available here: {unavailable}; add another format to candidates")
    # the whole-network check decides between a few networks once: it times them longer
    network_measure = _default_measure(repeats, 1e-2) if measure is None else measure
    measure = _default_measure(repeats) if measure is None else measure
    conv_impl = small.model_kwargs.get("conv_impl", "auto")

    layers, weights, measured_packs, measurements, skipped = [], {}, {}, {}, {}
    key = jax.random.key(seed)
    image = None if input_shape is None else tuple(input_shape)  # one example's input to the next convolution
    for i, (path, kind, relu, pool) in enumerate(layout):
        kernel = np.asarray(small.params[path]["kernel"], np.float32)
        bias = np.asarray(small.params[path]["bias"], np.float32)
        nonzero = int(np.count_nonzero(np.asarray(small.mask[path]["kernel"]) & (kernel != 0)))
        options = tuple(c for c in candidates if kind == "dense" or c in CONV_FORMATS) or ("dense",)
        example = (kernel.shape[0],) if kind == "dense" else image
        fmt = chosen[path]
        if fmt == "auto" and len(options) > 1 and example is not None:
            packs = {c: _pack(c, kernel, bias) for c in options}
            x = jax.random.normal(jax.random.fold_in(key, i), (batch_size, *example), jnp.float32)
            measurements[path], why = _measure_layer(kind, relu, conv_impl, packs, x, measure, max_temp_bytes)
            why = {**unavailable, **why}
            fmt = min(measurements[path], key=lambda c: _median(measurements[path][c]))  # min keeps the first of ties
            stored = packs[fmt]
            measured_packs[path] = packs
        else:
            why = {c: "not measured: pass input_shape= to time convolutions" for c in options[1:]} \
                if fmt == "auto" and example is None else {}
            fmt = options[0] if fmt == "auto" else fmt
            stored = _pack(fmt, kernel, bias)
        if why:
            skipped[path] = why
        if kind == "conv" and image is not None:
            image = (*(n // 2 if pool else n for n in image[:2]), kernel.shape[-1])
        weights[path] = stored
        layers.append(ExportedLayer(path, kind, fmt, tuple(kernel.shape), nonzero, _bytes(stored), relu, pool))
    exported = Exported(name, tuple(layers), weights, measurements, small, int(batch_size), conv_impl, skipped)
    first_path, first_kind, *_ = layout[0]
    one_input = tuple(input_shape) if input_shape is not None else \
        (np.shape(small.params[first_path]["kernel"])[0],) if first_kind == "dense" else None
    rivals = {fmt: _measured_layers_in(exported, measured_packs, fmt) for fmt in NETWORK_RIVALS if fmt in candidates}
    rivals = {fmt: rival for fmt, rival in rivals.items() if rival.spec != exported.spec}
    if not check_network or not rivals or one_input is None:
        return exported
    return _check_network(exported, rivals, (batch_size, *one_input), network_measure)


def _measured_layers_in(exported: Exported, packs: dict, fmt: str) -> Exported:
    """``exported`` with every measured layer that timed ``fmt`` stored in ``fmt``."""
    uses = lambda path: fmt in exported.measurements.get(path, {})
    return exported._replace(
        weights={path: packs[path][fmt] if uses(path) else w for path, w in exported.weights.items()},
        layers=tuple(l._replace(format=fmt, bytes=_bytes(packs[l.path][fmt])) if uses(l.path) else l
                     for l in exported.layers))


def _check_network(exported: Exported, rivals: dict, input_shape: tuple, measure: Measure) -> Exported:
    """Per-layer timings need not compose (a sparse layer changes the layouts and cache use
    of its neighbours; consecutive ``'csr'`` layers run as one call): times the whole
    exported network against each rival (format -> the network with its measured layers in
    that format) and returns the fastest, the per-layer choices on a tie."""
    x = jax.random.normal(jax.random.key(0), input_shape, jnp.float32)
    networks = {"chosen": exported, **rivals}
    timings = measure({name: functools.partial(compile_apply(network, input_shape), x)
                       for name, network in networks.items()})
    seconds = {name: _median(timings[name]) for name in networks}
    best = min(seconds, key=seconds.get)  # min keeps the first of ties: the per-layer choices
    return networks[best]._replace(network_seconds=seconds, network_choice=best)


def format_export(exported: Exported) -> str:
    """A table of the exported layers: shape, density, format, bytes, and the median time of
    every measured candidate (``*`` marks the choice; candidates skipped for their memory
    are listed as such); then the whole-network check, if it ran.

    Examples:
      >>> from lottojax.models import create
      >>> params, _ = create('mlp', input_shape=(6,), hidden=(8,)).init(jax.random.key(0))
      >>> exported = export_inference('mlp', params, formats={'fc0': 'bcsr'}, batch_size=2,
      ...                             measure=lambda fns: {f: 1e-6 * (i + 1) for i, f in enumerate(fns)})
      >>> print(format_export(exported))
      mlp exported for batch 2
        layer    kind   kernel        density  format        bytes  measured (median per call)
        fc0      dense  6x8            100.0%  bcsr            452  -
        output   dense  8x10           100.0%  dense           360  dense 1 µs*, bcsr 2 µs, bcoo 3 µs, gather 4 µs, csr 5 µs
        whole network: per-layer choices 1 µs*, measured layers csr 2 µs
    """
    lines = [f"{exported.name} exported for batch {exported.batch_size}",
             f"  {'layer':<8} {'kind':<6} {'kernel':<12} {'density':>8}  {'format':<8} {'bytes':>10}  measured (median per call)"]
    for layer in exported.layers:
        timings = exported.measurements.get(layer.path)
        measured = "-" if not timings else ", ".join(
            [f"{fmt} {format_seconds(_median(t))}{'*' if fmt == layer.format else ''}" for fmt, t in timings.items()]
            + [f"{fmt} skipped ({why.splitlines()[0]})" for fmt, why in exported.skipped.get(layer.path, {}).items()])
        lines.append(f"  {layer.path:<8} {layer.kind:<6} {'x'.join(map(str, layer.shape)):<12} {layer.density:>8.1%}  "
                     f"{layer.format:<8} {layer.bytes:>10}  {measured}")
    if exported.network_seconds:
        lines.append("  whole network: " + ", ".join(
            f"{'per-layer choices' if name == 'chosen' else 'measured layers ' + name} {format_seconds(t)}"
            f"{'*' if name == exported.network_choice else ''}" for name, t in exported.network_seconds.items()))
    return "\n".join(lines)
