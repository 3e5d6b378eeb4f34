"""Category names (and sizes) of the benchmark data sets: no TensorFlow, configs import this."""

MVTEC_AD = (
  "bottle",
  "cable",
  "capsule",
  "carpet",
  "grid",
  "hazelnut",
  "leather",
  "metal_nut",
  "pill",
  "screw",
  "tile",
  "toothbrush",
  "transistor",
  "wood",
  "zipper",
)
# VisA's 12 categories, as its split_csv/1cls.csv names them.
VISA = (
  "candle",
  "capsules",
  "cashew",
  "chewinggum",
  "fryum",
  "macaroni1",
  "macaroni2",
  "pcb1",
  "pcb2",
  "pcb3",
  "pcb4",
  "pipe_fryum",
)
# MVTec AD train/good counts (the official archive), for planning without the data.
MVTEC_TRAIN_COUNTS = {
  "bottle": 209,
  "cable": 224,
  "capsule": 219,
  "carpet": 280,
  "grid": 264,
  "hazelnut": 391,
  "leather": 245,
  "metal_nut": 220,
  "pill": 267,
  "screw": 320,
  "tile": 230,
  "toothbrush": 60,
  "transistor": 213,
  "wood": 247,
  "zipper": 240,
}
