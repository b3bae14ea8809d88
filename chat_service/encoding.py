"""Domain events to wire bytes, encoded once per broadcast and framed so that batches are concatenations."""

from __future__ import annotations

from chat.v1 import chat_pb2 as pb
from chat_service.events import (
    CloseReason,
    Event,
    Joined,
    LeaveReason,
    MemberJoined,
    MemberLeft,
    Members,
    Message,
    Problem,
    RoomClosed,
    Whisper,
)
from chat_service.status import error_code

_LEAVE_REASONS = {
    LeaveReason.LEFT: pb.LEAVE_REASON_LEFT,
    LeaveReason.DISCONNECTED: pb.LEAVE_REASON_DISCONNECTED,
    LeaveReason.TOO_SLOW: pb.LEAVE_REASON_TOO_SLOW,
}
_CLOSE_REASONS = {
    CloseReason.KILLED: pb.CLOSE_REASON_KILLED,
    CloseReason.SERVER_SHUTDOWN: pb.CLOSE_REASON_SERVER_SHUTDOWN,
}
# ChatResponse.events is field 1, length-delimited: each element is framed as tag, length, bytes.
_EVENTS_TAG = b"\x0a"


def to_proto(event: Event) -> pb.Event:
    """The protobuf form of a domain event."""
    match event:
        case Message(seq, sender, text, sent_at_ns, client_id, action):
            message = pb.Message(seq=seq, sender=sender, text=text, client_id=client_id, action=action)
            message.sent_at.FromNanoseconds(sent_at_ns)
            return pb.Event(message=message)
        case Whisper(sender, recipient, text, sent_at_ns, client_id):
            whisper = pb.Whisper(sender=sender, recipient=recipient, text=text, client_id=client_id)
            whisper.sent_at.FromNanoseconds(sent_at_ns)
            return pb.Event(whisper=whisper)
        case Joined(room, name, members, last_seq, created, resumed, resume_token, replayed, lost):
            joined = pb.Joined(
                room=room,
                name=name,
                members=members,
                last_seq=last_seq,
                created=created,
                resumed=resumed,
                resume_token=resume_token,
                replayed=replayed,
                lost=lost,
            )
            return pb.Event(joined=joined)
        case MemberJoined(name, returned):
            return pb.Event(member_joined=pb.MemberJoined(name=name, returned=returned))
        case MemberLeft(name, reason):
            return pb.Event(member_left=pb.MemberLeft(name=name, reason=_LEAVE_REASONS[reason]))
        case Members(names):
            return pb.Event(members=pb.Members(names=names))
        case RoomClosed(room, reason):
            return pb.Event(room_closed=pb.RoomClosed(room=room, reason=_CLOSE_REASONS[reason]))
        case Problem(error, client_id):
            problem = pb.Error(code=error_code(error.kind), message=error.message, client_id=client_id)
            if error.retry_after is not None:
                problem.retry_after.FromNanoseconds(round(error.retry_after * 1e9))
            return pb.Event(error=problem)


def encode(event: Event) -> bytes:
    """One event as a framed element of ChatResponse.events: a batch is these pieces joined."""
    body = to_proto(event).SerializeToString()
    return _EVENTS_TAG + varint(len(body)) + body


def varint(value: int) -> bytes:
    """`value` as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
