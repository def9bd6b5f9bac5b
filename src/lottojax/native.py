"""A native sparse kernel for XLA:CPU: the CSR products behind the ``'csr'`` export format.

XLA has no fast sparse product on a CPU (``jax.experimental.sparse``'s BCSR and BCOO lower
to gathers and scatters). :func:`csr_matmul` (dense layers) and :func:`csr_conv` (stride-1
'SAME' convolutions) call a small C++ kernel instead (``lottojax/csrc/csr_matmul.cc``)
through the XLA FFI: every stored weight adds ``w`` times a contiguous run of 64 inputs
(batch entries of one feature, or pixels of one channel) to its output row at once, in
registers, so a layer costs its nonzeros times the batch (times the pixels) in vector
multiply-adds and nothing for its zeros. Bias and ReLU are fused. :func:`csr_chain` runs
several dense layers in one call: each block of examples passes through all of them in the
thread's cache, and a batch-1 network pays one call's dispatch instead of one per layer.

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``;
``-O3 -march=native``) against the headers that ship with jaxlib, and cached in
``$LOTTOJAX_CACHE_DIR`` (default ``~/.cache/lottojax``) under a name that hashes the
source, the flags, jax's version and the CPU's instruction sets, so a new jax or machine
rebuilds it. No compiler, a failed build or ``LOTTOJAX_NATIVE=0`` make :func:`available`
false, and :func:`unavailable_reason` says why; the pure-XLA formats keep working.

Examples (needing the kernel, so a C++ compiler):
  >>> import numpy as np
  >>> w = np.array([[0., 2., 0.], [1., 0., 3.]], np.float32)      # (outputs, inputs)
  >>> x = np.array([[1., 1., 1.], [1., 2., 3.]], np.float32)      # (batch, inputs)
  >>> np.asarray(csr_matmul(x, *csr_arrays(w), bias=np.array([0., -20.], np.float32), relu=True))
  array([[2., 0.],
         [4., 0.]], dtype=float32)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: FFI target name -> the kernel's exported handler symbol.
TARGETS = {"lottojax_csr_windows": "LottojaxCsrWindows", "lottojax_csr_chain": "LottojaxCsrChain"}
SOURCE = Path(__file__).parent / "csrc" / "csr_matmul.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cpu_features() -> str:
    """The CPU's instruction-set flags (``-march=native`` code is only valid where they match)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(compiler: str) -> Path:
    """Where the kernel built by ``compiler`` for this source, jax and CPU is cached."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), compiler, jax.__version__,
                                     platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOTTOJAX_CACHE_DIR", Path.home() / ".cache" / "lottojax"))
    return root / "native" / f"csr_matmul-{key}.so"


def _build(compiler: str, target: Path) -> None:
    """Compiles the kernel into ``target`` (atomically: concurrent builds cannot tear it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    """(loaded, why not): builds if needed and registers the FFI target, once per process."""
    if os.environ.get("LOTTOJAX_NATIVE", "1") == "0":
        return False, "disabled by LOTTOJAX_NATIVE=0"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, (f"no C++ compiler: {compiler!r} (from $CXX, default 'c++') is not on PATH; "
                       "install one (e.g. apt-get install g++) or set CXX")
    target = library_path(compiler)
    try:
        if not target.exists():
            _build(compiler, target)
        library = ctypes.cdll.LoadLibrary(str(target))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError) as error:
        return False, f"building or loading the kernel failed: {error}"
    return True, ""


def available() -> bool:
    """Whether :func:`csr_matmul` can run here (CPU backend, kernel built and registered)."""
    return jax.default_backend() == "cpu" and _load()[0]


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is false (``None`` when it is true)."""
    if jax.default_backend() != "cpu":
        return f"the kernel is for XLA:CPU; the default backend is {jax.default_backend()!r}"
    loaded, why = _load()
    return None if loaded else why


def csr_arrays(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr, indices, values)`` of a dense ``(outputs, inputs)`` matrix's nonzeros, row-major.

    Examples:
      >>> csr_arrays(np.array([[0., 2.], [0., 0.], [1., 3.]]))
      (array([0, 1, 1, 3], dtype=int32), array([1, 0, 1], dtype=int32), array([2., 1., 3.], dtype=float32))
    """
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (outputs, inputs); got shape {weight.shape}")
    rows, cols = np.nonzero(weight)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=weight.shape[0]))]).astype(np.int32)
    return indptr, cols.astype(np.int32), weight[rows, cols]


