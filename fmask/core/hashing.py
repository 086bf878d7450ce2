"""Content hashes and seals: every artifact records the hashes of what made it, and every JSON artifact carries a
seal (the hash of its other keys) so a changed bit is refused on read."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

FORMAT_VERSION = 1  # every artifact's format version; a reader refuses another
SEAL_KEY = "content_sha256"  # in JSON artifacts: hash of every other key, so a changed bit is refused on read


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def seal_json(obj: dict) -> dict:
    """``obj`` with :data:`SEAL_KEY` set to the hash of all its other keys (an earlier seal is replaced)."""
    body = {key: value for key, value in obj.items() if key != SEAL_KEY}
    return {**body, SEAL_KEY: sha256_json(body)}


def seal_matches(obj: Any) -> bool:
    """False only for a sealed JSON object whose content no longer matches its seal (unsealed ones pass)."""
    if not isinstance(obj, dict) or SEAL_KEY not in obj:
        return True
    return obj[SEAL_KEY] == sha256_json({key: value for key, value in obj.items() if key != SEAL_KEY})


def json_bytes(obj: Any) -> bytes:
    """How fmask writes every JSON artifact."""
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
