"""skrd4ad_jax: reverse-distillation anomaly detection in JAX/Flax.

install_requires holds compatible ranges, so that the package installs into an
environment that already has an accelerator build of JAX (a CUDA image, a TPU VM)
without replacing it. The exact versions the tests and CI run are in
constraints.txt: ``pip install -c constraints.txt -e ".[test,export]"``.
"""

from setuptools import find_packages, setup

# Every packaged file that is not Python (the published numbers, and whatever
# data a package ships later); tests/test_packaging.py checks that the wheel
# holds every such file of the source tree.
DATA_FILES = ["*.csv", "*.json", "*.tsv", "*.txt", "*.sha256", "*.bib", "*.md"]

setup(
  name="skrd4ad_jax",
  version="0.2.0",
  description="SK-RD4AD, RD4AD, MRKD and RD with Expert in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  # The include patterns pick up data_pipelines once it exists; until then it
  # matches nothing.
  packages=find_packages(
    include=["skrd4ad_jax", "skrd4ad_jax.*", "data_pipelines", "data_pipelines.*"]
  ),
  package_data={"": DATA_FILES},
  include_package_data=False,
  python_requires=">=3.10",
  install_requires=[
    # jax, not jaxlib: jax pulls the matching jaxlib, and an accelerator build
    # (jax[cuda13], jax[tpu]) is a plugin beside that same jaxlib, so nothing
    # here replaces it. The upper bounds are the next minor releases nobody has
    # tested; lower bounds are the versions tested.
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.14",
    "ml-collections>=1.1.0,<2",
    "numpy>=2.0,<3",
    "scipy>=1.14",
    "scikit-image>=0.26.0,<0.28",
    "pillow>=10.1",
    "h5py>=3.11",  # the offline VGG16/HED teacher's weight file
    "absl-py>=2.0",
    # The data side: tf.data input pipeline and tfds builders (data/), and clu's
    # TensorBoard writers. tensorflow-cpu because JAX owns the accelerator.
    "tensorflow-cpu>=2.21.0,<2.23",
    "tensorflow-datasets>=4.9.10,<5",
    "clu>=0.0.12,<0.1",
    # tfds 4.9.10 needs it to load a builder; clu's writers need tensorboard.
    "importlib_resources",
    "tensorboard>=2.21",
  ],
  extras_require={
    # Accelerator builds of jax (the same jax version, plus its plugin and
    # runtime libraries). An image that already has one needs none of these.
    "cuda12": ["jax[cuda12]"],
    "cuda13": ["jax[cuda13]"],
    "tpu": ["jax[tpu]"],
    # Oracles only: torch/torchvision are never imported at run time. One minor
    # release of each (torchvision pins its torch): a newer torchvision would
    # pull a newer torch, on Linux a CUDA build of several GB. scikit-learn and
    # safetensors are test oracles too.
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.8,<4",
      "ruff>=0.17.6,<0.18",
      "import-linter>=2.17,<3",
      "torch>=2.13.0,<2.14",
      "torchvision>=0.28.0,<0.29",
      "scikit-learn>=1.5",
      "safetensors>=0.4",
    ],
    # Deployment export (python -m skrd4ad_jax.export): ONNX writing and running.
    "export": ["onnx>=1.23.2,<2", "onnxruntime>=1.31.1,<2"],
  },
)
