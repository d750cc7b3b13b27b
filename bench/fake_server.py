"""A gunicorn-servable app over the fake NER backend, for load and fault tests (no real model)."""

from __future__ import annotations

import logging

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.support.fakes import FAMILIES, FakeNER, FakeResolver

logging.basicConfig(level=logging.WARNING)
# A model that takes 5 ms per batch: enough for queues to build under 64 clients.
FakeNER.forward_delay_s = 0.005
_settings = Settings.from_env()
app = create_app(_settings, runtime=Runtime(_settings, families=FAMILIES, resolver=FakeResolver()))
