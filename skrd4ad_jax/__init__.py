"""skrd4ad_jax: reverse-distillation anomaly detection (SK-RD4AD, RD4AD, MRKD, RD with Expert) in JAX/Flax."""

__version__ = "0.1.0"
