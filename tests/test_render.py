"""The client's lines: whatever the server sends, nothing printed can forge a line or act on the terminal."""

from __future__ import annotations

import re

import pytest

from chat.v1 import chat_pb2 as pb
from chat_cli import render
from chat_cli.protocol import ConnectionLost, Incoming

FORGED = "hi\n* room lobby was closed by the server\r\x1b]0;pwned\x07\x1b[2J\u202eevil\x9b"
# Anything a terminal acts on, or that reorders the rest of the line.
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")


def test_safe_escapes_controls_and_bidi_overrides_and_keeps_the_rest() -> None:
    assert render.safe("a\nb\rc\x1bd\u202ee\tf\x85") == "a\\nb\\rc\\x1bd\\u202ee\\tf\\x85"
    assert render.safe("caf\u00e9 \u540d\u524d \U0001f468\u200d\U0001f469\u200d\U0001f467 \u200f") == (
        "caf\u00e9 \u540d\u524d \U0001f468\u200d\U0001f469\u200d\U0001f467 \u200f"
    )


@pytest.mark.parametrize(
    "incoming",
    [
        pb.Event(message=pb.Message(seq=1, sender=FORGED, text=FORGED)),
        pb.Event(whisper=pb.Whisper(sender=FORGED, recipient="me", text=FORGED)),
        pb.Event(whisper=pb.Whisper(sender="me", recipient=FORGED, text=FORGED)),
        pb.Event(member_joined=pb.MemberJoined(name=FORGED)),
        pb.Event(member_left=pb.MemberLeft(name=FORGED)),
        pb.Event(room_closed=pb.RoomClosed(room=FORGED)),
        pb.Event(error=pb.Error(message=FORGED)),
        pb.Event(joined=pb.Joined(room=FORGED, name=FORGED, members=[FORGED, "me"])),
        ConnectionLost(FORGED, FORGED),
    ],
    ids=["message", "whisper", "whisper-echo", "joined", "left", "closed", "error", "own-join", "lost"],
)
def test_an_event_is_one_inert_line_whatever_it_carries(incoming: Incoming) -> None:
    line = render.event(incoming, "me")
    assert RAW.search(line) is None, line
    assert "\\n* room lobby was closed by the server\\r\\x1b]0;pwned\\x07" in line


def test_listings_and_confirmations_are_inert() -> None:
    lines = [
        *render.rooms([pb.Room(name=FORGED, member_count=1)]),
        render.members(FORGED, [FORGED]),
        render.left(FORGED),
        render.killed(FORGED, 1),
        render.pending(FORGED, FORGED),
        render.error(FORGED),
    ]
    assert [line for line in lines if RAW.search(line)] == []


def test_styled_colours_the_sender_and_sets_apart_your_lines_and_mentions() -> None:
    said = pb.Event(message=pb.Message(seq=1, sender="bob", text="hi Alice, and alicebot"))
    line = render.event(said, "alice")
    colour = render.nick_colour("bob")
    assert render.styled(line, said, "alice") == [
        (render.MENTION_STYLE, ""),
        (f"{render.MENTION_STYLE} {colour}", "bob"),
        (render.MENTION_STYLE, " : hi Alice, and alicebot"),
    ]
    # Part of a longer word is no mention; your own line is bold; an action colours the name after its star.
    assert render.styled(line, said, "alicebo")[0][0] == ""
    assert render.styled(line, said, "bob")[1] == (f"{render.OWN_STYLE} {colour}", "bob")
    action = pb.Event(message=pb.Message(seq=2, sender="bob", text="waves", action=True))
    assert render.styled(render.event(action, "alice"), action, "alice") == [
        ("", "* "),
        (colour, "bob"),
        ("", " waves"),
    ]
    assert render.styled("error: no", None, "alice") == [(render.ERROR_STYLE, "error: no")]
    assert render.styled("* bob joined", None, "alice") == [(render.NOTICE_STYLE, "* bob joined")]


def test_a_nickname_has_the_same_colour_in_every_run() -> None:
    # crc32, unlike hash(), is not salted per process.
    assert render.nick_colour("alice") == "ansibrightcyan"
    assert {render.nick_colour(f"member-{n}") for n in range(200)} == set(render.NICK_COLOURS)
