"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests, latency, batch sizes, queue depth and errors per route and backend."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lsml_requests_total", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "lsml_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "lsml_batch_size",
            "Items per forward call",
            ["backend"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "lsml_forward_seconds",
            "Time in forward per batch",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "lsml_queue_depth", "Items waiting for a model", ["backend"], registry=self.registry
        )
        self.errors = Counter(
            "lsml_errors_total",
            "Errors by route or backend and kind",
            ["where", "kind"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "lsml_tasks_total", "Tasks predicted, by outcome", ["outcome"], registry=self.registry
        )
        self.regions_dropped = Counter(
            "lsml_regions_dropped_total",
            "Regions dropped by config validation",
            ["backend"],
            registry=self.registry,
        )
        self._cache_metrics()
        self._admission_metrics()
        self._memory_metrics()

    def _cache_metrics(self) -> None:
        """Image embeddings of promptable models and chunks of split requests."""
        # Image embeddings of promptable models (serving/util/embeddings.py), per model.
        self.embedding_hits = Counter(
            "lsml_embedding_cache_hits_total",
            "Prompts answered from a cached image embedding (no encode)",
            ["backend"],
            registry=self.registry,
        )
        self.embedding_misses = Counter(
            "lsml_embedding_cache_misses_total",
            "Image embeddings computed (one encoder run per image)",
            ["backend"],
            registry=self.registry,
        )
        self.embedding_evictions = Counter(
            "lsml_embedding_cache_evictions_total",
            "Image embeddings dropped to stay within EMBEDDING_CACHE_BYTES",
            ["backend"],
            registry=self.registry,
        )
        self.embedding_bytes = Gauge(
            "lsml_embedding_cache_bytes", "Bytes of image embeddings held", registry=self.registry
        )
        self.embedding_entries = Gauge(
            "lsml_embedding_cache_entries", "Image embeddings held", registry=self.registry
        )

        self.split_chunks = Counter(
            "lsml_split_chunks_total",
            "Chunks of big /predict requests, by outcome (local: answered by the replica that split it)",
            ["outcome"],
            registry=self.registry,
        )

    def _admission_metrics(self) -> None:
        """Requests waiting for room in a model's queue, their wait and the refused ones."""
        # Admission (issue #32): requests waiting for room in a model's queue.
        self.admission_waiting = Gauge(
            "lsml_admission_waiting_items",
            "Items of requests waiting for room in a model's queue",
            ["backend"],
            registry=self.registry,
        )
        self.admission_wait = Histogram(
            "lsml_admission_wait_seconds",
            "Time a request waited for room for all its items, per lane (urgent: interactive and small)",
            ["backend", "lane"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.admission_rejected = Counter(
            "lsml_admission_rejected_total",
            "Requests refused (503) because their items could not get through the queue in time",
            ["backend"],
            registry=self.registry,
        )

    def _memory_metrics(self) -> None:
        """The GPU memory budget: models on the device, their bytes, offloads (serving/inference/residency.py)."""
        self.resident_models = Gauge(
            "lsml_resident_models",
            "Loaded models whose weights are on the model device",
            registry=self.registry,
        )
        self.resident_bytes = Gauge(
            "lsml_resident_bytes",
            "Bytes of model weights on the model device (counted against the GPU memory budget)",
            registry=self.registry,
        )
        self.evictions = Counter(
            "lsml_model_evictions_total",
            "Idle models offloaded to CPU memory to make room under the GPU memory budget",
            ["backend"],
            registry=self.registry,
        )

    def observe_wait(self, backend: str, lane: str, seconds: float) -> None:
        """Record how long a request waited for room."""
        self.admission_wait.labels(backend, lane).observe(seconds)

    def observe_batch(self, backend: str, size: int, seconds: float) -> None:
        """Record one forward call."""
        self.batch_size.labels(backend).observe(size)
        self.forward_seconds.labels(backend).observe(seconds)

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return generate_latest(self.registry)
