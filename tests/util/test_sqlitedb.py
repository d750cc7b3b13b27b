"""Opening a shared store while another process switches it to WAL waits instead of failing."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from serving.util import sqlite as sqlitedb


class _Flaky:
    """A connection whose first `busy` WAL switches answer "database is locked" (SQLite's immediate BUSY)."""

    def __init__(self, conn: sqlite3.Connection, busy: int, message: str) -> None:
        self.conn = conn
        self.busy = busy
        self.message = message
        self.tries = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "PRAGMA journal_mode=WAL":
            self.tries += 1
            if self.tries <= self.busy:
                raise sqlite3.OperationalError(self.message)
        return self.conn.execute(sql, *args)

    def close(self) -> None:
        self.conn.close()


def _patch(monkeypatch: pytest.MonkeyPatch, busy: int, message: str = "database is locked") -> list[_Flaky]:
    made: list[_Flaky] = []
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> _Flaky:
        made.append(_Flaky(real(*args, **kwargs), busy, message))
        return made[-1]

    monkeypatch.setattr(sqlitedb.sqlite3, "connect", connect)
    return made


def test_a_locked_wal_switch_is_retried_until_it_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _patch(monkeypatch, busy=3)
    conn = sqlitedb.connect_wal(tmp_path / "db.sqlite", timeout_s=5.0)
    assert made[0].tries == 4
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_other_errors_and_a_lock_past_the_timeout_still_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch(monkeypatch, busy=1, message="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        sqlitedb.connect_wal(tmp_path / "a.sqlite", timeout_s=5.0)
    _patch(monkeypatch, busy=10_000)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlitedb.connect_wal(tmp_path / "b.sqlite", timeout_s=0.05)
