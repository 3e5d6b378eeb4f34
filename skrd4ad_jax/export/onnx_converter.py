"""A small jaxpr -> ONNX converter for the primitives the exported models use.

Why our own: the maintained JAX -> ONNX packages do not fit this project's pinned
stack (``jax2onnx`` 0.14-0.17 pins ``orbax-checkpoint<0.11.37``; 0.13 installs but
patches ``flax.linen.max_pool`` with a signature flax 0.12.8 no longer calls and
emits a MaxPool that onnxruntime rejects), and tf2onnx cannot read the
``XlaCallModule`` ops of a jax2tf SavedModel. The inference graph of an RD-family
model is small: convolutions, matmuls (``einsum``), BatchNorm arithmetic,
max/average pooling, reductions and reshapes. This module walks the traced
jaxpr and writes one ONNX node (or a short fixed pattern) per primitive, so
every exported operation is one whose ONNX semantics are known to equal
XLA's; an unsupported primitive stops the export with its name.

Conventions:

* One dynamic dimension: the batch. ``convert`` traces with a symbolic batch
  (``jax.export.symbolic_shape``); shapes that contain it are rebuilt at run
  time from the first input's ``Shape``.
* Anything that does not depend on the inputs (weights, BatchNorm scales,
  interpolation matrices) is evaluated once by JAX at conversion time and
  stored as an initializer: the graph holds only the input-dependent work.
* Layouts: ONNX convolutions and pools are NCHW; the converter transposes
  around them and leaves it to onnxruntime's transpose optimiser to cancel
  the pairs between consecutive layers.

Why one module of this size: it is one table of jaxpr primitives and their ONNX
translations, sharing the shape and layout helpers above; a primitive is added
in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
from jax.extend import core as jax_core
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
BATCH = "batch"  # dim_param of the dynamic batch dimension.

_INT64_MIN = np.iinfo(np.int64).min


class UnsupportedError(NotImplementedError):
  """A primitive (or a use of one) the converter does not translate."""


@dataclasses.dataclass
class _Tensor:
  """A graph value: its ONNX name and its JAX shape/dtype.

  ``lazy`` marks a ``broadcast_in_dim`` left unexpanded: ``name`` holds the
  operand reshaped to the output rank (size-1 axes), which ONNX's numpy-style
  broadcasting expands for free inside an elementwise op.
  """

  name: str
  shape: tuple[Any, ...]
  dtype: np.dtype
  lazy: bool = False


def _onnx_dtype(dtype) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


_UNARY = {
  "neg": "Neg",
  "exp": "Exp",
  "log": "Log",
  "tanh": "Tanh",
  "logistic": "Sigmoid",
  "sqrt": "Sqrt",
  "abs": "Abs",
  "floor": "Floor",
  "ceil": "Ceil",
  "sign": "Sign",
  "erf": "Erf",
  "sin": "Sin",
  "cos": "Cos",
  "not": "Not",
}
_BINARY = {
  "add": "Add",
  "sub": "Sub",
  "mul": "Mul",
  "div": "Div",
  "max": "Max",
  "min": "Min",
  "pow": "Pow",
  "lt": "Less",
  "le": "LessOrEqual",
  "gt": "Greater",
  "ge": "GreaterOrEqual",
  "eq": "Equal",
  "and": "And",
  "or": "Or",
}
_REDUCE = {
  "reduce_sum": "ReduceSum",
  "reduce_max": "ReduceMax",
  "reduce_min": "ReduceMin",
  "reduce_prod": "ReduceProd",
}
_PASS_THROUGH = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
# Call-like primitives: their sub-jaxpr is converted inline.
_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Converter:
  """Converts one jaxpr; see ``convert``."""

  def __init__(self, batch_dim: Any):
    self.batch_dim = batch_dim
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._scalars: dict[tuple, str] = {}
    self._batch_tensor: str | None = None
    self._first_input: str | None = None

  # -- names, constants, nodes ------------------------------------------------

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value: np.ndarray, hint: str = "const") -> str:
    value = np.asarray(value)
    key = None
    if value.size == 1 and value.ndim <= 1:
      key = (value.dtype.str, value.shape, value.tobytes())
      if key in self._scalars:
        return self._scalars[key]
    name = self.fresh(hint)
    self.initializers.append(numpy_helper.from_array(value, name))
    if key is not None:
      self._scalars[key] = name
    return name

  def node(self, op: str, inputs: Sequence[str], num_outputs: int = 1, **attrs) -> list[str]:
    outputs = [self.fresh(op.lower()) for _ in range(num_outputs)]
    self.nodes.append(helper.make_node(op, list(inputs), outputs, **attrs))
    return outputs

  def node1(self, op: str, inputs: Sequence[str], **attrs) -> str:
    return self.node(op, inputs, 1, **attrs)[0]

  # -- shapes with the symbolic batch ------------------------------------------

  def is_batch(self, d) -> bool:
    if isinstance(d, (int, np.integer)) or self.batch_dim is None:
      return False
    return d == self.batch_dim

  def static(self, d) -> bool:
    return isinstance(d, (int, np.integer))

  def batch_tensor(self) -> str:
    """int64 [1]: the run-time batch size (``Shape`` of the first input)."""
    if self._batch_tensor is None:
      self._batch_tensor = self.node1("Shape", [self._first_input], start=0, end=1)
    return self._batch_tensor

  def shape_tensor(self, dims: Sequence[Any]) -> str:
    """An int64 shape tensor for ``dims`` (ints and the batch)."""
    if all(self.static(d) for d in dims):
      return self.const(np.asarray(dims, np.int64), "shape")
    pieces, run = [], []
    for d in dims:
      if self.static(d):
        run.append(int(d))
        continue
      if not self.is_batch(d):
        raise UnsupportedError(f"shape {dims}: only the batch dimension may be symbolic")
      if run:
        pieces.append(self.const(np.asarray(run, np.int64), "shape"))
        run = []
      pieces.append(self.batch_tensor())
    if run:
      pieces.append(self.const(np.asarray(run, np.int64), "shape"))
    return pieces[0] if len(pieces) == 1 else self.node1("Concat", pieces, axis=0)

  def reshape_target(self, dims: Sequence[Any]) -> str:
    """A Reshape target: static sizes, -1 for the one symbolic size."""
    symbolic = [i for i, d in enumerate(dims) if not self.static(d)]
    if not symbolic:
      return self.const(np.asarray(dims, np.int64), "shape")
    if len(symbolic) == 1:
      out = [int(d) if self.static(d) else -1 for d in dims]
      return self.const(np.asarray(out, np.int64), "shape")
    return self.shape_tensor(dims)

  # -- values -------------------------------------------------------------------

  def materialize(self, v) -> str:
    """The ONNX name of a value (a constant becomes an initializer)."""
    if isinstance(v, np.ndarray):
      return self.const(v)
    if v.lazy:
      name = self.node1("Expand", [v.name, self.shape_tensor(v.shape)])
      v.name, v.lazy = name, False
    return v.name

  def out(self, eqn, name: str, index: int = 0) -> _Tensor:
    aval = eqn.outvars[index].aval
    return _Tensor(name, tuple(aval.shape), np.dtype(aval.dtype))

  # -- the walk -----------------------------------------------------------------

  def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(var):
      if isinstance(var, jax_core.Literal):
        return np.asarray(var.val, dtype=var.aval.dtype)
      return env[var]

    for var, value in zip(jaxpr.constvars, consts):
      env[var] = np.asarray(value)
    for var, value in zip(jaxpr.invars, args):
      env[var] = value
    for eqn in jaxpr.eqns:
      inputs = [read(v) for v in eqn.invars]
      outputs = self.convert_eqn(eqn, inputs)
      for var, value in zip(eqn.outvars, outputs):
        if not isinstance(var, jax_core.DropVar):
          env[var] = value
    return [read(v) for v in jaxpr.outvars]

  def convert_eqn(self, eqn, inputs: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    for key in _CALL_JAXPR_PARAMS:
      sub = eqn.params.get(key)
      if isinstance(sub, jax_core.ClosedJaxpr):
        return self.run(sub.jaxpr, sub.consts, inputs)
      if isinstance(sub, jax_core.Jaxpr):
        return self.run(sub, (), inputs)
    static_out = all(all(self.static(d) for d in getattr(v.aval, "shape", ())) for v in eqn.outvars)
    if static_out and all(isinstance(x, np.ndarray) for x in inputs):
      # Input-independent: evaluated here, stored as a constant.
      return self.fold(eqn, inputs)
    if name in _PASS_THROUGH:
      return inputs
    handler = getattr(self, f"_{name}", None)
    if name in _UNARY:
      handler = self._unary
    elif name in _BINARY:
      handler = self._binary
    elif name in _REDUCE:
      handler = self._reduce
    if handler is None:
      raise UnsupportedError(
        f"The ONNX export does not translate the JAX primitive {name!r} yet "
        f"(skrd4ad_jax/export/onnx_converter.py); params: {dict(eqn.params)}"
      )
    result = handler(eqn, inputs)
    return result if isinstance(result, list) else [result]

  def fold(self, eqn, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Evaluates an input-independent equation.

    Moves of data and correctly rounded IEEE arithmetic (+ - * /) in numpy give
    XLA's bits without compiling one XLA program per equation; anything else
    (rsqrt, exp...) is evaluated by JAX itself.
    """
    name, p = eqn.primitive.name, eqn.params
    dtype = np.dtype(eqn.outvars[0].aval.dtype)
    x = inputs[0] if inputs else None
    value = None
    if name == "broadcast_in_dim":
      shape = [1] * len(p["shape"])
      for axis, d in zip(p["broadcast_dimensions"], x.shape):
        shape[axis] = d
      value = np.broadcast_to(x.reshape(shape), p["shape"])
    elif name == "reshape" and p.get("dimensions") is None:
      value = x.reshape(p["new_sizes"])
    elif name == "transpose":
      value = np.transpose(x, p["permutation"])
    elif name == "squeeze":
      value = np.squeeze(x, axis=tuple(p["dimensions"]))
    elif name == "convert_element_type" and np.dtype(p["new_dtype"]) == x.dtype:
      value = x
    elif name in _PASS_THROUGH:
      value = x
    elif name in ("add", "sub", "mul", "div") and dtype.kind == "f":
      a, b = (np.asarray(v, dtype) for v in inputs)
      value = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[name](a, b)
    if value is not None and value.shape == tuple(eqn.outvars[0].aval.shape):
      return [np.array(value, dtype=dtype)]  # (ascontiguousarray makes 0-d arrays 1-d)
    values = eqn.primitive.bind(*inputs, **p)
    values = values if eqn.primitive.multiple_results else [values]
    return [np.asarray(v) for v in values]

  # -- elementwise --------------------------------------------------------------

  def _unary(self, eqn, inputs):
    return self.out(eqn, self.node1(_UNARY[eqn.primitive.name], [self.materialize(inputs[0])]))

  def _binary(self, eqn, inputs):
    shape = tuple(eqn.outvars[0].aval.shape)
    names = []
    for i, x in enumerate(inputs):
      other = inputs[1 - i]
      full_other = isinstance(other, _Tensor) and not other.lazy and other.shape == shape
      if isinstance(x, _Tensor) and x.lazy and full_other:
        names.append(x.name)  # ONNX broadcasting expands it inside the op.
      else:
        names.append(self.materialize(x))
    return self.out(eqn, self.node1(_BINARY[eqn.primitive.name], names))

  def _ne(self, eqn, inputs):
    eq = self.node1("Equal", [self.materialize(x) for x in inputs])
    return self.out(eqn, self.node1("Not", [eq]))

  def _rsqrt(self, eqn, inputs):
    root = self.node1("Sqrt", [self.materialize(inputs[0])])
    return self.out(eqn, self.node1("Reciprocal", [root]))

  def _square(self, eqn, inputs):
    x = self.materialize(inputs[0])
    return self.out(eqn, self.node1("Mul", [x, x]))

  def _integer_pow(self, eqn, inputs):
    x = self.materialize(inputs[0])
    y = int(eqn.params["y"])
    if y == 2:
      return self.out(eqn, self.node1("Mul", [x, x]))
    exponent = self.const(np.asarray(y, np.dtype(eqn.outvars[0].aval.dtype)))
    return self.out(eqn, self.node1("Pow", [x, exponent]))

  def _convert_element_type(self, eqn, inputs):
    to = _onnx_dtype(eqn.params["new_dtype"])
    return self.out(eqn, self.node1("Cast", [self.materialize(inputs[0])], to=to))

  def _select_n(self, eqn, inputs):
    if len(inputs) != 3:
      raise UnsupportedError("select_n with more than two cases")
    pred, false, true = (self.materialize(x) for x in inputs)
    if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
      pred = self.node1("Cast", [pred], to=TensorProto.BOOL)
    return self.out(eqn, self.node1("Where", [pred, true, false]))

  def _clamp(self, eqn, inputs):
    lo, x, hi = (self.materialize(v) for v in inputs)
    return self.out(eqn, self.node1("Min", [self.node1("Max", [x, lo]), hi]))

  # -- shapes -------------------------------------------------------------------

  def _reshape(self, eqn, inputs):
    if eqn.params.get("dimensions") is not None:
      raise UnsupportedError("reshape with dimensions")
    target = self.reshape_target(tuple(eqn.outvars[0].aval.shape))
    return self.out(eqn, self.node1("Reshape", [self.materialize(inputs[0]), target]))

  def _squeeze(self, eqn, inputs):
    axes = self.const(np.asarray(eqn.params["dimensions"], np.int64), "axes")
    return self.out(eqn, self.node1("Squeeze", [self.materialize(inputs[0]), axes]))

  def _expand_dims(self, eqn, inputs):
    axes = self.const(np.asarray(eqn.params["dimensions"], np.int64), "axes")
    return self.out(eqn, self.node1("Unsqueeze", [self.materialize(inputs[0]), axes]))

  def _broadcast_in_dim(self, eqn, inputs):
    shape = tuple(eqn.params["shape"])
    dims = tuple(eqn.params["broadcast_dimensions"])
    x = inputs[0]
    in_shape = tuple(eqn.invars[0].aval.shape)
    if list(dims) != sorted(dims):
      raise UnsupportedError("broadcast_in_dim with permuted dimensions")
    new_axes = [i for i in range(len(shape)) if i not in dims]
    unsqueezed = [1] * len(shape)
    for i, d in zip(dims, in_shape):
      unsqueezed[i] = d
    name = self.materialize(x)
    if new_axes:
      name = self.node1("Unsqueeze", [name, self.const(np.asarray(new_axes, np.int64), "axes")])
    lazy = any(not (u == s) for u, s in zip(unsqueezed, shape))
    return _Tensor(name, shape, np.dtype(eqn.outvars[0].aval.dtype), lazy=lazy)

  def _transpose(self, eqn, inputs):
    perm = [int(p) for p in eqn.params["permutation"]]
    return self.out(eqn, self.node1("Transpose", [self.materialize(inputs[0])], perm=perm))

  def _concatenate(self, eqn, inputs):
    names = [self.materialize(x) for x in inputs]
    return self.out(eqn, self.node1("Concat", names, axis=int(eqn.params["dimension"])))

  def _pad(self, eqn, inputs):
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
      raise UnsupportedError("pad with interior or negative padding")
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    x, value = (self.materialize(v) for v in inputs)
    pads_name = self.const(np.asarray(pads, np.int64), "pads")
    return self.out(eqn, self.node1("Pad", [x, pads_name, value], mode="constant"))

  def _slice(self, eqn, inputs):
    start = eqn.params["start_indices"]
    limit = eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    in_shape = eqn.invars[0].aval.shape
    axes = [
      i
      for i in range(len(start))
      if not (start[i] == 0 and limit[i] == in_shape[i] and strides[i] == 1)
    ]
    if not axes:
      return inputs[0]
    if any(not (self.static(start[i]) and self.static(limit[i])) for i in axes):
      raise UnsupportedError("slice of the batch dimension")
    args = [
      self.materialize(inputs[0]),
      self.const(np.asarray([start[i] for i in axes], np.int64), "starts"),
      self.const(np.asarray([limit[i] for i in axes], np.int64), "ends"),
      self.const(np.asarray(axes, np.int64), "axes"),
      self.const(np.asarray([strides[i] for i in axes], np.int64), "steps"),
    ]
    return self.out(eqn, self.node1("Slice", args))

  def _rev(self, eqn, inputs):
    axes = [int(d) for d in eqn.params["dimensions"]]
    n = len(axes)
    args = [
      self.materialize(inputs[0]),
      self.const(np.full(n, -1, np.int64), "starts"),
      self.const(np.full(n, _INT64_MIN, np.int64), "ends"),
      self.const(np.asarray(axes, np.int64), "axes"),
      self.const(np.full(n, -1, np.int64), "steps"),
    ]
    return self.out(eqn, self.node1("Slice", args))

  def _gather(self, eqn, inputs):
    """Two patterns of ``jnp`` indexing under a symbolic batch.

    ``x[..., idx, ...]`` along one axis (``x[..., ::-1]``) becomes a Gather;
    a constant-start window (``x[:, 1:, :-1]``) becomes a Slice.
    """
    dn = eqn.params["dimension_numbers"]
    operand_shape = tuple(eqn.invars[0].aval.shape)
    idx_shape = tuple(eqn.invars[1].aval.shape)
    rank = len(operand_shape)
    sizes = tuple(eqn.params["slice_sizes"])
    window = (
      not dn.collapsed_slice_dims
      and not dn.operand_batching_dims
      and tuple(dn.offset_dims) == tuple(range(rank))
      and isinstance(inputs[1], np.ndarray)
      and inputs[1].size == len(dn.start_index_map)
      and all(sizes[i] == operand_shape[i] for i in range(rank) if i not in dn.start_index_map)
    )
    if window:
      axes = [int(a) for a in dn.start_index_map]
      # XLA clamps start indices so that the window fits.
      starts = [
        int(np.clip(i, 0, operand_shape[a] - sizes[a])) for i, a in zip(inputs[1].reshape(-1), axes)
      ]
      args = [
        self.materialize(inputs[0]),
        self.const(np.asarray(starts, np.int64), "starts"),
        self.const(np.asarray([st + sizes[a] for st, a in zip(starts, axes)], np.int64), "ends"),
        self.const(np.asarray(axes, np.int64), "axes"),
      ]
      return self.out(eqn, self.node1("Slice", args))
    ok = (
      len(dn.collapsed_slice_dims) == 1
      and tuple(dn.start_index_map) == tuple(dn.collapsed_slice_dims)
      and not dn.operand_batching_dims
      and len(idx_shape) == 2
      and idx_shape[1] == 1
    )
    if ok:
      axis = int(dn.collapsed_slice_dims[0])
      others = tuple(i for i in range(rank) if i != axis)
      sizes = tuple(eqn.params["slice_sizes"])
      ok = tuple(dn.offset_dims) == others and all(sizes[i] == operand_shape[i] for i in others)
    if not ok:
      raise UnsupportedError(f"gather with dimension numbers {dn}")
    indices = inputs[1]
    if isinstance(indices, np.ndarray):
      idx = self.const(indices.reshape(-1).astype(np.int64), "indices")
    else:
      flat = self.const(np.asarray([-1], np.int64), "shape")
      idx = self.node1("Reshape", [self.materialize(indices), flat])
    return self.out(eqn, self.node1("Gather", [self.materialize(inputs[0]), idx], axis=axis))

  def _split(self, eqn, inputs):
    sizes = self.const(np.asarray(eqn.params["sizes"], np.int64), "split")
    names = self.node(
      "Split", [self.materialize(inputs[0]), sizes], len(eqn.outvars), axis=int(eqn.params["axis"])
    )
    return [self.out(eqn, n, i) for i, n in enumerate(names)]

  # -- reductions, pools ------------------------------------------------------

  def _reduce(self, eqn, inputs):
    axes = self.const(np.asarray(eqn.params["axes"], np.int64), "axes")
    op = _REDUCE[eqn.primitive.name]
    return self.out(eqn, self.node1(op, [self.materialize(inputs[0]), axes], keepdims=0))

  def _pool(self, eqn, inputs, op: str):
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    if any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"]):
      raise UnsupportedError(f"{eqn.primitive.name} with dilation")
    rank = len(window)
    spatial = [
      i for i in range(rank) if window[i] != 1 or strides[i] != 1 or tuple(padding[i]) != (0, 0)
    ]
    other = [i for i in range(rank) if i not in spatial]
    if rank != 4 or len(other) != 2 or other[0] != 0:
      raise UnsupportedError(f"{eqn.primitive.name} over axes {spatial} of a rank-{rank} array")
    to_nchw = other + spatial
    x = self.node1("Transpose", [self.materialize(inputs[0])], perm=to_nchw)
    attrs = dict(
      kernel_shape=[int(window[i]) for i in spatial],
      strides=[int(strides[i]) for i in spatial],
      pads=[int(padding[i][0]) for i in spatial] + [int(padding[i][1]) for i in spatial],
    )
    if op == "AveragePool":
      attrs["count_include_pad"] = 1
    y = self.node1(op, [x], **attrs)
    if op == "AveragePool":  # sum = mean * window (exact for the power-of-two windows used)
      y = self.node1("Mul", [y, self.const(np.asarray(np.prod(window), np.float32))])
    back = [to_nchw.index(i) for i in range(rank)]
    return self.out(eqn, self.node1("Transpose", [y], perm=back))

  def _reduce_window_max(self, eqn, inputs):
    return self._pool(eqn, inputs, "MaxPool")

  def _reduce_window_sum(self, eqn, inputs):
    return self._pool(eqn, inputs, "AveragePool")

  # -- linear algebra -----------------------------------------------------------

  def _conv_general_dilated(self, eqn, inputs):
    p = eqn.params
    if any(d != 1 for d in p["lhs_dilation"]) or int(p["batch_group_count"]) != 1:
      raise UnsupportedError("conv_general_dilated with lhs dilation or batch groups")
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    x = self.node1("Transpose", [self.materialize(inputs[0])], perm=list(lhs_spec))
    kernel = inputs[1]
    if isinstance(kernel, np.ndarray):
      w = self.const(np.ascontiguousarray(np.transpose(kernel, rhs_spec)), "kernel")
    else:
      w = self.node1("Transpose", [self.materialize(kernel)], perm=list(rhs_spec))
    padding = [tuple(int(v) for v in pad) for pad in p["padding"]]
    y = self.node1(
      "Conv",
      [x, w],
      strides=[int(s) for s in p["window_strides"]],
      dilations=[int(d) for d in p["rhs_dilation"]],
      pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
      group=int(p["feature_group_count"]),
    )
    back = [0] * len(out_spec)
    for k, axis in enumerate(out_spec):
      back[axis] = k
    return self.out(eqn, self.node1("Transpose", [y], perm=back))

  def _dot_general(self, eqn, inputs):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = inputs
    ls, rs = tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape)
    lf = [i for i in range(len(ls)) if i not in lc and i not in lb]
    rf = [i for i in range(len(rs)) if i not in rc and i not in rb]

    def size(shape, axes):
      dims = [shape[i] for i in axes]
      if all(self.static(d) for d in dims):
        return int(np.prod(dims, dtype=np.int64))
      return -1

    k = size(ls, lc)
    m, n = size(ls, lf), size(rs, rf)
    if k < 0 or (m < 0 and n < 0):
      raise UnsupportedError("dot_general contracting over the batch dimension")
    nb = len(lb)
    batch_shape = [ls[i] for i in lb]
    if any(not self.static(d) for d in batch_shape) and (m < 0 or n < 0):
      raise UnsupportedError("dot_general with a symbolic batch and free dimension")

    def operand(x, perm, tail):
      shape = [0] * nb + tail  # 0 copies the (leading) batch dimensions
      if isinstance(x, np.ndarray):
        x = np.transpose(x, perm)
        if all(self.static(d) for d in batch_shape):
          return self.const(np.ascontiguousarray(x.reshape(list(x.shape[:nb]) + tail)), "matmul")
        return self.node1(
          "Reshape", [self.const(np.ascontiguousarray(x)), self.const(np.asarray(shape, np.int64))]
        )
      name = self.materialize(x)
      if perm != sorted(perm):
        name = self.node1("Transpose", [name], perm=perm)
      return self.node1("Reshape", [name, self.const(np.asarray(shape, np.int64), "shape")])

    a = operand(lhs, list(lb) + lf + list(lc), [m, k])
    b = operand(rhs, list(rb) + list(rc) + rf, [k, n])
    y = self.node1("MatMul", [a, b])
    out_shape = tuple(eqn.outvars[0].aval.shape)
    return self.out(eqn, self.node1("Reshape", [y, self.reshape_target(out_shape)]))


