"""`chat-admin`: list, kill and prune rooms, once from the command line or in a small console."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from prompt_toolkit import PromptSession

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_cli import options, render
from chat_cli.commands import ADMIN_USAGE, AdminCommand, Help, Invalid, Kill, Ls, Prune, Quit, parse_admin
from chat_cli.protocol import SessionError
from chat_cli.session import CONNECT_TIMEOUT, RPC_TIMEOUT, UnreachableError, diagnose, target
from chat_cli.terminal import ctrl_c_keeps_prompting

TOKEN_ENV_VAR = "CHAT_ADMIN_TOKEN"


def default_token_path(port: int) -> Path:
    """The token file a server on `port` writes when given no token (the server applies the same rule)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "chat-service" / f"admin-token-{port}"


@dataclass(frozen=True)
class Token:
    """The admin token and where it came from, to name in error messages."""

    value: str
    source: str


def resolve_token(token_file: Path | None, port: int) -> Token:
    """The token from `token_file` when one is given, else $CHAT_ADMIN_TOKEN, else the server's file for `port`."""
    # A flag typed on this command line says more about what is wanted than a variable set long ago.
    if token_file is None and (from_env := os.environ.get(TOKEN_ENV_VAR, "").strip()):
        return Token(from_env, f"${TOKEN_ENV_VAR}")
    path = token_file or default_token_path(port)
    how = f"pass --token-file PATH or set {TOKEN_ENV_VAR} (the server prints 'admin token: PATH' at start)"
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        where = "" if token_file else f"{TOKEN_ENV_VAR} is not set and "
        raise SessionError(f"no admin token: {where}the token file {path} does not exist; {how}") from None
    except OSError as exc:
        raise SessionError(f"cannot read the token file {path} ({exc.strerror}); {how}") from None
    if not value:
        raise SessionError(f"the token file {path} is empty; {how}")
    return Token(value, str(path))


@dataclass
class Admin:
    """The admin operations on one connected server; each returns the lines to print."""

    stub: chat_pb2_grpc.ChatServiceStub
    address: str
    token_file: Path | None
    port: int
    # False for plaintext to a host that is not loopback: the token would cross a network in clear.
    token_may_travel: bool = True

    def ls(self) -> list[str]:
        """The open rooms."""
        try:
            response = self.stub.ListRooms(chat_pb2.ListRoomsRequest(), timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            raise self._error(exc, None) from None
        return render.rooms(response.rooms)

    def kill(self, room: str) -> list[str]:
        """Close `room`, sending its members back to waiting."""
        token = self._token()
        try:
            response = self.stub.KillRoom(
                chat_pb2.KillRoomRequest(room=room),
                metadata=(("authorization", f"Bearer {token.value}"),),
                timeout=RPC_TIMEOUT,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, token) from None
        return [render.killed(room, response.ejected_members)]

    def prune(self) -> list[str]:
        """Close every room nobody is in."""
        token = self._token()
        try:
            response = self.stub.PruneRooms(
                chat_pb2.PruneRoomsRequest(),
                metadata=(("authorization", f"Bearer {token.value}"),),
                timeout=RPC_TIMEOUT,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, token) from None
        return [render.pruned(response.rooms)]

    def run(self, command: AdminCommand) -> list[str]:
        """The outcome of one console command; expected failures become `error:` lines."""
        try:
            match command:
                case Ls():
                    return self.ls()
                case Kill(room):
                    return self.kill(room)
                case Prune():
                    return self.prune()
                case Help():
                    return [ADMIN_USAGE]
                case Invalid(message):
                    return [render.error(message)]
                case Quit():
                    return []
        except SessionError as exc:
            return [render.error(str(exc))]

    def _token(self) -> Token:
        """The admin token to send, unless it would cross a network in clear."""
        if not self.token_may_travel:
            raise SessionError(
                f"refusing to send the admin token in plaintext to {self.address}; use --tls, or --insecure if "
                "the network between here and the server is trusted"
            )
        # Read at each use, not at start-up: listing needs no token, and a restarted server writes a new one.
        return resolve_token(self.token_file, self.port)

    def _error(self, exc: grpc.RpcError, token: Token | None) -> SessionError:
        # Failed sync calls raise an object that is both an RpcError and a Call, which carries the status.
        if not isinstance(exc, grpc.Call):
            return SessionError(f"the call to {self.address} failed: {exc}")
        code, details = exc.code(), exc.details() or exc.code().name
        if code == grpc.StatusCode.UNAVAILABLE:
            return UnreachableError(self.address)
        if token is not None and code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return SessionError(f"the server refused the admin token from {token.source}: {details}")
        return SessionError(details)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `chat-admin`; returns the exit status."""
    args = _parser().parse_args(argv)
    address = target(args.host, args.port)
    try:
        tls = options.credentials(args)
        with _channel(address, tls) as channel:
            _wait_until_ready(channel, address, tls is not None)
            admin = Admin(
                chat_pb2_grpc.ChatServiceStub(channel),
                address,
                args.token_file,
                args.port,
                token_may_travel(args.host, tls=tls is not None, insecure=args.insecure),
            )
            if args.command == "ls":
                lines = admin.ls()
            elif args.command == "kill":
                lines = admin.kill(args.room)
            elif args.command == "prune":
                lines = admin.prune()
            else:
                _console(admin)
                return 0
    except SessionError as exc:
        print(render.error(str(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    for line in lines:
        print(line)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-admin",
        description="List, kill and prune the rooms of a chat server. Without a command, read commands from a console.",
    )
    options.add_version_option(parser)
    options.add_connection_options(parser)
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="send the admin token over plaintext to a host that is not loopback (refused without this)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the admin token; it wins over ${TOKEN_ENV_VAR} (default: ${TOKEN_ENV_VAR}, else "
        "$XDG_STATE_HOME/chat-service/admin-token-PORT, which the server writes)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("ls", help="list the rooms")
    kill = commands.add_parser("kill", help="close a room and send its members back to waiting")
    kill.add_argument("room", metavar="ROOM")
    commands.add_parser("prune", help="close every room nobody is in")
    return parser


def token_may_travel(host: str, *, tls: bool, insecure: bool) -> bool:
    """Whether the admin token may be sent to `host`: over TLS, to a loopback address, or when told --insecure."""
    if tls or insecure:
        return True
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # A name other than localhost may resolve anywhere; only the address itself proves the token stays here.
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _channel(address: str, tls: grpc.ChannelCredentials | None) -> grpc.Channel:
    return grpc.secure_channel(address, tls) if tls is not None else grpc.insecure_channel(address)


def _wait_until_ready(channel: grpc.Channel, address: str, tls: bool) -> None:
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=CONNECT_TIMEOUT)
    except grpc.FutureTimeoutError:
        ready.cancel()
        raise diagnose(address, tls) from None


def _console(admin: Admin) -> None:
    """Run commands until /quit or end of input; failures are printed and the console goes on."""
    for line in _console_lines():
        command = parse_admin(line)
        if command is None:
            continue
        if isinstance(command, Quit):
            return
        for out in admin.run(command):
            print(out, flush=True)


def _console_lines() -> Iterator[str]:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        yield from sys.stdin
        return
    prompt: PromptSession[str] = PromptSession()
    print("type /help for the commands")
    while True:
        try:
            yield prompt.prompt("admin> ")
        except KeyboardInterrupt:
            if ctrl_c_keeps_prompting(prompt):
                continue
            return
        except EOFError:
            return
