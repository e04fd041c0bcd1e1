"""The console's HTML pages (blueprint `bp`, registered by create_app in app.py).

The pages are shells rendered on the server (navigation, this node's name, the CSRF token in a
<meta>); what they show comes from the REST API through static/console.js, so every action a
page offers is one an API client can do too. Log lines and file contents reach the page only as
text (JavaScript textContent / textarea values; Jinja autoescaping for anything rendered here).
"""

from __future__ import annotations

from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, abort, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from appliance.console import auth
from appliance.console.node import node_name
from appliance.paths import DEFAULT_MODULE

bp = Blueprint("ui", __name__, template_folder="templates", static_folder="static",
               static_url_path="/assets")

LOG_KINDS = ("module", "application")
# The files the advanced page edits, in the order shown (keys of the config API's "files").
ADVANCED_FILES = ("bin/start_prim", "bin/stop_prim", "conf/userconfig.xml")
# Node names come from cluster.xml, which validates them; this only keeps URLs tidy.
_NODE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def logged_in() -> bool:
    return auth.current_user() is not None


def login_required(view: Any) -> Any:
    """Pages need the session too (the API refuses without it anyway); go to /login and back."""
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        if not logged_in():
            return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)
    return wrapper


def safe_next(target: str | None) -> str:
    """Only a path on this console: a crafted ?next= must not send the browser elsewhere.
    Browsers read a backslash as a slash (`/\\host` is `//host`) and drop tabs and newlines,
    so neither may appear, nor an encoded backslash that a later decoding could reveal."""
    if not target:
        return url_for("ui.dashboard")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") \
            or "\\" in target or "%5c" in target.lower() or \
            any(ord(ch) < 0x20 or ord(ch) == 0x7f for ch in target):
        return url_for("ui.dashboard")
    return target


def page(template: str, name: str, **context: Any) -> str:
    """Every page gets this node's name, the module and the page key console.js dispatches on."""
    return render_template(template, page=name, node=node_name(),
                           module=request.args.get("module", DEFAULT_MODULE),
                           csrf_token=auth.csrf_token(), **context)


@bp.get("/login")
def login() -> ResponseReturnValue:
    if logged_in():
        return redirect(safe_next(request.args.get("next")))
    return page("login.html", "login", next=safe_next(request.args.get("next")))


@bp.post("/login")
def login_without_script() -> ResponseReturnValue:
    """The page logs in through the JSON API; a form posted before its script ran (or with
    scripts off) lands back on the page, which says what it needs."""
    return page("login.html", "login", next=safe_next(request.args.get("next")),
                needs_script=True), 400


@bp.get("/")
@login_required
def dashboard() -> ResponseReturnValue:
    return page("dashboard.html", "dashboard")


@bp.get("/cluster")
@login_required
def cluster() -> ResponseReturnValue:
    return page("cluster.html", "cluster")


@bp.get("/module")
@login_required
def module() -> ResponseReturnValue:
    return page("module.html", "module")


@bp.get("/logs")
@login_required
def logs_default() -> ResponseReturnValue:
    return redirect(url_for("ui.logs", node_=node_name(), kind="module"))


@bp.get("/logs/<node_>/<kind>")
@login_required
def logs(node_: str, kind: str) -> ResponseReturnValue:
    if kind not in LOG_KINDS or not node_ or not set(node_) <= _NODE_NAME_CHARS:
        abort(404)
    return page("logs.html", "logs", log_node=node_, log_kind=kind, log_kinds=LOG_KINDS)


@bp.get("/advanced")
@login_required
def advanced() -> ResponseReturnValue:
    return page("advanced.html", "advanced", files=ADVANCED_FILES)
