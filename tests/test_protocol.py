"""The client's protocol core, fed events by hand: joins, replay, duplicates, answers, reconnects and resumes."""

from __future__ import annotations

import pytest

from chat.v1 import chat_pb2 as pb
from chat_cli.protocol import (
    MAX_LINE_BYTES,
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    ConnectionLost,
    Feed,
    HistoryMessage,
    Outcome,
    Protocol,
    Reconnecting,
    SessionError,
    StreamEnd,
)

ADDRESS = "127.0.0.1:50051"


def joined(name: str = "alice", *, last_seq: int = 0, replayed: int = 0, resumed: bool = False) -> pb.Event:
    return pb.Event(
        joined=pb.Joined(
            room="lobby",
            name=name,
            members=[name, "bob"],
            last_seq=last_seq,
            resume_token=f"token-{last_seq}",
            replayed=replayed,
            resumed=resumed,
        )
    )


def message(seq: int, sender: str = "bob", client_id: str = "") -> pb.Event:
    return pb.Event(message=pb.Message(seq=seq, sender=sender, text=f"line {seq}", client_id=client_id))


def error(client_id: str = "", code: pb.ErrorCode.ValueType = pb.ERROR_CODE_INVALID_TEXT) -> pb.Event:
    return pb.Event(error=pb.Error(code=code, message="refused", client_id=client_id))


def in_lobby(core: Protocol, *, last_seq: int = 0) -> Feed:
    """A feed whose join was answered; the member `alice` is in `lobby`."""
    feed, _ = core.join("lobby", "alice", create=False, history=0)
    core.receive(feed, joined(last_seq=last_seq))
    return feed


def lines(outcome: Outcome) -> list[str]:
    """What the outcome shows, as the kinds a front end would print."""
    return [
        type(shown).__name__ if not isinstance(shown, pb.Event) else str(shown.WhichOneof("kind"))
        for shown in outcome.show
    ]


def test_a_join_is_answered_and_its_history_is_marked_before_it_catches_up() -> None:
    core = Protocol(ADDRESS)
    feed, request = core.join("lobby", "alice", create=True, history=2)
    assert request.join == pb.ChatRequest.JoinRoom(room="lobby", name="alice", create=True, history=2)
    outcome = core.receive(feed, joined(last_seq=5, replayed=2))
    assert (outcome.answered, outcome.caught_up, lines(outcome)) == (True, False, ["joined"])
    assert outcome.joined is not None and core.current is not None and core.current.room == "lobby"
    first = core.receive(feed, message(4))
    last = core.receive(feed, message(5))
    assert isinstance(first.show[0], HistoryMessage) and not first.caught_up
    assert isinstance(last.show[0], HistoryMessage) and last.caught_up
    assert core.who() == ("lobby", ["alice", "bob"])
    with pytest.raises(SessionError, match="already in room lobby; /leave first"):
        core.join("other", None, create=False, history=0)


def test_a_refused_join_shows_the_error_and_stays_waiting() -> None:
    core = Protocol(ADDRESS)
    feed, _ = core.join("nowhere", None, create=False, history=0)
    outcome = core.receive(feed, error(code=pb.ERROR_CODE_ROOM_NOT_FOUND))
    assert (outcome.answered, outcome.joined, lines(outcome)) == (True, None, ["error"])
    assert core.current is None
    with pytest.raises(SessionError, match="not in a room"):
        core.say("hello")


def test_a_repeat_of_a_message_seen_is_dropped_and_counted() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core, last_seq=3)
    assert lines(core.receive(feed, message(3))) == []
    assert lines(core.receive(feed, message(4))) == ["message"]
    assert lines(core.receive(feed, message(4))) == []
    assert core.repeats_dropped == 2


def test_presence_events_keep_the_member_list() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    core.receive(feed, pb.Event(member_joined=pb.MemberJoined(name="carol")))
    core.receive(feed, pb.Event(member_left=pb.MemberLeft(name="bob")))
    assert core.who() == ("lobby", ["alice", "carol"])
    core.receive(feed, pb.Event(members=pb.Members(names=["alice", "dave"])))
    assert core.who() == ("lobby", ["alice", "dave"])


def test_lines_are_answered_by_their_echo_or_by_an_error_naming_their_id() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    stay, first, request = core.say("hello", action=True)
    assert request.say == pb.ChatRequest.SendMessage(text="hello", client_id=first, action=True)
    _, second, _ = core.whisper("bob", "psst")
    _, third, _ = core.say("again")
    assert list(stay.unanswered) == [first, second, third]
    # Errors answer the request they name, whatever the order: the third line fails before the whisper is answered.
    assert core.receive(feed, error(third)).answered_ids == [third]
    assert core.receive(feed, error("")).answered_ids == []
    assert core.receive(feed, message(1, "alice", first)).answered_ids == [first]
    # Someone else's echo with the same id is no answer to this member's line.
    whisper = pb.Whisper(sender="bob", recipient="alice", text="hi", client_id=second)
    assert core.receive(feed, pb.Event(whisper=whisper)).answered_ids == []
    assert list(stay.unanswered) == [second]


