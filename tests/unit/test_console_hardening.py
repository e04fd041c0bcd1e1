"""What a hostile reviewer tried against the console, as scenarios: stolen cookies, password
guessing (in parallel, behind a forged X-Forwarded-For, through the bootstrap join), crafted
redirects, certificates of the wrong node, huge or symlinked files, a hung peer, concurrent
deploys. Real gunicorn and TLS on loopback where the behaviour lives there."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.console import auth
from appliance.console.app import create_app
from tests.support.console import (
    PASSWORD,
    Api,
    console_home,
    free_port,
    running_console,
    unverified,
)


@pytest.fixture
def fresh(tmp_path: Path) -> Api:
    return Api(create_app(console_home(tmp_path / "home"), node="node1", peer_port=free_port()))


def _cookie(api: Api) -> str:
    cookie = api.client.get_cookie("mirrorha-node1", domain="localhost")
    assert cookie is not None
    return cookie.value


# -- sessions ----------------------------------------------------------------------------------


def test_a_cookie_copied_before_logout_is_dead_after_it(fresh: Api) -> None:
    fresh.login()
    stolen = _cookie(fresh)
    assert fresh.call("POST", "/api/v1/logout", {}).status_code == 200
    fresh.client.set_cookie("mirrorha-node1", stolen, domain="localhost")
    replay = fresh.call("GET", "/api/v1/session")
    assert replay.status_code == 401
    assert fresh.call("GET", "/").status_code == 302  # the pages too: back to /login


def test_changing_the_password_ends_every_session(fresh: Api) -> None:
    fresh.login()
    assert fresh.call("GET", "/api/v1/session").status_code == 200
    auth.set_password(fresh.app.extensions["mirrorha"].files, "another long password")
    assert fresh.call("GET", "/api/v1/session").status_code == 401
    assert fresh.login(PASSWORD).status_code == 401
    assert fresh.login("another long password").status_code == 200


def test_login_replaces_the_anonymous_session(fresh: Api) -> None:
    """Session fixation: what a visitor had before logging in (its cookie, its CSRF token) is
    not the logged-in session."""
    page = fresh.call("GET", "/login")
    anonymous = _cookie(fresh)
    token_before = page.data.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()
    fresh.login()
    assert _cookie(fresh) != anonymous and fresh.csrf != token_before
    fresh.client.set_cookie("mirrorha-node1", anonymous, domain="localhost")
    assert fresh.call("GET", "/api/v1/session").status_code == 401


# -- password guessing -------------------------------------------------------------------------


def _guess(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url + "/api/v1/login", method="POST", headers={
        "Content-Type": "application/json", **(headers or {})},
        data=json.dumps({"username": "admin", "password": "a wrong guess"}).encode())
    try:
        with urllib.request.urlopen(req, context=unverified(), timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_parallel_guesses_get_no_more_tries_than_sequential_ones(tmp_path: Path) -> None:
    """Sixteen guesses at once over the console's eight threads: still five wrong answers at
    most (the check and the count of an attempt are one step), the rest 429."""
    home = console_home(tmp_path / "home")
    with running_console(home, "node1", "127.0.0.1", free_port()) as url, \
            ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: _guess(url), range(16)))
    assert answers.count(401) <= auth.LOGIN_FAILURES, answers
    assert answers.count(429) >= 16 - auth.LOGIN_FAILURES, answers


def test_forwarded_headers_do_not_buy_more_guesses(tmp_path: Path) -> None:
    home = console_home(tmp_path / "home")
    with running_console(home, "node1", "127.0.0.1", free_port()) as url:
        for i in range(auth.LOGIN_FAILURES):
            assert _guess(url, {"X-Forwarded-For": f"203.0.113.{i}"}) == 401
        for spoof in ({"X-Forwarded-For": "203.0.113.99"}, {"X-Real-IP": "203.0.113.98"},
                      {"Forwarded": "for=203.0.113.97"}):
            assert _guess(url, spoof) == 429, spoof


# -- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/\\evil.example/", "/\t/evil.example/", "//evil.example",
                                    "https://evil.example/", "/%5Cevil.example"])
def test_next_never_leaves_the_console(fresh: Api, target: str) -> None:
    """Browsers read `/\\host` (and `/<tab>/host`, tabs being dropped) as `//host`."""
    query = {"next": target}
    page = fresh.call("GET", "/login", query_string=query)
    assert b'data-next="/"' in page.data, page.data
    fresh.login()
    again = fresh.call("GET", "/login", query_string=query)
    assert again.status_code == 302 and again.headers["Location"] == "/"
