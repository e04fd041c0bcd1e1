"""The console's Flask application: `create_app()` wires the API, the peer API, the health
checks and the HTML pages (appliance.console.views, the UI's blueprint), and turns every error
of an API route into `{"error": {"code", "message", "fields"}}` — never a traceback."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask.typing import ResponseReturnValue
from markupsafe import escape
from werkzeug.exceptions import HTTPException

from appliance.console import auth
from appliance.console.api import Console, api, health, peer_api
from appliance.console.node import ConsoleError, LocalNode
from appliance.console.peer import CONSOLE_PORT
from appliance.errors import MirrorhaError
from appliance.paths import home_from_env

log = logging.getLogger("mirrorha.console")

# Served whether or not an admin password is set: load balancers, and a peer asking who we are.
OPEN_WITHOUT_PASSWORD = ("/health", "/primary", "/secondary", "/api/v1/hello")
MAX_REQUEST_BYTES = 2 << 20  # the largest body is a module's three files


def create_app(paths_home: Path | None = None, *, node: str | None = None,
               peer_port: int = CONSOLE_PORT, limiter: auth.LoginLimiter | None = None
               ) -> Flask:
    home = paths_home or home_from_env()
    files = auth.ConsoleFiles(home)
    local = LocalNode(home, node)
    app = Flask(__name__, static_folder=None)  # assets: the UI blueprint's /assets
    app.extensions["mirrorha"] = Console(home, local, files, peer_port,
                                         limiter or auth.LoginLimiter())
    app.config.update(
        SECRET_KEY=auth.secret_key(files),
        # One cookie name per node: two consoles reached on one host name (the lab's forwarded
        # ports on 127.0.0.1) must not overwrite each other's session.
        SESSION_COOKIE_NAME=f"mirrorha-{local.name}",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=auth.SESSION_LIFETIME_S),
        MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES,
        JSON_SORT_KEYS=False,
    )
    app.json = _HtmlSafeJson(app)
    # "//" must not be merged into a redirect: a path parameter is never empty.
    app.url_map.merge_slashes = False
    app.register_blueprint(api)
    app.register_blueprint(peer_api)
    app.register_blueprint(health)
    from appliance.console import views  # the HTML pages (the UI's blueprint)
    app.register_blueprint(views.bp)
    app.before_request(_require_password)
    app.after_request(_security_headers)
    app.register_error_handler(ConsoleError, _console_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(MirrorhaError, _mirrorha_error)
    app.register_error_handler(Exception, _unexpected)
    return app


class _HtmlSafeJson(DefaultJSONProvider):
    """JSON whose <, > and & are escaped (\u003c...): a log line or a script shown as text
    stays inert even if a response is ever sniffed or embedded as HTML."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        text = super().dumps(obj, **kwargs)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _is_api() -> bool:
    return request.path.startswith(("/api/", "/peer/")) or request.path in OPEN_WITHOUT_PASSWORD


def _require_password() -> ResponseReturnValue | None:
    """No default password: until `mirrorha console passwd` has run, only the open endpoints
    and the peer API (certificate-authenticated; join checks the password itself) answer."""
    files: auth.ConsoleFiles = _console().files
    if auth.has_password(files) or request.path in OPEN_WITHOUT_PASSWORD or \
            (request.path.startswith("/peer/") and request.path != "/peer/v1/join"):
        return None
    message = ("no admin password is set on this node: run `mirrorha console passwd` there "
               "(as root), then reload this page")
    if _is_api():
        raise ConsoleError(503, "no_password", message)
    return Response(f"<!doctype html><title>mirrorha console</title><h1>mirrorha console of "
                    f"{escape(_console().local.name)}</h1><p>{escape(message)}</p>",
                    status=503, mimetype="text/html")


def _security_headers(resp: Response) -> Response:
    # Pages load only their own assets; nothing may frame them (clickjacking of the menus).
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    # Answers and pages (which carry the session's CSRF token) stay out of every cache;
    # the stylesheet and the script may be cached.
    if not request.path.startswith("/assets/"):
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def _console() -> Console:
    from flask import current_app
    return current_app.extensions["mirrorha"]  # type: ignore[no-any-return]


def _json_error(status: int, code: str, message: str, fields: list[Any] | None = None
                ) -> ResponseReturnValue:
    resp = jsonify({"error": {"code": code, "message": message, "fields": fields or []}})
    resp.status_code = status
    return resp


def _console_error(e: ConsoleError) -> ResponseReturnValue:
    resp = jsonify(e.body())
    resp.status_code = e.status
    if e.status == 429:
        resp.headers["Retry-After"] = "60"
    return resp


def _http_error(e: HTTPException) -> ResponseReturnValue:
    if not _is_api():
        return e
    code = (e.name or "error").lower().replace(" ", "_")
    return _json_error(e.code or 500, code, e.description or e.name)


def _mirrorha_error(e: MirrorhaError) -> ResponseReturnValue:
    """An operator-level failure (a file the console could not write, say): one sentence."""
    if not _is_api():
        return Response(escape(str(e)), status=500, mimetype="text/plain")
    return _json_error(500, "failed", str(e))


def _unexpected(e: Exception) -> ResponseReturnValue:
    log.exception("unexpected error in %s %s", request.method, request.path)
    if not _is_api():
        return Response("internal error (see the console's log)", status=500,
                        mimetype="text/plain")
    return _json_error(500, "internal", f"internal error: {type(e).__name__}: {e}")
