"""Decoded-dataset caches, keyed by what they are made from.

A dataset is decoded once into ``<runs>/datasets/<tag>-<key>/`` (arrays + ``meta.json``), where ``key`` hashes the
resolved data root, so two data roots never share a cache. ``meta.json`` also records the source the loader read
(``watch``) and a stamp of its files (every file's relative path, size and modification time, read again on every
load: about half a second for CIFAR-10's 60,000 JPEGs): a cache whose source files changed since it was decoded is
stale and is decoded again; one that cannot be read (truncated,
damaged) is decoded again too, and if it still cannot be read the error names the folder and the fix. A cache
whose source is gone (raw files deleted after decoding) is still used: it can only be what that source held.
Building holds a lock (``<cache>.lock``), so processes starting together decode once; a killed decode leaves no
half-written cache (it is built in a sibling temporary folder and renamed when complete).

``nftbench cache ls`` lists the caches and their state; ``nftbench cache clean`` removes stale ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common.fileio import file_lock

T = TypeVar("T")
KEY = re.compile(r"-[0-9a-f]{10}$")
CLIP_CACHE = "video-clips"  # <runs>/video-clips: decoded clips, one per video file, keyed by its path and content


class CacheError(RuntimeError):
    """A dataset cache that cannot be used; the message names it and the fix."""


def root_key(root: str | os.PathLike) -> str:
    return hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:10]


def watched_paths(source: str) -> list[str]:
    """The file or folder a loader's ``source`` names (its first word, when that is an existing path): the files
    the cache was made from. Embedded datasets (sklearn digits, procedural sets) name none."""
    head = Path(source.split(" (")[0]).expanduser()
    return [str(head.resolve())] if head.is_absolute() and head.exists() else []


def files_stamp(paths: list[str]) -> str | None:
    """A fingerprint of every file under ``paths`` (relative path, size, mtime); None when one of them is gone."""
    digest = hashlib.sha256()
    for top in map(Path, paths):
        if top.is_file():
            files = [top]
        elif top.is_dir():
            files = walk_files(top)
        else:
            return None
        for f in files:
            try:
                st = f.stat()
            except OSError:  # a dangling link or a file removed while scanning
                continue
            digest.update(f"{f.relative_to(top) if f != top else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def walk_files(top: Path) -> list[Path]:
    """Every file under ``top``, in a fixed (sorted) order."""
    files = []
    for folder, dirs, names in os.walk(top):
        dirs.sort()
        files += [Path(folder) / n for n in sorted(names)]
    return files


def cache_state(cache: Path) -> str:
    """``ok``, ``ok (source gone)``, ``missing``, ``incomplete`` or ``stale (...)`` (decoded again before use)."""
    meta_path = cache / "meta.json"
    if not cache.is_dir():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "incomplete"
    if "stamp" not in meta:
        return "stale (decoded by an older nftbench, not keyed by its source files)"
    stamp = files_stamp(meta.get("watch", []))
    if stamp is None:
        return "ok (source gone)"
    if stamp != meta["stamp"]:
        return f"stale (files under {', '.join(meta['watch'])} changed since it was decoded)"
    return "ok"


def dataset_cache(cache_dir: str | os.PathLike, tag: str, root: str | os.PathLike, build: Callable[[Path], None],
                  load: Callable[[Path], T]) -> T:
    """``load(cache)`` of the cache of dataset ``tag`` from data root ``root``, (re)built by ``build(tmp)`` (which
    writes the arrays and a ``meta.json`` with the loader's ``source``) when missing, stale or unreadable."""
    cache = Path(cache_dir) / "datasets" / f"{tag}-{root_key(root)}"
    with file_lock(cache.with_name(cache.name + ".lock")):
        state = cache_state(cache)
        if state.startswith("ok"):
            try:
                return load(cache)
            except (ValueError, OSError, KeyError) as e:
                state = f"unreadable ({e})"
        if state != "missing":
            print(f"nftbench: dataset cache {cache} is {state}; decoding the dataset again", file=sys.stderr)
        rebuild(cache, build)
        try:
            return load(cache)
        except (ValueError, OSError, KeyError) as e:
            raise CacheError(f"dataset cache {cache} cannot be read right after decoding ({e}); check the free disk "
                             f"space, then run `nftbench cache clean --runs-dir {cache_dir}`") from None


def rebuild(cache: Path, build: Callable[[Path], None]) -> None:
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        meta = json.loads((tmp / "meta.json").read_text())
        watch = [p for p in watched_paths(str(meta.get("source", ""))) if not Path(p).is_relative_to(tmp.resolve())]
        meta.update(watch=watch, stamp=files_stamp(watch))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


@dataclass
class CacheEntry:
    path: Path
    state: str
    size_bytes: int
    source: str


def list_caches(runs_dir: str | os.PathLike) -> list[CacheEntry]:
    """Every folder under ``<runs>/datasets``: keyed caches with their state, older unkeyed ones, and temporary
    folders a killed decode left; and the per-video clip cache ``<runs>/video-clips``."""
    folder = Path(runs_dir) / "datasets"
    entries = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not p.is_dir():
            continue
        tmp = re.search(r"\.tmp(\d+)$", p.name)
        if tmp:
            state = ("decoding (process " + tmp.group(1) + ")" if pid_alive(int(tmp.group(1)))
                     else "incomplete (a decode that did not finish)")
        elif not KEY.search(p.name):
            state = "stale (decoded by an older nftbench, not keyed by its data root)"
        else:
            state = cache_state(p)
        try:
            source = str(json.loads((p / "meta.json").read_text()).get("source", ""))
        except (OSError, ValueError):
            source = ""
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        entries.append(CacheEntry(p, state, size, source))
    clips = Path(runs_dir) / CLIP_CACHE
    if clips.is_dir():
        size = sum(f.stat().st_size for f in clips.glob("*.npy"))
        entries.append(CacheEntry(clips, "ok (decoded clips, one per video file, keyed by its content)", size,
                                  "the video files of tasks.video_data"))
    return entries


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def clean_caches(runs_dir: str | os.PathLike, everything: bool = False) -> list[CacheEntry]:
    """Remove the stale and incomplete caches (``everything``: all of them but those being decoded now); returns what
    was removed. Victims and records are never touched."""
    removed = []
    for entry in list_caches(runs_dir):
        if entry.state.startswith("decoding") or not (everything or not entry.state.startswith("ok")):
            continue
        with file_lock(entry.path.with_name(entry.path.name + ".lock")):  # not while a process loads or builds it
            shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry)
    return removed