def convert(
  fn: Callable[..., Any],
  inputs: Sequence[tuple[str, jax.ShapeDtypeStruct]],
  output_names: Sequence[str],
  *,
  batch_dim: Any = None,
  doc_string: str = "",
  metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
  """Traces ``fn`` and converts it to an ONNX model.

  Args:
    fn: a JAX function of the inputs (weights closed over) returning a tuple
      of arrays.
    inputs: (name, spec) per argument of ``fn``; a spec's shape may hold
      ``batch_dim`` (a ``jax.export.symbolic_shape`` dimension).
    output_names: the ONNX names of ``fn``'s outputs, in order.
    batch_dim: the symbolic batch dimension used in ``inputs`` (None: static).
    doc_string: the model's description.
    metadata: string key/value pairs stored in the model (``metadata_props``).

  Returns:
    A checked ``onnx.ModelProto`` (opset ``OPSET``); the batch dimension is
    named ``BATCH``.

  Raises:
    UnsupportedError: ``fn`` uses a primitive this converter does not translate.
  """
  closed = jax.make_jaxpr(fn)(*[spec for _, spec in inputs])
  conv = _Converter(batch_dim)
  conv._first_input = inputs[0][0]
  args = [_Tensor(name, tuple(spec.shape), np.dtype(spec.dtype)) for name, spec in inputs]
  outs = conv.run(closed.jaxpr, closed.consts, args)
  if len(outs) != len(output_names):
    raise ValueError(f"fn returns {len(outs)} outputs, {len(output_names)} names given")

  def dims(shape):
    return [int(d) if conv.static(d) else BATCH for d in shape]

  graph_outputs = []
  for value, name, var in zip(outs, output_names, closed.jaxpr.outvars):
    conv.nodes.append(helper.make_node("Identity", [conv.materialize(value)], [name]))
    graph_outputs.append(
      helper.make_tensor_value_info(name, _onnx_dtype(var.aval.dtype), dims(var.aval.shape))
    )
  graph_inputs = [
    helper.make_tensor_value_info(name, _onnx_dtype(spec.dtype), dims(spec.shape))
    for name, spec in inputs
  ]
  graph = helper.make_graph(
    conv.nodes, "skrd4ad_jax", graph_inputs, graph_outputs, initializer=conv.initializers
  )
  model = helper.make_model(
    graph,
    opset_imports=[helper.make_opsetid("", OPSET)],
    producer_name="skrd4ad_jax",
    doc_string=doc_string,
  )
  # onnxruntime 1.2x reads IR version 10 (onnx 1.16+); newer IRs are not needed.
  model.ir_version = min(model.ir_version, 10)
  if metadata:
    helper.set_model_props(model, dict(metadata))
  onnx.checker.check_model(model, full_check=False)
  return model
