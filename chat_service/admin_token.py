"""Where the admin token comes from, and the interceptor that guards the admin-only RPCs with it."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

ENV_VAR = "CHAT_ADMIN_TOKEN"


class TokenFileError(Exception):
    """The token file cannot be written safely; the text says what to fix."""


def default_token_path(port: int) -> Path:
    """The token file a server on `port` writes and `chat-admin` reads by default."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "chat-service" / f"admin-token-{port}"


def new_token() -> str:
    """A fresh random token."""
    return secrets.token_urlsafe(32)


def write_token(path: Path, token: str) -> None:
    """Write `token` to `path`, readable only by this user, replacing whatever is there without following links."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = _open_private_directory(path.parent)
    temporary = f".{path.name}.{secrets.token_hex(8)}"
    try:
        # A new name opened with O_EXCL and O_NOFOLLOW cannot be a link planted in advance, and the rename then
        # replaces the name itself: a stale file or a link left at `path` is swapped out, never written through.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory)
        try:
            os.write(fd, (token + "\n").encode())
        finally:
            os.close(fd)
        os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
        raise
    finally:
        os.close(directory)


def _open_private_directory(path: Path) -> int:
    """Open the token's directory, refusing a link or another user's directory and closing loose permissions."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        raise TokenFileError(f"cannot use {path} for the admin token: it is a link or not a directory") from error
    info = os.fstat(fd)
    if info.st_uid != os.getuid():
        os.close(fd)
        raise TokenFileError(f"{path} belongs to another user; the admin token cannot be kept there safely")
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("%s was open to other users; made it private (mode 700)", path)
        os.fchmod(fd, 0o700)
    return fd


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

    def __init__(self, token: str, guarded: frozenset[str]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._guarded = guarded

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
                "this needs the admin token as 'authorization: Bearer TOKEN' metadata",
            )
        if not hmac.compare_digest(given, self._expected):
            return _refuse(grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong")
        return await continuation(handler_call_details)


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
