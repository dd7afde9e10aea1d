"""Image attacks whose trigger is optimised against a clean model: Trojan and label-consistent (CLB).

The clean model is the task's cached benign model (``training.victims.clean_model``); an optimised trigger is
cached per (task config, attack config) under ``<task.cache_dir>/attacks/<hash>/`` as ``trigger.safetensors`` and a
``trigger.json`` sidecar (both configs and what the optimisation reached), so every victim and every evaluation of
the same config reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import ATTACKS
from attacks.image import ImageAttack
from common.checkpoint import cached_tensors
from common.hashing import config_hash
from common.precision import precision_identity
from training.victims import clean_model

Builder = Callable[[], tuple[dict[str, Tensor], dict[str, Any]]]


def trigger_key(task: Any, attack: ImageAttack) -> str:
    """The trigger cache's key: the task, the attack and an explicit precision (the clean model it is optimised on
    depends on it)."""
    return config_hash({"task": task.config(), "attack": attack.config(), **precision_identity()})


def cached_trigger(task: Any, attack: ImageAttack, build: Builder) -> dict[str, Tensor]:
    """The attack's trigger tensors for ``task``: loaded from ``<cache>/attacks/<key>/trigger.*``, or built by
    ``build`` (tensors, info) and cached with ``{task, attack, **info}`` beside them; concurrent workers build once."""
    def build_with_sidecar() -> tuple[dict[str, Tensor], dict[str, Any]]:
        with torch.enable_grad():  # prepare may run inside an evaluation's no_grad
            tensors, info = build()
        return tensors, {"task": task.config(), "attack": attack.config(), **info}

    return cached_tensors(Path(task.cache_dir) / "attacks" / trigger_key(task, attack), "trigger",
                          build_with_sidecar)[0]


def attacker_images(task: Any, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` seeded random images (float, [0, 1], on the task's device) and labels of the attacker's split."""
    g = torch.Generator().manual_seed(seed)
    idx = task.attacker_idx[torch.randperm(len(task.attacker_idx), generator=g)[:count]]
    x = task.data.train.x[idx].to(task.device).float().div_(255)
    return x, task.data.train.y[idx].to(task.device)


