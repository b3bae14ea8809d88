"""`chat-server`: parse the command line and run the server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import sys
import urllib.parse
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path

from prompt_toolkit.patch_stdout import patch_stdout

from chat_service import logs
from chat_service.admin_token import TokenFileError
from chat_service.errors import ChatError
from chat_service.history import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES
from chat_service.limits import (
    DEFAULT_JOIN_BURST,
    DEFAULT_JOINS_PER_SECOND,
    DEFAULT_LINE_BURST,
    DEFAULT_LINES_PER_SECOND,
    DEFAULT_ROOM_BURST,
    DEFAULT_ROOMS_PER_MINUTE,
    DEFAULT_TRACKED_ADDRESSES,
    Limits,
    Rate,
)
from chat_service.rooms import DEFAULT_QUEUE_LIMIT
from chat_service.server import DEFAULT_MAX_STREAMS_PER_CONNECTION, MEMORY, Config, Tls, run
from chat_service.service import DEFAULT_JOIN_TIMEOUT_SECONDS, DEFAULT_LINES_IN_FLIGHT
from chat_service.store import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_ROOMS, DEFAULT_RESUME_GRACE_SECONDS
from chat_service.workers import Supervisor, WorkerStartError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The server's command line."""
    parser = argparse.ArgumentParser(prog="chat-server", description="Run the multi-room chat server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('chat-service')}")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=50051, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the admin token (default: $CHAT_ADMIN_TOKEN, else a new token written to "
        "$XDG_STATE_HOME/chat-service/admin-token-PORT)",
    )
    parser.add_argument(
        "--max-queue",
        type=_at_least(1),
        metavar="N",
        default=DEFAULT_QUEUE_LIMIT,
        help=f"events waiting for one member before it is dropped as too slow (default: {DEFAULT_QUEUE_LIMIT})",
    )
    parser.add_argument(
        "--history",
        type=_at_least(0),
        default=DEFAULT_HISTORY,
        metavar="N",
        help=f"recent messages each room keeps for joins and resumes; 0 keeps none (default: {DEFAULT_HISTORY})",
    )
    parser.add_argument(
        "--history-bytes",
        type=_at_least(0),
        default=DEFAULT_HISTORY_BYTES,
        metavar="BYTES",
        help="bytes all rooms' history may hold together; past it the oldest messages on the server go first "
        f"(default: {DEFAULT_HISTORY_BYTES}, 256 MiB)",
    )
    parser.add_argument(
        "--resume-grace",
        type=_seconds,
        default=DEFAULT_RESUME_GRACE_SECONDS,
        metavar="SECONDS",
        help="how long a member whose connection dropped keeps its name for a resume "
        f"(default: {DEFAULT_RESUME_GRACE_SECONDS:g})",
    )
    parser.add_argument(
        "--max-rooms",
        type=_at_least(1),
        default=DEFAULT_MAX_ROOMS,
        metavar="N",
        help=f"rooms the server holds at most; creating one more is refused (default: {DEFAULT_MAX_ROOMS})",
    )
    parser.add_argument(
        "--max-members",
        type=_at_least(1),
        default=DEFAULT_MAX_MEMBERS,
        metavar="N",
        help="names the server holds at most, by members and for resumes; one more join is refused "
        f"(default: {DEFAULT_MAX_MEMBERS})",
    )
    parser.add_argument(
        "--max-streams-per-connection",
        type=_at_least(1),
        default=DEFAULT_MAX_STREAMS_PER_CONNECTION,
        metavar="N",
        help="streams one connection may have open at once; its further streams wait "
        f"(default: {DEFAULT_MAX_STREAMS_PER_CONNECTION})",
    )
    parser.add_argument(
        "--join-timeout",
        type=_positive_seconds,
        default=DEFAULT_JOIN_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="how long a new stream may take to join a room before it is ended "
        f"(default: {DEFAULT_JOIN_TIMEOUT_SECONDS:g})",
    )
    parser.add_argument(
        "--max-lines-in-flight",
        type=_at_least(1),
        default=DEFAULT_LINES_IN_FLIGHT,
        metavar="N",
        help="lines one member may have waiting for the store at once; the server reads its next request once the "
        f"oldest is kept (default: {DEFAULT_LINES_IN_FLIGHT})",
    )
    parser.add_argument(
        "--empty-room-ttl",
        type=_positive_seconds,
        metavar="SECONDS",
        help="close a room once nobody has been in it for this long (default: rooms stay until killed or pruned)",
    )
    _add_rate(parser, "rooms-per-minute", DEFAULT_ROOMS_PER_MINUTE, "rooms one client address may create a minute")
    _add_burst(parser, "room-burst", DEFAULT_ROOM_BURST, "rooms one address may create at once before that rate")
    _add_rate(parser, "joins-per-second", DEFAULT_JOINS_PER_SECOND, "joins and resumes one address may make a second")
    _add_burst(parser, "join-burst", DEFAULT_JOIN_BURST, "joins one address may make at once before that rate")
    _add_rate(parser, "lines-per-second", DEFAULT_LINES_PER_SECOND, "lines and whispers one member may send a second")
    _add_burst(parser, "line-burst", DEFAULT_LINE_BURST, "lines one member may send at once before that rate")
    parser.add_argument(
        "--tracked-addresses",
        type=_at_least(1),
        default=DEFAULT_TRACKED_ADDRESSES,
        metavar="N",
        help="client addresses whose rates are remembered at most; the least recently seen is forgotten first "
        f"(default: {DEFAULT_TRACKED_ADDRESSES})",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)}, any case; DEBUG shows joins and leaves (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="text for people, json for one JSON object per line (default: text)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to serve metrics on (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument(
        "--store",
        type=_store,
        default=MEMORY,
        metavar="STORE",
        help="where rooms live: memory (this process alone) or nats://HOST:PORT[,nats://HOST:PORT...], a NATS "
        "JetStream cluster that any number of chat servers share (default: memory)",
    )
    parser.add_argument(
        "--replicas",
        type=_at_least(1, 5),
        metavar="N",
        help="NATS nodes that keep a copy of each room's messages (default: 3, or fewer in a smaller cluster)",
    )
    parser.add_argument(
        "--workers",
        type=_at_least(1, 256),
        default=1,
        metavar="N",
        help="server processes sharing the port, one per core is a good start; needs a nats:// --store (default: 1)",
    )
    parser.add_argument("--no-console", action="store_true", help="do not read /ls and /kill from the terminal")
    tls = parser.add_argument_group("TLS (off unless --tls-cert and --tls-key are given)")
    tls.add_argument("--tls-cert", type=Path, metavar="PATH", help="PEM certificate chain to serve TLS with")
    tls.add_argument("--tls-key", type=Path, metavar="PATH", help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PATH",
        help="PEM CA certificate; clients must then present a certificate it signed (mutual TLS)",
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both, or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.workers > 1 and args.store == MEMORY:
        parser.error("--workers needs a nats:// --store: in memory, each process would have rooms of its own")
    if args.replicas is not None and args.store == MEMORY:
        parser.error("--replicas applies to a nats:// --store only")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of `chat-server`."""
    args = parse_args(argv)
    # The console reads /ls and /kill into one process's registry; workers each have their own.
    console = sys.stdin.isatty() and not args.no_console and args.workers == 1
    with _stdout_guard(console):
        logs.configure(args.log_level, args.log_format)
        config = Config(
            host=args.host,
            port=args.port,
            admin_token_file=args.admin_token_file,
            queue_limit=args.max_queue,
            history=args.history,
            history_bytes=args.history_bytes,
            resume_grace_seconds=args.resume_grace,
            max_rooms=args.max_rooms,
            tls=_tls(args),
            empty_room_ttl=args.empty_room_ttl,
            limits=Limits(
                rooms=Rate(args.rooms_per_minute / 60, args.room_burst),
                joins=Rate(args.joins_per_second, args.join_burst),
                lines=Rate(args.lines_per_second, args.line_burst),
                max_addresses=args.tracked_addresses,
            ),
            max_members=args.max_members,
            max_streams_per_connection=args.max_streams_per_connection,
            join_timeout_seconds=args.join_timeout,
            lines_in_flight=args.max_lines_in_flight,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            store=args.store,
            replicas=args.replicas,
        )
        _tune_gc()
        try:
            if args.workers > 1:
                sys.exit(Supervisor(config, args.workers, _serve_worker).run())
            _run_loop(run(config, console=console))
        except TokenFileError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        except ChatError as error:
            print(f"error: cannot start the server: {error.message}", file=sys.stderr)
            sys.exit(1)
        except (OSError, RuntimeError, WorkerStartError) as error:
            print(f"error: cannot start the server on {args.host}:{args.port}: {error}", file=sys.stderr)
            sys.exit(1)


def _serve_worker(config: Config, token: str, ready: Callable[[int], None]) -> int:
    """Run one of --workers' processes; its exit status."""
    try:
        _run_loop(run(config, console=False, token=token, ready=ready))
    except ChatError as error:
        print(f"error: a worker cannot start: {error.message}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:
        print(f"error: a worker cannot serve on {config.host}:{config.port}: {error}", file=sys.stderr)
        return 1
    return 0


def _store(text: str) -> str:
    """`memory`, or a comma-separated list of nats:// URLs, each with a host and a port."""
    if text == MEMORY:
        return text
    for url in text.split(","):
        parts = urllib.parse.urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "nats" or not parts.hostname or port is None or parts.path not in ("", "/"):
            raise argparse.ArgumentTypeError(f"expected memory or nats://HOST:PORT[,nats://HOST:PORT...], not {text!r}")
    return text


def _add_rate(parser: argparse.ArgumentParser, flag: str, default: float, what: str) -> None:
    parser.add_argument(
        f"--{flag}", type=_rate, default=default, metavar="R", help=f"{what}; 0 for no limit (default: {default:g})"
    )


def _add_burst(parser: argparse.ArgumentParser, flag: str, default: int, what: str) -> None:
    parser.add_argument(
        f"--{flag}", type=_at_least(1), default=default, metavar="N", help=f"{what} (default: {default})"
    )


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _tls(args: argparse.Namespace) -> Tls | None:
    """The TLS material the options name, read now so that a bad path stops the start with a clear message."""
    if args.tls_cert is None:
        return None
    chain, key = _pem(args.tls_cert, "--tls-cert"), _pem(args.tls_key, "--tls-key")
    client_ca = _pem(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca is not None else None
    return Tls(chain, key, client_ca)


def _pem(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        print(f"error: cannot read {option} {path} ({error.strerror})", file=sys.stderr)
        sys.exit(1)


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            within = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"must be {within}, not {value}")
        return value

    return whole_number


_port = _at_least(0, 65535)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, not {text}")
    return value


def _tune_gc() -> None:
    """Keep full garbage collections rare and small: each one walks every member's objects while delivery waits."""
    # What start-up made lives as long as the process; frozen, no collection walks it again.
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    # A full collection after 1000 middle ones instead of 10: with thousands of members each took tens of ms,
    # which was the server's worst latency (bench/README.md has the measurements).
    gc.set_threshold(young, middle, 1000)


def _run_loop(main: Coroutine[None, None, None]) -> None:
    """Run on uvloop where it is installed: its faster loop cuts the server's CPU per delivery (bench/README.md)."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _stdout_guard(console: bool) -> contextlib.AbstractContextManager[object]:
    """On a console, keep log lines above the prompt instead of through it."""
    if not console:
        return contextlib.nullcontext()
    return patch_stdout(raw=True)


if __name__ == "__main__":
    main()
