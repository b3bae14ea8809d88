"""The command parser and the renderer, tested as data: no terminal, no network."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from chat.v1 import chat_pb2 as pb
from chat_cli import render
from chat_cli.commands import (
    ADMIN_USAGE,
    USAGE,
    AdminCommand,
    Command,
    Create,
    Help,
    Invalid,
    Join,
    Kill,
    Leave,
    Ls,
    Me,
    Prune,
    Quit,
    Say,
    Whisper,
    Who,
    parse,
    parse_admin,
)
from chat_cli.protocol import ConnectionLost, HistoryMessage, Incoming, Reconnecting

HINT = "/help lists the commands"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", None),
        ("   \t ", None),
        ("\n", None),
        ("hello world", Say("hello world")),
        ("  indented stays indented", Say("  indented stays indented")),
        ("hello\n", Say("hello")),
        ("hello\r\n", Say("hello")),
        ("//etc/passwd is a path", Say("/etc/passwd is a path")),
        ("//", Say("/")),
        ("/create lobby", Create("lobby")),
        ("/create lobby alice", Create("lobby", "alice")),
        ("/create   lobby \t alice  ", Create("lobby", "alice")),
        ("/join lobby", Join("lobby")),
        ("/join lobby bob", Join("lobby", "bob")),
        ("/JOIN lobby", Join("lobby")),
        ("/whisper bob hi there", Whisper("bob", "hi there")),
        ("/whisper bob   spaced  out ", Whisper("bob", "spaced  out ")),
        ("/w bob hi", Whisper("bob", "hi")),
        ("/msg bob hi", Whisper("bob", "hi")),
        ("/me waves  hello ", Me("waves  hello ")),
        ("/me", Invalid("usage: /me ACTION")),
        ("/me   ", Invalid("usage: /me ACTION")),
        ("/leave", Leave()),
        ("/who", Who()),
        ("/ls", Ls()),
        ("/list", Ls()),
        ("/help", Help()),
        ("/quit", Quit()),
        ("/exit", Quit()),
        ("/create", Invalid("usage: /create ROOM [NAME]")),
        ("/create a b c", Invalid("usage: /create ROOM [NAME]")),
        ("/join", Invalid("usage: /join ROOM [NAME]")),
        ("/join a b c", Invalid("usage: /join ROOM [NAME]")),
        ("/whisper", Invalid("usage: /whisper NAME TEXT")),
        ("/whisper bob", Invalid("usage: /whisper NAME TEXT")),
        ("/whisper bob   ", Invalid("usage: /whisper NAME TEXT")),
        ("/leave now", Invalid("usage: /leave (it takes no arguments)")),
        ("/ls all", Invalid("usage: /ls (it takes no arguments)")),
        ("/frobnicate", Invalid(f"unknown command /frobnicate; {HINT}")),
        ("/kill lobby", Invalid(f"unknown command /kill; {HINT}")),
        ("/", Invalid(f"a command name must follow '/'; {HINT}, //TEXT says /TEXT")),
        ("/ join lobby", Invalid(f"a command name must follow '/'; {HINT}, //TEXT says /TEXT")),
    ],
)
def test_parse(line: str, expected: Command | None) -> None:
    assert parse(line) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", None),
        ("/ls", Ls()),
        ("  /ls  ", Ls()),
        ("/kill lobby", Kill("lobby")),
        ("/kill", Invalid("usage: /kill ROOM")),
        ("/kill a b", Invalid("usage: /kill ROOM")),
        ("/prune", Prune()),
        ("/prune lobby", Invalid("usage: /prune (it takes no arguments)")),
        ("/help", Help()),
        ("/quit", Quit()),
        ("/exit", Quit()),
        ("/ls now", Invalid("usage: /ls (it takes no arguments)")),
        ("/join lobby", Invalid(f"unknown command /join; {HINT}")),
        ("/w bob hi", Invalid(f"unknown command /w; {HINT}")),
        ("ls", Invalid("admin commands start with '/'; /help lists them")),
    ],
)
def test_parse_admin(line: str, expected: AdminCommand | None) -> None:
    assert parse_admin(line) == expected


@pytest.mark.parametrize(
    "command",
    [
        "/create ROOM [NAME]",
        "/join ROOM [NAME]",
        "/ls",
        "/who",
        "/whisper NAME TEXT",
        "/me ACTION",
        "/w,",
        "/msg",
        "/list",
        "/exit",
        "/leave",
        "/help",
        "/quit",
        "//TEXT",
    ],
)
def test_usage_lists_every_command(command: str) -> None:
    assert command in USAGE


@pytest.mark.parametrize("command", ["/ls", "/kill ROOM", "/prune", "/help", "/quit"])
def test_admin_usage_lists_every_command(command: str) -> None:
    assert command in ADMIN_USAGE


@pytest.mark.parametrize(
    ("incoming", "me", "line"),
    [
        (pb.Event(message=pb.Message(seq=1, sender="alice", text="hello all")), "bob", "alice : hello all"),
        (pb.Event(message=pb.Message(seq=1, sender="alice", text="waves", action=True)), "bob", "* alice waves"),
        (pb.Event(whisper=pb.Whisper(sender="alice", recipient="bob", text="hi")), "bob", "(whisper) alice : hi"),
        (
            pb.Event(whisper=pb.Whisper(sender="alice", recipient="bob", text="hi")),
            "alice",
            "(whisper to bob) alice : hi",
        ),
        (pb.Event(whisper=pb.Whisper(sender="me", recipient="me", text="note")), "me", "(whisper) me : note"),
        (
            pb.Event(joined=pb.Joined(room="lobby", name="bob", members=["alice", "bob"])),
            "bob",
            "* you joined lobby as bob (members: alice, bob)",
        ),
        (
            pb.Event(joined=pb.Joined(room="lobby", name="alice", members=["alice"], created=True)),
            "alice",
            "* room lobby created; you joined as alice",
        ),
        (pb.Event(member_joined=pb.MemberJoined(name="carol")), "bob", "* carol joined"),
        (pb.Event(member_left=pb.MemberLeft(name="carol", reason=pb.LEAVE_REASON_LEFT)), "bob", "* carol left"),
        (
            pb.Event(member_left=pb.MemberLeft(name="carol", reason=pb.LEAVE_REASON_DISCONNECTED)),
            "bob",
            "* carol left (connection lost)",
        ),
        (
            pb.Event(member_left=pb.MemberLeft(name="carol", reason=pb.LEAVE_REASON_TOO_SLOW)),
            "bob",
            "* carol left (too slow, disconnected)",
        ),
        (
            pb.Event(room_closed=pb.RoomClosed(room="lobby", reason=pb.CLOSE_REASON_KILLED)),
            "bob",
            "* room lobby was closed by the server",
        ),
        (
            pb.Event(room_closed=pb.RoomClosed(room="lobby", reason=pb.CLOSE_REASON_SERVER_SHUTDOWN)),
            "bob",
            "* the server is shutting down",
        ),
        (
            pb.Event(error=pb.Error(code=pb.ERROR_CODE_ROOM_NOT_FOUND, message="room 'x' does not exist")),
            "",
            "error: room 'x' does not exist; /ls lists rooms, /create ROOM makes one",
        ),
        (ConnectionLost("lobby", "the chat server went away"), "bob", "error: the chat server went away"),
        (pb.Event(member_joined=pb.MemberJoined(name="carol", returned=True)), "bob", "* carol is back"),
        (
            Reconnecting("lobby", 1, 0.31),
            "bob",
            "* connection to the server lost; reconnecting to lobby in 0.3 s",
        ),
        (Reconnecting("lobby", 4, 2.06), "bob", "* still reconnecting to lobby: attempt 4 in 2.1 s"),
        (
            pb.Event(joined=pb.Joined(room="lobby", name="bob", members=["bob"], resumed=True, replayed=12)),
            "bob",
            "* reconnected to lobby as bob; 12 missed messages replayed",
        ),
        (
            pb.Event(joined=pb.Joined(room="lobby", name="bob", resumed=True, replayed=1, lost=3)),
            "bob",
            "* reconnected to lobby as bob; 1 missed message replayed; 3 could not be recovered "
            "(older than the server keeps)",
        ),
        (
            pb.Event(joined=pb.Joined(room="lobby", name="bob", resumed=True)),
            "bob",
            "* reconnected to lobby as bob; 0 missed messages replayed",
        ),
    ],
)
def test_render_event(incoming: Incoming, me: str, line: str) -> None:
    assert render.event(incoming, me) == line


def test_render_rate_limited_error_says_how_long_to_wait() -> None:
    error = pb.Error(code=pb.ERROR_CODE_RATE_LIMITED, message="you are sending lines too fast (at most 5 a second)")
    error.retry_after.FromMilliseconds(1500)
    assert render.event(pb.Event(error=error), "bob") == (
        "error: slow down: you are sending lines too fast (at most 5 a second) (try again in 1.5 s)"
    )


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC for the duration of the test."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("utc")
def test_render_history_marks_the_line_with_the_local_time_it_was_said() -> None:
    message = pb.Message(seq=7, sender="alice", text="hi")
    message.sent_at.FromSeconds(14 * 3600 + 2 * 60 + 59)
    assert render.event(HistoryMessage(message), "bob") == "[history 14:02] alice : hi"


@pytest.mark.parametrize(
    ("listed", "lines"),
    [
        ([], ["no rooms yet; /create ROOM makes one"]),
        (
            [
                pb.Room(name="empty", member_count=0),
                pb.Room(name="lobby", member_count=2, last_seq=15),
                pb.Room(name="x", member_count=1, last_seq=1),
            ],
            [
                "rooms:",
                "  empty (0 members, 0 messages)",
                "  lobby (2 members, 15 messages)",
                "  x (1 member, 1 message)",
            ],
        ),
    ],
)
def test_render_rooms(listed: list[pb.Room], lines: list[str]) -> None:
    assert render.rooms(listed) == lines


@pytest.mark.parametrize(
    ("rendered", "line"),
    [
        (render.members("lobby", ["alice", "bob"]), "members of lobby: alice, bob"),
        (render.left("lobby"), "* you left lobby"),
        (render.killed("lobby", 2), "room lobby killed; 2 members sent back to waiting"),
        (render.killed("lobby", 1), "room lobby killed; 1 member sent back to waiting"),
        (render.error("no such room"), "error: no such room"),
        (render.pruned([]), "no empty rooms to prune"),
        (render.pruned(["attic", "cellar"]), "pruned 2 empty rooms: attic, cellar"),
        (render.pending("hello"), "(pending) hello"),
        (render.pending("psst", "bob"), "(pending whisper to bob) psst"),
    ],
)
def test_render_results(rendered: str, line: str) -> None:
    assert rendered == line
