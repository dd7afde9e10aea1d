"""The task adapter protocol: the only way defences and the runner talk to a model.

A task adapter (one per modality) owns the model factory, the data, how an attack's trigger is
applied, the task's MixUp, the training loss and the evaluation. Defences receive a task object and
an opaque clean split and use only the methods of :class:`Task`; they never import a concrete task.
This mirrors lm-evaluation-harness's task adapters and timm's ``create_model`` registries.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no registry knows; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> factory table, as timm's model registry: ``@REG.register("name")``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items


def options_for(cls: type, params: dict[str, Any], what: str) -> dict[str, Any]:
    """``params`` checked against the dataclass ``cls``'s fields: an unknown key gets an error listing the valid
    ones, and every value must fit its field's type (:func:`coerce_option`), so ``mixup: maybe`` or ``steps: 2.5`` fail
    here, before any work. One error lists every problem. Ranges and enums are the dataclass's ``__post_init__``."""
    valid = {f.name for f in fields(cls)}
    unknown = set(params) - valid
    if unknown:
        raise ValueError(f"{what} has no option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    hints = get_type_hints(cls)
    out, problems = dict(params), []
    for key, value in params.items():
        try:
            out[key] = coerce_option(value, hints.get(key))
        except ValueError as e:
            problems.append(f"option {key!r} {e}")
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}; fix the config")
    return out


def coerce_option(value: Any, kind: Any) -> Any:
    """``value`` as a field of type ``kind``, or ValueError saying what was expected. Booleans must be true/false; an
    int field takes whole numbers (``5.0`` -> 5); a float field takes numbers; a string that spells a number is read
    as one, since YAML 1.1 (PyYAML) reads ``1e-3`` as the string ``'1e-3'`` (it wants ``1.0e-3``), in sweep files and
    ``--set`` values alike. ``X | None`` takes null; ``tuple[...]`` takes a list; other types pass unchecked."""
    args = get_args(kind)
    if kind is None or kind is Any:
        return value
    if type(None) in args:  # X | None
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return coerce_option(value, rest[0]) if len(rest) == 1 else value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {value!r}")
    if kind in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value) if kind is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ValueError(f"must be a {'whole ' if kind is int else ''}number, got {value!r}")
        if kind is int:
            if number != int(number):
                raise ValueError(f"must be a whole number, got {value!r}")
            return int(number)
        return float(number)
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, got {value!r}")
    if getattr(kind, "__origin__", None) is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be a list, got {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"must be a list of {len(items)} values, got {value!r}")
        return tuple(coerce_option(v, k) for v, k in zip(value, items, strict=True))
    return value


@dataclass
class Batch:
    """One batch: model inputs and targets (a label tensor for classification)."""

    inputs: Tensor
    targets: Any

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class LabelledTensors:
    """Inputs ``x`` (N, ...) and labels ``y`` (N,), on CPU or a device.

    A poisoned training set keeps its clean inputs and marks the poisoned ones (``poisoned``, bool (N,));
    their labels are already the attacker's, and ``trigger`` (the attack's ``apply``) is applied when a
    batch is gathered, on the device. That equals baking the trigger into a copy, without the copy
    (ImageNet-size data stays memory-mapped).
    """

    x: Tensor
    y: Tensor
    poisoned: Tensor | None = None
    trigger: Callable[..., Tensor] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Tensor):
        poisoned = None if self.poisoned is None else self.poisoned[idx.to(self.poisoned.device)]
        return type(self)(self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)], poisoned, self.trigger)

    def to(self, device: torch.device):
        poisoned = None if self.poisoned is None else self.poisoned.to(device)
        return type(self)(self.x.to(device), self.y.to(device), poisoned, self.trigger)


