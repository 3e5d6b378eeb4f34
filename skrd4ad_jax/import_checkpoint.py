"""Official PyTorch checkpoints in: RD4AD, SK-RD4AD, MRKD and RD with Expert.

  python -m skrd4ad_jax.import_checkpoint --method=sk_rd4ad \
      --checkpoint=wide_res50bottle200111sample_auc=1.0.pth --category=bottle \
      --workdir=runs/official [--teacher_weights=FILE] [--config=configs/mvtec.py]

reads a checkpoint exactly as the official training script saves it, maps every
tensor into the project's parameter tree and BatchNorm statistics, and writes a
normal checkpoint of ``<workdir>/<category>`` (step 0, ``final``, with
``imported_from`` in its JSON item) whose config reproduces the official model.
``python -m skrd4ad_jax.predict --workdir=... --category=...`` then predicts with
it, and an evaluation-only run evaluates it.

What each official script saves (the format read here):

- rd4ad, ``hq-deng/RD4AD main.py``: ``torch.save({'bn': bn.state_dict(),
  'decoder': decoder.state_dict()}, path)`` (``BN_layer`` = our OCBE with the
  unused ``conv4``/``bn4``; ``de_resnet`` = our decoder).
- sk_rd4ad, ``pej0918/SK-RD4AD main.py`` (``--seg 0``), ``main_visA.py``,
  ``main_vad.py``: the same dict.
- mrkd, ``yuxin-jiang/MRKD main.py``: saves nothing; we read RD4AD's dict, whose
  ``decoder`` then holds ``generation1..3`` (our FLM heads) and the unused ``conv1``.
- rd_expert, ``hito2448/URD train.py`` (its save is commented out):
  ``torch.save({'teacher': teacher.state_dict(), 'student': student.state_dict()},
  path)``; ``teacher.encoder`` is the trained WideResNet, ``student`` holds
  ``bn``, ``decoder`` and the fusion module lists.

SK-RD4AD's ``--seg 1`` branch saves ``decoder.state_dict()`` alone: without the
bottleneck (``bn``) the model cannot be rebuilt, and the importer says so. An
RD4AD and an SK-RD4AD checkpoint hold the same tensors; ``--method`` decides
whether the decoder takes SK-RD4AD's skips (``--res 0`` runs are RD4AD).

Tensors the official forward never uses are skipped: the OCBE's ``conv4`` /
``bn4``, MRKD's decoder ``conv1``, URD's teacher ``layer4`` / ``fc`` and every
``num_batches_tracked``. Anything else that is missing, left over or of the
wrong shape stops the import with the tensor's name. ``.pth`` files are read
without torch and without running pickled code (``skrd4ad_jax.torch_io``); a
``.safetensors`` file holds the same tensors with the dict's keys joined by
``'.'`` (``bn.conv1.weight``, ``student.fuse_skip.0.0.weight``).

The teacher of RD4AD, SK-RD4AD and MRKD is not in their checkpoints: it is the
ImageNet encoder (``config.model.teacher_weights``, ``--teacher_weights``).
RD with Expert's checkpoint holds its trained teacher, which the maps use; its
config still names the expert's (ImageNet) weights.

Why one module of this size: one name map per official method (four), each next
to the parameter tree it fills; the command line is a few lines over them.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from skrd4ad_jax import methods, teachers, torch_io
from skrd4ad_jax.config import defaults
from skrd4ad_jax.teachers import porting, recipe

METHODS = ("rd4ad", "sk_rd4ad", "mrkd", "rd_expert")


class CheckpointImportError(ValueError):
  """An official checkpoint that does not fit the method; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class OfficialFormat:
  """How one official script saves its checkpoint.

  Attributes:
    groups: top-level keys of the saved dict (each a state dict).
    saved_by: the script and the call that writes it (for messages and the JSON item).
    unused: tensors the official forward never reads (skipped on import).
  """

  groups: tuple[str, ...]
  saved_by: str
  unused: re.Pattern