@torch.enable_grad()
def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int) -> Tensor:
    """Untargeted L-inf PGD (Madry et al., ICLR 2018) from ``x`` itself: ascend the cross-entropy of the true labels
    ``y`` with signed steps, projected to the eps-ball and [0, 1]."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


@ATTACKS.register("trojan")
@dataclass
class Trojan(ImageAttack):
    """Trojan (Liu et al., NDSS 2018): a patch optimised on the clean model to excite chosen internal neurons.

    The neurons: the ``num_neurons`` inputs of the classifier's last linear layer (the penultimate features) with
    the largest summed absolute connection weight to it, as the paper selects neurons by their connectivity to the
    next layer. The patch's pixels are optimised by signed-gradient steps on the trigger alone (zeros off the mask)
    so those activations reach ``neuron_value``: PGD from a white patch, ``steps`` steps of ``step_size``, each
    pixel kept within ``eps`` of white, stopping once the squared error is below 1e-3. Then standard dirty-label
    poisoning: the patch is stamped on the poisoned images (all-to-one or all-to-all by ``mode``).

    Defaults follow BackdoorBench (``config/attack/trojannn/preactresnet18.yaml``, ``attack/trojannn.py``):
    2 neurons of the ``linear`` layer's input, target value 100, 1000 steps of 0.1, eps 0.3, poison rate 0.1,
    target 0. Mask: BackdoorBench's ``square.png`` (a square of about 7% of the image, the paper's trigger size,
    0.09 of the side from the bottom-right corner), scaled to the image: 8x8 at 3 px from the corner on
    32x32, 4x4 at 1 px on 16x16. Deviations: the patch is stamped (replaces the masked pixels, as in the paper)
    where BackdoorBench adds it to the image; the paper's model retraining on reverse-engineered data is replaced
    by training the victim on poisoned data, as BackdoorBench and NFT do.
    """

    area: float = 0.07
    margin: float = 0.09
    num_neurons: int = 2
    neuron_value: float = 100.0
    steps: int = 1000
    step_size: float = 0.1
    eps: float = 0.3

    name = "trojan"
    paper = "Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang, Trojaning Attack on Neural Networks, NDSS 2018"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.area < 1:
            raise ValueError(f"trojan area (share of the image the patch covers) must be in (0, 1), got {self.area}")
        if not 0 <= self.margin < 1 - math.sqrt(self.area):
            raise ValueError(f"trojan margin must be in [0, 1 - sqrt(area)), got {self.margin}")
        if self.num_neurons < 1 or self.steps < 0:
            raise ValueError(f"trojan needs num_neurons >= 1 and steps >= 0, got {self.num_neurons}, {self.steps}")
        if self.step_size <= 0 or not 0 < self.eps <= 1:
            raise ValueError(f"trojan needs step_size > 0 and eps in (0, 1], got {self.step_size}, {self.eps}")
        self._key: str | None = None
        self._pattern: Tensor | None = None
        self._mask: Tensor | None = None

    def mask(self, height: int, width: int) -> Tensor:
        """(1, H, W) float mask of the square patch at the bottom-right."""
        side = max(1, round(math.sqrt(self.area) * min(height, width)))
        gap = round(self.margin * min(height, width))
        m = torch.zeros(1, height, width)
        m[:, height - gap - side : height - gap, width - gap - side : width - gap] = 1
        return m

    def prepare(self, task: Any) -> None:
        key = trigger_key(task, self)
        if key == self._key:
            return
        tensors = cached_trigger(task, self, lambda: self.optimise(task))
        self._pattern, self._mask, self._key = tensors["pattern"], tensors["mask"], key

    def optimise(self, task: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        model = clean_model(task, self.seed)
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        neurons = linear.weight.detach().abs().sum(0).argsort(descending=True)[: self.num_neurons]
        feats: list[Tensor] = []
        hook = linear.register_forward_pre_hook(lambda _, inputs: feats.append(inputs[0]))
        mask = self.mask(*task.data.shape[1:]).to(task.device)
        pattern, start = torch.ones(1, *task.data.shape, device=task.device), None
        try:
            for step in range(self.steps + 1):
                pattern.requires_grad_(True)
                feats.clear()
                model(pattern * mask)
                acts = feats[0][:, neurons]
                cost = ((acts - self.neuron_value) ** 2).sum()
                start = acts.detach() if start is None else start
                if step == self.steps or cost < 1e-3:
                    break
                (grad,) = torch.autograd.grad(cost, pattern)
                pattern = (pattern.detach() - self.step_size * grad.sign()).clamp(1 - self.eps, 1)
        finally:
            hook.remove()
        info = {"neurons": neurons.tolist(), "activation_start": start.flatten().tolist(),
                "activation_end": acts.detach().flatten().tolist(), "cost": float(cost.detach())}
        return {"pattern": (pattern.detach() * mask)[0], "mask": mask}, info

    def trigger(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._pattern is None or self._mask is None:
            raise RuntimeError("trojan's patch is optimised per task: call attack.prepare(task) first "
                               "(the task's check_attack does)")
        if self._pattern.shape != x.shape[1:]:
            raise ValueError(f"trojan patch was prepared for images {tuple(self._pattern.shape)}, got "
                             f"{tuple(x.shape[1:])}")
        return self._pattern.to(x), self._mask.to(x)

    def apply(self, x: Tensor) -> Tensor:
        pattern, mask = self.trigger(x)
        return x * (1 - mask) + pattern * mask


def corner_trigger(height: int, width: int) -> Tensor:
    """(H, W) signs of the label-consistent "all-corners" trigger: +1 white, -1 black, 0 untouched.

    The 3x3 pattern [[+, -, -], [-, +, -], [+, -, +]] in both left corners and its left-right mirror image in both
    right corners (the authors' and BackdoorBench's pattern), each pixel a block of round(side / 32) pixels."""
    base = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [1, -1, 1]])
    scale = max(1, round(min(height, width) / 32))
    left = base.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    right, k = left.flip(1), 3 * scale
    if 2 * k > min(height, width):
        raise ValueError(f"the corner trigger ({k}x{k}) does not fit twice across a {height}x{width} image")
    out = torch.zeros(height, width)
    out[:k, :k] = out[-k:, :k] = left
    out[:k, -k:] = out[-k:, -k:] = right
    return out


@ATTACKS.register("clb")
@dataclass
class LabelConsistent(ImageAttack):
    """Label-consistent backdoor, CLB (Turner, Tsipras, Madry, 2019): clean-label poisoning of target-class images.

    Each poisoned target-class training image is first perturbed by untargeted L-inf PGD against the clean model
    (``eps``, ``steps`` signed steps of ``step_size``, no random start) so its own features are hard to learn, then
    the trigger is added: the "all-corners" 3x3 black-and-white pattern (:func:`corner_trigger`) at
    ``amplitude`` (1: full contrast; the paper's reduced-amplitude variants use e.g. 16/255). Labels are kept; the
    test-time trigger is the corner pattern alone. The perturbed images are computed once (``bakes_poison``).

    Defaults follow BackdoorBench: PGD eps 8/255, step 1.5/255, 100 steps (``resource/label-consistent/
    craft_adv_dataset.py``), amplitude 1 (``config/attack/lc/default.yaml``: ``reduced_amplitude: 1``), target 0.
    Poison rate 0.08 of the attacker's training set (80% of CIFAR-10's target class): BackdoorBench's 0.1 of all
    samples is the whole CIFAR-10 target class and exceeds it wherever the target class holds under 10% of the
    attacker's split (digits after the defender's reserve, GTSRB); pass ``poison_rate`` to change it. Deviation:
    BackdoorBench crafts the PGD images on an adversarially trained ResNet-18 (and the paper also offers GAN
    interpolation); here PGD runs against the task's clean model, with no pre-made dataset to download.
    """

    poison_rate: float = 0.08
    eps: float = 8 / 255
    step_size: float = 1.5 / 255
    steps: int = 100
    amplitude: float = 1.0

    name = "clb"
    paper = "Turner, Tsipras, Madry, Label-Consistent Backdoor Attacks, arXiv 1912.02771 (2019)"
    clean_label = True
    bakes_poison = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.eps <= 1 or self.step_size <= 0 or self.steps < 0:
            raise ValueError(f"clb needs eps in [0, 1], step_size > 0, steps >= 0; got {self.eps}, "
                             f"{self.step_size}, {self.steps}")
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"clb amplitude must be in (0, 1], got {self.amplitude}")
        self._key: str | None = None
        self._load_model: Callable[[], nn.Module] | None = None
        self._model: nn.Module | None = None

    def prepare(self, task: Any) -> None:
        """Note where the clean model comes from; it is loaded (or trained) only when poisoning needs it."""
        key = trigger_key(task, self)
        if key != self._key:
            self._key, self._model = key, None
            self._load_model = partial(clean_model, task, self.seed)

    def apply(self, x: Tensor) -> Tensor:
        return (x + self.amplitude * corner_trigger(*x.shape[-2:]).to(x)).clamp(0, 1)

    def poison_inputs(self, x: Tensor, y: Tensor) -> Tensor:
        if self._model is None:
            if self._load_model is None:
                raise RuntimeError("clb perturbs images against the task's clean model: call attack.prepare(task) "
                                   "first (the task's check_attack does)")
            self._model = self._load_model().eval()
        return self.apply(pgd(self._model, x, y, self.eps, self.step_size, self.steps))
