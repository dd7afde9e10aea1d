"""Checkpoints are ``model.safetensors`` plus a JSON sidecar. Nothing here ever unpickles a file."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model; the message says why."""


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a half-written file nor a stray temporary
        raise


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, sidecar: dict[str, Any],
                    sidecar_name: str = "checkpoint.json") -> Path:
    """Write ``model.safetensors`` (then the sidecar) atomically into ``directory``."""
    d = Path(directory)
    save_tensors(d / "model.safetensors", model.state_dict(), metadata={"format": "nftbench"})
    atomic_write_text(d / sidecar_name, json.dumps(sidecar, indent=1, default=str))
    return d / "model.safetensors"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> Path:
    """Write ``tensors`` (detached, on the CPU) as a safetensors file, atomically: a temporary file renamed into
    place, so a reader never sees half a file and a file's presence means it is complete."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def check_safetensors_file(path: Path) -> None:
    """Refuse anything that is not a well-formed safetensors file (pickles, zips, truncated files)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[8:9] != b"{"):  # a header length can end in 0x80
        raise CheckpointError(
            f"{path} is a pickle/torch.save file; nftbench loads only safetensors (pickles can run code). "
            "Convert it once, in a trusted environment, with safetensors.torch.save_file(state_dict, ...)."
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"{path} is not a safetensors file (bad header); re-save it with safetensors")
    (header_len,) = struct.unpack("<Q", head[:8])
    if 8 + header_len > size:
        raise CheckpointError(f"{path} is truncated ({size} bytes, header says more); copy it again")


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    check_safetensors_file(p)
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is corrupt or truncated ({e}); copy or re-create it") from e


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load weights into ``model``; any missing, unexpected or mis-shaped tensor is one clear error."""
    state = load_state(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        raise CheckpointError(
            f"{path} does not fit this architecture: {'; '.join(parts)}. Check --model/--dataset match the "
            "ones the checkpoint was trained with (see its JSON sidecar)."
        )
    model.load_state_dict(state)
    return model


def cached_tensors(folder: str | os.PathLike, stem: str, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``<folder>/<stem>.safetensors`` and its JSON sidecar ``<stem>.json`` (a trigger, a trained encoder), built
    first by ``build() -> (tensors, info)`` when absent. Locked (:func:`common.fileio.dir_lock`), so concurrent workers
    build it once; the sidecar is written first and the tensors last, so an interrupted build is built again."""
    from common.fileio import dir_lock

    d = Path(folder)
    path, sidecar = d / f"{stem}.safetensors", d / f"{stem}.json"
    if not (path.is_file() and sidecar.is_file()):
        with dir_lock(d):
            if not (path.is_file() and sidecar.is_file()):
                tensors, info = build()
                atomic_write_text(sidecar, json.dumps(info, indent=1, default=str))
                save_tensors(path, tensors)
    return load_state(path), json.loads(sidecar.read_text())


def save_state_tree(path: str | os.PathLike, tree: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write a nested state (dicts, lists, tuples, numbers, strings, tensors: an optimiser's or a schedule's
    ``state_dict``) as one safetensors file: the tensors as tensors, the rest as JSON in the file's metadata, so no
    pickle is ever needed to read it back (:func:`load_state_tree`). Atomic, like :func:`save_tensors`."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    return save_tensors(path, tensors, metadata={**(metadata or {}), "state_tree": json.dumps(encoded)})


def load_state_tree(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """The nested state :func:`save_state_tree` wrote, and the file's other metadata."""
    p = Path(path)
    tensors = load_state(p)
    with safe_open(str(p), "pt") as f:
        metadata = dict(f.metadata() or {})
    if "state_tree" not in metadata:
        raise CheckpointError(f"{p} holds tensors but no saved state (no 'state_tree' metadata); it is not a "
                              "training state nftbench wrote")
    return _decode(json.loads(metadata.pop("state_tree")), tensors), metadata


def _encode(x: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        tensors[where] = x
        return {"$tensor": where}
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, f"{where}/{k}", tensors) for k, v in x.items()}
        return {"$items": [[k, _encode(v, f"{where}/{i}", tensors)] for i, (k, v) in enumerate(x.items())]}
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(x)]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot save {type(x).__name__} at {where or '/'}: a saved state holds only tensors, numbers, "
                    "strings, lists and dicts")


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if "$tensor" in x:
        return tensors[x["$tensor"]]
    if "$tuple" in x:
        return tuple(_decode(v, tensors) for v in x["$tuple"])
    if "$items" in x:
        return {k: _decode(v, tensors) for k, v in x["$items"]}
    return {k: _decode(v, tensors) for k, v in x.items()}