_RD_SAVE = "torch.save({'bn': bn.state_dict(), 'decoder': decoder.state_dict()}, path)"
FORMATS = {
  "rd4ad": OfficialFormat(
    ("bn", "decoder"), f"hq-deng/RD4AD main.py: {_RD_SAVE}", re.compile(r"^bn\.(conv4|bn4)\.")
  ),
  "sk_rd4ad": OfficialFormat(
    ("bn", "decoder"), f"pej0918/SK-RD4AD main.py: {_RD_SAVE}", re.compile(r"^bn\.(conv4|bn4)\.")
  ),
  "mrkd": OfficialFormat(
    ("bn", "decoder"),
    f"yuxin-jiang/MRKD (saves nothing; RD4AD's format): {_RD_SAVE}",
    re.compile(r"^bn\.(conv4|bn4)\.|^decoder\.conv1\.weight$"),
  ),
  "rd_expert": OfficialFormat(
    ("teacher", "student"),
    "hito2448/URD train.py: torch.save({'teacher': teacher.state_dict(), "
    "'student': student.state_dict()}, path)",
    re.compile(r"^student\.bn\.(conv4|bn4)\.|^teacher\.encoder\.(layer4|fc)\."),
  ),
}
_NUM_BATCHES_TRACKED = re.compile(r"(^|\.)num_batches_tracked$")
# URD's fusion blocks are nn.Sequential(conv, BN, ReLU); conv1x1_downsample_dim
# starts with an nn.Upsample, which shifts its conv and BN by one index.
_SEQUENTIAL_INDEX = {"conv": 0, "bn": 1}
_DOWNSAMPLE_INDEX = {"conv": 1, "bn": 2}
_FUSION = re.compile(r"^(fuse_skip|conv3x3_simattn|conv1x1_downsample_dim|fuse_encoder)_(\d+)$")


# ----------------------------------------------------------------------------- names and layouts


def official_key(method: str, flax_key: str) -> str:
  """The official state-dict name of one of our variables, group included.

  ``'params/bottleneck/bn_layer_0/conv1/kernel'`` -> ``'bn.bn_layer.0.conv1.weight'``;
  ``'batch_stats/decoder/layer1_0/upsample_1/var'`` ->
  ``'decoder.layer1.0.upsample.1.running_var'``; MRKD's
  ``'params/heads/generation1_0/bias'`` -> ``'decoder.generation1.0.bias'``; RD with
  Expert's ``'params/teacher/layer1_0/conv1/kernel'`` ->
  ``'teacher.encoder.layer1.0.conv1.weight'`` and
  ``'params/student/decoder/fuse_skip_1/bn/scale'`` -> ``'student.fuse_skip.1.1.weight'``.
  """
  collection, *path = flax_key.split("/")
  prefix = ""
  if method == "rd_expert":
    top, *path = path
    if top == "teacher":
      return "teacher.encoder." + porting.torch_key("/".join([collection, *path]))
    prefix = "student."
  module, *rest = path
  fusion = _FUSION.match(rest[0]) if method == "rd_expert" and module == "decoder" else None
  if fusion:  # URD's fusion modules sit on the student itself, not in its decoder
    name, index = fusion.groups()
    positions = _DOWNSAMPLE_INDEX if name == "conv1x1_downsample_dim" else _SEQUENTIAL_INDEX
    leaf = porting.torch_key(f"{collection}/{rest[-1]}")
    return f"{prefix}{name}.{index}.{positions[rest[1]]}.{leaf}"
  group = {"bottleneck": "bn", "decoder": "decoder", "heads": "decoder"}[module]
  return f"{prefix}{group}." + porting.torch_key("/".join([collection, *rest]))


def _is_deconv(flax_shape: tuple[int, ...]) -> bool:
  # The only 2x2 kernels of these models are ConvTranspose2d(k=2, s=2) (layers.Deconv2x2).
  return len(flax_shape) == 4 and tuple(flax_shape[:2]) == (2, 2)


