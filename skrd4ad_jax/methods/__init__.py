"""The RD-family methods, selected by ``config.model.name``."""

from __future__ import annotations

METHOD_NAMES = ("sk_rd4ad", "rd4ad", "mrkd", "rd_expert")


def build_method(config):
  """Returns the ``Method`` for ``config.model.name``."""
  name = config.model.name
  if name in ("sk_rd4ad", "rd4ad"):
    from skrd4ad_jax.methods.rd import ReverseDistillation  # pylint: disable=g-import-not-at-top
    skip = config.model.get("skip_connections", -1)
    skip = (name == "sk_rd4ad") if skip in (-1, None) else bool(skip)
    return ReverseDistillation(config, skip=skip)
  if name == "mrkd":
    from skrd4ad_jax.methods.mrkd import MRKD  # pylint: disable=g-import-not-at-top
    return MRKD(config)
  if name == "rd_expert":
    from skrd4ad_jax.methods.rd_expert import RDExpert  # pylint: disable=g-import-not-at-top
    return RDExpert(config)
  raise ValueError(f"Unknown config.model.name {name!r}; choose one of {METHOD_NAMES}.")