def conv_csr_arrays(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr, channel, dy, dx, values)`` of a ``(kh, kw, inputs, outputs)`` kernel's nonzeros,
    one CSR row per output channel (for :func:`csr_conv`).

    Examples:
      >>> kernel = np.zeros((3, 3, 2, 1), np.float32); kernel[0, 2, 1, 0] = 5.
      >>> conv_csr_arrays(kernel)
      (array([0, 1], dtype=int32), array([1], dtype=int32), array([0], dtype=int32), array([2], dtype=int32), array([5.], dtype=float32))
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (kh, kw, inputs, outputs); got shape {kernel.shape}")
    _, kw, inputs, outputs = kernel.shape
    indptr, taps, values = csr_arrays(kernel.transpose(3, 0, 1, 2).reshape(outputs, -1))
    return indptr, taps % inputs, taps // (kw * inputs), (taps // inputs) % kw, values


def _check(**arrays: tuple) -> None:
    for name, (array, ndim, dtype) in arrays.items():
        if array.ndim != ndim or array.dtype != dtype:
            raise ValueError(f"{name} must be a {ndim}-D {jnp.dtype(dtype).name} array; "
                             f"got shape {array.shape} dtype {array.dtype}")


def _require_kernel() -> None:
    if not available():
        raise RuntimeError(f"lottojax's native CSR kernel is not available: {unavailable_reason()}; "
                           "use a pure-XLA format ('dense', 'bcsr', 'bcoo', 'gather') instead")


def _checked_bias(bias: Optional[jax.Array], indptr: jax.Array, nonzeros: int, values: jax.Array) -> jax.Array:
    """``bias`` (zeros for ``None``), its length and the values' checked against ``indptr``."""
    outputs = indptr.shape[0] - 1
    bias = jnp.zeros((outputs,), jnp.float32) if bias is None else jnp.asarray(bias)
    _check(bias=(bias, 1, jnp.float32))
    if bias.shape != (outputs,) or nonzeros != values.shape[0]:
        raise ValueError(f"indptr has {indptr.shape[0]} entries (outputs + 1), so bias must have {outputs} "
                         f"(got {bias.shape[0]}) and the indices and values one per nonzero "
                         f"(got {nonzeros} and {values.shape[0]})")
    return bias


def csr_matmul(x: jax.Array, indptr: jax.Array, indices: jax.Array, values: jax.Array, *,
               bias: Optional[jax.Array] = None, relu: bool = False) -> jax.Array:
    """``act(x @ W.T + bias)`` for a sparse ``W`` (outputs, inputs) given in CSR form.

    Args:
      x: ``(batch, inputs)`` float32.
      indptr: ``(outputs + 1,)`` int32: row ``o`` of ``W`` is ``values[indptr[o]:indptr[o+1]]``
        at columns ``indices[...]`` (see :func:`csr_arrays`).
      indices: ``(nnz,)`` int32 column indices in ``[0, inputs)`` (the kernel refuses an
        index that would read outside ``x``).
      values: ``(nnz,)`` float32.
      bias: ``(outputs,)`` float32, or ``None`` for zeros.
      relu: apply ``max(., 0)`` to the result.

    Returns:
      ``(batch, outputs)`` float32. Works under ``jit`` and ``vmap`` (one call per mapped
      element); it has no gradient (an inference kernel).

    Raises:
      RuntimeError: the kernel is not available here (the message says why).
      ValueError: an argument of the wrong rank, length or dtype (named in the message).
    """
    return csr_chain(x, [dict(indptr=indptr, indices=indices, values=values, bias=bias)], relu=[relu])


