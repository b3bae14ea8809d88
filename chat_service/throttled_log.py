"""A log that writes at most one line per kind of event per interval, so that no client can flood it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# One line per kind every ten seconds: enough to see that something is wrong and who did it, while a client
# sending nothing but garbage (thousands of requests a second) adds a few bytes a second to the log.
DEFAULT_INTERVAL_SECONDS = 10.0


class ThrottledLog:
    """Logs the first event of each kind, then at most one per interval, saying how many it left out meanwhile."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        # kind -> (when the next line may be written, how many events were left out since the last one). Kinds
        # come from the server's code, never from a client, so this holds a handful of entries.
        self._kinds: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log `message % args` as a warning, unless a line of this `kind` was logged less than an interval ago."""
        now = self._clock()
        next_at, left_out = self._kinds.get(kind, (now, 0))
        if now < next_at:
            self._kinds[kind] = (next_at, left_out + 1)
            return
        self._kinds[kind] = (now + self._interval, 0)
        if left_out:
            message += f" ({left_out} more like it since the last such line)"
        self._logger.warning(message, *args)
