"""The JSON body of a request: an object, or a 400 that says what is wrong."""

from __future__ import annotations

from typing import Any

from flask import request

from serving.errors import BadRequest
from serving.http.jsonio import loads


def json_body(empty: str = "the request body is empty; send a JSON object") -> dict[str, Any]:
    """Return the request's JSON object or raise a 400 that says what is wrong (`empty`: when there is none)."""
    raw = request.get_data(cache=True)
    if not raw:
        raise BadRequest(empty)
    try:
        body = loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body