def csr_chain(x: jax.Array, layers: Sequence[Mapping[str, Optional[jax.Array]]], *, relu: Sequence[bool]) -> jax.Array:
    """Dense layers ``h = act_l(h @ W_l.T + bias_l)`` one after another, all in one kernel call.

    Each block of 64 examples passes through every layer in the thread's cache, and the
    call costs one dispatch however many layers there are (at batch 1 each call costs
    several microseconds, as much as a small layer).

    Args:
      x: ``(batch, inputs)`` float32.
      layers: per layer a mapping with ``indptr``, ``indices``, ``values`` and ``bias`` as for
        :func:`csr_matmul` (``bias`` may be ``None``); layer ``l + 1`` reads layer ``l``'s outputs.
      relu: per layer, whether ``max(., 0)`` follows it.

    Returns:
      ``(batch, outputs of the last layer)`` float32.

    Examples (needing the kernel):
      >>> w0, w1 = np.array([[1., -1.], [0., 2.]], np.float32), np.array([[1., 1.]], np.float32)
      >>> layers = [dict(zip(('indptr', 'indices', 'values'), csr_arrays(w))) for w in (w0, w1)]
      >>> np.asarray(csr_chain(np.array([[1., 3.]], np.float32), layers, relu=[True, False]))
      array([[6.]], dtype=float32)
    """
    _require_kernel()
    x = jnp.asarray(x)
    _check(x=(x, 2, jnp.float32))
    if len(layers) != len(relu) or not layers:
        raise ValueError(f"layers ({len(layers)}) and relu ({len(relu)}) need one entry per layer, at least one")
    buffers, width = [], x.shape[1]
    for layer in layers:
        indptr, indices, values = (jnp.asarray(layer[k]) for k in ("indptr", "indices", "values"))
        _check(indptr=(indptr, 1, jnp.int32), indices=(indices, 1, jnp.int32), values=(values, 1, jnp.float32))
        buffers += [indptr, indices, values, _checked_bias(layer.get("bias"), indptr, indices.shape[0], values)]
        width = indptr.shape[0] - 1
    call = jax.ffi.ffi_call("lottojax_csr_chain", jax.ShapeDtypeStruct((x.shape[0], width), jnp.float32),
                            vmap_method="sequential")
    return call(x, *buffers, relu_mask=np.int64(sum(1 << l for l, r in enumerate(relu) if r)))


def csr_conv(x: jax.Array, indptr: jax.Array, channel: jax.Array, dy: jax.Array, dx: jax.Array,
             values: jax.Array, *, kernel_size: tuple[int, int], bias: Optional[jax.Array] = None,
             relu: bool = False) -> jax.Array:
    """A stride-1 ``'SAME'`` 2-D convolution (cross-correlation, as ``lax.conv``) with a sparse kernel.

    The images are zero-padded and laid out channel-major, so each stored weight multiplies
    a contiguous run of pixels of one image (the padding columns of the grid are computed
    and dropped).

    Args:
      x: ``(batch, height, width, inputs)`` float32.
      indptr, channel, dy, dx, values: the kernel's nonzeros from :func:`conv_csr_arrays`
        (one CSR row per output channel; input channel and tap position per entry).
      kernel_size: ``(kh, kw)``.
      bias: ``(outputs,)`` float32, or ``None`` for zeros.
      relu: apply ``max(., 0)`` to the result.

    Returns:
      ``(batch, height, width, outputs)`` float32.
    """
    _require_kernel()
    x, indptr, channel, dy, dx, values = map(jnp.asarray, (x, indptr, channel, dy, dx, values))
    _check(x=(x, 4, jnp.float32), indptr=(indptr, 1, jnp.int32), channel=(channel, 1, jnp.int32),
           dy=(dy, 1, jnp.int32), dx=(dx, 1, jnp.int32), values=(values, 1, jnp.float32))
    batch, height, width, inputs = x.shape
    kh, kw = kernel_size
    top, left = (kh - 1) // 2, (kw - 1) // 2  # 'SAME' at stride 1, as lax pads
    padded = jnp.pad(x.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (top, kh - 1 - top), (left, kw - 1 - left)))
    hp, wp = height + kh - 1, width + kw - 1
    flat = jnp.pad(padded.reshape(-1), (0, (kh - 1) * wp + kw - 1))  # the last pixels' taps stay inside
    if flat.size >= 2**31:
        raise ValueError(f"x padded has {flat.size} elements; the kernel's int32 offsets reach 2**31: split the batch")
    offsets = channel * (hp * wp) + dy * wp + dx
    call = jax.ffi.ffi_call("lottojax_csr_windows", jax.ShapeDtypeStruct((indptr.shape[0] - 1, batch * hp * wp),
                                                                          jnp.float32), vmap_method="sequential")
    y = call(flat, indptr, offsets, values, _checked_bias(bias, indptr, offsets.shape[0], values), relu=bool(relu),
             groups=np.int64(batch), group_stride=np.int64(inputs * hp * wp), columns=np.int64(hp * wp))
    return y.reshape(-1, batch, hp, wp)[:, :, :height, :width].transpose(1, 2, 3, 0)
