"""skrd4ad_jax: reverse-distillation anomaly detection in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name="skrd4ad_jax",
  version="0.2.0",
  description="SK-RD4AD, RD4AD, MRKD and RD with Expert in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=find_packages(
    include=["skrd4ad_jax", "skrd4ad_jax.*", "data_pipelines", "skrd4ad_jax.data.*"]
  ),
  package_data={"skrd4ad_jax": ["published_results.csv"]},
  python_requires=">=3.10",
  install_requires=[
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    # tfds 4.9.10 needs it to load a builder; clu's writers need tensorboard.
    "importlib_resources",
    "tensorboard",
    "numpy>=2.0",
    "scipy",
    "scikit-image==0.26.0",
    "scikit-learn",
    "pillow",
    "h5py",
    "safetensors",
    "absl-py",
  ],
  extras_require={
    # Oracles only: torch/torchvision are never imported at run time. Pin both:
    # an unpinned torchvision pulls a CUDA torch and several GB of packages.
    "test": ["pytest", "ruff==0.17.6", "torch==2.13.0", "torchvision==0.28.0"],
    # Deployment export (python -m skrd4ad_jax.export): ONNX writing and running.
    "export": ["onnx==1.23.2", "onnxruntime==1.31.1"],
  },
)
