"""Resumable victim training: a training loop saves its state at epoch ends (at most once a minute), and a killed
run (a preempted cluster job, a session that ends) starts again at the last saved epoch instead of epoch 0.

A resumed run is the same computation as an uninterrupted one: the weights, the optimisers' and schedules' state,
every random generator the loop draws from and torch's global generators are all saved, so on the same machine and
build the resumed model equals the uninterrupted one bit for bit (``tests/test_resume.py``). The state is one
safetensors file (:func:`common.checkpoint.save_state_tree`; nothing is unpickled) in the victim's cache folder,
which is named by the victim's config hash, so a state is only ever read back by the training it came from."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import CheckpointError, load_state_tree, save_state_tree

RESUME_FORMAT = "1"
SAVE_EVERY_S = 60.0


class EpochCheckpoint:
    """Where a training saves its resume state (``path``), at most how often (``every_s``, default
    :data:`SAVE_EVERY_S`; 0: every epoch), and,
    once the loop has looked, what it resumed: ``resumed`` (whether a state was restored), ``resumed_epoch`` (epochs
    already done; 0 for a fresh start, or for a state saved after a phase that comes before the first epoch, such as
    Input-aware's mask pre-training) and ``prior_s`` (training seconds spent before the restart, so the victim's
    ``train_time_s`` counts them)."""

    def __init__(self, path: str | Path, every_s: float | None = None):
        self.path = Path(path)
        self.every_s = SAVE_EVERY_S if every_s is None else every_s
        self.resumed = False
        self.resumed_epoch = 0
        self.prior_s = 0.0

    def clear(self) -> None:
        """Delete the state (the training it belongs to has finished and been saved)."""
        self.path.unlink(missing_ok=True)


class TrainingState:
    """The parts of one training loop that :class:`EpochCheckpoint` saves and restores: modules, optimisers and
    schedules (anything with ``state_dict``/``load_state_dict``) and ``torch.Generator`` s, by name, plus torch's
    global generators. ``checkpoint=None``: nothing is saved or restored (a loop runs the same either way).

    A loop calls :meth:`start_epoch` once, after building every part, and :meth:`epoch_done` at the end of each
    epoch; ``extras`` (JSON-able values or tensors the loop keeps across epochs) come back from :meth:`start_epoch`.
    A loop with a long phase before its first epoch calls :meth:`save` after it (``epochs_done=0``) with an extra
    that tells it, on restart, to skip the phase.
    """

    def __init__(self, checkpoint: EpochCheckpoint | None, epochs: int, **parts: Any):
        self.checkpoint, self.epochs, self.parts = checkpoint, epochs, parts
        self.started = time.monotonic()
        self.last_save = self.started

    def start_epoch(self) -> tuple[int, dict[str, Any]]:
        """The first epoch to run (0 unless a saved state was restored) and the saved ``extras``."""
        c = self.checkpoint
        if c is None or not c.path.is_file():
            return 0, {}
        tree, meta = load_state_tree(c.path)
        if meta.get("format") != RESUME_FORMAT or int(meta.get("epochs", -1)) != self.epochs:
            raise CheckpointError(f"{c.path} is a resume state of another training (format {meta.get('format')}, "
                                  f"{meta.get('epochs')} epochs; this one has {self.epochs}); delete it to train "
                                  "from the start")
        try:
            for name, part in self.parts.items():
                state = tree["parts"][name]
                part.set_state(state) if isinstance(part, torch.Generator) else part.load_state_dict(state)
            torch.set_rng_state(tree["rng"]["cpu"])
            if torch.cuda.is_available() and tree["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(tree["rng"]["cuda"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{c.path} does not fit this training ({type(e).__name__}: {e}); the code or "
                                  "the model changed since it was saved: delete it to train from the start") from e
        c.resumed, c.resumed_epoch, c.prior_s = True, int(meta["epochs_done"]), float(meta["elapsed_s"])
        return c.resumed_epoch, tree["extras"]

    def epoch_done(self, epoch: int, **extras: Any) -> None:
        """Save the state after ``epoch`` (0-based) when a save is due; never after the last epoch (the finished
        model is saved by the caller)."""
        c = self.checkpoint
        if c is not None and epoch + 1 < self.epochs and time.monotonic() - self.last_save >= c.every_s:
            self.save(epoch + 1, **extras)

    def save(self, epochs_done: int, **extras: Any) -> None:
        """Save the state now, as of ``epochs_done`` finished epochs (nothing without a checkpoint)."""
        c = self.checkpoint
        if c is None:
            return
        tree = {"parts": {name: part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
                          for name, part in self.parts.items()},
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                "extras": extras}
        elapsed = c.prior_s + time.monotonic() - self.started
        save_state_tree(c.path, tree, {"format": RESUME_FORMAT, "epochs": str(self.epochs),
                                       "epochs_done": str(epochs_done), "elapsed_s": f"{elapsed:.3f}"})
        self.last_save = time.monotonic()
