"""Poisoning attacks, registered by name per modality (``ATTACKS.get("badnets")``)."""

from attacks import image, pointcloud  # noqa: F401  (register the image and point-cloud attacks)
from attacks.base import ATTACKS, Attack, create_attack, select_poison_indices

__all__ = ["ATTACKS", "Attack", "create_attack", "select_poison_indices"]
