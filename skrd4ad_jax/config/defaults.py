"""Base configuration: every knob with the official RD4AD / SK-RD4AD default.

Not run directly; the dataset configs in ``configs/`` (mvtec.py, visa.py, vad.py,
folder.py, demo.py, tiny.py) start from ``get_config()``. Any field can be
overridden on the command line:

  python -m skrd4ad_jax.main --config=configs/mvtec.py --config.train.epochs=100
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  """The defaults shared by every dataset config."""
  config = ml_collections.ConfigDict()
  config.name = "default"
  # RD4AD / SK-RD4AD seed every category with 111.
  config.seed = 111

  config.model = ml_collections.ConfigDict()
  # 'sk_rd4ad' (skip-connected, the flagship), 'rd4ad', 'mrkd' or 'rd_expert'.
  config.model.name = "sk_rd4ad"
  # Frozen teacher: 'wide_resnet50_2' (the papers'), 'resnet50', 'resnet18', 'vgg16_hed'.
  config.model.teacher = "wide_resnet50_2"
  # '' = the default location ($SKRD4AD_CACHE/teachers), 'random' = a fixed random init
  # (seed 0, whatever config.seed: the frozen teacher is the same for every seed), or a path.
  config.model.teacher_weights = ""
  # -1: by model name (sk_rd4ad on, rd4ad off); 0/1 forces the SK-RD4AD skips off/on.
  config.model.skip_connections = -1
  # 0 / () = the official value for the teacher (128 for wide_resnet50_2, else 64;
  # OCE blocks 3 (2 for resnet18); decoder blocks (3, 4, 6) ((2, 2, 2) for resnet18)).
  # anomalib's RD uses bottleneck_width_per_group=64 with wide_resnet50_2.
  config.model.bottleneck_width_per_group = 0
  config.model.decoder_width_per_group = 0
  config.model.oce_blocks = 0
  config.model.decoder_blocks = ()
  # Compute dtype of teacher and student ('float32' or 'bfloat16'); parameters stay float32.
  config.model.dtype = "float32"

  # Three settings belong to the teacher (teachers/registry.py): left unset
  # (None), they take the teacher's value, which is the official recipe for the
  # paper's teachers (flat_cosine, 0.005, levels (1, 2, 3)); set, they win.
  config.loss = ml_collections.ConfigDict()
  # 'flat_cosine' (official code: cosine of the flattened C*H*W vector per sample),
  # 'pixel_cosine' (the papers' Eq.), 'mse' (SK-RD4AD --L2 1), 'mse_cosine' (--L2 2).
  config.loss.kind = config_dict.placeholder(str)
  # SK-RD4AD inter-level consistency weight: 0.005 in the official all-category
  # recipe (0.05 for single-class runs); ignored when the skips are off (RD4AD).
  config.loss.consistency_rate = config_dict.placeholder(float)

  config.anomaly_map = ml_collections.ConfigDict()
  config.anomaly_map.mode = "add"  # 'add' (official evaluation) or 'mul'
  config.anomaly_map.sigma = 4.0  # Gaussian sigma in pixels; 0 disables
  config.anomaly_map.truncate = 4.0  # scipy's default: 33 taps at sigma 4
  # 'reflect' = scipy's (edge duplicated; official); 'mirror' = torch/anomalib's.
  config.anomaly_map.blur_mode = "reflect"
  # Levels (1 = the shallowest teacher tap) summed into the map; the official code
  # uses all three. Training always distils every level.
  config.anomaly_map.levels = config_dict.placeholder(tuple)

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 200
  # Per-category epochs, e.g. 'carpet:10,leather:10' (RD++-style schedules).
  config.train.category_epochs = ""
  # > 0: a fixed number of steps per category instead of epochs (RD with Expert).
  config.train.num_steps = 0
  config.train.batch_size = 16
  # Seeds per category: seed k trains with config.seed + k (initialisation,
  # shuffling, augmentation); results.md reports mean ± std over seeds.
  config.train.seeds = 1
  # Compute the frozen teacher's features of the training images once instead of
  # every epoch: the same batches in the same order, the features (computed in
  # evaluation batches) equal to float round-off. RD4AD/SK-RD4AD only (no input
  # augmentation); host memory: N x the three feature maps per category.
  config.train.cache_teacher_features = False
  config.train.learning_rate = 0.005
  config.train.b1 = 0.5
  config.train.b2 = 0.999
  config.train.log_every_steps = 20
  # One TensorBoard run per job (clu's writer, which imports TensorFlow); False =
  # the training and evaluation scalars go to the log only.
  config.train.tensorboard = True
  # Evaluate on the test set every N epochs (TensorBoard only; the results
  # table always reports the last epoch). 0 = only at the end.
  config.train.eval_every_epochs = 10
  config.train.checkpoint_every_epochs = 10

  config.data = ml_collections.ConfigDict()
  # 'folder' (an MVTec-layout tree at data.root), 'tfds' (builders in
  # data_pipelines/), or 'demo' (generated offline from scikit-image photos).
  config.data.source = "folder"
  config.data.dataset = "mvtec_ad"  # tfds builder name; also picks the published numbers
  config.data.root = ""
  config.data.categories = ()  # empty = every category found
  config.data.image_size = 256
  config.data.mask_threshold = 0.5
  # Fraction of the normal training images held out to pick thresholds (never the test set).
  config.data.val_fraction = 0.1
  config.data.tfds_data_dir = ""
  config.data.manual_dir = ""
  # Seed of the held-out validation split (the training order is each job's own seed).
  config.data.shuffle_seed = 111
  # Threads that make training batches (and augmentations) ahead of the step;
  # 0 = min(4, CPU count).
  config.data.host_workers = 0

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16
  config.eval.fpr_limit = 0.3
  config.eval.save_pictures = True
  # Pictures for every seed (default: seed 0 only, to save disk).
  config.eval.pictures_all_seeds = False
  # 'project' or 'official': the official test.py's conventions (labels from the
  # masks, metrics rounded to 3 decimals); results.md says which.
  config.eval.protocol = "project"
  config.eval.tensorboard_pictures = 16  # heat-map overlays per evaluation in TensorBoard
  # Also report the non-learned colour-statistics baseline (skrd4ad_jax/baseline.py)
  # beside the model, to show what a trivial detector already solves.
  config.eval.baseline = False

  config.thresholds = ml_collections.ConfigDict()
  # 'val' = held-out normal training images (default), 'test' = the peers' optimistic
  # convention (F1-optimal on the test set).
  config.thresholds.source = "val"
  # Normal-only rule: this quantile of normal image / pixel scores.
  config.thresholds.normal_quantile = 0.99

  config.parallel = ml_collections.ConfigDict()
  # Devices that split one category's batch (mesh axis 'data'); the rest of the
  # devices form the 'category' axis. 1 = categories only.
  config.parallel.data_axis_size = 1
  # How one jitted step advances the categories on a device: 'vmap' (batched;
  # accelerators), 'unroll' (a loop inside the program; several times faster on
  # XLA:CPU, needs data_axis_size=1), 'auto' = 'unroll' on CPU, else 'vmap'.
  config.parallel.category_loop = "auto"
  # Jobs (category x seed) each device trains at once; 0 = auto: 1 on CPU, on
  # accelerators the most (<= 8) that fit in device memory and keep >= 95 % of
  # the step-time useful. An explicit count that does not fit stops before training.
  config.parallel.slots_per_device = 0
  # Memory (GiB) one device may use, against which slots and the evaluation batch
  # are sized (training/memory.py); 0 = what the device reports (GPU, TPU: the
  # allocator's limit; CPU reports none, so no cap there).
  config.parallel.device_memory_gb = 0.0

  # MRKD (config.model.name = 'mrkd').
  config.mrkd = ml_collections.ConfigDict(
    dict(
      # Feature-level masking: probability that a decoder position is zeroed.
      mask_ratio=0.2,
      # Also mask at test time, as the released code does (stochastic maps);
      # False = deterministic inference. The results table says which was used.
      mask_at_test=False,
    )
  )
  # RD with Expert (config.model.name = 'rd_expert').
  config.rd_expert = ml_collections.ConfigDict(
    dict(
      # False = plain injection, what the released scripts run (their attn flag is
      # inverted); True = the paper's gated guided information injection (GII).
      gated=False,
      # Adam learning rate of the trainable teacher (the student uses train.learning_rate).
      teacher_learning_rate=1e-4,
      # Folder of texture images for the DRAEM anomalies (DTD's dtd/images in the
      # official code); '' = offline bank (scikit-image photos + procedural textures).
      texture_dir="",
      # 'otsu': restrict anomalies to the object for object categories (OpenCV's
      # grabCut replaced by Otsu); 'none': anywhere.
      foreground="otsu",
      # Iteration budget per category, used when config.train.num_steps == 0.
      num_steps=5000,
      # Categories with the longer budget (comma-separated) and that budget.
      long_categories="cable,transistor",
      long_num_steps=10000,
    )
  )
  return config
