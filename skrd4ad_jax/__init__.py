"""skrd4ad_jax: reverse-distillation anomaly detection in JAX/Flax.

SK-RD4AD, RD4AD, MRKD and RD with Expert; see README.md and ARCHITECTURE.md.
"""

__version__ = "0.2.0"
