"""Where the admin token comes from, and the interceptor that guards the admin-only RPCs with it."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc

ENV_VAR = "CHAT_ADMIN_TOKEN"


def default_token_path(port: int) -> Path:
    """The token file a server on `port` writes and `chat-admin` reads by default."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "chat-service" / f"admin-token-{port}"


def new_token() -> str:
    """A fresh random token."""
    return secrets.token_urlsafe(32)


def write_token(path: Path, token: str) -> None:
    """Write `token` to `path` so that only this user can read it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)


def read_token(path: Path) -> str:
    """The token stored in `path`, without surrounding whitespace."""
    return path.read_text().strip()


Metadata = Iterable[tuple[str, str | bytes]]


def bearer(metadata: Metadata | None) -> bytes | None:
    """The call's `authorization` metadata value, if it has one."""
    given = next((value for key, value in metadata or () if key == "authorization"), None)
    if given is None:
        return None
    return given if isinstance(given, bytes) else given.encode()


def carries_token(metadata: Metadata | None, token: str) -> bool:
    """Whether the call carries `authorization: Bearer TOKEN` with this token."""
    given = bearer(metadata)
    # compare_digest takes the same time wherever the first difference is, so the token cannot be guessed
    # byte by byte from response times.
    return given is not None and hmac.compare_digest(given, f"Bearer {token}".encode())


Req = TypeVar("Req")
Resp = TypeVar("Resp")


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses the guarded methods unless the call carries `authorization: Bearer TOKEN`."""

    def __init__(self, token: str, guarded: frozenset[str], hint: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._guarded = guarded
        self.hint = hint

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        if handler_call_details.method not in self._guarded:
            return await continuation(handler_call_details)
        given = bearer(handler_call_details.invocation_metadata)
        if given is None:
            return _refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                f"this needs the admin token as 'authorization: Bearer TOKEN' metadata; {self.hint}",
            )
        if not hmac.compare_digest(given, self._expected):
            return _refuse(grpc.StatusCode.PERMISSION_DENIED, f"the admin token is wrong; {self.hint}")
        return await continuation(handler_call_details)


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
