"""The suite's arithmetic precision: one setting (``auto``, ``fp32``, ``bf16``) that every autocast obeys, what it
means on a device, and its part in cache keys and ids. A floor module: tasks, training, attacks and the runner read it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "NFTBENCH_PRECISION"


def set_precision(precision: str) -> None:
    """Set the suite-wide autocast precision (``auto``, ``fp32`` or ``bf16``) that :func:`autocast` obeys.

    Stored in ``$NFTBENCH_PRECISION``, so worker processes a sweep spawns (and a local Ray instance) inherit it."""
    os.environ[PRECISION_ENV] = _check_precision(precision)


def get_precision() -> str:
    """The precision setting: the last :func:`set_precision`, else ``$NFTBENCH_PRECISION``, else ``auto``."""
    return _check_precision(os.environ.get(PRECISION_ENV, "auto"), f"${PRECISION_ENV}")


def precision_identity() -> dict[str, str]:
    """The precision part of every cache key and id (victims, runs, clean models' triggers, surrogates): nothing
    under ``auto``, ``{"precision": "fp32" | "bf16"}`` for a precision set explicitly.

    Why not always: ids are hashes of configs, and every committed victim, record and ``--reuse`` match was made
    before the setting existed, under ``auto`` (bf16 on GPUs and on CPUs with AMX / AVX512-BF16, fp32 elsewhere).
    Under ``auto`` the ids stay those ids; the precision a victim or run actually used is recorded beside them
    (``precision`` in victim.json and run records). An explicit precision gets ids of its own, even where it equals
    what ``auto`` picks on that machine: the id says what was asked for, not what the machine happened to have.
    The torch thread count is recorded (``torch_threads``), never hashed: like precision it moves a victim's numbers
    as far as another seed does (README Development), but it is a resource knob, not a choice of arithmetic; a
    hashed one would split the cache by machine and by sweep worker count, and mean nothing on a GPU.
    """
    setting = get_precision()
    return {} if setting == "auto" else {"precision": setting}


def _check_precision(precision: str, what: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def precision_in_effect(device: torch.device, enabled: bool = True) -> str:
    """``bf16`` or ``fp32``: what :func:`autocast` computes in on ``device`` under the current setting.

    ``auto`` (the default, and the behaviour results were produced with) is bf16 on CUDA and on CPUs with native
    bf16 (AVX512-BF16 or AMX), fp32 elsewhere; ``bf16`` forces it (emulated, slower, on other CPUs); ``fp32`` turns
    it off. ``enabled=False`` (a task built with ``amp=False``) is always fp32."""
    setting = get_precision()
    if not enabled or setting == "fp32":
        return "fp32"
    if setting == "bf16":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"bf16 autocast runs on cuda and cpu, not {device.type}; use precision fp32 or auto")
        return "bf16"
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"


def numerics(task: Any) -> dict[str, Any]:
    """How a victim or run computes: the precision in effect on its task's device and torch's CPU thread count."""
    return {"precision": precision_in_effect(task.device, task.amp), "torch_threads": torch.get_num_threads()}


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast where :func:`precision_in_effect` says bf16; a no-op elsewhere."""
    if precision_in_effect(device, enabled) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
