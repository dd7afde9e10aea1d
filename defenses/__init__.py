"""Backdoor purification defences on one interface (``defenses.base.purify``), registered by name."""

from defenses import anp, clp, fine_pruning, ft, ibau, nft  # noqa: F401  (each registers itself)
from defenses.base import DEFENSES, DefenseSpec, NonFiniteLossError, purify, register_defense

__all__ = ["DEFENSES", "DefenseSpec", "NonFiniteLossError", "purify", "register_defense"]
