"""Poisoning attacks, registered by name per modality (``ATTACKS.get("badnets")``)."""

# each module registers its attacks
from attacks import image, image_optimised, image_signal, pointcloud  # noqa: F401
from attacks.base import ATTACKS, Attack, create_attack, select_poison_indices

__all__ = ["ATTACKS", "Attack", "create_attack", "select_poison_indices"]
