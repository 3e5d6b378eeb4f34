"""Image and mask decoding with Pillow and numpy, bit for bit as the tf.data pipeline.

Pre-processing reproduces the RD4AD reference: PIL ``convert('RGB')``, then
``Resize((S, S))``: antialiased bilinear on 8-bit values, Pillow's two
fixed-point passes, horizontal then vertical. The passes are computed here in
numpy from Pillow's own integer weights (``pil_bilinear_coeffs``), so the
result does not depend on the Pillow version (Pillow 13 runs the vertical pass
first on some portrait images, which moves a few pixels by one 8-bit level).
``data_pipelines.input_pipeline`` computes the same integers in TensorFlow.

16-bit images are scaled to 8 bits as ``floor(v / 65535 * 255 + 0.5)`` in
float32 (where PIL would clip or truncate); 16-bit colour PNGs, which Pillow
reads truncated to their high byte, are decoded here from their zlib stream.

Only numpy, Pillow and the standard library are imported: the exported-model
runner (``skrd4ad_jax.export.run``) uses this module without JAX.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

# Pillow's fixed-point precision of 8-bit resampling (libImaging/Resample.c).
PIL_PRECISION_BITS = 32 - 8 - 2
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> samples per pixel (0 gray, 2 RGB, 4 gray+alpha, 6 RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def pil_bilinear_coeffs(in_size, out_size) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's antialiased bilinear weights for one axis, in fixed point.

  Mirrors ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's
  Resample.c in IEEE double, in the same order of operations, so the integer
  weights are bit-identical.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    index int32 [out, ksize] (input positions, clamped) and weight int32
    [out, ksize] (0 beyond each window).
  """
  in_size, out_size = int(in_size), int(out_size)
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale  # The bilinear filter's support is 1.
  ksize = int(np.ceil(support)) * 2 + 1
  center = (np.arange(out_size) + 0.5) * scale
  ss = 1.0 / filterscale
  xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  taps = np.arange(ksize)
  w = np.maximum(1.0 - np.abs((taps[None] + xmin[:, None] - center[:, None] + 0.5) * ss), 0.0)
  w = np.where(taps[None] < xmax[:, None], w, 0.0)
  total = np.zeros(out_size)
  for k in range(ksize):  # Sequential, as in C (numpy's sum is pairwise).
    total = total + w[:, k]
  safe_total = np.where(total == 0.0, 1.0, total)[:, None]
  w = np.where(total[:, None] != 0.0, w / safe_total, w)
  weight = np.trunc(0.5 + w * (1 << PIL_PRECISION_BITS)).astype(np.int32)
  index = np.minimum(xmin[:, None] + taps[None], in_size - 1).astype(np.int32)
  return index, weight


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  """One of Pillow's 8-bit passes along ``axis`` of int32 [H, W, C] values in [0, 255].

  int32 as in Pillow and TensorFlow: the weights of a window sum to about
  ``2**22``, so ``255 *`` that sum stays below ``2**31``.
  """
  if image.shape[axis] == out_size:  # Pillow skips a pass whose size does not change.
    return image
  index, weight = pil_bilinear_coeffs(image.shape[axis], out_size)
  shape = list(image.shape)
  shape[axis] = out_size
  total = np.full(shape, 1 << (PIL_PRECISION_BITS - 1), np.int32)
  w = weight[:, :, None, None] if axis == 0 else weight[None, :, :, None]
  for k in range(index.shape[1]):  # One tap at a time keeps the memory at one output.
    total += np.take(image, index[:, k], axis=axis) * (w[:, k] if axis == 0 else w[:, :, k])
  return np.clip(total >> PIL_PRECISION_BITS, 0, 255)


def resize_8bit(image: np.ndarray, image_size: int) -> np.ndarray:
  """Bit-exact ``PIL.Image.resize((S, S), BILINEAR)`` (horizontal pass first) of [H, W, C].

  Args:
    image: [H, W, C] integer values in [0, 255].
    image_size: output side S.

  Returns:
    uint8 [S, S, C].
  """
  image = np.asarray(image).astype(np.int32)
  image = _resize_axis(image, image_size, axis=1)
  image = _resize_axis(image, image_size, axis=0)
  return image.astype(np.uint8)


