"""Category names of the benchmark data sets (no TensorFlow: configs import this)."""

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
