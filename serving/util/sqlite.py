"""SQLite connections for the stores several threads, workers and replicas share (jobs, training)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def connect_wal(
    path: str | Path, timeout_s: float = 60.0, *, check_same_thread: bool = True
) -> sqlite3.Connection:
    """Open a database in WAL mode (autocommit; BEGIN IMMEDIATE for writes), waiting out a mode change.

    Switching a new database to WAL answers "database is locked" at once, without SQLite's busy
    handler, when another connection is opening it at the same moment (two replicas, or a trainer
    polling for the store a request is creating): retry that until the timeout instead of failing.
    """
    conn = sqlite3.connect(
        str(path), timeout=timeout_s, isolation_level=None, check_same_thread=check_same_thread
    )
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(delay)
            delay = min(0.2, delay * 2)
    # NORMAL in WAL mode survives a killed process (only a power loss can drop the last commits).
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn
