"""Exports a finished category as one self-contained ONNX model or TensorFlow SavedModel.

The exported function is the evaluation's, end to end: uint8 RGB images
``[batch, S, S, 3]`` -> ImageNet normalisation (``normalization.py``'s constants,
the input pipeline's arithmetic) -> ``method.anomaly_maps`` (teacher, student,
levels, align-corners up-sampling, Gaussian blur, add/mul) -> the raw map
``[batch, S, S]`` and the raw image score ``[batch]``. Thresholds stay outside
the graph, in the spec JSON beside it (``spec.py``), unless post-processing is
asked for; even then they can be graph inputs.

Conversion paths (why: see ``onnx_converter.py`` and the README):

* ``saved_model``: ``jax.experimental.jax2tf`` with native serialisation: the
  graph is the StableHLO JAX compiles, run by TensorFlow's XLA
  (``XlaCallModule``), with a symbolic batch dimension. The weights are
  ``tf.Variable``s of the SavedModel.
* ``onnx``: ``onnx_converter``, a jaxpr -> ONNX translation of the traced
  function with the weights as initializers.

Every export is checked before it is reported done: the written model is
loaded back and run on synthetic images, and its maps and scores must match
the JAX checkpoint's to ``PARITY_RTOL`` (figures stored in the spec).

Why one module of this size: both formats share the traced function, the loading
of a finished checkpoint and the parity check; each format's part is short.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import datetime
import os
import shutil
import time
from typing import Any

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

import skrd4ad_jax
from skrd4ad_jax import normalization
from skrd4ad_jax.export import spec as spec_lib
from skrd4ad_jax.export.spec import ExportError

PARITY_RTOL = 1e-4  # max |exported - JAX| / max |JAX| accepted by the export's own check
DEFAULT_PLATFORMS = ("cpu", "cuda")
VERIFY_IMAGES = 8


def load_finished(workdir: str, category: str | None, seed: int = 0):
  """The ``predict.Predictor`` of a category (and seed) whose training finished.

  Seed k > 0 of a multi-seed run is the job ``<category>/seed_<k>``.

  Raises:
    ExportError: no run or checkpoint, an untrained seed, or a latest
      checkpoint that is not final.
  """
  from skrd4ad_jax import predict
  from skrd4ad_jax.training import checkpoints

  if int(seed) < 0:
    raise ExportError(f"--seed must be >= 0, got {seed}.")
  try:
    name = predict.resolve_job(workdir, category, int(seed))
  except predict.PredictError as e:
    raise ExportError(str(e)) from None
  manager = checkpoints.make_manager(workdir, name, read_only=True)

  def check_finished(meta: dict, step) -> None:
    if not meta.get("final") or not meta.get("thresholds"):
      raise ExportError(
        f"The latest readable checkpoint of {name!r} in {os.path.abspath(workdir)} (step "
        f"{step} of {meta.get('total_steps', '?')}) is not a finished one (no final "
        "evaluation, no thresholds). Fix: finish training (rerun python -m skrd4ad_jax.main "
        "with the same --workdir; it resumes) and export again."
      )

  # The JSON item first (no teacher to load when training is plainly unfinished),
  # then the state the predictor actually restored: when the newest checkpoint's
  # arrays are damaged it falls back to an older step, which may not be final.
  meta = checkpoints.restore_meta(manager) or {}
  check_finished(meta, meta.get("step", manager.latest_step()))
  try:
    predictor = predict.Predictor(workdir, category, int(seed))
  except predict.PredictError as e:
    raise ExportError(str(e)) from None
  check_finished(predictor.meta, predictor.step)
  return predictor


# ---------------------------------------------------------------------------
# The exported function.


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> ImageNet-normalised float32, as the input pipeline computes it."""
  x = images.astype(jnp.float32) / jnp.float32(255.0)
  mean = jnp.asarray(normalization.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(normalization.IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def normalize_scores(x: jax.Array, threshold, low, high) -> jax.Array:
  """``thresholds.normalize_scores`` in float32, for traced thresholds too."""
  low_width = threshold - low
  high_width = high - threshold
  low_part = jnp.where(low_width > 0, 0.5 * (x - low) / jnp.where(low_width > 0, low_width, 1), 0)
  high_part = jnp.where(
    high_width > 0, 0.5 + 0.5 * (x - threshold) / jnp.where(high_width > 0, high_width, 1), 1
  )
  out = jnp.where(x < threshold, low_part, jnp.where(x == threshold, 0.5, high_part))
  out = jnp.where(jnp.isnan(x), jnp.nan, out)
  return jnp.clip(out, 0.0, 1.0).astype(jnp.float32)


def postprocess(maps: jax.Array, scores: jax.Array, thr: dict[str, Any]) -> dict[str, jax.Array]:
  """Normalised map and score, OK/NG label and defect mask (True = NG / defect)."""
  return {
    "anomaly_map_normalized": normalize_scores(
      maps, thr["pixel_threshold"], thr["pixel_min"], thr["pixel_max"]
    ),
    "pred_score": normalize_scores(
      scores, thr["image_threshold"], thr["image_min"], thr["image_max"]
    ),
    # The raw comparison is the decision (as in predict); thresholds rounded up
    # to float32 keep it identical (spec.threshold_float32).
    "pred_label": scores >= thr["image_threshold"],
    "pred_mask": maps >= thr["pixel_threshold"],
  }


class ExportedFunction:
  """The function an export serialises, with its weights as a separate argument.

  ``fn(weights, image, *threshold_inputs) -> dict of outputs``; ``weights`` is
  the list of the arrays the graph uses (unused ones, e.g. RD with Expert's
  frozen expert, are left out).
  """

  def __init__(self, predictor, with_postprocessing: bool, thresholds_as: str):
    if thresholds_as not in spec_lib.THRESHOLDS_AS:
      raise ExportError(
        f"Unknown --thresholds_as={thresholds_as!r}; choose one of {spec_lib.THRESHOLDS_AS}."
      )
    method = predictor.method
    if getattr(method, "mask_at_test", False):
      raise ExportError(
        "config.mrkd.mask_at_test=True draws random feature masks at test time, so the "
        "maps depend on the batch and the PRNG key: not exportable as a fixed model. Fix: "
        "export a run trained with config.mrkd.mask_at_test=False."
      )
    self.predictor = predictor
    self.image_size = int(predictor.image_size)
    self.with_postprocessing = bool(with_postprocessing)
    self.thresholds_as = thresholds_as if with_postprocessing else None
    self.threshold_inputs = spec_lib.THRESHOLD_INPUTS if self.thresholds_as == "inputs" else ()
    self.output_names = spec_lib.RAW_OUTPUTS + (
      spec_lib.POSTPROCESSING_OUTPUTS if with_postprocessing else ()
    )
    self.constant_thresholds = None
    if self.thresholds_as == "constants":
      thr = spec_lib.thresholds_float32(predictor.thresholds)
      missing = [k for k, v in thr.items() if not np.isfinite(v)]
      if missing:
        raise ExportError(
          f"The checkpoint holds no {', '.join(missing)}: constant thresholds cannot be "
          "built into the model. Fix: --thresholds_as=inputs, or export without "
          "--with_postprocessing."
        )
      self.constant_thresholds = thr

    state = predictor.state
    leaves, self._treedef = jax.tree.flatten(
      (state.params, state.batch_stats, predictor.teacher_vars)
    )
    self._leaves = [np.asarray(x) for x in leaves]
    self._used = None

  @property
  def used(self) -> list[bool]:
    """Which weight leaves the graph reads (traced once, on first use)."""
    if self._used is None:
      s = self.image_size
      image = jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8)
      scalars = [jax.ShapeDtypeStruct((), jnp.float32)] * len(self.threshold_inputs)
      jaxpr = jax.make_jaxpr(self._full)(self._leaves, image, *scalars).jaxpr
      read = {v for e in jaxpr.eqns for v in e.invars if not isinstance(v, jax_core.Literal)}
      read |= {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
      self._used = [v in read for v in jaxpr.invars[: len(self._leaves)]]
    return self._used

  @property
  def weights(self) -> list[np.ndarray]:
    """The weight leaves the graph reads, in order (``__call__``'s first argument)."""
    return [x for x, u in zip(self._leaves, self.used) if u]

  def _full(self, leaves, image, *thresholds):
    params, batch_stats, teacher_vars = jax.tree.unflatten(self._treedef, leaves)
    p = self.predictor
    state = p.state.replace(params=params, batch_stats=batch_stats)
    maps, scores = p.method.anomaly_maps(state, teacher_vars, normalize_images(image), p.rng)
    maps, scores = maps.astype(jnp.float32), scores.astype(jnp.float32)
    out = {"anomaly_map": maps, "pred_score_raw": scores}
    if self.with_postprocessing:
      if self.thresholds_as == "inputs":
        thr = dict(zip(self.threshold_inputs, thresholds))
      else:
        thr = {k: jnp.float32(v) for k, v in self.constant_thresholds.items()}
      out.update(postprocess(maps, scores, thr))
    return out

  def __call__(self, weights: Sequence[Any], image, *thresholds) -> dict[str, Any]:
    it = iter(weights)
    leaves = [next(it) if u else x for x, u in zip(self._leaves, self.used)]
    return self._full(leaves, image, *thresholds)

  def input_specs(self, batch) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    s = self.image_size
    image = (spec_lib.INPUT_NAME, jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8))
    return [image] + [(k, jax.ShapeDtypeStruct((), jnp.float32)) for k in self.threshold_inputs]


# ---------------------------------------------------------------------------
# Writers.


def _symbolic_batch():
  (batch,) = jax.export.symbolic_shape("batch")
  return batch


def write_onnx(fn: ExportedFunction, output: str) -> str:
  """Converts and writes ``model.onnx``; returns its path."""
  spec_lib.require("onnx", "--format=onnx")
  from skrd4ad_jax.export import onnx_converter

  if fn.predictor.config.model.get("dtype", "float32") != "float32":
    raise ExportError(
      f"config.model.dtype={fn.predictor.config.model.dtype}: onnxruntime has no bfloat16 "
      "convolution on CPU. Fix: --format=saved_model, or a float32 run."
    )
  batch = _symbolic_batch()
  names = fn.output_names

  def outputs(*inputs):
    # The weights are closed over: the converter stores them as initializers.
    out = fn._full(fn._leaves, *inputs)
    return tuple(out[k] for k in names)

  model = onnx_converter.convert(
    outputs,
    fn.input_specs(batch),
    names,
    batch_dim=batch,
    doc_string=f"skrd4ad_jax {skrd4ad_jax.__version__} anomaly detector; see {spec_lib.SPEC_FILE}",
  )
  path = os.path.join(output, spec_lib.ONNX_FILE)
  import onnx

  # Protobuf's 2 GB limit: larger models keep their weights in a side file.
  large = model.ByteSize() > 1_800_000_000
  onnx.save_model(model, path, save_as_external_data=large, location=spec_lib.ONNX_FILE + ".data")
  return path


def write_saved_model(fn: ExportedFunction, output: str, platforms: Sequence[str]) -> str:
  """Converts with jax2tf and writes ``saved_model/``; returns its path."""
  tf = spec_lib.require("tensorflow", "--format=saved_model")
  from jax.experimental import jax2tf

  s = fn.image_size
  converted = jax2tf.convert(
    fn,
    polymorphic_shapes=[None, f"(batch, {s}, {s}, 3)"] + [None] * len(fn.threshold_inputs),
    with_gradient=False,
    native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  module.weights = [tf.Variable(w, trainable=False) for w in fn.weights]
  signature = [tf.TensorSpec([None, s, s, 3], tf.uint8, name=spec_lib.INPUT_NAME)] + [
    tf.TensorSpec([], tf.float32, name=k) for k in fn.threshold_inputs
  ]

  def serve(image, *thresholds):
    return dict(converted(module.weights, image, *thresholds))

  module.serve = tf.function(serve, input_signature=signature, autograph=False)
  path = os.path.join(output, spec_lib.SAVED_MODEL_DIR)
  if os.path.isdir(path):
    shutil.rmtree(path)
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  return path


# ---------------------------------------------------------------------------
# Checking what was written.


def verification_images(image_size: int, count: int = VERIFY_IMAGES) -> np.ndarray:
  """Deterministic uint8 test images [count, S, S, 3]: noise, gradients, flat greys."""
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 255, image_size, dtype=np.float32)
  images = []
  for i in range(count):
    if i % 3 == 0:
      images.append(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
    elif i % 3 == 1:
      images.append(np.stack([np.add.outer(ramp, ramp[::-1] * (i % 5) / 4) / 2] * 3, -1))
    else:
      images.append(np.full((image_size, image_size, 3), 40 * i % 256, np.float32))
  return np.stack(images).astype(np.uint8)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b| (0 for two zero arrays)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  diff = float(np.max(np.abs(a - b))) if b.size else 0.0
  return diff / scale if scale > 0 else diff


def verify(model_dir: str, fn: ExportedFunction, log=print) -> dict[str, float]:
  """Runs the written model (its own runtime) against JAX; raises if they disagree."""
  from skrd4ad_jax.export import run as runner

  p = fn.predictor
  # The evaluation's batch size (up to VERIFY_IMAGES): predict's compiled step is reused.
  count = min(VERIFY_IMAGES, int(p.config.eval.batch_size))
  images = verification_images(fn.image_size, count)
  maps, scores = p._eval_step(p.state, p.teacher_vars, normalize_images(images), p.rng)
  model = runner.load_model(model_dir)
  out = model.run(images)
  figures = {
    "images": int(len(images)),
    "map_max_relative_error": relative_error(out["anomaly_map"], maps),
    "score_max_relative_error": relative_error(out["pred_score_raw"], scores),
  }
  worst = max(figures["map_max_relative_error"], figures["score_max_relative_error"])
  if not worst <= PARITY_RTOL:
    raise ExportError(
      f"The exported model disagrees with the checkpoint: max relative error {worst:.3g} > "
      f"{PARITY_RTOL:g} on {len(images)} synthetic images ({model_dir}). This is a bug of "
      "the export; please report it with the run's config."
    )
  log(
    f"verified: {model.format} reproduces the checkpoint's maps to "
    f"{figures['map_max_relative_error']:.2g} and scores to "
    f"{figures['score_max_relative_error']:.2g} (max relative error)"
  )
  return figures


# ---------------------------------------------------------------------------
# The whole export.


def export(
  workdir: str,
  category: str | None,
  fmt: str,
  output: str,
  *,
  seed: int = 0,
  with_postprocessing: bool = False,
  thresholds_as: str = "inputs",
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
  check: bool = True,
  log: Callable[[str], Any] = print,
) -> dict[str, Any]:
  """Exports the latest (finished) checkpoint of a category; see the module doc.

  Args:
    workdir: the training run.
    category: the category (None when the run trained one).
    fmt: 'onnx' or 'saved_model'.
    output: the directory to write (created; a previous export there is replaced).
    seed: which seed of a multi-seed run (``<category>/seed_<k>`` for k > 0).
    with_postprocessing: add normalised map/score, label and mask outputs.
    thresholds_as: 'inputs' (graph inputs, fed from the spec by the runner) or
      'constants' (built in) for the post-processing.
    platforms: jax2tf lowering platforms of a SavedModel.
    check: run the written model against JAX before returning.
    log: a print-like function for progress lines.

  Returns:
    The spec written beside the model (also in ``output/skrd4ad_export.json``).

  Raises:
    ExportError: bad format, unfinished checkpoint, missing dependency, or a
      model that disagrees with the checkpoint.
  """
  if fmt not in spec_lib.FORMATS:
    raise ExportError(f"Unknown --format={fmt!r}; choose one of {', '.join(spec_lib.FORMATS)}.")
  # Missing dependencies are reported before minutes of restoring and tracing.
  if fmt == "onnx":
    spec_lib.require("onnx", "--format=onnx")
    if check:
      spec_lib.require("onnxruntime", "Checking the ONNX export")
  else:
    spec_lib.require("tensorflow", "--format=saved_model")
  predictor = load_finished(workdir, category, seed)
  return export_predictor(
    predictor,
    fmt,
    output,
    seed=seed,
    with_postprocessing=with_postprocessing,
    thresholds_as=thresholds_as,
    platforms=platforms,
    check=check,
    log=log,
  )


def export_predictor(
  predictor,
  fmt: str,
  output: str,
  *,
  seed: int = 0,
  with_postprocessing: bool = False,
  thresholds_as: str = "inputs",
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
  check: bool = True,
  log: Callable[[str], Any] = print,
) -> dict[str, Any]:
  """``export`` for an already restored ``predict.Predictor`` (same arguments)."""
  if fmt not in spec_lib.FORMATS:
    raise ExportError(f"Unknown --format={fmt!r}; choose one of {', '.join(spec_lib.FORMATS)}.")
  t0 = time.time()
  fn = ExportedFunction(predictor, with_postprocessing, thresholds_as)
  output = os.path.abspath(os.path.expanduser(output))
  os.makedirs(output, exist_ok=True)
  old = os.path.join(output, spec_lib.SPEC_FILE)
  if os.path.exists(old):
    os.remove(old)  # a half-written export must not look finished
  log(f"[{predictor.category}] exporting step {predictor.step} as {fmt} to {output}")
  if fmt == "onnx":
    model_path = write_onnx(fn, output)
  else:
    model_path = write_saved_model(fn, output, platforms)
  cfg = predictor.config
  thresholds = dict(predictor.thresholds)
  s = fn.image_size
  spec = {
    "format": fmt,
    "model_file": os.path.basename(model_path),
    "project": "skrd4ad_jax",
    "project_version": skrd4ad_jax.__version__,
    "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "workdir": predictor.workdir,
    "category": predictor.category,
    "seed": int(seed),
    "checkpoint_step": int(predictor.step),
    "method": predictor.method.name,
    "teacher": cfg.model.teacher,
    "method_facts": predictor.meta.get("method", {}),
    "image_size": s,
    "batch_size": int(cfg.eval.batch_size),
    "preprocessing": (
      "Pillow: Image.open(path).convert('RGB').resize((image_size, image_size), "
      "Image.BILINEAR) -> uint8 RGB [batch, S, S, 3]; ImageNet normalisation is in the model"
    ),
    "anomaly_map": {
      "mode": cfg.anomaly_map.mode,
      "levels": list(predictor.method.map_kwargs["levels"]),
      "sigma": float(cfg.anomaly_map.sigma),
      "truncate": float(cfg.anomaly_map.truncate),
      "blur_mode": cfg.anomaly_map.blur_mode,
      "image_score": "max of the smoothed map",
    },
    "inputs": {
      spec_lib.INPUT_NAME: {"dtype": "uint8", "shape": ["batch", s, s, 3], "layout": "NHWC RGB"},
      **{k: {"dtype": "float32", "shape": []} for k in fn.threshold_inputs},
    },
    "outputs": {
      "anomaly_map": {"dtype": "float32", "shape": ["batch", s, s]},
      "pred_score_raw": {"dtype": "float32", "shape": ["batch"]},
      **(
        {
          "anomaly_map_normalized": {"dtype": "float32", "shape": ["batch", s, s]},
          "pred_score": {"dtype": "float32", "shape": ["batch"]},
          "pred_label": {"dtype": "bool", "shape": ["batch"], "meaning": "True = NG"},
          "pred_mask": {"dtype": "bool", "shape": ["batch", s, s], "meaning": "True = defect"},
        }
        if fn.with_postprocessing
        else {}
      ),
    },
    "postprocessing": {
      "in_model": fn.with_postprocessing,
      "thresholds_as": fn.thresholds_as,
    },
    "thresholds": thresholds,
    "thresholds_float32": {k: float(v) for k, v in spec_lib.thresholds_float32(thresholds).items()},
    "score_normalization": (
      "piecewise linear: [min, threshold] -> [0, 0.5], [threshold, max] -> [0.5, 1], "
      "clipped to [0, 1] (skrd4ad_jax.evaluation.thresholds.normalize_scores); "
      "NG when pred_score_raw >= image_threshold; defect pixel when anomaly_map >= "
      "pixel_threshold"
    ),
  }
  if fmt == "saved_model":
    spec["platforms"] = list(platforms)
    spec["signature"] = "serving_default"
  spec_lib.write_spec(output, spec)
  if check:
    spec["verification"] = verify(output, fn, log)
    spec_lib.write_spec(output, spec)
  log(f"[{predictor.category}] exported in {time.time() - t0:.1f} s: {model_path}")
  return spec
