"""Where a node keeps its files. One root (MIRRORHA_HOME, default /var/lib/mirrorha) so that the
lab can give each node its own tree while real servers use the default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/mirrorha")
DEFAULT_MODULE = "mirror"


def home_from_env() -> Path:
    return Path(os.environ.get("MIRRORHA_HOME", str(DEFAULT_HOME)))


@dataclass(frozen=True)
class Paths:
    """Layout of one node's files for one module.

    home/cluster.xml            node names and addresses per heartbeat network
    home/cluster.key            shared secret authenticating the peers (mode 0600)
    home/pki/                   cluster CA and node certificates (replication over mutual TLS)
    home/MODULE/conf/userconfig.xml
    home/MODULE/bin/start_prim, stop_prim
    home/MODULE/log/module.log, application.log
    home/MODULE/state.json      data generation and last role (survives restarts)
    home/MODULE/control.sock    local control API of the daemon
    """

    home: Path
    module: str = DEFAULT_MODULE

    @classmethod
    def from_env(cls, module: str = DEFAULT_MODULE) -> Paths:
        return cls(home_from_env(), module)

    @property
    def cluster_xml(self) -> Path:
        return self.home / "cluster.xml"

    @property
    def cluster_key(self) -> Path:
        return self.home / "cluster.key"

    @property
    def pki_dir(self) -> Path:
        """Cluster CA and node certificates for the replication channel (mutual TLS)."""
        return self.home / "pki"

    @property
    def module_dir(self) -> Path:
        return self.home / self.module

    @property
    def userconfig(self) -> Path:
        return self.module_dir / "conf" / "userconfig.xml"

    @property
    def bin_dir(self) -> Path:
        return self.module_dir / "bin"

    @property
    def log_dir(self) -> Path:
        return self.module_dir / "log"

    @property
    def module_log(self) -> Path:
        return self.log_dir / "module.log"

    @property
    def app_log(self) -> Path:
        return self.log_dir / "application.log"

    @property
    def state_file(self) -> Path:
        return self.module_dir / "state.json"

    @property
    def control_socket(self) -> Path:
        return self.module_dir / "control.sock"
