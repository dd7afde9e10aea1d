"""File safety shared by the data caches, the victim cache and the runner: an inter-process lock and the checks a
path must pass before any work is done for it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class WritePathError(ValueError):
    """A path nftbench was asked to write that cannot take the write; the message names it and the fix."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; yields whether it is held
    (always True when ``blocking``). The kernel releases it when its holder exits, even on SIGKILL, so a dead
    process never leaves a stale lock (the empty lock file itself is harmless). Without ``fcntl`` (Windows) nothing
    is locked."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def dir_lock(folder: str | os.PathLike):
    """:func:`file_lock` on ``<folder>.lock`` beside a cache folder (a victim, a trigger, a trained encoder), so
    concurrent workers (processes, Ray tasks on a shared file system) build it once: the others wait, then load it."""
    d = Path(folder)
    return file_lock(d.parent / f"{d.name}.lock")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_write_path(path: str | os.PathLike, what: str, kind: str = "file") -> Path:
    """Refuse, before any work, a ``kind`` (file | folder) path that could not be written: one that is the other
    kind, sits under a file, has a name longer than the file system allows, or lies in a folder this user cannot
    write. ``what`` names the option (``--results``) in the message. Creates nothing."""
    p = Path(path).expanduser()
    absolute = p if p.is_absolute() else Path.cwd() / p
    existing, rest = Path(absolute.anchor), list(absolute.parts[1:])  # the deepest existing folder, what follows
    limit = _name_max(existing)
    descending = True
    for part in rest:
        if len(part.encode()) > limit:
            raise WritePathError(f"{what} {p}: the name {part[:40]!r}... is {len(part.encode())} bytes, longer than "
                                 f"the file system's limit of {limit}; give a shorter name")
        if descending:
            try:
                descending = (existing / part).exists()
            except OSError as e:
                raise WritePathError(f"{what} {p}: {e.strerror}; give a shorter path") from None
            if descending:
                existing = existing / part
                limit = _name_max(existing) if existing.is_dir() else limit
    if existing != absolute and not existing.is_dir():
        raise WritePathError(f"{what} {p}: {existing} is a file, so nothing can be created under it; "
                             "give a path in a folder")
    if absolute.exists():
        if kind == "file" and absolute.is_dir():
            raise WritePathError(f"{what} {p} is a folder; give a file path such as {p / 'results.csv'}")
        if kind == "folder" and not absolute.is_dir():
            raise WritePathError(f"{what} {p} is a file; give a folder (it is created if missing)")
    target = absolute if absolute.is_dir() else existing if existing != absolute else absolute.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise WritePathError(f"{what} {p}: {target} is not writable by this user; give a path you can write")
    if kind == "file" and absolute.is_file() and not os.access(absolute, os.W_OK):
        raise WritePathError(f"{what} {p} is read-only; give a path you can write")
    return p


def convert_to_safetensors_hint(path: Path) -> str:
    """The one-off command that converts a torch ``.pth`` state dict into the safetensors file nftbench loads."""
    out = path.with_suffix(".safetensors")
    return ("nftbench loads only safetensors (unpickling a .pth can run code). Convert it once, in a trusted "
            "environment: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path}', weights_only=True), '{out}')\", then pass {out}")
