"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.replication import tls


def _cluster_pki(directory: Path) -> Path:
    tls.create_cluster_ca(directory)
    for node in ("node1", "node2"):
        tls.issue_node_cert(directory, node)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA with certificates for node1 and node2."""
    return _cluster_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another cluster whose nodes happen to have the same names."""
    return _cluster_pki(tmp_path_factory.mktemp("foreign"))
