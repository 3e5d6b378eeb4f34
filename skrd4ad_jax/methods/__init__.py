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
  from skrd4ad_jax.config import resolve

  config = resolve(config)
  name = config.model.name
  if name in ("sk_rd4ad", "rd4ad"):
    from skrd4ad_jax.methods.rd import ReverseDistillation

    skip = config.model.get("skip_connections", -1)
    skip = (name == "sk_rd4ad") if skip in (-1, None) else bool(skip)
    return ReverseDistillation(config, skip=skip)
  if name == "mrkd":
    from skrd4ad_jax.methods.mrkd.method import MRKD

    return MRKD(config)
  if name == "rd_expert":
    from skrd4ad_jax.methods.rd_expert.method import RDExpert

    return RDExpert(config)
  raise ValueError(f"Unknown config.model.name {name!r}; choose one of {METHOD_NAMES}.")
