"""`mirrorha console`: the console under gunicorn, HTTPS on :9010.

One worker with 8 threads (gthread): the login rate limiter and other in-memory state live in
one process, and a log follow (up to 10 s) holds a thread, not the server.

TLS. gunicorn's gthread worker wraps every accepted connection with `ssl_context(cfg)`, which
calls the `ssl_context` hook for each connection (gunicorn/sock.py `ssl_wrap_socket`, checked
in 27.0). Our hook returns a context cached by the (mtime, size) of tls.pem, tls.key and the
cluster CA: replacing the certificate when the cluster is created (PUT /api/v1/nodes) takes
effect on the next connection, without a restart, and unchanged files cost one stat each.
A pair that fails to load (caught between the key's and the certificate's replacement) keeps
the previous context.

Client certificates: optional (browsers are not asked to choose one; CERT_OPTIONAL) and, when
the cluster CA exists, verified against it alone: a client presenting a certificate of another
CA fails the handshake, and the peer API (/peer/v1) answers 403 to a client without one.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from appliance.console import auth
from appliance.console.node import node_name
from appliance.paths import home_from_env
from appliance.replication.tls import CA_CERT

DEFAULT_BIND = "0.0.0.0:9010"


class TlsContexts:
    """The server's SSL context, rebuilt when one of its files changes."""

    def __init__(self, files: auth.ConsoleFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._ctx: ssl.SSLContext | None = None

    def _stamp(self) -> tuple[Any, ...]:
        out = []
        for path in (self.files.tls_cert, self.files.tls_key, self.files.pki / CA_CERT):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def get(self) -> ssl.SSLContext:
        with self._lock:
            stamp = self._stamp()
            if self._ctx is None or stamp != self._key:
                try:
                    self._ctx = self._build()
                    self._key = stamp
                except (ssl.SSLError, OSError):
                    if self._ctx is None:
                        raise
            return self._ctx

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.files.tls_cert), str(self.files.tls_key))
        ca = self.files.pki / CA_CERT
        if ca.is_file():
            # Only the cluster CA: never the system's public CAs.
            ctx.load_verify_locations(cafile=str(ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
            # As strict as the replication channel's (tls._common): our certificates are
            # RFC 5280 clean, so a client certificate that is not is no peer of ours.
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx


class ConsoleServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Any, bind: str, files: auth.ConsoleFiles,
                 extra: dict[str, Any] | None = None) -> None:
        self.application = app
        self.contexts = TlsContexts(files)
        self.options: dict[str, Any] = {
            "bind": [bind],
            "workers": 1,
            "worker_class": "gthread",
            "threads": 8,
            # gunicorn needs the files named to switch TLS on; our hook builds the context.
            "certfile": str(files.tls_cert),
            "keyfile": str(files.tls_key),
            "ssl_context": self._ssl_context,
            "timeout": 120,  # a deploy restarting a daemon, a snapshot of big logs
            "graceful_timeout": 5,
            "accesslog": "-",
            "errorlog": "-",
            "loglevel": "info",
            "proc_name": "mirrorha-console",
            # gunicorn >= 25.1 opens a control socket in $HOME by default: two consoles of the
            # lab share /root, and nothing here uses it.
            "control_socket_disable": True,
            **(extra or {}),
        }
        super().__init__()

    def _ssl_context(self, _conf: Any, _default: Callable[[], ssl.SSLContext]
                     ) -> ssl.SSLContext:
        return self.contexts.get()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings newer than the installed gunicorn: skip
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


def run(bind: str = DEFAULT_BIND, home: Path | None = None,
        extra: dict[str, Any] | None = None) -> int:
    from appliance.console.app import create_app
    home = home or home_from_env()
    files = auth.ConsoleFiles(home)
    node = node_name()
    if (files.pki / f"{node}.pem").is_file():
        # The cluster was made (or imported with `mirrorha cluster import`) before this start:
        # serve its certificate, or the peer console would refuse us as a stranger.
        auth.install_cluster_cert(files, node)
    else:
        auth.ensure_bootstrap_cert(files, node)
    if not auth.has_password(files):
        print("mirrorha console: no admin password yet; set it with `mirrorha console passwd` "
              "(until then only /health answers)", flush=True)
    # Both nodes serve their console on the same port (one installation, two servers): the
    # peer is reached on the port this one listens on.
    app = create_app(home, peer_port=int(bind.rpartition(":")[2]))
    os.environ.setdefault("SERVER_SOFTWARE", "mirrorha-console")
    ConsoleServer(app, bind, files, extra).run()
    return 0
