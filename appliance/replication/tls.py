"""Cluster PKI for the replication channel: a private CA and one certificate per node.

The channel is mutual TLS (1.3 only): each side proves it holds a certificate issued by the
cluster's own CA, and the primary also checks that the secondary's certificate carries the
secondary's NODE NAME (subjectAltName DNS:<node>, also the CN). No IP address is bound into a
certificate: nodes move between networks and the VIP moves, the name does not.

Key material, in one directory (MIRRORHA_HOME/pki)::

    ca.pem      the cluster CA certificate: every node needs it (trust anchor)
    ca.key      the CA private key (0600): needed only on the node that issues certificates,
                normally the one where the cluster was configured; it may be taken offline
    NODE.pem    NODE's certificate (CN = NODE, subjectAltName DNS:NODE), signed by the CA
    NODE.key    NODE's private key (0600)

Bootstrap: on one node `create_cluster_ca(dir)`, then `issue_node_cert(dir, node)` for BOTH
nodes; copy ca.pem, PEER.pem and PEER.key to the peer's pki directory (never ca.key). Keys are
EC P-256 (ECDSA with SHA-256): supported by every OpenSSL that Python's ssl module links to.

A certificate from another cluster's CA, or this CA's certificate for another name, is refused
by the handshake itself: the checks live in the SSL contexts built here, not in channel code.
"""

from __future__ import annotations

import datetime
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import MirrorhaError
from appliance.files import write_atomic

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 20 * 365  # the cluster CA lives as long as the cluster: no rotation machinery yet
NODE_DAYS = 10 * 365
# Node names as cluster.xml allows them (config.NAME_RULE), minus what cannot be a DNS name in
# a certificate (the `_`) and the name of the CA's own files.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,31})*")
_CLOCK_SKEW = datetime.timedelta(days=1)  # the peer's clock may be behind ours at issue time


class TlsError(MirrorhaError):
    """The cluster PKI is missing, incomplete or would be damaged by the requested action."""


def create_cluster_ca(directory: Path, *, name: str = "mirrorha cluster CA") -> None:
    """Create ca.key (0600) and ca.pem in `directory`; refuse if a CA is already there:
    replacing it would silently stop the peer from trusting this node."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    for path in (key_path, cert_path):
        if path.exists():
            raise TlsError(
                f"{path}: a cluster CA already exists; refusing to replace it (certificates "
                "issued by it, including the peer's, would no longer be trusted)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def issue_node_cert(directory: Path, node: str) -> None:
    """Create NODE.key (0600) and NODE.pem signed by the CA in `directory` (needs ca.key).

    Re-issuing replaces the node's pair: the CA stays the trust anchor, so the peer keeps
    trusting the node (copy the new pair to the node if it is the peer's)."""
    check_node_name(node)
    ca_key, ca_cert = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + datetime.timedelta(days=NODE_DAYS),
                             ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # Both roles: a node is the TLS server as secondary and the client as primary.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / f"{node}.key", key)
    write_atomic(directory / f"{node}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def server_context(directory: Path, node: str) -> ssl.SSLContext:
    """Context of the secondary's listener: presents NODE's certificate and requires a client
    certificate issued by the cluster CA (any cluster node; the channel compares the name the
    certificate carries with the peer it expects, see `peer_node_name`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, directory, node)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(directory: Path, node: str, peer: str) -> ssl.SSLContext:
    """Context of the primary's connection to `peer`: presents NODE's certificate and accepts
    only a server certificate from the cluster CA whose name is the peer's.

    The name is checked by OpenSSL against the `server_hostname` given when wrapping (trio:
    `trio.SSLStream(..., server_hostname=peer)`): check_hostname is on, so forgetting it is an
    error at connection time rather than a silently unchecked peer."""
    check_node_name(peer)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    _common(ctx, directory, node)
    return ctx


def peer_node_name(peer_cert: dict[str, object] | None) -> str:
    """The node name (DNS subjectAltName) of a verified peer certificate, as returned by
    `SSLObject.getpeercert()`; TlsError if there is none or more than one."""
    if not peer_cert:
        raise TlsError("the peer presented no certificate")
    san = peer_cert.get("subjectAltName", ())
    names = [value for kind, value in san if kind == "DNS"]  # type: ignore[attr-defined]
    if len(names) != 1:
        raise TlsError(f"the peer certificate names {len(names)} DNS names, expected one")
    return str(names[0])


def check_node_name(node: str) -> None:
    """A node name must be usable as the certificate's DNS name and as a file name here."""
    if not NODE_NAME_RE.fullmatch(node) or len(node) > 63 or node == "ca":
        raise TlsError(
            f"{node!r} cannot be a node name in a certificate (letters, digits, '-' and '.', "
            "at most 63 characters, not 'ca')")


def _common(ctx: ssl.SSLContext, directory: Path, node: str) -> None:
    check_node_name(node)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # our certificates are RFC 5280 clean: insist
    files = [directory / CA_CERT, directory / f"{node}.pem", directory / f"{node}.key"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise TlsError(f"cluster PKI incomplete for node {node!r}: missing {', '.join(missing)}")
    try:
        # Only the cluster CA is trusted: never the system's public CAs.
        ctx.load_verify_locations(cafile=str(files[0]))
        ctx.load_cert_chain(certfile=str(files[1]), keyfile=str(files[2]))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"cannot load the cluster PKI of node {node!r} from {directory}: {e}") \
            from None


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError as e:
        raise TlsError(
            f"{e.filename}: no cluster CA here; node certificates are issued on the node "
            "that holds ca.key (create it with create_cluster_ca)") from None
    except ValueError as e:
        raise TlsError(f"{directory}: unreadable cluster CA: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{key_path}: not an EC private key")
    return key, cert


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(path, pem, 0o600)


