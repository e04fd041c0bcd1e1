"""The cluster PKI: nodes of one cluster authenticate each other by name, nobody else gets in."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from appliance.replication import tls
from appliance.replication.tls import TlsError

TIMEOUT_S = 5.0






def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              server_hostname: str) -> tuple[str | Exception, bytes | Exception]:
    """Run a real TLS handshake over a socketpair: the server reports the client's node name
    (or its error) and sends one byte; the client reports that byte (or its error)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(TIMEOUT_S)
    server_result: list[str | Exception] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as conn:
                server_result.append(tls.peer_node_name(conn.getpeercert()))
                conn.sendall(b"!")
        except (ssl.SSLError, OSError, TlsError) as e:
            server_result.append(e)
            a.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_result: bytes | Exception
    try:
        with client.wrap_socket(b, server_hostname=server_hostname) as conn:
            # TLS 1.3: the client finishes its handshake before the server has judged the
            # client certificate; a refusal shows on the first read.
            client_result = conn.recv(1) or ConnectionResetError("closed without data")
    except (ssl.SSLError, OSError) as e:
        client_result = e
    finally:
        b.close()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "server side of the handshake did not finish"
    return server_result[0], client_result


def test_nodes_of_one_cluster_connect_and_learn_each_others_names(pki: Path) -> None:
    server_side, client_side = handshake(tls.server_context(pki, "node2"),
                                         tls.client_context(pki, "node1", "node2"), "node2")
    assert server_side == "node1"
    assert client_side == b"!"


def test_roles_swap_after_failover(pki: Path) -> None:
    server_side, client_side = handshake(tls.server_context(pki, "node1"),
                                         tls.client_context(pki, "node2", "node1"), "node1")
    assert (server_side, client_side) == ("node2", b"!")


def test_client_with_a_foreign_ca_certificate_is_refused(pki: Path, foreign_pki: Path) -> None:
    # ca.pem is no secret: the intruder trusts our server, so only our server's check of the
    # client certificate stands in the way.
    intruder = tls.client_context(foreign_pki, "node1", "node2")
    intruder.load_verify_locations(cafile=str(pki / "ca.pem"))
    server_side, client_side = handshake(tls.server_context(pki, "node2"), intruder, "node2")
    assert isinstance(server_side, ssl.SSLCertVerificationError)
    assert isinstance(client_side, Exception)  # never got the server's byte


def test_server_with_a_foreign_ca_certificate_is_refused(pki: Path, foreign_pki: Path) -> None:
    impostor = tls.server_context(foreign_pki, "node2")
    impostor.load_verify_locations(cafile=str(pki / "ca.pem"))  # would accept our client
    server_side, client_side = handshake(impostor, tls.client_context(pki, "node1", "node2"),
                                         "node2")
    assert isinstance(client_side, ssl.SSLCertVerificationError)
    assert isinstance(server_side, Exception)


def test_server_certificate_for_another_node_name_is_refused(pki: Path) -> None:
    # node1's genuine certificate, but the primary wants to talk to node2.
    server_side, client_side = handshake(tls.server_context(pki, "node1"),
                                         tls.client_context(pki, "node1", "node2"), "node2")
    assert isinstance(client_side, ssl.SSLCertVerificationError)
    assert "node2" in str(client_side) or "Hostname mismatch" in str(client_side)
    assert isinstance(server_side, Exception)


def test_client_context_cannot_be_used_without_naming_the_peer(pki: Path) -> None:
    ctx = tls.client_context(pki, "node1", "node2")
    with socket.socket() as s, pytest.raises(ValueError, match="server_hostname"):
        ctx.wrap_socket(s)


def test_private_keys_are_readable_by_root_only(pki: Path) -> None:
    for name in ("ca.key", "node1.key", "node2.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name
    assert not list(pki.glob("*.tmp"))


def test_existing_ca_is_never_replaced(pki: Path) -> None:
    before = (pki / "ca.pem").read_bytes(), (pki / "ca.key").read_bytes()
    with pytest.raises(TlsError, match="already exists"):
        tls.create_cluster_ca(pki)
    assert ((pki / "ca.pem").read_bytes(), (pki / "ca.key").read_bytes()) == before


def test_node_certificate_needs_the_ca_key(tmp_path: Path, pki: Path) -> None:
    (tmp_path / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())  # a peer: no ca.key
    with pytest.raises(TlsError, match="no cluster CA here"):
        tls.issue_node_cert(tmp_path, "node3")
    assert not (tmp_path / "node3.key").exists()


@pytest.mark.parametrize("name", ["", "ca", "node_1", "-node", "node/../x", "a" * 64])
def test_names_unusable_in_a_certificate_are_refused(pki: Path, name: str) -> None:
    with pytest.raises(TlsError, match="cannot be a node name"):
        tls.issue_node_cert(pki, name)


def test_incomplete_pki_is_reported_with_the_missing_files(tmp_path: Path) -> None:
    tls.create_cluster_ca(tmp_path)
    with pytest.raises(TlsError, match=r"missing .*node1\.pem"):
        tls.server_context(tmp_path, "node1")