def test_a_line_over_the_limit_is_refused_before_it_is_sent() -> None:
    core = Protocol(ADDRESS)
    in_lobby(core)
    core.say("é" * (MAX_LINE_BYTES // 2))
    with pytest.raises(SessionError, match=r"at most 4,096 bytes of UTF-8 and this one has 4,098"):
        core.say("é" * (MAX_LINE_BYTES // 2) + "xy")
    assert core.current is not None and len(core.current.unanswered) == 1


def test_a_broken_stream_is_resumed_with_what_was_seen_and_replays_only_what_was_missed() -> None:
    core = Protocol(ADDRESS, rand=lambda low, high: 1.0)
    feed = in_lobby(core, last_seq=2)
    core.receive(feed, message(3))
    stay, pending, _ = core.say("said before the cut")
    assert core.ended(feed, StreamEnd("UNAVAILABLE", "connection reset")).resume
    assert core.reconnecting
    attempts = [core.attempt(stay, number) for number in (1, 2, 10)]
    assert attempts == [
        Reconnecting("lobby", 1, RECONNECT_FIRST_DELAY),
        Reconnecting("lobby", 2, 2 * RECONNECT_FIRST_DELAY),
        Reconnecting("lobby", 10, RECONNECT_MAX_DELAY),
    ]

    attempt, request = core.resume(stay)
    assert (request.join.name, request.join.resume.token, request.join.resume.last_seq) == ("alice", "token-2", 3)
    outcome = core.receive(attempt, joined(last_seq=5, replayed=2, resumed=True))
    assert outcome.answered and lines(outcome) == ["joined"]
    # Replayed after a resume, the missed messages are live ones, not history.
    assert lines(core.receive(attempt, message(4))) == ["message"]
    assert core.receive(attempt, message(5)).caught_up
    assert core.unanswered(stay) == [(pending, stay.unanswered[pending])]
    assert core.adopt(attempt) and not core.reconnecting
    # The line re-sent on the new stream comes back with a number already shown: answered, not shown again.
    echo = core.receive(attempt, message(5, "alice", pending))
    assert (echo.answered_ids, echo.show) == ([pending], [])


def test_a_refused_resume_is_back_to_waiting_and_counts_the_lines_dropped() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    stay, _, _ = core.say("one")
    core.say("two")
    core.ended(feed, StreamEnd("UNAVAILABLE"))
    attempt, _ = core.resume(stay)
    # An error before Joined refuses the resume, and is told as a loss rather than shown as a join error.
    refused = core.receive(attempt, error(code=pb.ERROR_CODE_ROOM_NOT_FOUND))
    assert refused.answered and refused.show == [] and not core.retry_refusal(attempt)
    lost = core.refused(stay, attempt.refusal)
    assert lost == ConnectionLost(
        "lobby",
        "room lobby no longer exists (it was closed, or the server restarted); you are back in the waiting state; "
        "2 unsent lines were dropped",
    )
    assert core.current is None


def test_a_resume_refused_for_the_rate_limit_is_tried_again() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    core.ended(feed, StreamEnd("UNAVAILABLE"))
    assert core.current is not None
    attempt, _ = core.resume(core.current)
    core.receive(attempt, error(code=pb.ERROR_CODE_RATE_LIMITED))
    assert core.retry_refusal(attempt) and core.reconnecting


def test_a_server_shutdown_is_shown_then_resumed_and_a_killed_room_is_back_to_waiting() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    shutdown = pb.Event(room_closed=pb.RoomClosed(room="lobby", reason=pb.CLOSE_REASON_SERVER_SHUTDOWN))
    outcome = core.receive(feed, shutdown)
    assert lines(outcome) == ["room_closed"]
    assert outcome.resume and outcome.half_close and core.reconnecting
    # Its stream's end that follows is no second loss.
    assert core.ended(feed, StreamEnd()) == Outcome()

    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    killed = pb.Event(room_closed=pb.RoomClosed(room="lobby", reason=pb.CLOSE_REASON_KILLED))
    outcome = core.receive(feed, killed)
    assert (lines(outcome), outcome.resume, outcome.half_close, core.current) == (["room_closed"], False, True, None)


def test_a_stream_the_server_ends_is_a_loss_in_the_servers_words() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    core.say("unanswered")
    outcome = core.ended(feed, StreamEnd("RESOURCE_EXHAUSTED", "you read too slowly"))
    assert outcome.show == [ConnectionLost("lobby", "you read too slowly; 1 unsent line was dropped")]
    assert core.current is None

    feed = in_lobby(core)
    outcome = core.ended(feed, StreamEnd("INTERNAL"))
    assert outcome.show == [
        ConnectionLost("lobby", f"the chat server at {ADDRESS} went away (INTERNAL); you are no longer in room lobby")
    ]


def test_the_end_of_a_stream_being_left_is_no_loss() -> None:
    core = Protocol(ADDRESS)
    feed = in_lobby(core)
    feed.leaving = True
    assert core.ended(feed, StreamEnd("UNAVAILABLE")) == Outcome()
    assert core.leave().room == "lobby" and core.current is None
