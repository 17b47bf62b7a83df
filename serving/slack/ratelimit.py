"""How many mentions the app answers per person and per channel: sliding one-minute windows.

Each answer costs a model generation, so one person (or one busy channel) must not be able
to keep the model for themselves. The windows live in this process's memory, keyed by
(workspace, user) and (workspace, channel): each replica counts on its own, so N replicas
allow up to N times the limit. That is enough to stop a flood, and needs no table.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class MentionLimiter:
    """Admits a mention when neither its author nor its channel is over their limit."""

    def __init__(
        self,
        per_user: int,
        per_channel: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_user = per_user
        self.per_channel = per_channel
        self._clock = clock
        self._lock = threading.Lock()
        self._answered: dict[tuple[str, str, str], deque[float]] = {}
        self._swept = clock()

    def admit(self, workspace_id: str, user_id: str, channel_id: str) -> str | None:
        """None, and the mention counts against both windows; or why it is refused, in words
        for its author (it then counts against neither: a refused person does not use up
        the channel's share)."""
        user = ("user", workspace_id, user_id)
        channel = ("channel", workspace_id, channel_id)
        with self._lock:
            now = self._clock()
            if now - self._swept > WINDOW_SECONDS:  # forget people and channels gone quiet
                for key in list(self._answered):
                    self._recent(key, now)
                self._swept = now
            if self._recent(user, now) >= self.per_user:
                return (
                    f"You have mentioned me {self.per_user} times in the last minute, my "
                    "limit per person. Try again in a minute."
                )
            if self._recent(channel, now) >= self.per_channel:
                return (
                    f"I have answered {self.per_channel} mentions in this channel in the last "
                    "minute, my limit per channel. Try again in a minute."
                )
            for key in (user, channel):
                self._answered.setdefault(key, deque()).append(now)
        return None

    def _recent(self, key: tuple[str, str, str], now: float) -> int:
        """Mentions of `key` within the window; older ones, and empty windows, are dropped."""
        times = self._answered.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()
        if not times:
            del self._answered[key]
        return len(times)
