"""The model API's error bodies, shaped as OpenAI's: `{"error": {message, type, code}}`.

OpenAI clients read `error.message` and `error.type`, so every refusal of the API, from
the key check in front of it to a missing model, answers in this one shape.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class ErrorResponse(JSONResponse):
    """JSON escaped to ASCII: an error may quote the request, and a request may hold a
    lone surrogate ("\\ud800") that has no UTF-8 encoding. Escaped, it can still be sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> ErrorResponse:
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return ErrorResponse(body, status_code=status, headers=headers)
