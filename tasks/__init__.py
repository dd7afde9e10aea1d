"""Task adapters, one per modality, registered by name (``create_task("image", dataset="cifar10")``)."""

from typing import Any

from tasks import detection, image_classification, image_folder, point_cloud, translation, video  # noqa: F401
from tasks.base import TASKS, Batch, CleanBudget, Task, UnknownNameError


def create_task(name: str, **kwargs: Any) -> Task:
    return TASKS.get(name)(**kwargs)


__all__ = ["TASKS", "Batch", "CleanBudget", "Task", "UnknownNameError", "create_task"]