def official_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a variable: convs OIHW, transposed convs IOHW, vectors as is."""
  s = tuple(flax_shape)
  if len(s) != 4:
    return s
  return (s[2], s[3], s[0], s[1]) if _is_deconv(s) else (s[3], s[2], s[0], s[1])


def to_flax_layout(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """A torch tensor in our layout: OIHW -> HWIO; ConvTranspose2d IOHW -> [2, 2, I, O]."""
  if value.ndim != 4:
    return value
  return value.transpose(2, 3, 0, 1) if _is_deconv(flax_shape) else value.transpose(2, 3, 1, 0)


def to_official_layout(value: np.ndarray) -> np.ndarray:
  """Inverse of ``to_flax_layout`` (for export and tests)."""
  if value.ndim != 4:
    return value
  return value.transpose(2, 3, 0, 1) if _is_deconv(value.shape) else value.transpose(3, 2, 0, 1)


def variable_names(method: str, abstract_state: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{official name: (our 'params/...' or 'batch_stats/...' key, our shape)}``."""
  names = {}
  for collection in ("params", "batch_stats"):
    tree = getattr(abstract_state, collection)
    for key, leaf in porting.flatten(tree, collection):
      names[official_key(method, key)] = (key, tuple(leaf.shape))
  return names


# ----------------------------------------------------------------------------- reading


def _guess(groups: set[str], flat: Mapping[str, np.ndarray]) -> str:
  if {"teacher", "student"} <= groups:
    return "it looks like RD with Expert's (URD): --method=rd_expert"
  if {"bn", "decoder"} <= groups:
    if any(k.startswith("decoder.generation") for k in flat):
      return "its decoder has MRKD's generation heads: --method=mrkd"
    return "it looks like RD4AD's / SK-RD4AD's: --method=rd4ad or --method=sk_rd4ad"
  return ""


def read_official(path: str | os.PathLike, method: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors, flattened to ``'<group>.<state-dict key>'`` names.

  Args:
    path: ``.pth`` / ``.pt`` (``torch.save``) or ``.safetensors``.
    method: one of ``METHODS``; selects the expected groups.

  Raises:
    CheckpointImportError: the file does not hold the method's groups (naming
      what it holds and, when recognisable, the method it is for).
  """
  path = pathlib.Path(path)
  if method not in FORMATS:
    raise CheckpointImportError(f"Unknown --method {method!r}; choose one of {METHODS}.")
  fmt = FORMATS[method]
  obj = torch_io.load(path)
  if not isinstance(obj, Mapping):
    raise CheckpointImportError(
      f"{path}: holds a {type(obj).__name__}, expected the dict of state dicts that "
      f"{fmt.saved_by} writes."
    )
  flat = torch_io.flatten_tensors(obj)
  groups = {k.split(".", 1)[0] for k in flat}
  if set(fmt.groups) <= groups:
    return flat
  if any(k.startswith(("layer1.", "layer2.", "layer3.")) for k in flat) and "bn" not in groups:
    raise CheckpointImportError(
      f"{path}: holds a decoder state dict alone (SK-RD4AD main.py --seg 1 saves "
      "decoder.state_dict() without the bottleneck 'bn'); the model cannot be rebuilt "
      "without the bottleneck's weights. Use a checkpoint saved as {'bn': ..., 'decoder': ...}."
    )
  guess = _guess(groups, flat)
  raise CheckpointImportError(
    f"{path}: expected the groups {list(fmt.groups)} of a --method={method} checkpoint "
    f"({fmt.saved_by}), found {sorted(groups)[:6]}" + (f"; {guess}." if guess else ".")
  )


def _hint_for_missing(method: str, missing: list[str], flat: Mapping[str, np.ndarray]) -> str:
  if method == "mrkd" and any(".generation" in k for k in missing):
    if not any(k.startswith("decoder.generation") for k in flat):
      return " The file has no MRKD generation heads: --method=rd4ad or --method=sk_rd4ad?"
  return ""


def _hint_for_unexpected(unexpected: list[str]) -> str:
  if any(k.startswith("decoder.generation") for k in unexpected):
    return " decoder.generation* are MRKD's heads: --method=mrkd?"
  if any(".module." in k or k.startswith("module.") for k in unexpected):
    return " A 'module.' prefix comes from nn.DataParallel: save model.module.state_dict()."
  return ""


def convert(
  method: str,
  flat: Mapping[str, np.ndarray],
  abstract_state: Any,
  path: str | os.PathLike,
  teacher: str = "",
  dtype: Any = np.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Maps the official tensors onto our ``params`` and ``batch_stats`` trees.

  Args:
    method: one of ``METHODS``.
    flat: ``read_official``'s tensors.
    abstract_state: ``jax.eval_shape`` of the method's ``init`` (the target tree).
    path: the file (for messages).
    teacher: the config's teacher (for messages).
    dtype: of the returned arrays (float64 for the parity tests).

  Returns:
    (params, batch_stats) as nested dicts of numpy arrays.

  Raises:
    CheckpointImportError: naming every missing, unexpected or mis-shaped tensor
      (the first five of each kind).
  """
  fmt = FORMATS[method]
  names = variable_names(method, abstract_state)
  out, missing, wrong = {}, [], []
  for name, (key, shape) in names.items():
    if name not in flat:
      missing.append(f"{name!r} (expected shape {official_shape(shape)})")
      continue
    value = np.asarray(flat[name])
    if value.shape != official_shape(shape):
      wrong.append(f"{name!r} has shape {value.shape}, expected {official_shape(shape)}")
      continue
    out[key] = np.array(to_flax_layout(value, shape), dtype)  # a copy, never a view
  unexpected = sorted(
    k
    for k in flat
    if k not in names and not fmt.unused.search(k) and not _NUM_BATCHES_TRACKED.search(k)
  )
  problems = []
  if wrong:
    problems.append(
      f"Wrong shape ({len(wrong)}; another teacher or layout than the config's?): "
      + "; ".join(wrong[:5])
      + "."
    )
  if missing:
    problems.append(
      f"Missing ({len(missing)}): "
      + "; ".join(missing[:5])
      + "."
      + _hint_for_missing(method, [m.split("'")[1] for m in missing], flat)
    )
  if unexpected:
    problems.append(
      f"Unexpected ({len(unexpected)}): {unexpected[:5]}." + _hint_for_unexpected(unexpected)
    )
  if problems:
    raise CheckpointImportError(
      f"{path}: does not fit --method={method}"
      + (f" with config.model.teacher={teacher!r}" if teacher else "")
      + ". "
      + " ".join(problems)
    )
  tree = porting.unflatten(out)
  return tree.get("params", {}), tree.get("batch_stats", {})


