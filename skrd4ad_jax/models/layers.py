"""Building blocks with PyTorch semantics, shared by teachers, bottlenecks and decoders.

PyTorch pads strided convolutions symmetrically while XLA's ``'SAME'`` pads
asymmetrically, so every convolution here takes explicit ``((p, p), (p, p))``
padding. Parameter names follow torchvision's module names so that a state dict
maps one-to-one onto the Flax tree (``layer1.0.conv1.weight`` ->
``layer1_0/conv1/kernel``; see ``skrd4ad_jax.porting``).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / fan_out).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.init.xavier_normal_ (used by RD with Expert's student).
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# How convolutions are computed (the same numbers up to float round-off; see
# ``conv2d``). 'auto': 'gemm' on XLA's CPU backend, 'xla' elsewhere.
CONV_IMPLS = ("auto", "gemm", "xla")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSION_NUMBERS
  )


def _im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """The convolution as one GEMM over the k*k taps side by side (im2col)."""
  k, _, c, o = kernel.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (xp.shape[1] - k) // stride + 1
  out_w = (xp.shape[2] - k) // stride + 1
  cols = jnp.concatenate([w for _, _, w in _taps(xp, k, stride, out_h, out_w)], axis=-1)
  return jnp.einsum("nhwc,co->nhwo", cols, kernel.reshape(k * k * c, o))


def _cpu_forward_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """A forward convolution as XLA:CPU computes it fast.

  Where the input has fewer positions than the kernel has taps (a 3x3 kernel
  over the 2x2 bottleneck of a 64 px image), XLA swaps the operands of the
  convolution and runs it as a slow reversed-kernel convolution (34 ms instead
  of under 1 ms for 4x2x2x512 -> 512 on the 2-core CPU): there the taps go side
  by side into one GEMM instead.
  """
  if _few_positions(x, kernel.shape[0]):
    return _im2col_conv(x, kernel, stride, pad)
  return _xla_conv(x, kernel, stride, pad)


def _few_positions(x: jax.Array, k: int) -> bool:
  """Whether [N, H, W, C] ``x`` has fewer positions than a k x k kernel has taps."""
  return x.shape[1] * x.shape[2] < k * k


def _taps(xp: jax.Array, k: int, stride: int, out_h: int, out_w: int):
  """(a, b, the padded input's window of tap (a, b) at every output position)."""
  n, _, _, c = xp.shape
  for a in range(k):
    for b in range(k):
      end = (n, a + stride * (out_h - 1) + 1, b + stride * (out_w - 1) + 1, c)
      yield a, b, jax.lax.slice(xp, (0, a, b, 0), end, (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gemm_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  return _cpu_forward_conv(x, kernel, stride, pad)


def _gemm_conv_fwd(x, kernel, stride, pad):
  return _cpu_forward_conv(x, kernel, stride, pad), (x, kernel)


# The flat kernel gradient multiplies every padded position, (Hp * Wp) / (H * W) - 1
# more rows than the outputs: 6 % at 64x64, 13 % at 32x32, 27 % at 16x16, 56 % at
# 8x8. Where that is small it wins (64x64x128: 0.30 -> 0.18 s per batch of 16 on the
# 2-core CPU); where it is not, the strided windows do (8x8x1024: 0.12 vs 0.18 s).
_FLAT_MAX_EXTRA = 0.15


def _flat_kernel_grad(xp: jax.Array, g: jax.Array, k: int, acc: Any) -> jax.Array:
  """The kernel gradient of a stride-1 convolution, one GEMM per tap on contiguous rows.

  With the padded input flattened to rows ``[N * Hp * Wp, C]`` and ``g`` placed on
  the same grid (zeros where no output is), tap (a, b)'s window is the contiguous
  row range starting at ``a * Wp + b``: ``d kernel[a, b] = rows[s : s + L]^T g``.
  A strided window (``_taps``) costs XLA:CPU a slow gather-like copy per tap;
  a contiguous range is a plain copy (1.2-1.7x faster kernel gradients from
  32x32 up; the extra zero rows add 6-13 % to the GEMMs' work there).

  Args:
    xp: [N, Hp, Wp, C] the padded input.
    g: [N, Hp - k + 1, Wp - k + 1, O] the output gradient.
    k: kernel size.
    acc: accumulation dtype.

  Returns:
    [k, k, C, O] in ``acc``.
  """
  n, hp, wp, c = xp.shape
  _, out_h, out_w, o = g.shape
  rows = xp.reshape(n * hp * wp, c)
  # Every tap's range ends inside the array: (k - 1) rows and columns of slack.
  rows = jnp.pad(rows, ((0, (k - 1) * wp + (k - 1)), (0, 0)))
  grid = jnp.pad(g, ((0, 0), (0, hp - out_h), (0, wp - out_w), (0, 0))).reshape(n * hp * wp, o)
  length = grid.shape[0]
  taps = [
    jax.lax.dot_general(
      jax.lax.slice_in_dim(rows, a * wp + b, a * wp + b + length),
      grid,
      (((0,), (0,)), ((), ())),
      preferred_element_type=acc,
    )
    for a in range(k)
    for b in range(k)
  ]
  return jnp.stack(taps).reshape(k, k, c, o)


def _gemm_conv_bwd(stride, pad, residuals, g):
  """Both gradients as GEMMs (XLA:CPU's own backward convolutions are 2-6x slower)."""
  x, kernel = residuals
  k, _, c, o = kernel.shape
  n, h, w, _ = x.shape
  _, out_h, out_w, _ = g.shape
  acc = jnp.promote_types(g.dtype, jnp.float32)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  hp, wp = xp.shape[1:3]
  if stride == 1 and hp * wp <= (1 + _FLAT_MAX_EXTRA) * out_h * out_w:
    dkernel = _flat_kernel_grad(xp, g, k, acc)
  else:
    # d kernel[a, b] = sum over positions of window(a, b)^T g: one GEMM per tap.
    dkernel = jnp.stack(
      [
        jnp.einsum("nhwc,nhwo->co", window, g, preferred_element_type=acc)
        for _, _, window in _taps(xp, k, stride, out_h, out_w)
      ]
    ).reshape(k, k, c, o)
  if stride == 1 and not _few_positions(g, k):
    # d x is the convolution of g with the flipped, transposed kernel (a forward
    # convolution, which XLA:CPU computes fast).
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = _xla_conv(g, flipped, 1, k - 1 - pad).astype(acc)
  else:
    # Strided (or too few positions for a fast convolution, where flipping and
    # transposing the kernel would cost more than the sums): each tap's g W[a, b]^T
    # lands on every stride-th input position.
    hp, wp = xp.shape[1], xp.shape[2]
    dxp = jnp.zeros(xp.shape, acc)
    zero = jnp.zeros((), acc)
    for a in range(k):
      for b in range(k):
        t = jnp.einsum("nhwo,co->nhwc", g, kernel[a, b], preferred_element_type=acc)
        dxp = dxp + jax.lax.pad(
          t,
          zero,
          (
            (0, 0, 0),
            (a, hp - a - (stride * (out_h - 1) + 1), stride - 1),
            (b, wp - b - (stride * (out_w - 1) + 1), stride - 1),
            (0, 0, 0),
          ),
        )
    dx = dxp[:, pad : pad + h, pad : pad + w]
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def auto_conv_impl() -> str:
  """What ``impl='auto'`` means on the default backend."""
  return "gemm" if jax.default_backend() == "cpu" else "xla"


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = "auto") -> jax.Array:
  """``torch.nn.functional.conv2d(x, w, stride=stride, padding=k // 2)`` in NHWC / HWIO.

  ``impl='xla'`` is ``lax.conv_general_dilated`` forward and backward. ``'gemm'``
  computes the same sums as matrix products where XLA's CPU backend is slow:
  a 1x1 convolution is an ``einsum`` (forward and both gradients are GEMMs;
  ``lax.conv`` took 4-6x longer for forward + backward on the decoder's
  shapes), and a 3x3 convolution keeps XLA's fast forward convolution with a
  custom gradient (the input gradient a forward convolution, the kernel
  gradient one GEMM per tap, on contiguous rows at stride 1 from 32x32 up; 1.1-2x
  faster, and the contiguous rows another 1.2-1.7x on the kernel gradient); on
  inputs with fewer positions than the kernel has taps (the 2x2 bottleneck of a
  64 px image) the forward is one im2col GEMM and the input gradient one GEMM per
  tap, where XLA's convolution is 30x slower. Larger kernels (the 7x7 stem) use
  'xla'. 'auto' picks 'gemm' on the CPU backend.
  Parameters, shapes and (up to float round-off) numbers are the same
  (``tests/test_core.py``).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    impl = auto_conv_impl()
  k = kernel.shape[0]
  pad = k // 2
  if impl == "xla" or k > 3:
    return _xla_conv(x, kernel, stride, pad)
  if k == 1:
    if stride > 1:  # a strided slice (not indexing, which becomes a gather)
      x = jax.lax.slice(x, (0,) * x.ndim, x.shape, (1, stride, stride, 1))
    return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])
  return _gemm_conv(x, kernel, stride, pad)


class Conv(nn.Module):
  """A square convolution padded like PyTorch (``padding = kernel // 2``).

  The variables are ``nn.Conv``'s (``kernel`` [k, k, C_in, C_out], ``bias``),
  in float32, with its dtype promotion; computed by ``conv2d``.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = False
  kernel_init: Initializer = kaiming_fan_out
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H', W', O]
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, self.stride, self.impl)
    return y if bias is None else y + bias


def conv(
  features: int,
  kernel: int = 3,
  stride: int = 1,
  *,
  name: str,
  use_bias: bool = False,
  kernel_init: Initializer = kaiming_fan_out,
  bias_init: Initializer = nn.initializers.zeros,
  dtype: Any = None,
) -> Conv:
  """A square convolution padded like PyTorch (``padding = kernel // 2``)."""
  return Conv(
    features,
    kernel,
    stride,
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    name=name,
  )


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` over the channel (last) axis, with PyTorch's semantics.

  Training (``use_running_average=False``) normalises with the batch mean and
  the *biased* batch variance over every axis but the last, and folds them into
  the running statistics as PyTorch does: ``running = (1 - momentum) * running
  + momentum * batch``, where the variance folded in is the *unbiased* one
  (``var * n / (n - 1)``, n values per channel). Flax's ``nn.BatchNorm`` folds
  the biased one, which leaves the evaluation-mode variance low by a factor
  ``(n - 1) / n`` after every step. Evaluation normalises with the running
  statistics.

  Statistics and normalisation are computed in float32 whatever ``dtype`` is;
  the output is cast to ``dtype``. The batch statistics are plain means over
  the batch axes, so under ``jit`` with a batch sharded over devices they are
  those of the global batch, and the module runs unchanged inside ``jax.vmap``.

  The variables are named like Flax's (``params/scale``, ``params/bias``,
  ``batch_stats/mean``, ``batch_stats/var``), which are torch's ``weight``,
  ``bias``, ``running_mean`` and ``running_var``.

  Attributes:
    use_running_average: normalise with the running statistics (evaluation).
    momentum: PyTorch's momentum (the weight of the new batch statistics).
    epsilon: added to the variance.
    dtype: output dtype (None: the input's promoted with float32).
  """

  use_running_average: bool = False
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., C] -> [..., C]
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    out_dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = math.prod(x.shape[:-1])
      mean = jnp.mean(x32, axis=axes)
      # Two-pass variance, as torch computes it (E[x^2] - E[x]^2 loses digits).
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        # torch folds the unbiased variance (n = 1 raises in torch; kept finite here).
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(out_dtype)


def batch_norm(train: bool, *, name: str, dtype: Any = None) -> BatchNorm:
  """BatchNorm with PyTorch's semantics and defaults (eps 1e-5, momentum 0.1)."""
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(3, 2, padding=1)``: padded with -inf on both sides."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def deconv_init(key, shape, dtype=jnp.float32):
  """PyTorch's default ``ConvTranspose2d`` init for a [2, 2, C_in, C_out] kernel.

  PyTorch computes fan_in of a transposed conv from weight dim 1 (= C_out) times
  the kernel area, so the bound is 1/sqrt(4 * C_out).
  """
  bound = 1.0 / (shape[0] * shape[1] * shape[3]) ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Deconv2x2(nn.Module):
  """``nn.ConvTranspose2d(C_in, C_out, kernel_size=2, stride=2, bias=False)``.

  A 2x2 stride-2 unpadded transposed convolution has no overlapping windows:
  ``out[2i+a, 2j+b, o] = sum_c in[i, j, c] * W[c, o, a, b]``. It is computed as a
  1x1 convolution to 4*C_out channels followed by depth-to-space, because XLA's
  CPU backend differentiates ``lax.conv_transpose`` about 14x slower.

  The kernel is stored as [2, 2, C_in, C_out] with ``kernel[a, b, c, o] =
  torch_weight[c, o, a, b]``, so PyTorch checkpoints stay portable.
  """

  features: int
  kernel_init: Initializer = deconv_init
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, O]
    kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features))
    if self.dtype is not None:
      x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel)  # [B, H, 2, W, 2, O]
    return y.reshape(b, 2 * h, 2 * w, self.features)
