"""A node's MIRRORHA_HOME in a temporary directory, as the lab writes it (cluster.xml,
userconfig.xml with a replicated directory, cluster key and certificates), for tests that build
a real Daemon without running it."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.keys import init_cluster
from appliance.lab import Lab, LabSettings, cluster_xml, userconfig_xml
from appliance.paths import Paths


def node_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node: str = "node1") -> Paths:
    paths = Paths(tmp_path / "home")
    paths.userconfig.parent.mkdir(parents=True)
    paths.cluster_xml.write_text(cluster_xml(Lab.NODES))
    data = tmp_path / "data"
    data.mkdir()
    paths.userconfig.write_text(userconfig_xml(LabSettings(replicated_dirs=(str(data),)),
                                               Lab.VIP))
    init_cluster(paths, Lab.NODES)
    monkeypatch.setenv("MIRRORHA_NODE", node)
    return paths
