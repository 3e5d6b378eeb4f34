"""What one slot costs in device memory, and how many slots fit, before the first step.

XLA's memory analysis of a compiled program gives the bytes one device needs
for it: arguments + outputs + temporaries - the donated arguments that alias
outputs. The training step is compiled (not run) for 1 and 2 slots on one
device: the difference is the cost of a slot (its stacked state, its batch,
its activations), the rest is fixed (the replicated teacher, the program). The
evaluation step is compiled for two batch sizes likewise. Against the device's
limit (``device.memory_stats()["bytes_limit"]``, or
``config.parallel.device_memory_gb``) with ``MARGIN`` to spare this gives the
most slots per device and the largest evaluation batch that fit.

Where no limit is known (the CPU backend reports none and the config sets
none) nothing is compiled and nothing is capped.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
import dataclasses
from typing import Any

from absl import logging
import jax
import numpy as np

from skrd4ad_jax.config.validation import ConfigError

# Share of the limit the estimate may fill: XLA's analysis leaves out the
# allocator's fragmentation and some library workspaces.
MARGIN = 0.85
GIB = 2**30
# Messages of XLA (and the allocators under it) when a device is out of memory.
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM when allocating")


@dataclasses.dataclass(frozen=True)
class SlotMemory:
  """Device memory of a run's programs, per device, in bytes.

  Training K slots needs ``fixed_bytes + K * per_slot_bytes``; evaluating a
  batch of B images while K slots hold their states needs
  ``K * state_bytes + eval_fixed_bytes + B * eval_bytes_per_image``.
  """

  per_slot_bytes: int
  fixed_bytes: int
  state_bytes: int
  eval_fixed_bytes: int
  eval_bytes_per_image: int
  limit_bytes: int | None
  limit_source: str = "device"
  margin: float = MARGIN
  # What the analysis gave: training at 1 and 2 slots, evaluation at the two batch sizes.
  measured_bytes: tuple[int, ...] = ()

  @property
  def usable_bytes(self) -> float | None:
    return None if self.limit_bytes is None else self.margin * self.limit_bytes

  def train_bytes(self, slots: int) -> int:
    return self.fixed_bytes + slots * self.per_slot_bytes

  def eval_bytes(self, slots: int, batch: int) -> int:
    return slots * self.state_bytes + self.eval_fixed_bytes + batch * self.eval_bytes_per_image

  def fits(self, slots: int) -> bool:
    """``slots`` per device train, and evaluate at least one image at a time."""
    usable = self.usable_bytes
    if usable is None:
      return True
    return self.train_bytes(slots) <= usable and self.eval_bytes(slots, 1) <= usable

  def max_slots(self, most: int = 1024) -> int | None:
    """The most slots per device that fit (0: not even one); None without a limit."""
    if self.usable_bytes is None:
      return None
    n = 0
    while n < most and self.fits(n + 1):
      n += 1
    return n

  def max_eval_batch(self, slots: int) -> int | None:
    """The largest evaluation batch beside ``slots`` resident states; None without a limit."""
    usable = self.usable_bytes
    if usable is None:
      return None
    room = usable - self.eval_bytes(slots, 0)
    return max(0, int(room // max(1, self.eval_bytes_per_image)))

  def summary(self, slots: int | None = None) -> str:
    """One clause for the plan line: the estimate per slot and the limit."""
    text = (
      f"memory ~{self.per_slot_bytes / GIB:.2f} GiB per slot + {self.fixed_bytes / GIB:.2f} "
      "GiB fixed"
    )
    if self.limit_bytes is None:
      return text + ", no device limit known"
    text += (
      f", limit {self.limit_bytes / GIB:.1f} GiB ({self.limit_source}), {self.margin:.0%} of it "
      f"used: at most {self.max_slots()} slot(s) per device"
    )
    if slots is not None:
      text += f"; {slots} use ~{self.train_bytes(slots) / GIB:.2f} GiB"
    return text


def program_bytes(compiled) -> int | None:
  """Bytes a compiled program needs on one device, or None where XLA has no analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (backends without memory analysis)
    return None
  if m is None:
    return None
  total = sum(
    int(getattr(m, name, 0) or 0)
    for name in (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
    )
  )
  # A donated argument and the output it becomes share one buffer.
  return total - int(getattr(m, "alias_size_in_bytes", 0) or 0)