class TensorBatches(ABC):
    """``sample_batch`` / ``epoch_batches`` / ``iter_batches`` for tasks whose splits are
    :class:`LabelledTensors`; the task supplies ``make_batch``."""

    eval_batch_size = 1024

    @abstractmethod
    def make_batch(self, split: LabelledTensors, idx: Tensor, augment: bool, generator: torch.Generator | None
                   ) -> Batch:
        """The batch of ``split[idx]`` on the task's device (trigger on poisoned rows, then augmentation)."""

    def sample_batch(self, split: LabelledTensors, batch_size: int, generator: torch.Generator,
                     augment: bool = True) -> Batch:
        idx = torch.randint(0, len(split), (batch_size,), generator=generator)
        return self.make_batch(split, idx, augment, generator)

    def epoch_batches(self, split: LabelledTensors, batch_size: int, generator: torch.Generator,
                      augment: bool = True) -> Iterator[Batch]:
        """One shuffled pass over ``split`` (the last partial batch is dropped when there are several)."""
        perm = torch.randperm(len(split), generator=generator)
        n = len(split) // batch_size * batch_size if len(split) >= 2 * batch_size else len(split)
        for idx in perm[:n].split(batch_size):
            yield self.make_batch(split, idx, augment, generator)

    def iter_batches(self, split: LabelledTensors, batch_size: int | None = None) -> Iterator[Batch]:
        for idx in torch.arange(len(split)).split(batch_size or self.eval_batch_size):
            yield self.make_batch(split, idx, False, None)


@dataclass(frozen=True)
class CleanBudget:
    """How much clean data the defender gets: a fraction of the training set, or k per class."""

    fraction: float | None = 0.01
    per_class: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.per_class is None):
            raise ValueError("give exactly one of a clean fraction (--val-frac) or samples per class (--per-class)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"clean fraction must be in (0, 1], got {self.fraction}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"samples per class must be >= 1, got {self.per_class}")

    def describe(self) -> str:
        return f"{self.per_class}/class" if self.per_class is not None else f"{self.fraction:g}"


