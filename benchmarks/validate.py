"""Checks of a run's inputs that need no training: model options, the attack and clean budget against the task,
and the files a model option names. The CLI, ``run_once`` and the sweep validator call them, so a bad value fails
before any work with one message per problem and its fix.

Hand checks rather than a validation library (pydantic): every defence's and attack's options are already typed
dataclasses with the papers' defaults (``tasks.base.options_for`` checks their types, their ``__post_init__`` their
ranges), and model options are the typed signatures of the model factories; a library would add a dependency
and a second description of the same options.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

from common.fileio import convert_to_safetensors_hint
from tasks.base import CleanBudget, Task, coerce_option

SET_BY_TASK = {"num_classes", "in_channels"}  # model factory arguments the task fills in, not the user
POSITIVE = ("width",)  # size multipliers: 0 or less builds a degenerate network that still trains


def model_factory(task: str, dataset: str, model: str | None, scale: str) -> tuple[str, Callable[..., Any] | None]:
    """The name and registered factory of the model the task would build (image, point-cloud and video models; no
    factory for the other tasks)."""
    if task == "image":
        from tasks.image_classification import DEFAULT_MODELS
        from tasks.image_models import IMAGE_MODELS

        name = model or DEFAULT_MODELS.get((dataset, scale), "resnet-quick")
        return name, IMAGE_MODELS.get(name)
    if task == "pointcloud":
        from tasks.point_cloud import DEFAULT_MODELS
        from tasks.point_models import POINTCLOUD_MODELS

        name = model or DEFAULT_MODELS.get((dataset, scale), "pointnet-small")
        return name, POINTCLOUD_MODELS.get(name)
    if task == "video":
        from tasks.video import DEFAULT_MODELS, VIDEO_MODELS

        name = model or DEFAULT_MODELS[scale]
        return name, VIDEO_MODELS.get(name)
    return model or "default", None


def model_problems(task: str, dataset: str, model: str | None, scale: str, params: dict[str, Any]) -> list[str]:
    """Unknown model options, values of the wrong type or range, and ``pretrained`` files that cannot be loaded."""
    if not params:
        return []
    try:
        name, factory = model_factory(task, dataset, model, scale)
    except KeyError:
        return []  # the unknown model name is reported by its own check
    label = f"model {name} ({task}, {dataset})"
    if factory is not None:
        signature = inspect.signature(factory)
        hints = get_type_hints(factory)
        valid = {n: hints.get(n) for n, p in signature.parameters.items()
                 if n not in SET_BY_TASK and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    elif task == "translation":
        from transformers import MarianConfig

        valid = {n: None for n in inspect.signature(MarianConfig.__init__).parameters if n != "self"}
        valid["pretrained"] = str
    elif task == "detection":
        valid = {"pretrained": str}
    else:
        return []
    unknown = sorted(set(params) - set(valid))
    if unknown:
        return [f"{label} has no option(s) {unknown}; valid: {sorted(valid)}"]
    problems = []
    for key, value in params.items():
        try:
            number = coerce_option(value, valid[key])
        except ValueError as e:
            problems.append(f"{label}: option {key!r} {e}")
            continue
        if isinstance(value, str) and not isinstance(number, str):
            problems.append(f"{label}: option {key!r} must be written as a number (e.g. 0.001, not '1e-3'), "
                            f"got {value!r}")
        elif key in POSITIVE and number <= 0:
            problems.append(f"{label}: option {key!r} must be > 0, got {value!r}")
        elif ("dropout" in key or "layerdrop" in key) and isinstance(number, float) and not 0 <= number < 1:
            problems.append(f"{label}: option {key!r} must be in [0, 1), got {value!r}")
        elif task == "translation" and key != "pretrained" and isinstance(value, int | float):
            problems += translation_range(label, key, value)
    if isinstance(params.get("pretrained"), str) and not problems:
        problems += pretrained_problems(task, Path(params["pretrained"]).expanduser(), label)
    return problems


def translation_range(label: str, key: str, value: float) -> list[str]:
    """Sizes of a Marian config (layers, widths, heads, vocabulary) are whole numbers >= 1; dropouts: [0, 1)."""
    if any(key.endswith(s) for s in ("_layers", "d_model", "_heads", "_ffn_dim", "vocab_size", "_embeddings")):
        if isinstance(value, bool) or value != int(value) or value < 1:
            return [f"{label}: option {key!r} must be a whole number >= 1, got {value!r}"]
    if ("dropout" in key or "layerdrop" in key) and not 0 <= value < 1:
        return [f"{label}: option {key!r} must be in [0, 1), got {value!r}"]
    return []


def pretrained_problems(task: str, path: Path, label: str) -> list[str]:
    """``pretrained`` is a safetensors file (image, detection) or a Marian folder (translation): checked to exist and
    to hold what loading needs, by header only (nothing is unpickled or loaded)."""
    from common.checkpoint import CheckpointError, check_safetensors_file

    if task == "translation":
        if not path.is_dir():
            return [f"{label}: pretrained {path} is not a folder; give a Marian checkpoint folder holding config.json, "
                    "tokenizer.json and model.safetensors"]
        missing = [n for n in ("config.json", "tokenizer.json", "model.safetensors") if not (path / n).is_file()]
        if missing:
            return [f"{label}: pretrained folder {path} lacks {', '.join(missing)}; a checkpoint folder needs "
                    "config.json, tokenizer.json (a `tokenizers` tokenizer) and model.safetensors (convert a "
                    "pytorch_model.bin once, in a trusted environment, with save_pretrained(safe_serialization=True))"]
        try:
            config = json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return [f"{label}: {path / 'config.json'} is not valid JSON ({e}); restore the checkpoint folder"]
        if not isinstance(config, dict) or config.get("model_type") != "marian":
            return [f"{label}: {path / 'config.json'} is not a Marian config (model_type "
                    f"{config.get('model_type') if isinstance(config, dict) else None!r}); give a MarianMT checkpoint"]
        path = path / "model.safetensors"
    elif path.suffix != ".safetensors":
        return [f"{label}: pretrained {path} is not a .safetensors file; {convert_to_safetensors_hint(path)}"]
    try:
        check_safetensors_file(path)
    except CheckpointError as e:
        return [f"{label}: pretrained: {e}"]
    return []


def attack_problems(task: str, attack: str | None) -> list[str]:
    """An attack of another modality than the task's (static: no data needed)."""
    if attack is None:
        return []
    from attacks import ATTACKS

    try:
        modality = ATTACKS.get(attack).modality
    except KeyError:
        return []  # reported by the attack's own check
    if modality != task:
        return [f"attack {attack!r} is a {modality} attack; the {task} task takes {task} attacks "
                "(see `nftbench list --attacks`)"]
    return []


