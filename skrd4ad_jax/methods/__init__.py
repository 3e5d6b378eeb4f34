"""The RD-family methods, selected by ``config.model.name``.

Each method is a unit: ``rd.py`` (RD4AD and SK-RD4AD), ``mrkd/`` (method, FLM
heads, ILM) and ``rd_expert/`` (method, fusion student, DRAEM anomalies), on top
of ``base.Method`` and, for the distillation methods, ``distill.py``.
"""

from __future__ import annotations

METHOD_NAMES = ("sk_rd4ad", "rd4ad", "mrkd", "rd_expert")


def build_method(config):
  """Returns the ``Method`` for ``config.model.name``.

  The config is first resolved (``config.resolve``): settings left to the
  teacher take its defaults.
  """
  from skrd4ad_jax.teachers import recipe

  config = recipe.resolve(config)
  name = config.model.name
  cls = method_class(name)
  if name in ("sk_rd4ad", "rd4ad"):
    skip = config.model.get("skip_connections", -1)
    skip = (name == "sk_rd4ad") if skip in (-1, None) else bool(skip)
    return cls(config, skip=skip)
  return cls(config)


def method_class(name: str):
  """The ``Method`` class of ``config.model.name`` (imported, not built)."""
  if name in ("sk_rd4ad", "rd4ad"):
    from skrd4ad_jax.methods.rd import ReverseDistillation

    return ReverseDistillation
  if name == "mrkd":
    from skrd4ad_jax.methods.mrkd.method import MRKD

    return MRKD
  if name == "rd_expert":
    from skrd4ad_jax.methods.rd_expert.method import RDExpert

    return RDExpert
  raise ValueError(f"Unknown config.model.name {name!r}; choose one of {METHOD_NAMES}.")