class Task(ABC):
    """Protocol every modality implements. Splits are task-specific opaque objects.

    Attributes set by the adapter: ``name``, ``num_classes``, ``device``; the CLI's defaults
    ``default_dataset`` (embedded, needs no files) and ``default_attack``.
    """

    name: str
    num_classes: int
    device: torch.device
    default_dataset: ClassVar[str]
    default_attack: ClassVar[str]
    mask_target: ClassVar[str] = "bn_gamma"  # the neurons mask-based defences (NFT, ANP) mask; see defenses.masking
    has_classes: ClassVar[bool] = True  # False: no class labels, so no per-class clean budget or target class
    amp: bool = True  # False: never autocast; True: as the suite's precision setting says (precision_in_effect)

    # --- model and data -------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model of the configured architecture, on ``self.device``."""

    @abstractmethod
    def split_sizes(self, split: Any) -> int:
        """Number of samples in a split."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that determines the data and model (hashed into victim ids)."""

    @abstractmethod
    def recipe(self) -> dict[str, Any]:
        """Victim training recipe: epochs, batch_size, lr, momentum, nesterov, weight_decay, schedule,
        label_smoothing."""

    @abstractmethod
    def attacker_train(self, attack: Any, seed: int) -> tuple[Any, Tensor]:
        """The attacker's (poisoned) training split and the indices it poisoned."""

    @abstractmethod
    def check_attack(self, attack: Any) -> None:
        """Refuse an attack of another modality (one clear error) and prepare its trigger (fitted locations,
        auxiliary models) before poisoning, evaluation or loading a cached victim. ``None``: a benign model."""

    @abstractmethod
    def clean_split(self, budget: CleanBudget, seed: int) -> Any:
        """The defender's clean split, held out from the attacker's training data."""

    # --- batches, loss and MixUp (what a defence uses) ---------------------------------------
    @abstractmethod
    def sample_batch(self, split: Any, batch_size: int, generator: torch.Generator, augment: bool = True) -> Batch:
        """A batch drawn with replacement from ``split`` (augmented as in training)."""

    @abstractmethod
    def epoch_batches(self, split: Any, batch_size: int, generator: torch.Generator, augment: bool = True
                      ) -> Iterator[Batch]:
        """One shuffled pass over ``split`` (victim training)."""

    @abstractmethod
    def iter_batches(self, split: Any, batch_size: int) -> Iterator[Batch]:
        """The whole split in order, without augmentation."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Tensor:
        """Mean training loss of ``model`` on ``batch``."""

    @abstractmethod
    def mixup_loss(self, model: nn.Module, batch: Batch, alpha: float, generator: torch.Generator) -> Tensor:
        """The task's MixUp: mix the batch with a permutation of itself, lambda ~ Beta(alpha, alpha)."""

    def cutmix_loss(self, model: nn.Module, batch: Batch, alpha: float, generator: torch.Generator) -> Tensor:
        """CutMix (Yun et al., ICCV 2019), for tasks whose inputs have a spatial layout (images); an alternative
        augmentation for NFT's ablations."""
        raise NotImplementedError(f"task {self.name!r} has no CutMix; use MixUp (nft mix=mixup)")

    @abstractmethod
    def accuracy(self, model: nn.Module, split: Any) -> float:
        """Clean task metric of ``model`` on ``split`` in [0, 1] (what a defender may select with)."""

    @abstractmethod
    def perturbable_input(self, batch: Batch) -> Tensor:
        """The tensor a universal perturbation is added to (pixels in [0, 1] for images)."""

    @abstractmethod
    def with_input(self, batch: Batch, inputs: Tensor) -> Batch:
        """``batch`` with its perturbable input replaced (the inverse of :meth:`perturbable_input`)."""

    def samples_per_class(self, split: Any) -> float:
        """Clean samples per class (N_c of NFT's regulariser); a task without classes overrides it."""
        return self.split_sizes(split) / self.num_classes

    @abstractmethod
    def feature_layer(self, model: nn.Module) -> nn.Module:
        """The last feature layer (its output channels are what fine-pruning prunes)."""

    def attention_layers(self, model: nn.Module, count: int = 3) -> list[nn.Module]:
        """Up to ``count`` intermediate layers, shallow to deep, whose outputs (N, C, ...) NAD distils.

        Default: the feature layer and the ``count - 1`` modules registered just before it in its parent, i.e.
        a ResNet's last residual stages (NAD's residual-group outputs) or PointNet's last shared-MLP layers.
        Assumes the parent registers its children in forward order (every model here does); override otherwise.
        """
        layer = self.feature_layer(model)
        name = next(n for n, m in model.named_modules() if m is layer)
        siblings = list(model.get_submodule(name.rpartition(".")[0]).children())
        i = next(k for k, m in enumerate(siblings) if m is layer)
        return siblings[max(0, i - count + 1): i + 1]

    # --- evaluation (the runner's, never a defence's) ----------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, attack: Any) -> dict[str, float]:
        """``{"clean_acc", "asr", "ra"}`` on the test split, each in [0, 1]."""

    # --- what a defence gets -----------------------------------------------------------------
    defender_state: ClassVar[tuple[str, ...]] = ()  # non-plain attributes the protocol's operations need

    def defender_ops(self) -> Task:
        """A copy of this task that runs the protocol's operations and holds nothing else: its plain settings
        (numbers, strings, flags, the device, containers of those) and the attributes named in ``defender_state``.
        No dataset, split, index tensor or path survives, so neither does a way to the test or attacker data."""
        ops = object.__new__(type(self))
        ops.__dict__.update({k: v for k, v in vars(self).items() if k in self.defender_state or _plain(v)})
        return ops


TASKS: Registry[type[Task]] = Registry("task")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str | torch.device | torch.dtype):
        return True
    if isinstance(value, list | tuple | frozenset):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class DefenderView:
    """What a defence sees (the protocol's guarantee, by construction): the defender's clean split ``clean``,
    materialised to its budget (tensors that own their storage, no trigger, nothing poisoned), and the operations of
    :class:`Task` a defence may use, run by :meth:`Task.defender_ops`'s stripped copy of the task.

    It holds no reference to the task, its other splits, its cache paths or the victim's files, so a defence cannot
    reach test data or the attacker's training set through it, not even by introspection (``view._ops`` is the
    stripped copy). :func:`defenses.purify` builds one for every defence it runs.
    """

    __slots__ = ("clean", "_ops")
    OPERATIONS = ("split_sizes", "sample_batch", "epoch_batches", "iter_batches", "loss", "mixup_loss", "cutmix_loss",
                  "accuracy", "perturbable_input", "with_input", "samples_per_class", "feature_layer",
                  "attention_layers")
    SETTINGS = ("name", "num_classes", "device", "mask_target", "has_classes", "amp")

    def __init__(self, task: Task, clean: Any):
        if not hasattr(task, "defender_ops"):
            raise TypeError(f"a defence runs on a task of the protocol (a tasks.base.Task subclass), got "
                            f"{type(task).__name__}; subclass Task or give the object a defender_ops() method")
        self.clean = _materialised(clean)
        self._ops = task.defender_ops()

    def __getattr__(self, name: str) -> Any:
        if name in self.OPERATIONS or name in self.SETTINGS:
            return getattr(self._ops, name)
        raise AttributeError(f"a defence sees only its clean split and the protocol's operations "
                             f"({', '.join(self.OPERATIONS)}; {', '.join(self.SETTINGS)}), not {name!r}")


