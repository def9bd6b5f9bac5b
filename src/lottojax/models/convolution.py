"""Convolution and max-pooling layers that train fast inside compiled loops on CPU.

XLA:CPU compiles the gradient of ``lax.conv_general_dilated`` with respect to the kernel
very slowly when it sits inside a loop body such as the ``lax.scan`` of
:func:`lottojax.train.make_trainer` (jax issue #12868): a Conv-2 training step took 4.7 s
inside the scan against 0.11 s jitted alone. :func:`conv` keeps the convolution's
arithmetic and changes only how the gradient is computed:

- ``impl='patches'``: the forward pass and the input gradient stay XLA convolutions (the
  input gradient written as a forward convolution of the output gradient with the
  flipped, transposed kernel, which XLA:CPU hands to its fast YNNPACK path); the kernel
  gradient is one matrix product of the input's patches (im2col, built from strided
  slices and one concatenation, no gather) with the output gradient. The patches exist
  only during the backward pass: the forward pass saves the input, as a native
  convolution does. Where the input is smaller than the (dilated) kernel, e.g. VGG's
  2x2 maps under 3x3 kernels, XLA:CPU runs even the forward convolution on a slow
  generic path (about 1 s per layer and step for VGG-16's last three layers at batch
  60), so there the whole convolution is one matrix product over the (few) patches.
- ``impl='native'``: plain ``lax.conv_general_dilated`` and its JAX gradient, what
  ``flax.linen.Conv`` computes.
- ``impl='auto'`` (the default): ``'patches'`` when ``jax.default_backend()`` is ``'cpu'``
  at trace time, ``'native'`` on GPU and TPU.

Both give the same outputs and gradients up to float32 rounding (different summation
order). :class:`Conv` is a drop-in ``flax.linen.Conv`` with the same parameters (``kernel``
of shape ``(*kernel_size, in_features, features)``, ``bias``) and the same initial values,
so parameters, masks and checkpoints carry over between the two. :func:`max_pool` is a
2x2, stride-2 max-pool written as a reshape and a maximum, which XLA:CPU also runs faster
inside loops than ``flax.linen.max_pool``'s ``reduce_window``.

Supported: 1, 2 or 3 spatial dimensions (channels last), padding ``'SAME'``, ``'VALID'``,
an int, a sequence of ints or of ``(low, high)`` pairs, any strides, any kernel dilation.
Not supported (``ValueError``): ``feature_group_count`` other than 1, input (lhs)
dilation, ``'CIRCULAR'``/``'CAUSAL'`` padding, masks.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

#: The accepted values of ``impl``.
IMPLS = ("auto", "native", "patches")

Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]


def resolve_impl(impl: str) -> str:
    """``'native'`` or ``'patches'``: ``'auto'`` resolved by ``jax.default_backend()``.

    Examples:
      >>> resolve_impl("native"), resolve_impl("auto")  # on a CPU
      ('native', 'patches')
      >>> resolve_impl("winograd")
      Traceback (most recent call last):
      ...
      ValueError: impl='winograd'; expected one of ('auto', 'native', 'patches').
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}.")
    if impl == "auto":
        return "patches" if jax.default_backend() == "cpu" else "native"
    return impl


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name}={value} has {len(value)} entries; the kernel has {n} spatial dimensions.")
    return value


