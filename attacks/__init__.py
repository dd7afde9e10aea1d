"""Poisoning attacks, registered by name per modality (``ATTACKS.get("badnets")``)."""

from attacks.base import ATTACKS, Attack, create_attack, select_poison_indices
from attacks import image  # noqa: F401  (registers the image attacks)

__all__ = ["ATTACKS", "Attack", "create_attack", "select_poison_indices"]
