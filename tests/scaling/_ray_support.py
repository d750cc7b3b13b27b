"""A real local Ray cluster for the Ray engine tests, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

# Logical CPUs: 4 on a 2-core machine, so two actors at 0.5 CPU fit beside Ray Data's read tasks.
NUM_CPUS = 4
OBJECT_STORE_BYTES = 160 * 1024 * 1024
ACTOR_CPUS = "0.5"
STALL_TIMEOUT_S = "60"  # a job that commits nothing for a minute fails instead of hanging CI


def ray_cluster() -> Iterator[str]:
    """Start Ray in this process (a fresh local cluster on the loopback); yield its GCS address.

    Stopped by ray.shutdown(), which ends the processes this init started and no others: never
    `ray stop`, which kills every Ray process on the host.
    """
    ray: Any = pytest.importorskip("ray", reason="ray[data] is not installed (requirements-ray.txt)")
    with pytest.MonkeyPatch.context() as mp:
        # Ray's gRPC servers listen on every interface whatever the node address, so the test cluster
        # keeps token auth on, with a fresh token that the drivers the tests start inherit
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.setenv("RAY_STALL_TIMEOUT_S", STALL_TIMEOUT_S)
        if ray.is_initialized():
            ray.shutdown()
        _reload_auth_settings()  # Ray read them when it was imported, maybe before this test
        context = ray.init(
            num_cpus=NUM_CPUS,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level="WARNING",
        )
        try:
            yield str(context.address_info["gcs_address"])
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
    _reload_auth_settings()


def _reload_auth_settings() -> None:
    """Make Ray re-read RAY_AUTH_* from the environment (what Ray's own tests do between clusters)."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


def normalize_ids(tasks: Any) -> Any:
    """Return the tasks with region ids renamed in order of appearance (ids are fresh per run)."""
    names: dict[str, str] = {}

    def walk(obj: Any) -> Any:
        if isinstance(obj, list):
            return [walk(x) for x in obj]
        if isinstance(obj, dict):
            out = {}
            for key, value in obj.items():
                if key in ("id", "parentID") and isinstance(value, str):
                    value = names.setdefault(value, f"r{len(names)}")
                out[key] = walk(value)
            return out
        return obj

    return walk(tasks)