def padding_pairs(padding: Padding, in_sizes: Sequence[int], kernel_sizes: Sequence[int],
                  strides: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Explicit ``(low, high)`` padding per spatial dimension, as XLA pads.

    ``'SAME'`` gives ``ceil(size / stride)`` outputs with the odd padding element at the end.

    Examples:
      >>> padding_pairs("SAME", (28, 28), (3, 3), (1, 1), (1, 1))
      ((1, 1), (1, 1))
      >>> padding_pairs("SAME", (32,), (3,), (2,), (1,)), padding_pairs(2, (8,), (3,), (1,), (1,))
      (((0, 1),), ((2, 2),))
      >>> padding_pairs("CIRCULAR", (8,), (3,), (1,), (1,))
      Traceback (most recent call last):
      ...
      ValueError: padding='CIRCULAR' is not supported; use 'SAME', 'VALID', an int or explicit (low, high) pairs.
    """
    n = len(kernel_sizes)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r} is not supported; use 'SAME', 'VALID', an int or "
                             "explicit (low, high) pairs.")
        effective = [(k - 1) * d + 1 for k, d in zip(kernel_sizes, dilation)]
        return tuple(lax.padtype_to_pads(tuple(in_sizes), tuple(effective), tuple(strides), padding))
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pairs = tuple((p, p) if isinstance(p, int) else tuple(int(v) for v in p) for p in padding)
    if len(pairs) != n or any(len(p) != 2 for p in pairs):
        raise ValueError(f"padding={padding!r} must give one int or (low, high) pair per spatial "
                         f"dimension ({n}).")
    return pairs


def _dimension_numbers(n: int) -> tuple[str, str, str]:
    spatial = "DHW"[3 - n:] if n <= 3 else None
    if spatial is None:
        raise ValueError(f"{n} spatial dimensions; supported: 1, 2 or 3.")
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def _native(x, kernel, strides, pads, dilation, precision=None):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(kernel.ndim - 2), precision=precision)


def extract_patches(x: jax.Array, kernel_sizes: Sequence[int], strides: Sequence[int],
                    pads: Sequence[tuple[int, int]], dilation: Sequence[int]) -> jax.Array:
    """The convolution's input patches, kernel positions outer and channels inner.

    Returns ``(N, *out_sizes, prod(kernel_sizes) * C)``: entry ``[n, *o, (p, c)]`` is the
    input at channel ``c`` under kernel position ``p`` (row-major over ``kernel_sizes``)
    for output ``o``, so that ``patches @ kernel.reshape(-1, C_out)`` is the convolution.
    Built by padding once, one strided slice per kernel position and one concatenation.

    Examples:
      >>> x = jnp.arange(4.).reshape(1, 4, 1)   # one signal 0 1 2 3
      >>> extract_patches(x, (3,), (1,), ((1, 1),), (1,))[0]
      Array([[0., 0., 1.],
             [0., 1., 2.],
             [1., 2., 3.],
             [2., 3., 0.]], dtype=float32)
    """
    n = len(kernel_sizes)
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
    effective = [(k - 1) * d + 1 for k, d in zip(kernel_sizes, dilation)]
    outs = [(xp.shape[1 + i] - effective[i]) // strides[i] + 1 for i in range(n)]
    if all(k == 1 for k in kernel_sizes) and all(s == 1 for s in strides):
        return xp
    pieces = []
    for position in itertools.product(*(range(k) for k in kernel_sizes)):
        start = [0] + [p * d for p, d in zip(position, dilation)] + [0]
        limit = [xp.shape[0]] + [s + (o - 1) * st + 1 for s, o, st in zip(start[1:-1], outs, strides)] + [xp.shape[-1]]
        pieces.append(lax.slice(xp, start, limit, (1, *strides, 1)))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _transpose_pads(in_sizes, out_sizes, kernel_sizes, strides, pads, dilation):
    """Padding of the (stride-dilated) output gradient for the input gradient's convolution."""
    result = []
    for size, out, k, s, (lo, _), d in zip(in_sizes, out_sizes, kernel_sizes, strides, pads, dilation):
        effective = (k - 1) * d + 1
        before = effective - 1 - lo
        after = size + effective - 1 - ((out - 1) * s + 1) - before
        result.append((before, after))
    return tuple(result)


def _conv_patches_fwd(x, kernel, strides, pads, dilation, precision):
    # Saves the input and kernel, as the native convolution's gradient does.
    return _native(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _conv_patches_bwd(strides, pads, dilation, precision, residuals, g):
    x, kernel = residuals
    n = kernel.ndim - 2
    kernel_sizes, c_out = kernel.shape[:n], kernel.shape[-1]
    # Input gradient: a forward convolution of the stride-dilated output gradient with the
    # flipped kernel whose in/out axes are swapped (materialized, so that XLA:CPU runs it
    # as an ordinary convolution rather than its slow transposed-kernel path).
    flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(n))), -1, -2)
    dx = lax.conv_general_dilated(
        g, flipped.astype(g.dtype), (1,) * n,
        _transpose_pads(x.shape[1:-1], g.shape[1:-1], kernel_sizes, strides, pads, dilation),
        lhs_dilation=strides, rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(n), precision=precision)
    # Kernel gradient: one matrix product of the patches with the output gradient.
    patches = extract_patches(x, kernel_sizes, strides, pads, dilation)
    patches = patches.reshape(-1, patches.shape[-1])
    dkernel = jnp.matmul(patches.T, g.reshape(-1, c_out), precision=precision)
    return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_conv_patches = jax.custom_vjp(
    lambda x, kernel, strides, pads, dilation, precision: _native(x, kernel, strides, pads, dilation, precision),
    nondiff_argnums=(2, 3, 4, 5),
)
_conv_patches.defvjp(_conv_patches_fwd, _conv_patches_bwd)