def _read_png16(contents: bytes) -> np.ndarray | None:
  """A 16-bit non-interlaced PNG as uint16 [H, W, C]; None for any other PNG."""
  pos, header, idat = len(_PNG_SIGNATURE), None, []
  while pos + 8 <= len(contents):
    length, kind = struct.unpack(">I4s", contents[pos : pos + 8])
    data = contents[pos + 8 : pos + 8 + length]
    pos += 12 + length
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", data)
    elif kind == b"IDAT":
      idat.append(data)
    elif kind == b"IEND":
      break
  if header is None:
    return None
  width, height, depth, color, _, _, interlace = header
  if depth != 16 or interlace or color not in _PNG_CHANNELS:
    return None
  bpp = 2 * _PNG_CHANNELS[color]  # Bytes per pixel, the filters' stride.
  stride = width * bpp
  raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
  raw = raw[: height * (stride + 1)].reshape(height, stride + 1)
  out = np.zeros((height, stride), np.uint8)
  prior = np.zeros(stride, np.int64)
  for y in range(height):
    kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
    if kind == 1:  # Sub: a running sum per byte lane.
      line = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 255
    elif kind == 2:  # Up
      line = (line + prior) & 255
    elif kind in (3, 4):  # Average, Paeth: each pixel needs the decoded one on its left.
      for x in range(0, stride, bpp):
        left = line[x - bpp : x] if x else np.zeros(bpp, np.int64)
        up = prior[x : x + bpp]
        if kind == 3:
          pred = (left + up) >> 1
        else:
          up_left = prior[x - bpp : x] if x else np.zeros(bpp, np.int64)
          p = left + up - up_left
          pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
          pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        line[x : x + bpp] = (line[x : x + bpp] + pred) & 255
    out[y] = line
    prior = line
  return out.view(">u2").astype(np.uint16).reshape(height, width, -1)


def _unit_or_8bit(contents: bytes) -> np.ndarray:
  """Decoded pixels: uint8 [H, W, 3], or float32 [H, W, 3] in [0, 1] for 16/32-bit sources.

  What ``data_pipelines.input_pipeline`` decodes before its 8-bit rounding:
  alpha dropped, grey repeated, palettes applied.
  """
  if contents.startswith(_PNG_SIGNATURE):
    wide = _read_png16(contents)
    if wide is not None:
      unit = wide.astype(np.float32) / np.float32(65535.0)
      return np.repeat(unit[..., :1], 3, axis=-1) if unit.shape[-1] < 3 else unit[..., :3]
  with Image.open(io.BytesIO(contents)) as im:
    im.load()
    if im.mode.startswith("I;16") or im.mode == "I":
      unit = np.asarray(im).astype(np.float32) / np.float32(65535.0)
    elif im.mode == "F":
      unit = np.asarray(im).astype(np.float32)
    else:
      return np.asarray(im.convert("RGB"), np.uint8)
  unit = np.clip(unit, 0.0, 1.0)
  return np.repeat(unit[..., None], 3, axis=-1)


def _contents(path_or_bytes: str | bytes | os.PathLike) -> bytes:
  if isinstance(path_or_bytes, bytes):
    return path_or_bytes
  with open(os.fspath(path_or_bytes), "rb") as f:
    return f.read()


def decode_image_8bit(path_or_bytes: str | bytes | os.PathLike, image_size: int) -> np.ndarray:
  """An image file (or its bytes) as the network's input: uint8 RGB [S, S, 3].

  PNG (8/16-bit, grey, grey+alpha, RGBA, palette), JPEG, BMP, GIF, WebP, TIFF
  and whatever else Pillow opens.

  Raises:
    OSError, ValueError, zlib.error, ...: a file that cannot be read or decoded
      (Pillow raises many types; callers catch ``Exception``).
  """
  pixels = _unit_or_8bit(_contents(path_or_bytes))
  if pixels.dtype != np.uint8:  # 16 -> 8 bits, float32 as in TensorFlow.
    pixels = np.floor(pixels * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
  return resize_8bit(pixels, image_size)


def decode_mask_binary(
  path_or_bytes: str | bytes | os.PathLike, image_size: int, threshold: float = 0.5
) -> np.ndarray:
  """A ground-truth mask (any nonzero value is a defect), resized and binarised.

  The {0, 255} mask is resized like an 8-bit 'L' image (as the reference
  does), then a pixel is a defect when value / 255 > threshold.

  Returns:
    uint8 [S, S] in {0, 1}.
  """
  defect = np.any(_unit_or_8bit(_contents(path_or_bytes)) > 0, axis=-1)
  resized = resize_8bit(defect[..., None].astype(np.int32) * 255, image_size)[..., 0]
  return (resized.astype(np.float32) / np.float32(255.0) > np.float32(threshold)).astype(np.uint8)
