"""`chat`: the member's front end, interactive on a terminal and line by line from a pipe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
import threading
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from typing import assert_never

import grpc
from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from chat_cli import options, render
from chat_cli.commands import (
    USAGE,
    Command,
    Create,
    Help,
    Invalid,
    Join,
    Leave,
    Ls,
    Me,
    Quit,
    Say,
    Whisper,
    Who,
    parse,
)
from chat_cli.protocol import MAX_LINE_BYTES, SessionError, too_long
from chat_cli.screen import ChatCompleter, Screen, colour_wanted, history_path, input_history
from chat_cli.session import DEFAULT_HISTORY, RPC_TIMEOUT, Session, target
from chat_cli.terminal import ctrl_c_keeps_prompting

# Exit statuses, as the README documents them.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# What a program killed by SIGPIPE reports through the shell (128 + 13): the reader of its output went away.
EXIT_OUTPUT_CLOSED = 141

# A line from a pipe is held at most this long; a longer one is counted, skipped and refused, never held whole.
READ_LIMIT = 4 * MAX_LINE_BYTES
READ_CHUNK = 65536


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `chat`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="chat", description="Chat in the rooms of a chat server.")
    options.add_version_option(parser)
    options.add_connection_options(parser)
    parser.add_argument(
        "--history",
        type=_history_size,
        default=DEFAULT_HISTORY,
        metavar="N",
        help=f"show a room's last N messages on joining it (default: {DEFAULT_HISTORY}; 0: none)",
    )
    parser.add_argument(
        "--no-timestamps", action="store_true", help="print lines without their [HH:MM] time on a terminal"
    )
    args = parser.parse_args(argv)
    # Whatever the locale, a line the terminal or file cannot encode is printed with escapes rather than crashing.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    # A terminal on both ends gets the prompt; otherwise lines are read and printed plainly, for scripts.
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    screen = Screen(timestamps=sys.stdout.isatty() and not args.no_timestamps, colour=colour_wanted())
    try:
        tls = options.credentials(args)
    except SessionError as exc:
        print(render.error(str(exc)), file=sys.stderr)
        return EXIT_FAILED
    address = target(args.host, args.port)
    try:
        return asyncio.run(run(address, screen, interactive=interactive, history=args.history, credentials=tls))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _history_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of messages (0 or more), got {text!r}")
    return value


async def run(
    address: str,
    screen: Screen,
    *,
    interactive: bool,
    history: int = DEFAULT_HISTORY,
    credentials: grpc.ChannelCredentials | None = None,
) -> int:
    """Connect to `address` and serve one user until /quit or end of input; returns the exit status."""
    async with Session(address, screen.event, history=history, credentials=credentials) as session:
        try:
            await session.connect()
        except SessionError as exc:
            print(render.error(str(exc)), file=sys.stderr)
            return EXIT_FAILED
        if interactive:
            await _interactive(session, screen)
        else:
            await _pipe(session, screen)
        if session.room is not None:
            screen.line(render.left(await session.leave()))
    if screen.closed:
        return EXIT_OUTPUT_CLOSED
    # An interactive user reads the errors; a script gets them summed up in the status.
    return EXIT_FAILED if screen.failed and not interactive else EXIT_OK


async def execute(session: Session, screen: Screen, command: Command) -> bool:
    """Run one command to completion, printing its outcome; False means the user wants to quit."""
    try:
        match command:
            case Create(room, name):
                await session.create(room, name)
            case Join(room, name):
                await session.join(room, name)
            case Say(text):
                if await session.say(text):
                    screen.line(render.pending(text))
            case Me(text):
                if await session.say(text, action=True):
                    screen.line(render.pending(f"* {session.name} {text}"))
            case Whisper(recipient, text):
                if await session.whisper(recipient, text):
                    screen.line(render.pending(text, recipient))
            case Leave():
                screen.line(render.left(await session.leave()))
            case Who():
                screen.line(render.members(*session.who()))
            case Ls():
                for line in render.rooms(await session.list_rooms()):
                    screen.line(line)
            case Help():
                screen.line(USAGE)
            case Quit():
                return False
            case Invalid(message):
                screen.error(message)
            case _:
                assert_never(command)
    except SessionError as exc:
        screen.error(str(exc))
    return True


async def _pipe(session: Session, screen: Screen) -> None:
    async with contextlib.aclosing(_stdin_lines(sys.stdin.fileno())) as lines:
        async for line in lines:
            command = line if isinstance(line, Invalid) else parse(line)
            if command is not None and not await execute(session, screen, command):
                return
            if isinstance(command, Say | Me | Whisper) and not session.reconnecting:
                # So that a line's echo or error is printed before the next command is read, for scripts to pair.
                try:
                    async with asyncio.timeout(RPC_TIMEOUT):
                        await session.answered()
                except TimeoutError:
                    screen.error(f"the server has not answered within {RPC_TIMEOUT:g} s; going on with the next line")
            if screen.closed:
                return


def split_lines(chunks: Iterable[bytes]) -> Iterator[str | Invalid]:
    """The lines in `chunks` of bytes, decoded, or an Invalid saying why one cannot be sent; memory stays bounded
    however long a line is."""
    pending = bytearray()
    # The size of an over-long line being skipped, or None while reading a line normally.
    skipping: int | None = None
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:end]
            if skipping is not None:
                yield Invalid(too_long(skipping + len(piece.rstrip(b"\r"))))
                skipping = None
            else:
                pending += piece
                yield _decoded(bytes(pending))
                pending.clear()
            start = end + 1
        rest = len(chunk) - start
        if skipping is not None:
            skipping += rest
        else:
            pending += chunk[start:]
            if len(pending) > READ_LIMIT:
                skipping = len(pending)
                pending.clear()
    if skipping is not None:
        yield Invalid(too_long(skipping))
    elif pending:
        yield _decoded(bytes(pending))


def _decoded(raw: bytes) -> str | Invalid:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid(f"not sent: the line is not valid UTF-8 (byte {exc.start + 1} of it); fix its encoding")


async def _stdin_lines(fd: int) -> AsyncGenerator[str | Invalid]:
    """The lines of file descriptor `fd`, read by a daemon thread so that neither a pipe nor a file blocks the loop."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | Invalid | None] = asyncio.Queue()

    def hand_over(line: str | Invalid | None) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the loop has closed: nobody wants more lines
            return False
        return True

    def pump() -> None:
        # os.read, not sys.stdin: a thread blocked in a buffered reader holds its lock, and the interpreter aborts
        # at exit when it cannot take that lock.
        try:
            for line in split_lines(iter(lambda: os.read(fd, READ_CHUNK), b"")):
                if not hand_over(line):
                    return
        finally:
            hand_over(None)

    # A daemon thread, because a thread blocked in a read must not keep the process alive after /quit.
    threading.Thread(target=pump, name="stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        yield line


async def _interactive(session: Session, screen: Screen) -> None:
    prompt: PromptSession[str] = PromptSession(
        completer=ChatCompleter(lambda: session.members),
        complete_while_typing=False,
        history=input_history(history_path()),
    )

    def message() -> str:
        if session.room is None:
            return "> "
        state = ", reconnecting" if session.reconnecting else ""
        return render.safe(f"[{session.room} as {session.name}{state}]> ")

    screen.line("type /help for the commands; Tab completes commands and names")
    with patch_stdout():
        while True:
            try:
                line = await prompt.prompt_async(message)
            except KeyboardInterrupt:
                if ctrl_c_keeps_prompting(prompt):
                    continue
                return
            except EOFError:
                return
            # A bracketed paste puts a whole block into the one-line prompt: each of its lines goes out on its own.
            parts = [part for part in line.splitlines() if part.strip()]
            if len(parts) > 1:
                screen.line(render.pasted(len(parts)))
            for part in parts:
                command = parse(part)
                if command is not None and not await execute(session, screen, command):
                    return
