"""The cluster key: a shared secret that authenticates heartbeats between the two nodes.

Created once on one node (`mirrorha cluster init`), copied to the other
(`mirrorha cluster export` there → `mirrorha cluster import` here). A node without it refuses
to start: running unauthenticated would let anyone on the network steer the cluster.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from appliance.errors import MirrorhaError

KEY_BYTES = 32


class KeyError_(MirrorhaError):
    """The cluster key is missing or malformed."""


def create_cluster_key(path: Path, *, force: bool = False) -> bytes:
    if path.exists() and not force:
        raise KeyError_(
            f"{path}: a cluster key already exists; refusing to replace it (the peer would no "
            "longer be trusted). Use --force to create a new one, then import it on the peer."
        )
    key = secrets.token_bytes(KEY_BYTES)
    write_cluster_key(path, key.hex())
    return key


def write_cluster_key(path: Path, text: str) -> bytes:
    key = parse_key(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(tmp, path)
    return key


def parse_key(text: str, origin: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyError_(f"{origin}: cluster key is not hexadecimal") from None
    if len(key) != KEY_BYTES:
        raise KeyError_(f"{origin}: cluster key must be {KEY_BYTES} bytes, found {len(key)}")
    return key


def load_cluster_key(path: Path) -> bytes:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KeyError_(
            f"{path}: no cluster key. Run `mirrorha cluster init` on one node, then "
            "`mirrorha cluster export` there and `mirrorha cluster import` on the other."
        ) from None
    return parse_key(text, str(path))
