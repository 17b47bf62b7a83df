"""Request parameters and cursor pagination, read the way Slack reads them.

A cursor is base64 of "kind:boundary" (the last ts or id handed out), not an offset,
so pages stay exact while messages are being posted between calls.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left, bisect_right
from decimal import Decimal, InvalidOperation

from devtools.emulator.state import Params, SlackError, message_key, ts_key
from doppel.types import SlackDict


def flag(params: Params, name: str) -> bool:
    return params.get(name) in (True, 1, "1", "true", "True")


def limit(params: Params, default: int, max_page_size: int) -> int:
    """Slack's `limit`: absent or 0 means the method's default; capped at max_page_size."""
    raw = params.get("limit") or default
    try:
        wanted = int(raw)
    except (TypeError, ValueError):
        raise SlackError("invalid_limit") from None
    return max(1, min(wanted if wanted > 0 else default, max_page_size))


def ts_range(messages: list[SlackDict], params: Params) -> tuple[int, int]:
    """Index range of `messages` within oldest/latest; both exclusive unless `inclusive`."""
    oldest, latest = _ts_param(params, "oldest"), _ts_param(params, "latest")
    inclusive = flag(params, "inclusive")
    low, high = 0, len(messages)
    if oldest is not None:
        low = (bisect_left if inclusive else bisect_right)(messages, oldest, key=message_key)
    if latest is not None:
        high = (bisect_right if inclusive else bisect_left)(messages, latest, key=message_key)
    return low, max(low, high)


def _ts_param(params: Params, name: str) -> Decimal | None:
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        return ts_key(str(raw))
    except InvalidOperation:
        raise SlackError(f"invalid_ts_{name}") from None


def cursor(kind: str, boundary: str | None) -> str:
    """The next_cursor for a page ending at `boundary`; "" when there is no next page."""
    return base64.urlsafe_b64encode(f"{kind}:{boundary}".encode()).decode() if boundary else ""


def read_cursor(params: Params, kind: str) -> str | None:
    raw = params.get("cursor")
    if not raw:
        return None
    try:
        decoded = base64.urlsafe_b64decode(str(raw).encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise SlackError("invalid_cursor") from None
    found_kind, _, boundary = decoded.partition(":")
    if found_kind != kind or not boundary:
        raise SlackError("invalid_cursor")
    return boundary


def read_ts_cursor(params: Params, kind: str) -> Decimal | None:
    boundary = read_cursor(params, kind)
    try:
        return None if boundary is None else ts_key(boundary)
    except InvalidOperation:
        raise SlackError("invalid_cursor") from None


def page_by_id(
    items: list[SlackDict], params: Params, default_limit: int, max_page_size: int
) -> tuple[list[SlackDict], SlackDict]:
    """A page of id-sorted objects after the cursor's id, with its response_metadata."""
    after = read_cursor(params, "after_id")
    remaining = [item for item in items if after is None or item["id"] > after]
    page = remaining[: limit(params, default_limit, max_page_size)]
    more = len(remaining) > len(page)
    return page, {"next_cursor": cursor("after_id", page[-1]["id"] if more else None)}