def conv(x: jax.Array, kernel: jax.Array, strides: Union[int, Sequence[int]] = 1,
         padding: Padding = "SAME", kernel_dilation: Union[int, Sequence[int]] = 1, *,
         impl: str = "auto", precision: Any = None) -> jax.Array:
    """A channels-last convolution (cross-correlation) whose gradient is fast on CPU.

    Computes ``lax.conv_general_dilated(x, kernel, strides, padding,
    rhs_dilation=kernel_dilation)`` with ``N...C`` inputs and ``...IO`` kernels, as
    ``flax.linen.Conv`` does; ``impl`` chooses how the gradient is computed (see the
    module doc).

    Args:
      x: ``(N, *spatial, C_in)``; more leading axes are flattened into ``N`` and restored.
      kernel: ``(*kernel_size, C_in, C_out)`` with 1, 2 or 3 spatial dimensions.
      strides: an int or one per spatial dimension.
      padding: ``'SAME'``, ``'VALID'``, an int, or one int or ``(low, high)`` pair per
        spatial dimension.
      kernel_dilation: an int or one per spatial dimension.
      impl: ``'auto'``, ``'native'`` or ``'patches'``.
      precision: passed to the convolutions and the matrix product.

    Returns:
      ``(N, *out_spatial, C_out)``.

    Raises:
      ValueError: unsupported padding or impl, mismatched shapes.

    Examples:
      >>> x = jnp.arange(5.)[None, :, None]          # one signal 0 1 2 3 4
      >>> kernel = jnp.array([1., 10., 100.])[:, None, None]
      >>> conv(x, kernel, 2)[0, :, 0]                # windows (0 0 1), (1 2 3), (3 4 0)
      Array([100., 321.,  43.], dtype=float32)
      >>> grad = jax.grad(lambda k: conv(x, k, 2, impl="patches").sum())(kernel)
      >>> grad[:, 0, 0]                              # column sums of those windows
      Array([4., 6., 4.], dtype=float32)
    """
    impl = resolve_impl(impl)
    n = kernel.ndim - 2
    if n < 1 or n > 3:
        raise ValueError(f"kernel of shape {kernel.shape}: expected (*kernel_size, in, out) with 1-3 spatial dimensions.")
    if x.ndim < n + 2:
        raise ValueError(f"input of shape {x.shape} for a {n}-D convolution: expected (N, *spatial, C).")
    if x.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"input has {x.shape[-1]} channels; the kernel expects {kernel.shape[-2]}.")
    batch_shape = x.shape[: x.ndim - n - 1]
    x = x.reshape((-1, *x.shape[x.ndim - n - 1:]))
    strides = _tuple(strides, n, "strides")
    dilation = _tuple(kernel_dilation, n, "kernel_dilation")
    pads = padding_pairs(padding, x.shape[1:-1], kernel.shape[:n], strides, dilation)
    if impl == "native":
        y = _native(x, kernel, strides, pads, dilation, precision)
    elif any(size < (k - 1) * d + 1 for size, k, d in zip(x.shape[1:-1], kernel.shape[:n], dilation)):
        # Inputs smaller than the kernel (VGG's 2x2 maps under 3x3 kernels): XLA:CPU runs
        # such convolutions on its slow generic path, forward too, so compute them as one
        # matrix product of the (few) patches, differentiated as such.
        patches = extract_patches(x, kernel.shape[:n], strides, pads, dilation)
        y = jnp.matmul(patches, kernel.reshape(-1, kernel.shape[-1]), precision=precision)
    else:
        y = _conv_patches(x, kernel, strides, pads, dilation, precision)
    return y.reshape((*batch_shape, *y.shape[1:]))


