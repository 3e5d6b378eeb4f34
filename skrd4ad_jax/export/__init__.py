"""Deployment export: ONNX and TensorFlow SavedModel models of a trained category.

  python -m skrd4ad_jax.export --workdir=RUN --category=C --format=onnx --output=DIR
  python -m skrd4ad_jax.export.run --model=DIR --input=IMAGES --output=OUT

This package's ``__init__`` imports nothing: the runner (``export.run``) must
load without JAX.
"""
