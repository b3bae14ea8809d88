"""The one exception type the chat domain raises, and the kinds of rule a request can break."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Which rule a failed request broke; the edge maps each kind to a gRPC status and a wire code."""

    INVALID_NAME = enum.auto()
    INVALID_TEXT = enum.auto()
    ROOM_NOT_FOUND = enum.auto()
    ROOM_EXISTS = enum.auto()
    NAME_TAKEN = enum.auto()
    MEMBER_NOT_FOUND = enum.auto()
    ALREADY_JOINED = enum.auto()
    NOT_JOINED = enum.auto()
    BAD_REQUEST = enum.auto()
    TOO_SLOW = enum.auto()
    RESUMED_ELSEWHERE = enum.auto()
    ROOM_LIMIT = enum.auto()
    RATE_LIMITED = enum.auto()
    MEMBER_LIMIT = enum.auto()
    JOIN_TIMEOUT = enum.auto()
    STORE_UNAVAILABLE = enum.auto()
    SERVER_RESTARTING = enum.auto()


class ChatError(Exception):
    """An expected failure: a kind plus a sentence a person can act on, and for RATE_LIMITED how long to wait."""

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
