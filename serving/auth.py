"""Who may call the model API: API keys for clients, the admin token for operators.

Clients send `Authorization: Bearer <key>`. With any `serve.api_keys` set, every route
needs a key except `/healthz` (liveness probes carry none), `/readyz` (which then says
only ready or not) and `/slack/*` (Slack signs those; Bolt checks the signature).
`/admin/*` always needs `serve.admin_token`, which also opens every client route: with
no admin token set, admin routes are off (403), on 127.0.0.1 too.

Keys are compared with `hmac.compare_digest`, against every configured key without
stopping at a match, so the time taken tells an attacker neither which key matched nor
how much of one they guessed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from doppel.config import ServeSettings
from serving.errors import error_response

OPEN_PATHS = ("/healthz", "/readyz")
SLACK_PREFIX = "/slack/"  # signed by Slack
ADMIN_PREFIX = "/admin/"
ADMIN_HINT = (
    "set DOPPEL_SERVE__ADMIN_TOKEN=<a long random token> (serve.admin_token) on the server "
    "and send Authorization: Bearer <that token>"
)


def bearer(headers: Mapping[str, str]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, as the bytes sent."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("latin-1")  # Starlette decodes headers as latin-1: undo it


def _secrets(values: Iterable[SecretStr | None]) -> list[bytes]:
    """The configured secrets as bytes, blanks left out (a blank one is not set)."""
    return [
        value.get_secret_value().encode() for value in values if value and value.get_secret_value()
    ]


class Credentials:
    """The configured API keys and admin token, and what a presented token may do."""

    def __init__(self, settings: ServeSettings) -> None:
        self._keys = _secrets(settings.api_keys)
        self._admin = _secrets([settings.admin_token])

    def is_client(self, token: bytes | None) -> bool:
        """A configured key or the admin token; anyone when no key is configured."""
        if not self._keys:
            return True
        matched = False
        for secret in self._keys + self._admin:  # every one of them: no early exit
            matched |= hmac.compare_digest(token or b"", secret)
        return matched

    def admin_refusal(self, token: bytes | None) -> Response | None:
        """None for the admin token; otherwise 403 (none is set) or 401 (wrong or missing)."""
        if not self._admin:
            return error_response(403, "admin_disabled", f"the admin routes are off: {ADMIN_HINT}")
        if token is not None and hmac.compare_digest(token, self._admin[0]):
            return None
        return unauthorized(
            "a missing or wrong admin token: send Authorization: Bearer <serve.admin_token>"
        )


def unauthorized(message: str) -> Response:
    return error_response(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


class RequireKeys:
    """Pure ASGI middleware: refuses a request before any of the app runs, body unread."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app, self.credentials = app, credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope["path"], bearer(Headers(scope=scope)))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, path: str, token: bytes | None) -> Response | None:
        if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
            return self.credentials.admin_refusal(token)
        if path in OPEN_PATHS or path.startswith(SLACK_PREFIX):
            return None
        if self.credentials.is_client(token):
            return None
        return unauthorized(
            "a missing or unknown API key: send Authorization: Bearer <key>, with one of the "
            "server's serve.api_keys"
        )