def max_pool(x: jax.Array, window: int = 2, *, impl: str = "auto") -> jax.Array:
    """Max-pool over non-overlapping ``window x window`` tiles of NHWC features (stride = window).

    With ``impl='patches'`` (the CPU choice of ``'auto'``) it is a reshape and a maximum;
    ``'native'`` is ``flax.linen.max_pool(x, (window, window), strides=(window, window))``.
    Rows and columns beyond the last whole tile are dropped, as in ``'VALID'`` pooling.
    Gradients agree except where a tile has several equal maxima (``reduce_window``
    routes the gradient to one of them, the reshape form shares it among them).

    Examples:
      >>> x = jnp.arange(16.).reshape(1, 4, 4, 1)
      >>> max_pool(x)[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    if resolve_impl(impl) == "native":
        return nn.max_pool(x, (window, window), strides=(window, window))
    h, w, c = x.shape[-3:]
    h2, w2 = h // window, w // window
    x = x[..., : h2 * window, : w2 * window, :]
    tiles = x.reshape((*x.shape[:-3], h2, window, w2, window, c))
    return jnp.max(tiles, axis=(-4, -2))


class Conv(nn.Conv):
    """A drop-in ``flax.linen.Conv`` (channels last) whose gradient is fast on CPU.

    A subclass of ``nn.Conv`` with the same attributes plus ``impl``: same parameter names
    (``kernel`` of shape ``(*kernel_size, in_features, features)``, ``bias``), shapes and
    initial values, so params, masks and checkpoints carry over, and code that looks for
    ``nn.Conv`` layers (``isinstance``, method interceptors) still finds it. With
    ``impl='native'`` it is exactly ``nn.Conv``; with ``'patches'`` (the CPU choice of
    ``'auto'``) it computes the same convolution through :func:`conv`, which supports
    1-3 spatial dimensions, padding ``'SAME'``, ``'VALID'``, an int or per-dimension ints
    or ``(low, high)`` pairs, any ``strides`` and ``kernel_dilation``. For
    ``feature_group_count`` other than 1, ``input_dilation``, ``mask``, ``'CIRCULAR'``
    or ``'CAUSAL'`` padding or a custom ``conv_general_dilated`` it raises ``ValueError``
    unless ``impl='native'``.

    Attributes:
      impl: ``'auto'``, ``'native'`` or ``'patches'`` (see :func:`conv`); the others are
        ``nn.Conv``'s.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> ours, theirs = Conv(4, (3, 3), impl="patches"), nn.Conv(4, (3, 3))
      >>> params = ours.init(jax.random.key(1), x)
      >>> jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, theirs.init(jax.random.key(1), x))
      {'params': {'bias': True, 'kernel': True}}
      >>> bool(jnp.allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5))
      True
      >>> isinstance(ours, nn.Conv)
      True
    """

    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the convolution to ``(..., *spatial, in_features)`` inputs."""
        if resolve_impl(self.impl) == "native":
            return super().__call__(inputs)
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        n = len(kernel_size)
        unsupported = []
        if self.feature_group_count != 1:
            unsupported.append(f"feature_group_count={self.feature_group_count}")
        if set(_tuple(self.input_dilation if self.input_dilation is not None else 1, n, "input_dilation")) != {1}:
            unsupported.append(f"input_dilation={self.input_dilation}")
        if self.mask is not None:
            unsupported.append("mask")
        if self.conv_general_dilated is not None or self.conv_general_dilated_cls is not None:
            unsupported.append("a custom conv_general_dilated")
        if isinstance(self.padding, str) and self.padding not in ("SAME", "VALID"):
            unsupported.append(f"padding={self.padding!r}")
        if unsupported:
            raise ValueError(f"lottojax.models.Conv(impl={self.impl!r}) does not support "
                             f"{', '.join(unsupported)}; use impl='native' (flax.linen.Conv).")
        unbatched = inputs.ndim == n + 1
        if unbatched:
            inputs = inputs[None]
        kernel = self.param("kernel", self.kernel_init, (*kernel_size, inputs.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv(inputs, kernel, self.strides, self.padding, self.kernel_dilation,
                 impl="patches", precision=self.precision)
        if bias is not None:
            y = y + bias
        return y[0] if unbatched else y
