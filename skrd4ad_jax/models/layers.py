"""Building blocks with PyTorch semantics, shared by teachers, bottlenecks and decoders.

PyTorch pads strided convolutions symmetrically while XLA's ``'SAME'`` pads
asymmetrically, so every convolution here takes explicit ``((p, p), (p, p))``
padding. Parameter names follow torchvision's module names so that a state dict
maps one-to-one onto the Flax tree (``layer1.0.conv1.weight`` ->
``layer1_0/conv1/kernel``; see ``skrd4ad_jax.porting``).
"""

from __future__ import annotations

from collections.abc import Callable
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
) -> nn.Conv:
  """A square convolution padded like PyTorch (``padding = kernel // 2``)."""
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    name=name,
  )


def batch_norm(train: bool, *, name: str, dtype: Any = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1 == Flax momentum 0.9)."""
  return nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


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
