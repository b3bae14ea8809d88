"""A log that writes at most one line per kind of event per client per interval, so that no client can flood it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

# One line per kind and client every ten seconds: enough to see that something is wrong and who did it, while a
# client sending nothing but garbage (thousands of requests a second) adds a few bytes a second to the log.
DEFAULT_INTERVAL_SECONDS = 10.0
# Kinds and clients remembered at once, about 200 bytes each; past this the one logged longest ago is forgotten.
DEFAULT_MAX_KEYS = 10_000


class ThrottledLog:
    """Logs the first event of each kind from each client, then at most one per interval, counting those left out."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        # (kind, client) -> (when the next line may be written, how many events were left out since the last one),
        # ordered by when each last wrote a line, so the head is the first to be allowed again, or forgotten.
        self._keys: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(
        self, kind: str, message: str, *args: object, client: str = "", extra: Mapping[str, object] | None = None
    ) -> None:
        """Log `message % args` as a warning, unless one of this `kind` from `client` was logged within an interval."""
        self._log(logging.WARNING, (kind, client), message, args, extra)

    def info(
        self, kind: str, message: str, *args: object, client: str = "", extra: Mapping[str, object] | None = None
    ) -> None:
        """As `warning`, at INFO."""
        self._log(logging.INFO, (kind, client), message, args, extra)

    def _log(
        self,
        level: int,
        key: tuple[str, str],
        message: str,
        args: tuple[object, ...],
        extra: Mapping[str, object] | None,
    ) -> None:
        now = self._clock()
        keys = self._keys
        next_at, left_out = keys.get(key, (now, 0))
        if now < next_at:
            # Updated in place: the key keeps its place in the order.
            keys[key] = (next_at, left_out + 1)
            return
        keys.pop(key, None)
        keys[key] = (now + self._interval, 0)
        self._forget(now)
        if left_out:
            message += f" ({left_out} more like it since the last such line)"
        self._logger.log(level, message, *args, extra=extra)

    def _forget(self, now: float) -> None:
        # A couple of heads per line keep the table small as clients go quiet, at a constant cost per line.
        keys = self._keys
        for _ in range(2):
            head = next(iter(keys))
            next_at, left_out = keys[head]
            if len(keys) > self._max_keys or (next_at <= now and not left_out):
                del keys[head]
            else:
                return
