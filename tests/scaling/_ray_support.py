"""A real local Ray cluster for the Ray engine tests, started and stopped by the tests themselves."""

from __future__ import annotations

import os
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
        # tests only: a cluster that lives on the loopback for the test's lifetime needs no token
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_STALL_TIMEOUT_S", STALL_TIMEOUT_S)
        if ray.is_initialized():
            ray.shutdown()
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
