"""Backdoor purification defences on one interface (``defenses.base.purify``), registered by name."""

from defenses import nft  # noqa: F401  (registers "nft")
from defenses.base import DEFENSES, DefenseSpec, NonFiniteLossError, purify, register_defense

__all__ = ["DEFENSES", "DefenseSpec", "NonFiniteLossError", "purify", "register_defense"]