def _materialised(split: Any) -> Any:
    """``split`` with every tensor copied out of any larger storage it views (a subset of the training set's memory
    map, say); refuses a split that carries a trigger or poisoned rows."""
    if isinstance(split, Tensor):
        whole = split.untyped_storage().nbytes() == split.numel() * split.element_size()
        return split if whole and split.storage_offset() == 0 else split.clone()
    if dataclasses.is_dataclass(split) and not isinstance(split, type):
        if getattr(split, "trigger", None) is not None or (
                isinstance(getattr(split, "poisoned", None), Tensor) and bool(split.poisoned.any())):
            raise ValueError("the defender's clean split carries poisoned samples or a trigger; a task's clean_split "
                             "must return clean data only")
        return dataclasses.replace(split, **{f.name: _materialised(getattr(split, f.name))
                                             for f in dataclasses.fields(split) if f.init})
    return split


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU, else MPS, else CPU; otherwise ``cpu`` / ``cuda:N``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {spec} asked for CUDA but no GPU is visible; use --device cpu or auto")
    return device


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into (rest, held-out) with ``fraction`` of each class held out (at least one)."""
    g = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, math.floor(fraction * len(idx) + 0.5))
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values


def select_clean(y: Tensor, reserve_idx: Tensor, num_classes: int, budget: CleanBudget, seed: int) -> Tensor:
    """The defender's clean indices (into the training set), drawn seeded from the reserve ``reserve_idx``:
    ``budget.fraction`` of the whole training set (``len(y)``), or ``budget.per_class`` of each class."""
    reserve_y = y[reserve_idx]
    g = torch.Generator().manual_seed(seed)
    if budget.per_class is not None:
        picks = []
        for c in range(num_classes):
            pool = torch.nonzero(reserve_y == c).flatten()
            if len(pool) < budget.per_class:
                raise ValueError(f"the defender's reserve has only {len(pool)} samples of class {c}; "
                                 f"lower --per-class below {budget.per_class}")
            picks.append(pool[torch.randperm(len(pool), generator=g)[: budget.per_class]])
        chosen = torch.cat(picks)
    else:
        n = max(1, round(budget.fraction * len(y)))
        if n > len(reserve_y):
            raise ValueError(f"--val-frac {budget.fraction} asks for {n} samples but the defender's reserve holds "
                             f"{len(reserve_y)} ({len(reserve_y) / len(y):.0%} of train); lower it")
        chosen = torch.randperm(len(reserve_y), generator=g)[:n]
    return reserve_idx[chosen.sort().values]


def select_poison_indices(labels: Tensor, attack: Any, generator: torch.Generator) -> Tensor:
    """Exactly ``round(poison_rate * N)`` indices, drawn without replacement from the samples
    ``attack.poison_pool`` allows."""
    n_poison = int(math.floor(attack.poison_rate * len(labels) + 0.5))
    labels = labels.cpu()
    pool, what = attack.poison_pool(labels)
    eligible = torch.nonzero(pool).flatten()
    if n_poison > len(eligible):
        raise ValueError(
            f"poison_rate {attack.poison_rate} asks for {n_poison} poisoned samples but only "
            f"{len(eligible)} are eligible ({what}); lower --poison-rate"
        )
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:n_poison]]
    return chosen.sort().values


def beta_sample(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha), reproducible from a torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
