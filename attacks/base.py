"""Attack base class, registry and exact, seeded poison selection."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tasks.base import Registry, options_for
from training.resume import EpochCheckpoint

MODES = ("all-to-one", "all-to-all")


@dataclass
class Attack:
    """A poisoning attack. Subclasses add trigger parameters as dataclass fields.

    ``target``: target label of all-to-one attacks (0, as in NFT's and BackdoorBench's configs).
    ``mode``: ``all-to-one`` or ``all-to-all`` (label y -> (y + 1) mod C).
    ``poison_rate``: share of the attacker's training set that is poisoned (exact count, rounded).
    ``seed``: seeds the poison selection and any generated pattern.

    ``clean_label`` attacks (SIG, CLB) poison only samples of the target class and keep their labels; ASR is
    still measured on triggered samples of the other classes.
    """

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    seed: int = 0

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"attack mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.poison_rate <= 1:
            raise ValueError(f"poison_rate must be in [0, 1], got {self.poison_rate}")
        if self.target < 0:
            raise ValueError(f"target label must be >= 0, got {self.target}")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def train_victim(self, task: Any, split: Any, recipe: dict[str, Any], seed: int,
                     checkpoint: EpochCheckpoint | None = None) -> nn.Module | None:
        """The victim, for attacks that train their trigger jointly with it (Input-aware, LIRA); ``None``: the
        task's recipe trains it on the poisoned ``split``. An attack's own loop saves and resumes its state through
        ``checkpoint`` (:class:`training.resume.TrainingState`), as the task's recipe does."""
        return None

    @property
    def trains_victim(self) -> bool:
        """Whether this attack trains its victim itself (overrides :meth:`train_victim`)."""
        return type(self).train_victim is not Attack.train_victim

    def victim_info(self) -> dict[str, Any]:
        """Facts about the trigger worth keeping in the victim's ``victim.json`` (``attack_info``): an auxiliary
        network's quality, a training log. Called right after the victim is trained."""
        return {}

    def artifacts(self) -> dict[str, Tensor]:
        """Tensors the trigger needs after training (a generator's weights), saved with the victim."""
        return {}

    def load_artifacts(self, tensors: dict[str, Tensor]) -> None:
        if tensors:
            raise ValueError(f"attack {self.name!r} saves no artifacts, got {sorted(tensors)}")

    def poison_label(self, y: Tensor, num_classes: int) -> Tensor:
        """The label the attacker wants for triggered inputs of true label ``y``."""
        if self.mode == "all-to-one":
            return torch.full_like(y, self.target)
        return (y + 1) % num_classes

    def counts_for_asr(self, y: Tensor) -> Tensor:
        """Test samples that count for ASR/RA (all-to-one: those whose true label is not the target)."""
        if self.mode == "all-to-one":
            return y != self.target
        return torch.ones_like(y, dtype=torch.bool)

    def poison_pool(self, y: Tensor) -> tuple[Tensor, str]:
        """Training samples that may be poisoned (bool mask over true labels ``y``) and how to say so in an error:
        the target class (clean-label attacks); samples whose label is not the target (all-to-one); else all."""
        if self.clean_label:
            return y == self.target, "of the target class"
        return self.counts_for_asr(y), "not of the target class"


ATTACKS: Registry[type[Attack]] = Registry("attack")


def create_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack; unknown parameters get an error listing the valid ones."""
    cls = ATTACKS.get(name)
    return cls(**options_for(cls, params, f"attack {name!r}"))
