"""Basic auth (the user and password set in Label Studio's model settings) and the routes open without it."""

from __future__ import annotations

import base64
import hmac

from flask import request

from serving.errors import Unauthorized
from serving.settings import Settings

# Routes that answer without basic auth: Label Studio's health probe, and project webhooks,
# which Label Studio sends without credentials (protected by WEBHOOK_SECRET instead).
OPEN_ROUTES = {"/health", "/webhook"}


def check_basic_auth(settings: Settings) -> None:
    """Raise Unauthorized unless the request carries BASIC_AUTH_USER/BASIC_AUTH_PASS (when they are set)."""
    if not (settings.basic_auth_user and settings.basic_auth_pass):
        return
    header = request.headers.get("Authorization", "")
    user, password = "", ""
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except Exception:
            user, password = "", ""
    # compare both fields in constant time, and always both, so timing tells nothing
    ok_user = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
    ok_pass = hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
    if not (ok_user and ok_pass):
        raise Unauthorized("basic auth required: set the user and password in Label Studio's model settings")


def check_webhook_secret(settings: Settings) -> None:
    """Accept a webhook with ?secret=WEBHOOK_SECRET, or with the model's basic auth; raise Unauthorized otherwise."""
    if settings.webhook_secret and not hmac.compare_digest(
        request.args.get("secret", "").encode(), settings.webhook_secret.encode()
    ):
        # Label Studio's own START_TRAINING goes to <model URL>/webhook (a query string in the
        # model URL is dropped) with the model's basic auth: that credential is accepted instead.
        if not (settings.basic_auth_user and request.authorization is not None):
            raise Unauthorized(
                "webhook secret missing or wrong: add ?secret=<WEBHOOK_SECRET> to the webhook URL"
            )
        check_basic_auth(settings)