# ----------------------------------------------------------------------------- config and writing


def official_config(
  method: str,
  category: str,
  config: ml_collections.ConfigDict | None = None,
  teacher_weights: str | None = None,
) -> ml_collections.ConfigDict:
  """The resolved config that reproduces the official model of ``method``.

  Args:
    method: one of ``METHODS``.
    category: the category the checkpoint was trained on.
    config: a base config (a dataset config); None = the MVTec AD defaults, which
      are the official recipe (wide_resnet50_2, 256 px, OCBE width 128, decoder
      (3, 4, 6), flat-cosine loss, maps from all three levels, sigma 4).
    teacher_weights: overrides ``config.model.teacher_weights`` (stored as an
      absolute path).

  Returns:
    A resolved copy with ``model.name = method`` and ``data.categories = (category,)``.
    MRKD evaluates without the FLM mask (``mrkd.mask_at_test = False``: the
    released code masks at test time, which makes its maps random); RD with
    Expert uses the plain injection its released scripts run (``rd_expert.gated =
    False``) unless the config says otherwise.
  """
  if method not in METHODS:
    raise CheckpointImportError(f"Unknown --method {method!r}; choose one of {METHODS}.")
  if config is None:
    config = defaults.get_config()
    config.name = "imported"
    config.data.dataset = "mvtec_ad"
    config.data.root = os.environ.get("MVTEC_ROOT", "")
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.name = method
  if teacher_weights is not None:
    config.model.teacher_weights = teacher_weights
  weights = config.model.teacher_weights
  if weights not in ("", "random"):
    config.model.teacher_weights = os.path.abspath(os.path.expanduser(weights))
  config.data.categories = (category,)
  return recipe.resolve(config)


