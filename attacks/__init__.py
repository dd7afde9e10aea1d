"""Poisoning attacks, registered by name per modality (``ATTACKS.get("badnets")``)."""

from attacks import image  # noqa: F401  (registers the image attacks)
from attacks.base import ATTACKS, Attack, create_attack, select_poison_indices

__all__ = ["ATTACKS", "Attack", "create_attack", "select_poison_indices"]
