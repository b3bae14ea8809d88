"""The rules for room names, member names and chat lines."""

from __future__ import annotations

import unicodedata

from chat_service.errors import ChatError, ErrorKind

MAX_NAME_CHARS = 32
MAX_TEXT_BYTES = 4096
MAX_CLIENT_ID_BYTES = 64


def check_name(name: str, what: str) -> str:
    """Return `name` if it is a valid room or member name, else raise INVALID_NAME naming `what`."""
    if not name:
        raise ChatError(ErrorKind.INVALID_NAME, f"the {what} name is empty; give 1 to {MAX_NAME_CHARS} characters")
    if len(name) > MAX_NAME_CHARS:
        raise ChatError(
            ErrorKind.INVALID_NAME,
            f"the {what} name is {len(name)} characters long; the limit is {MAX_NAME_CHARS}",
        )
    for char in name:
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            raise ChatError(
                ErrorKind.INVALID_NAME,
                f"the {what} name {name!r} has whitespace or a control character; use a single word",
            )
    return name


def check_text(text: str) -> str:
    """Return `text` if it is a valid chat line, else raise INVALID_TEXT."""
    if not text:
        raise ChatError(ErrorKind.INVALID_TEXT, "the line is empty; type something to say")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ChatError(
            ErrorKind.INVALID_TEXT,
            f"the line is {size} bytes long; the limit is {MAX_TEXT_BYTES} bytes, so split it",
        )
    return text


def check_client_id(client_id: str) -> str:
    """Return `client_id` if it is a valid client-chosen id (empty means none), else raise BAD_REQUEST."""
    # A character is at most 4 bytes, so short ids skip the encoding.
    too_long = len(client_id) > MAX_CLIENT_ID_BYTES // 4
    if too_long and len(client_id.encode("utf-8", "surrogatepass")) > MAX_CLIENT_ID_BYTES:
        raise ChatError(
            ErrorKind.BAD_REQUEST, f"the client id is longer than {MAX_CLIENT_ID_BYTES} bytes; use a shorter one"
        )
    return client_id
