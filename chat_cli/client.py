"""`chat`: the member's front end, interactive on a terminal and line by line from a pipe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncGenerator, Sequence
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
    Quit,
    Say,
    Whisper,
    Who,
    parse,
)
from chat_cli.protocol import Incoming, SessionError
from chat_cli.session import DEFAULT_HISTORY, Session, target
from chat_cli.terminal import ctrl_c_keeps_prompting


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
    args = parser.parse_args(argv)
    # A terminal on both ends gets the prompt; otherwise lines are read and printed plainly, for scripts.
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        tls = options.credentials(args)
    except SessionError as exc:
        print(render.error(str(exc)), file=sys.stderr)
        return 1
    address = target(args.host, args.port)
    try:
        return asyncio.run(run(address, interactive=interactive, history=args.history, credentials=tls))
    except KeyboardInterrupt:
        return 130


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
    *,
    interactive: bool,
    history: int = DEFAULT_HISTORY,
    credentials: grpc.ChannelCredentials | None = None,
) -> int:
    """Connect to `address` and serve one user until /quit or end of input; returns the exit status."""
    async with Session(address, _print_event, history=history, credentials=credentials) as session:
        try:
            await session.connect()
        except SessionError as exc:
            print(render.error(str(exc)), file=sys.stderr)
            return 1
        if interactive:
            await _interactive(session)
        else:
            await _pipe(session)
        if session.room is not None:
            emit(render.left(await session.leave()))
    return 0


def emit(line: str) -> None:
    """Print one line at once, so a reader on the other end of a pipe sees it without delay."""
    print(line, flush=True)


def _print_event(incoming: Incoming, me: str) -> None:
    emit(render.event(incoming, me))


async def execute(session: Session, command: Command) -> bool:
    """Run one command to completion, printing its outcome; False means the user wants to quit."""
    try:
        match command:
            case Create(room, name):
                await session.create(room, name)
            case Join(room, name):
                await session.join(room, name)
            case Say(text):
                if await session.say(text):
                    emit(render.pending(text))
            case Whisper(recipient, text):
                if await session.whisper(recipient, text):
                    emit(render.pending(text, recipient))
            case Leave():
                emit(render.left(await session.leave()))
            case Who():
                emit(render.members(*session.who()))
            case Ls():
                for line in render.rooms(await session.list_rooms()):
                    emit(line)
            case Help():
                emit(USAGE)
            case Quit():
                return False
            case Invalid(message):
                emit(render.error(message))
            case _:
                assert_never(command)
    except SessionError as exc:
        emit(render.error(str(exc)))
    return True


async def _pipe(session: Session) -> None:
    async with contextlib.aclosing(_stdin_lines()) as lines:
        async for line in lines:
            command = parse(line)
            if command is not None and not await execute(session, command):
                return


async def _stdin_lines() -> AsyncGenerator[str]:
    """Lines of standard input, read by a daemon thread so that neither a pipe nor a file blocks the loop."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def hand_over(line: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the loop has closed: nobody wants more lines
            return False
        return True

    def pump() -> None:
        try:
            for line in sys.stdin:
                if not hand_over(line):
                    return
        finally:
            hand_over(None)

    # A daemon thread, because a thread blocked in readline() must not keep the process alive after /quit.
    threading.Thread(target=pump, name="stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        yield line


async def _interactive(session: Session) -> None:
    prompt: PromptSession[str] = PromptSession()

    def message() -> str:
        if session.room is None:
            return "> "
        state = ", reconnecting" if session.reconnecting else ""
        return render.safe(f"[{session.room} as {session.name}{state}]> ")

    emit("type /help for the commands")
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
            for part in line.splitlines():
                command = parse(part)
                if command is not None and not await execute(session, command):
                    return
