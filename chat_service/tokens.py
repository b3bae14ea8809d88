"""Resume tokens: signed with a room's secret, so that any server process sharing the store can check them."""

from __future__ import annotations

import base64
import hmac
import secrets

from chat_service.store import RoomRecord


def issue(room: RoomRecord, key: str, nonce: str = "") -> str:
    """A resume token: the room's uid, a nonce (new unless given), and a MAC proving the room gave it out for the name
    with `key`."""
    nonce = nonce or secrets.token_urlsafe(12)
    mac = hmac.digest(room.secret, f"{key}\0{nonce}".encode("utf-8", "surrogatepass"), "sha256")
    return f"{room.uid}.{nonce}.{base64.urlsafe_b64encode(mac[:18]).decode()}"


def proves(token: str, room: RoomRecord, key: str) -> bool:
    """Whether `room` gave out `token` for the name with `key`, in this membership or an earlier one."""
    nonce = token.split(".")[1] if token.count(".") == 2 else ""
    return bool(nonce) and same(issue(room, key, nonce), token)


def same(expected: str, presented: str) -> bool:
    """Whether two tokens are equal, compared in constant time."""
    # As bytes: compare_digest refuses a str that is not ASCII.
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "surrogatepass"))
