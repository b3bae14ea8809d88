"""The server's own console: `/ls`, `/kill ROOM` and `/prune` typed where the server runs."""

from __future__ import annotations

from prompt_toolkit import PromptSession

from chat_service.errors import ChatError
from chat_service.registry import Registry

HELP = (
    "commands: /ls lists rooms, /kill ROOM closes one, /prune closes every room nobody is in, /help shows this, "
    "/quit stops the server"
)


async def run_console(registry: Registry[bytes]) -> None:
    """Read admin commands until /quit or end of input; returning stops the server."""
    session: PromptSession[str] = PromptSession()
    print(HELP)
    while True:
        try:
            line = (await session.prompt_async("admin> ")).strip()
        except KeyboardInterrupt:
            # As in the chat client: Ctrl-C discards a half-typed line, and only on an empty one stops the server.
            if session.default_buffer.text:
                continue
            return
        except EOFError:
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command == "/quit":
            return
        if command == "/help":
            print(HELP)
        elif command == "/ls":
            rooms = await registry.list_rooms()
            if not rooms:
                print("no rooms")
            for room in rooms:
                print(f"  {room.name} ({_count(room.member_count, 'member')}, {_count(room.last_seq, 'message')})")
        elif command == "/kill" and argument:
            try:
                ejected = await registry.kill_room(argument)
            except ChatError as error:
                print(f"error: {error.message}")
            else:
                print(f"room {argument} closed, {ejected} members returned to waiting")
        elif command == "/prune" and not argument:
            pruned = await registry.prune_rooms()
            names = ", ".join(pruned)
            print(f"pruned {_count(len(pruned), 'empty room')}: {names}" if pruned else "no empty rooms to prune")
        else:
            print(f"error: unknown command {line!r}; {HELP}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
