"""The console's credentials: the admin password (hashed), the session key, CSRF tokens, the
login rate limit, and the certificate the console serves.

Files, in $MIRRORHA_HOME/console/ (all written atomically, secrets 0600):

    admin.json   {"user": "admin", "hash": "<werkzeug hash>"}   (`mirrorha console passwd`)
    secret.key   the key signing session cookies (created on first use)
    tls.pem/key  what the console serves: self-signed until the cluster exists, then the
                 node's cluster certificate (issued by the cluster CA in $MIRRORHA_HOME/pki)
"""

from __future__ import annotations

import datetime
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from flask import current_app, request, session
from werkzeug.security import check_password_hash, generate_password_hash

from appliance.console.node import ConsoleError
from appliance.errors import MirrorhaError
from appliance.files import write_atomic
from appliance.paths import Paths

ADMIN_USER = "admin"
MIN_PASSWORD = 8
LOGIN_FAILURES = 5  # per client address...
LOGIN_WINDOW_S = 60.0  # ...within this window, then 429 until the oldest failure ages out


class ConsoleFiles:
    def __init__(self, home: Path) -> None:
        self.dir = home / "console"
        self.admin = self.dir / "admin.json"
        self.secret = self.dir / "secret.key"
        self.tls_cert = self.dir / "tls.pem"
        self.tls_key = self.dir / "tls.key"
        self.pki = Paths(home).pki_dir


# -- admin password -----------------------------------------------------------------------------


