"""Poisoning attacks, registered by name per modality (``ATTACKS.get("badnets")``)."""

from attacks import (  # noqa: F401  (each module registers its attacks)
    detection,
    image,
    image_composite,
    image_feature,
    image_generative,
    image_optimised,
    image_signal,
    image_stego,
    pointcloud,
    translation,
    video,
)
from attacks.base import ATTACKS, Attack, create_attack
from tasks.base import select_poison_indices

__all__ = ["ATTACKS", "Attack", "create_attack", "select_poison_indices"]
