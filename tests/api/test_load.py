"""Load on loopback: 64 concurrent clients against gunicorn with a bounded queue (marker slow)."""

from __future__ import annotations

import pytest

from bench.load_test import run


@pytest.mark.slow
def test_64_clients_get_only_200_or_503_with_retry_after() -> None:
    result = run(clients=64, duration_s=15, queue_size=16, threads=32)
    assert result["requests"] > 200
    assert set(result["statuses"]) <= {"200", "503"}, result["statuses"]
    assert result["problems"] == []
    assert result["p99_ms"] > 0
