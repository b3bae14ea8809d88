"""`chat-server`: parse the command line and run the server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path

from prompt_toolkit.patch_stdout import patch_stdout

from chat_service.history import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES
from chat_service.rooms import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_ROOMS, DEFAULT_QUEUE_LIMIT, DEFAULT_RESUME_GRACE_SECONDS
from chat_service.server import DEFAULT_MAX_STREAMS_PER_CONNECTION, Config, run
from chat_service.service import DEFAULT_JOIN_TIMEOUT_SECONDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The server's command line."""
    parser = argparse.ArgumentParser(prog="chat-server", description="Run the multi-room chat server.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the admin token (default: $CHAT_ADMIN_TOKEN, else a new token written to "
        "$XDG_STATE_HOME/chat-service/admin-token-PORT)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
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
        type=float,
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
        type=float,
        default=DEFAULT_JOIN_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="how long a new stream may take to join a room before it is ended "
        f"(default: {DEFAULT_JOIN_TIMEOUT_SECONDS:g})",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG shows joins and leaves (default: INFO)")
    parser.add_argument("--no-console", action="store_true", help="do not read /ls and /kill from the terminal")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `chat-server`."""
    args = parse_args(argv)
    console = sys.stdin.isatty() and not args.no_console
    with _stdout_guard(console):
        logging.basicConfig(stream=sys.stdout, level=args.log_level.upper(), format="%(message)s")
        config = Config(
            host=args.host,
            port=args.port,
            admin_token_file=args.admin_token_file,
            queue_limit=args.max_queue,
            history=args.history,
            history_bytes=args.history_bytes,
            resume_grace_seconds=args.resume_grace,
            max_rooms=args.max_rooms,
            max_members=args.max_members,
            max_streams_per_connection=args.max_streams_per_connection,
            join_timeout_seconds=args.join_timeout,
        )
        _tune_gc()
        try:
            _run_loop(run(config, console=console))
        except (OSError, RuntimeError) as error:
            print(f"error: cannot start the server on {args.host}:{args.port}: {error}", file=sys.stderr)
            sys.exit(1)


def _at_least(minimum: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return whole_number


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
