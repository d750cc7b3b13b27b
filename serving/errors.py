"""Typed errors and their HTTP status, in one place."""

from __future__ import annotations


class ServingError(Exception):
    """Base error: carries an HTTP status and a message that says how to fix it."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, str | int]:
        """Return the JSON body sent to the client."""
        return {"status": self.status, "error": self.code, "message": self.message}


class BadRequest(ServingError):
    """The request body is malformed (not JSON, wrong shape)."""

    status = 400
    code = "bad_request"


class Unauthorized(ServingError):
    """Basic auth is on and the credentials are missing or wrong."""

    status = 401
    code = "unauthorized"


class NotFound(ServingError):
    """The resource (a job, a route) does not exist."""

    status = 404
    code = "not_found"


class PayloadTooLarge(ServingError):
    """The request exceeds a configured limit."""

    status = 413
    code = "payload_too_large"


class ConfigError(ServingError):
    """The labeling config cannot be parsed or has nothing this server can fill."""

    status = 422
    code = "config_error"


class ModelUnavailable(ServingError):
    """A model the config needs cannot be loaded (weights missing, load failed)."""

    status = 422
    code = "model_unavailable"


class TrainingUnavailable(ServingError):
    """Training was asked for but cannot run (nothing trainable, no Label Studio connection...)."""

    status = 422
    code = "training_unavailable"


class Overloaded(ServingError):
    """The batch queue is full; the client should retry after a short wait."""

    status = 503
    code = "overloaded"
    retry_after_s = 1

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        if retry_after_s is not None:
            self.retry_after_s = max(1, int(retry_after_s))


class InputError(Exception):
    """One task's input cannot be used (bad URL, corrupt image...): that task gets an empty result."""


class ForwardLengthError(RuntimeError):
    """A backend's batched hook returned a different number of outputs than inputs."""
