"""Which process names a `<proc name=...>` check matches, and how checks are accepted."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errd import ProcCount, ProcessWatch, matches


def test_command_name_matches_exactly() -> None:
    assert matches("postgres", "postgres", ["/usr/lib/postgresql/15/bin/postgres"])
    assert not matches("postgres", "postgresql", ["/usr/bin/postgresql"])
    assert not matches("postgres", "pg", None)


def test_truncated_command_name_matches_a_long_configured_name() -> None:
    assert matches("my-long-daemon-name", "my-long-daemon-", ["python3"])
    assert not matches("my-long-daemon-name", "my-long-daemon", ["python3"])


def test_argv0_basename_matches() -> None:
    assert matches("myapp", "python3", ["/opt/myapp/bin/myapp", "--serve"])
    assert not matches("myapp", "python3", ["python3", "myapp.py"])
    assert not matches("myapp", "kworker/0:1", [])


def test_checks_may_be_tuples_or_objects_with_the_config_fields() -> None:
    @dataclass(frozen=True)
    class Proc:
        name: str
        atleast: int
        action: str
        klass: str

    watch = ProcessWatch([Proc("vipt-none-such", 2, "stop", "prim")])

    assert watch.count() == [ProcCount("vipt-none-such", 0, 2, "stop", "prim")]
    assert watch.count()[0].below


def test_no_checks_count_nothing() -> None:
    assert ProcessWatch([]).count() == []