def import_checkpoint(
  method: str,
  checkpoint: str | os.PathLike,
  category: str,
  workdir: str | os.PathLike,
  config: ml_collections.ConfigDict | None = None,
  teacher_weights: str | None = None,
  overwrite: bool = False,
) -> str:
  """Reads an official checkpoint and writes it as ``<workdir>/<category>``'s checkpoint.

  Args:
    method: one of ``METHODS``.
    checkpoint: the official ``.pth`` / ``.safetensors`` file.
    category: the category it was trained on (the run's category name).
    workdir: the run directory to write into.
    config: a base config (see ``official_config``).
    teacher_weights: the frozen teacher's weights (see ``official_config``).
    overwrite: replace the category's existing checkpoints.

  Returns:
    The category's checkpoint directory.

  Raises:
    CheckpointImportError / ValueError / FileNotFoundError: with a message
    naming the file, the tensor or the setting at fault.
  """
  from skrd4ad_jax.training import checkpoints  # orbax, only when writing

  path = pathlib.Path(checkpoint).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", category or ""):
    raise CheckpointImportError(f"--category must be a plain name, got {category!r}.")
  ckpt_dir = checkpoints.checkpoint_dir(str(workdir), category)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    if not overwrite:
      raise CheckpointImportError(
        f"{ckpt_dir} already holds checkpoints; choose another --workdir or pass --overwrite."
      )
    shutil.rmtree(ckpt_dir)

  cfg = official_config(method, category, config, teacher_weights)
  method_obj = methods.build_method(cfg)
  flat = read_official(path, method)
  teacher_vars = teachers.load_teacher_variables(
    cfg.model.teacher,
    cfg.model.teacher_weights,
    image_size=int(cfg.data.image_size),
    seed=int(cfg.seed),
  )
  abstract = jax.eval_shape(method_obj.init, jax.random.PRNGKey(int(cfg.seed)), teacher_vars)
  params, batch_stats = convert(method, flat, abstract, path, cfg.model.teacher)
  # A fresh optimiser state (the official files hold none) and step 0.
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = zeros.replace(params=params, batch_stats=batch_stats)
  state = jax.tree.map(jnp.asarray, state)

  meta = {
    "category": category,
    "step": 0,
    "total_steps": 0,
    "epochs": 0,
    "train_seconds": 0.0,
    "image_size": int(cfg.data.image_size),
    "method": method_obj.describe(),
    "config": json.loads(cfg.to_json_best_effort()),
    "final": True,
    "imported_from": {
      "file": str(path.resolve()),
      "sha256": porting.sha256(path),
      "method": method,
      "format": "safetensors" if path.suffix.lower() == ".safetensors" else "pth",
      "saved_by": FORMATS[method].saved_by,
    },
  }
  manager = checkpoints.make_manager(str(workdir), category)
  checkpoints.save(manager, 0, state, meta)
  manager.close()
  return ckpt_dir


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined on demand, like ``predict``)."""
  flags.DEFINE_enum("method", None, list(METHODS), "Which official code saved the checkpoint.")
  flags.DEFINE_string("checkpoint", None, "The official .pth / .safetensors file.")
  flags.DEFINE_string("category", None, "The category it was trained on (e.g. bottle).")
  flags.DEFINE_string("workdir", None, "Run directory to write <category>/checkpoints into.")
  config_flags.DEFINE_config_file(
    "config", None, "Optional base config (default: the MVTec AD official recipe)."
  )
  flags.DEFINE_string(
    "teacher_weights", None, "The ImageNet teacher's weights (default: the config's)."
  )
  flags.DEFINE_bool("overwrite", False, "Replace the category's existing checkpoints.")
  flags.mark_flags_as_required(["method", "checkpoint", "category", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  try:
    ckpt_dir = import_checkpoint(
      FLAGS.method,
      FLAGS.checkpoint,
      FLAGS.category,
      FLAGS.workdir,
      FLAGS.config,
      FLAGS.teacher_weights,
      FLAGS.overwrite,
    )
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"[{FLAGS.category}] {FLAGS.method} checkpoint {FLAGS.checkpoint} imported into {ckpt_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
