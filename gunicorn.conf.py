"""gunicorn settings, read from the same Settings object as the app (WORKERS, THREADS, HOST, PORT)."""

from serving.settings import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
# Models load in each worker after the fork: never preload (CUDA does not survive fork).
preload_app = False
# Label Studio waits 100 s for /predict; let a long batch finish rather than kill the worker.
timeout = 120
graceful_timeout = 30
accesslog = "-"
loglevel = _settings.log_level.lower()


def worker_exit(server: object, worker: object) -> None:
    """On a worker's exit, let batch jobs and forwards in progress end (within graceful_timeout)."""
    from flask import Flask

    from serving.http.app import shutdown

    app = getattr(worker, "wsgi", None)
    if isinstance(app, Flask):
        shutdown(app, timeout=graceful_timeout - 5)