def budget_problems(task: str, budget: CleanBudget) -> list[str]:
    from tasks import TASKS

    try:
        has_classes = TASKS.get(task).has_classes
    except KeyError:
        return []
    if budget.per_class is not None and not has_classes:
        return [f"the {task} task has no classes: give the clean budget as a fraction (--val-frac, or "
                "{val_frac: f} in a sweep), not per class"]
    return []


def attack_class_problems(task: Task, attack: Any) -> list[str]:
    """Class labels an attack names (``target``, a detection attack's ``source`` and ``trigger_classes``) that the
    task's dataset does not have. Needs the built task (its number of classes)."""
    if attack is None or not task.has_classes:
        return []
    problems = []
    for key in ("target", "source", "trigger_classes"):
        value = getattr(attack, key, None)
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if isinstance(v, int) and not 0 <= v < task.num_classes]
        if bad:
            problems.append(f"attack {attack.name!r}: {key} {value!r} is not a class of {task.config()['dataset']} "
                            f"(classes 0..{task.num_classes - 1}); fix the attack's {key}")
    return problems


def raise_problems(problems: list[str]) -> None:
    """One ValueError listing every problem (nothing was run)."""
    if len(problems) == 1:
        raise ValueError(f"{problems[0]} (nothing was run; fix the command or config)")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{len(problems)} problems; fix the command or config (nothing was run):\n{lines}")


def run_problems(task: str, dataset: str, model: str | None, scale: str, model_kwargs: dict[str, Any],
                 attack: str | None, budget: CleanBudget | None) -> list[str]:
    """Every check of a run that needs no data: model options, the attack's modality, the budget's fit."""
    return [*model_problems(task, dataset, model, scale, model_kwargs), *attack_problems(task, attack),
            *(budget_problems(task, budget) if budget is not None else [])]