def set_password(files: ConsoleFiles, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise MirrorhaError(f"the admin password must have at least {MIN_PASSWORD} characters")
    record = {"user": ADMIN_USER, "hash": generate_password_hash(password)}
    write_atomic(files.admin, json.dumps(record).encode() + b"\n")


def has_password(files: ConsoleFiles) -> bool:
    return files.admin.is_file()


def check_password(files: ConsoleFiles, username: str, password: str) -> bool:
    try:
        record = json.loads(files.admin.read_text())
    except (OSError, ValueError):
        return False
    # Always hash, whatever the user name: the answer's timing tells nothing about it.
    ok = check_password_hash(str(record.get("hash", "")), password)
    return ok and hmac.compare_digest(username.encode(), str(record.get("user")).encode())


def secret_key(files: ConsoleFiles) -> bytes:
    try:
        key = files.secret.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    write_atomic(files.secret, key)
    return key


# -- sessions and CSRF ------------------------------------------------------------------------

SESSION_LIFETIME_S = 12 * 3600  # also the cookie's (app.py PERMANENT_SESSION_LIFETIME)
MAX_SESSIONS = 1000


class Sessions:
    """The live logins, kept here: a signed cookie alone stays valid for its whole lifetime, so
    a copy taken before a logout or a password change would still work. The cookie carries a
    random id; only an id in here, made under the current password, is a session. In the
    worker's memory (one gunicorn worker): restarting the console ends every session."""

    def __init__(self, lifetime_s: float = SESSION_LIFETIME_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime_s = lifetime_s
        self.clock = clock
        self._live: dict[str, tuple[str, str, float]] = {}  # id -> user, password, expiry
        self._lock = threading.Lock()

    def create(self, user: str, password: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            for old in [k for k, (_, _, exp) in self._live.items() if exp <= now]:
                del self._live[old]
            while len(self._live) >= MAX_SESSIONS:  # the oldest login goes first
                del self._live[min(self._live, key=lambda k: self._live[k][2])]
            self._live[sid] = (user, password, now + self.lifetime_s)
        return sid

    def user(self, sid: str, password: str) -> str | None:
        """The session's user; None if it ended, expired or predates the current password."""
        with self._lock:
            entry = self._live.get(sid)
        if entry is None or entry[2] <= self.clock() or \
                not hmac.compare_digest(entry[1].encode(), password.encode()):
            return None
        return entry[0]

    def end(self, sid: str) -> None:
        with self._lock:
            self._live.pop(sid, None)


def password_stamp(files: ConsoleFiles) -> str:
    """What identifies the current password: its stored hash ("" without one)."""
    try:
        return str(json.loads(files.admin.read_text()).get("hash", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _console_state() -> Any:
    """The app's Console (api.py): its files and its Sessions."""
    return current_app.extensions["mirrorha"]


def start_session(user: str) -> str:
    """A fresh session (nothing carried over from before the login: no session fixation) with
    a new CSRF token."""
    c = _console_state()
    session.clear()
    session["sid"] = c.sessions.create(user, password_stamp(c.files))
    session["csrf_token"] = secrets.token_urlsafe(32)
    session.permanent = True
    return str(session["csrf_token"])


def current_user() -> str | None:
    sid = session.get("sid")
    if not isinstance(sid, str):
        return None
    c = _console_state()
    return c.sessions.user(sid, password_stamp(c.files))  # type: ignore[no-any-return]


def end_session() -> None:
    sid = session.get("sid")
    if isinstance(sid, str):
        _console_state().sessions.end(sid)
    session.clear()


def csrf_token() -> str:
    """The session's token, created for an anonymous visitor too (the login form carries it)."""
    if "csrf_token" not in session:
        session["csrf_token"] = secrets.token_urlsafe(32)
    return str(session["csrf_token"])


def csrf_ok() -> bool:
    expected = session.get("csrf_token")
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    return bool(expected) and hmac.compare_digest(str(expected).encode(), given.encode())


def api_login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """401 without a session; 403 on a state-changing request without the session's token."""
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            raise ConsoleError(401, "unauthorized", "log in first (POST /api/v1/login)")
        if request.method not in ("GET", "HEAD", "OPTIONS") and not csrf_ok():
            raise ConsoleError(403, "csrf", "missing or wrong X-CSRF-Token header")
        return view(*args, **kwargs)
    return wrapper


# -- login rate limit ---------------------------------------------------------------------------


class LoginLimiter:
    """At most LOGIN_FAILURES failed logins per client address within LOGIN_WINDOW_S. In the
    worker's memory: gunicorn runs one worker (with threads) so every request sees it."""

    def __init__(self, failures: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def attempt(self, client: str) -> float | None:
        """Count a login attempt of this client now, as a failure until `succeeded` says
        otherwise; or, if it already has too many, the seconds until it may try again (and
        nothing counted). One step under the lock: parallel guesses, each checked before any
        had failed, would each get a try."""
        with self._lock:
            times = self._recent(client)
            if len(times) >= self.failures:
                return max(0.0, times[0] + self.window_s - self.clock())
            times.append(self.clock())
            return None

    def succeeded(self, client: str) -> None:
        """The attempt had the right password: the client's failures are forgiven."""
        with self._lock:
            self._seen.pop(client, None)

    def _recent(self, client: str) -> deque[float]:
        times = self._seen.setdefault(client, deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        if len(self._seen) > 10_000:  # a scan from many addresses must not grow this forever
            for key in [k for k, v in self._seen.items() if not v and k != client]:
                del self._seen[key]
        return times


# -- the console's TLS certificate ---------------------------------------------------------


def ensure_bootstrap_cert(files: ConsoleFiles, node: str) -> None:
    """A self-signed certificate for the console until the cluster's replaces it."""
    if files.tls_cert.is_file() and files.tls_key.is_file():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{node} (mirrorha console, "
                                                               "self-signed)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(files.tls_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_atomic(files.tls_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def install_cluster_cert(files: ConsoleFiles, node: str) -> None:
    """Serve the node's cluster certificate from now on (the server reloads it on change)."""
    cert, key = files.pki / f"{node}.pem", files.pki / f"{node}.key"
    if not (cert.is_file() and key.is_file()):
        raise MirrorhaError(f"no cluster certificate for {node} in {files.pki}")
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Key first: the server reloads when the certificate changes, and must find the pair.
    write_atomic(files.tls_key, key.read_bytes())
    write_atomic(files.tls_cert, cert.read_bytes(), 0o644)
