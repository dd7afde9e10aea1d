"""Backdoor purification defences on one interface (``defenses.base.purify``), registered by name."""

# each module registers itself
from common.guards import NonFiniteLossError
from defenses import anp, awm, clp, fine_pruning, fst, ft, ft_sam, ibau, nad, nft, rnp, sau  # noqa: F401
from defenses.base import DEFENSES, DefenseSpec, purify, register_defense

__all__ = ["DEFENSES", "DefenseSpec", "NonFiniteLossError", "purify", "register_defense"]
