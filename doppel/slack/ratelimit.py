"""Client-side pacing so that all threads together stay under Slack's per-method tiers.

slack-sdk's retry handlers recover from a 429 after the fact; pacing keeps us from
earning one in the first place when many channels are scraped at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping


class MethodRateLimiter:
    """Spaces calls of each Slack method evenly at its requests-per-minute budget."""

    def __init__(
        self,
        per_minute: Mapping[str, float],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.intervals = {method: 60.0 / rate for method, rate in per_minute.items()}
        self._next_slot: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def wait(self, method: str) -> float:
        """Block until `method` may be called; returns the seconds waited."""
        interval = self.intervals.get(method)
        if interval is None:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot.get(method, now))
            self._next_slot[method] = slot + interval
        delay = slot - now
        if delay > 0:
            self._sleep(delay)
        return delay