def limit_bytes(config, device: jax.Device) -> tuple[int | None, str]:
  """(bytes one device may use, where that figure comes from); (None, '') if unknown.

  ``config.parallel.device_memory_gb`` > 0 wins; else the device's allocator
  limit (GPU, TPU). The CPU backend reports none.
  """
  gb = float(config.parallel.get("device_memory_gb", 0) or 0)
  if gb > 0:
    return int(gb * GIB), "config.parallel.device_memory_gb"
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without memory stats)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
  return None, ""


def _abstract(tree: Any, lead: tuple[int, ...] = ()) -> Any:
  """Shape structs of ``tree``'s leaves, with ``lead`` axes in front."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype), tree)


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(
  method,
  config,
  teacher_vars: Any,
  template: dict[str, np.ndarray],
  limit: int | None = None,
  limit_source: str = "device",
  devices: list[jax.Device] | None = None,
) -> SlotMemory:
  """Compiles (never runs) the steps at two sizes and fits the memory model.

  Args:
    method: the run's ``methods.Method``.
    config: the resolved config (``parallel.*``, ``train.batch_size``,
      ``eval.batch_size``, ``data.image_size``).
    teacher_vars: the teacher's variables (arrays or shape structs).
    template: one slot's training batch (host arrays; only shapes are read).
    limit: bytes one device may use (``limit_bytes``), or None.
    limit_source: where ``limit`` comes from, for messages.
    devices: the devices of one mesh row (default: the first
      ``parallel.data_axis_size`` local devices).

  Returns:
    The fitted ``SlotMemory``. Programs without a memory analysis count 0.
  """
  from skrd4ad_jax.training import parallel, steps

  data = max(1, int(config.parallel.data_axis_size))
  devices = list(devices or jax.local_devices()[:data])
  mesh = parallel.make_mesh(1, data, devices=devices)
  loop = config.parallel.get("category_loop", "auto")
  step = parallel.make_parallel_train_step(method, mesh, loop)
  teacher = _abstract(teacher_vars)
  state = jax.eval_shape(method.init, jax.random.PRNGKey(0), teacher)
  key = jax.ShapeDtypeStruct((2,), np.uint32)

  def train_args(k):
    return (
      _abstract(state, (k,)),
      teacher,
      _abstract(template, (k,)),
      jax.ShapeDtypeStruct((k, 2), np.uint32),
      jax.ShapeDtypeStruct((k,), np.bool_),
    )

  size = int(config.data.image_size)
  eval_sizes = (1, max(2, int(config.eval.batch_size)))
  eval_fn = steps.jitted_eval_step(method)
  with jax.default_device(devices[0]):
    lowered = [step.lower(*train_args(k)) for k in (1, 2)] + [
      eval_fn.lower(state, teacher, jax.ShapeDtypeStruct((b, size, size, 3), np.float32), key)
      for b in eval_sizes
    ]
  # XLA compiles outside the GIL: the four programs compile at once.
  with futures.ThreadPoolExecutor(len(lowered)) as pool:
    sizes = [program_bytes(c) or 0 for c in pool.map(lambda low: low.compile(), lowered)]
  one, two, e_small, e_large = sizes
  per_slot = max(1, two - one)
  per_image = max(1, (e_large - e_small) // (eval_sizes[1] - eval_sizes[0]))
  return SlotMemory(
    per_slot_bytes=per_slot,
    fixed_bytes=max(0, one - per_slot),
    state_bytes=_nbytes(state),
    eval_fixed_bytes=max(0, e_small - per_image),
    eval_bytes_per_image=per_image,
    limit_bytes=limit,
    limit_source=limit_source,
    measured_bytes=tuple(sizes),
  )


def _setting(config) -> str:
  return (
    f"batch size {int(config.train.batch_size)}, image size {int(config.data.image_size)} px, "
    f"dtype {config.model.get('dtype', 'float32')}"
  )


def check_slots(mem: SlotMemory | None, slots_per_device: int, config) -> None:
  """Raises ``ConfigError`` (one line, with the numbers) when the slots cannot fit."""
  if mem is None or mem.limit_bytes is None or mem.fits(slots_per_device):
    return
  most = mem.max_slots()
  if most == 0:
    fix = (
      "Not even one slot fits: lower config.train.batch_size or config.data.image_size, use "
      "--config.model.dtype=bfloat16, or set config.parallel.device_memory_gb if the device "
      "has more memory than reported."
    )
  else:
    fix = f"Set --config.parallel.slots_per_device={most} (or 0 = automatic)."
  raise ConfigError(
    [
      f"config.parallel.slots_per_device={slots_per_device} does not fit in device memory: "
      f"~{mem.per_slot_bytes / GIB:.2f} GiB per slot + {mem.fixed_bytes / GIB:.2f} GiB fixed "
      f"({_setting(config)}) against {mem.margin:.0%} of the limit "
      f"{mem.limit_bytes / GIB:.2f} GiB ({mem.limit_source}); at most {most} fit. {fix}"
    ]
  )


def choose_slots_per_device(
  method,
  config,
  teacher_vars: Any,
  template: Callable[[], dict[str, np.ndarray]],
  loads: dict[str, int],
  num_devices: int,
  device: jax.Device,
) -> tuple[int, SlotMemory | None]:
  """(slots per device, the memory estimate or None): the run's slot count, checked.

  ``config.parallel.slots_per_device`` > 0 is checked against the estimate; 0
  (auto) takes ``schedule.auto_slots_per_device`` capped at what fits. Without
  a known limit nothing is compiled (``template``, which makes one slot's
  training batch, is not even called) and the estimate is None.

  Raises:
    ConfigError: the requested slots (or a single slot) do not fit.
  """
  from skrd4ad_jax.training import schedule

  requested = int(config.parallel.get("slots_per_device", 0))
  limit, source = limit_bytes(config, device)
  mem = None
  if limit is not None:
    mem = estimate(method, config, teacher_vars, template(), limit, source)
  if requested > 0:
    check_slots(mem, requested, config)
    return requested, mem
  check_slots(mem, 1, config)
  cap = mem.max_slots() if mem is not None else None
  if jax.process_count() > 1:
    # Every process must make the same plan: the smallest cap of all (a collective).
    from skrd4ad_jax.training import parallel

    caps = [c for c in parallel.allgather_json(cap) if c is not None]
    cap = min(caps) if caps else None
  return schedule.auto_slots_per_device(loads, num_devices, device.platform, max_slots=cap), mem


def cap_eval_batch(config, mem: SlotMemory | None, slots_per_device: int) -> int:
  """Lowers ``config.eval.batch_size`` in place to what fits beside the slots; returns it."""
  wanted = int(config.eval.batch_size)
  most = mem.max_eval_batch(slots_per_device) if mem is not None else None
  if most is None or most >= wanted:
    return wanted
  most = max(1, most)
  logging.info(
    "config.eval.batch_size %d lowered to %d: ~%.1f MiB per image beside %d slot state(s) "
    "exceeds %.0f%% of the device limit %.1f GiB",
    wanted,
    most,
    mem.eval_bytes_per_image / 2**20,
    slots_per_device,
    100 * mem.margin,
    mem.limit_bytes / GIB,
  )
  config.eval.batch_size = most
  return most


class OutOfMemory(RuntimeError):
  """The device ran out of memory during a run; carries the slot plan the advice names.

  Raised ``from`` the device's error (``__cause__``), so its traceback stays whole.
  """

  def __init__(self, config, slots_per_device: int | None):
    super().__init__(f"Out of device memory with {slots_per_device} slot(s) per device.")
    self.config = config
    self.slots_per_device = slots_per_device


def is_out_of_memory(error: BaseException) -> bool:
  """Whether ``error`` is a device out-of-memory (XLA's RESOURCE_EXHAUSTED and kin)."""
  return isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MARKERS)


def out_of_memory_advice(config, slots_per_device: int | None, log_path: str | None) -> str:
  """The one-line message of an out-of-memory: the run's setting and what to lower."""
  slots = f"{slots_per_device} slot(s) per device" if slots_per_device else "slots not chosen yet"
  where = f" Traceback: {log_path} (or rerun with --verbosity=1)." if log_path else ""
  return (
    f"Out of device memory with {slots}, {_setting(config)}, evaluation batch "
    f"{int(config.eval.batch_size)}. Lower --config.parallel.slots_per_device (or set "
    "--config.parallel.device_memory_gb to the memory the device really has, so that automatic "
    "slots count with it), --config.train.batch_size / --config.eval.batch_size or "
    "--config.data.image_size, or use --config.model.dtype=bfloat16; another program on the "
    f"device (nvidia-smi) also takes memory.{where}"
  )
