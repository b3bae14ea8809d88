"""The one table from the domain's error kinds to gRPC status codes and wire error codes."""

from __future__ import annotations

import grpc

from chat.v1 import chat_pb2 as pb
from chat_service.errors import ErrorKind

_TABLE: dict[ErrorKind, tuple[grpc.StatusCode, pb.ErrorCode.ValueType]] = {
    ErrorKind.INVALID_NAME: (grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_INVALID_NAME),
    ErrorKind.INVALID_TEXT: (grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_INVALID_TEXT),
    ErrorKind.ROOM_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, pb.ERROR_CODE_ROOM_NOT_FOUND),
    ErrorKind.ROOM_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_ROOM_EXISTS),
    ErrorKind.NAME_TAKEN: (grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_NAME_TAKEN),
    ErrorKind.MEMBER_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, pb.ERROR_CODE_MEMBER_NOT_FOUND),
    ErrorKind.ALREADY_JOINED: (grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_ALREADY_JOINED),
    ErrorKind.NOT_JOINED: (grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_NOT_JOINED),
    ErrorKind.BAD_REQUEST: (grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_REQUEST),
    ErrorKind.TOO_SLOW: (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_UNSPECIFIED),
    ErrorKind.RESUMED_ELSEWHERE: (grpc.StatusCode.ABORTED, pb.ERROR_CODE_UNSPECIFIED),
    ErrorKind.ROOM_LIMIT: (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_ROOM_LIMIT),
    ErrorKind.RATE_LIMITED: (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_RATE_LIMITED),
    ErrorKind.MEMBER_LIMIT: (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_MEMBER_LIMIT),
    ErrorKind.JOIN_TIMEOUT: (grpc.StatusCode.DEADLINE_EXCEEDED, pb.ERROR_CODE_UNSPECIFIED),
    ErrorKind.STORE_UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, pb.ERROR_CODE_UNAVAILABLE),
    # A status the chat client resumes after, on this server once it is back or on another sharing its store.
    ErrorKind.SERVER_RESTARTING: (grpc.StatusCode.UNAVAILABLE, pb.ERROR_CODE_UNSPECIFIED),
}


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    """The gRPC status a unary RPC fails with for this kind of error."""
    return _TABLE[kind][0]


def error_code(kind: ErrorKind) -> pb.ErrorCode.ValueType:
    """The wire code an in-stream error event carries for this kind of error."""
    return _TABLE[kind][1]
