"""The cluster key: a shared secret that authenticates heartbeats between the two nodes.

Created once on one node (`mirrorha cluster init`), copied to the other
(`mirrorha cluster export` there → `mirrorha cluster import` here). A node without it refuses
to start: running unauthenticated would let anyone on the network steer the cluster.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import MirrorhaError
from appliance.files import write_atomic
from appliance.paths import Paths

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
    write_atomic(path, (key.hex() + "\n").encode(), 0o600)
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


def init_cluster(paths: Paths, nodes: Sequence[str], *, force: bool = False) -> None:
    """Everything the two nodes share, created once on one node: the heartbeat key, the cluster
    CA and a certificate for each node."""
    from appliance.replication.tls import create_cluster_ca, issue_node_cert
    create_cluster_key(paths.cluster_key, force=force)
    if not (paths.pki_dir / "ca.pem").exists():
        create_cluster_ca(paths.pki_dir)
    for node in nodes:
        issue_node_cert(paths.pki_dir, node)


def export_bundle(paths: Paths, peer: str) -> str:
    """What the peer needs, as one text to copy: the key, the CA certificate (not its private
    key) and the peer's own certificate and key."""
    files = {name: (paths.pki_dir / name).read_text()
             for name in ("ca.pem", f"{peer}.pem", f"{peer}.key")
             if (paths.pki_dir / name).exists()}
    return json.dumps({"cluster_key": load_cluster_key(paths.cluster_key).hex(), "pki": files})


def import_bundle(paths: Paths, text: str, origin: str) -> None:
    """Install a bundle made by `export_bundle` (or a bare hexadecimal key)."""
    try:
        bundle = json.loads(text)
    except ValueError:
        write_cluster_key(paths.cluster_key, text)
        return
    if not isinstance(bundle, dict) or "cluster_key" not in bundle:
        raise KeyError_(f"{origin}: not a mirrorha cluster bundle")
    write_cluster_key(paths.cluster_key, str(bundle["cluster_key"]))
    paths.pki_dir.mkdir(parents=True, exist_ok=True)
    for name, content in dict(bundle.get("pki", {})).items():
        if "/" in name or name.startswith(".") or not name.endswith((".pem", ".key")):
            raise KeyError_(f"{origin}: unexpected file name {name!r} in the bundle")
        write_atomic(paths.pki_dir / name, str(content).encode(),
                     0o600 if name.endswith(".key") else 0o644)
