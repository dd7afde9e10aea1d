"""Ctrl-C during a run or sweep: the SIGINT handler the CLI installs and the flag it sets. A module of its own, with
no heavy imports, so the CLI can install it without importing torch."""

from __future__ import annotations

import threading
from typing import Any

INTERRUPTED = threading.Event()


def interrupt_handler(signum: int, frame: Any) -> None:
    """Mark the interruption (so a Ctrl-C that lands inside a library is not taken for that library's error) and
    raise KeyboardInterrupt as Python's default handler does."""
    INTERRUPTED.set()
    raise KeyboardInterrupt
