"""Stable hashes of configs: victim, run, trigger and cache ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(config: dict[str, Any], length: int = 12) -> str:
    """Stable hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
