"""The rules for room names, member names and chat lines.

A name is shown as it was typed (in NFC) but compared by `name_key`: the PRECIS nickname rules (RFC 8266: width,
case and compatibility forms folded) and then the Unicode TS #39 skeleton, so `alice`, `Alice` and `alice` spelt with
a Cyrillic a are one name. A chat line is one line of plain text: nothing in it can move the cursor, end the line
or reorder it.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import icu
from precis_i18n import get_profile

from chat_service.errors import ChatError, ErrorKind

MAX_NAME_CHARS = 32
MAX_TEXT_BYTES = 4096
MAX_CLIENT_ID_BYTES = 64

# C0 controls and DEL, looked for in the UTF-8 form that the size check makes anyway: deleting them from the bytes
# costs a fifth of a regular-expression search over the text, and only text beyond ASCII pays for the search. With
# both, check_text takes 0.6 µs for 100 bytes of ASCII (0.25 µs without them), 6 µs for 4 KiB of ASCII and 18 µs
# for 4 KiB of accented letters, once per line said however many members it reaches.
_C0_BYTES = bytes(range(0x20)) + b"\x7f"
# Beyond ASCII: C1 controls, the line and paragraph separators, and the bidi embeddings, overrides and isolates,
# which reorder the text after them on screen (marks such as U+200F stay: right-to-left text needs them).
_NON_ASCII_UNSAFE = re.compile("[\x80-\x9f\u2028-\u202e\u2066-\u2069]")
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")

_NICKNAME = get_profile("NicknameCaseMapped")
_SPOOF = icu.SpoofChecker()
_ZWJ = "\u200d"
_PRESENTATION_SELECTORS = "\ufe0e\ufe0f"
_KEYCAP_BASES = "0123456789#*"
# Characters that show as nothing but a blank. PRECIS refuses the Hangul fillers too, and every default-ignorable
# code point, but the braille blank and the rest pass it.
_BLANKS = frozenset("\u2800\u3164\u115f\u1160\uffa0\u303f\U0001d159\U00016fe4")
_CONTROL_NAMES = {"\t": "a tab", "\n": "a line break", "\r": "a carriage return", "\x1b": "a terminal escape"}


def check_name(name: str, what: str) -> str:
    """Return `name` as shown (in NFC) if it is a valid room or member name, else raise INVALID_NAME naming `what`."""
    if not name:
        raise ChatError(ErrorKind.INVALID_NAME, f"the {what} name is empty; give 1 to {MAX_NAME_CHARS} characters")
    shown = unicodedata.normalize("NFC", name)
    if len(shown) > MAX_NAME_CHARS:
        raise ChatError(
            ErrorKind.INVALID_NAME,
            f"the {what} name is {len(shown)} characters long; the limit is {MAX_NAME_CHARS}",
        )
    if any(char.isspace() for char in shown):
        raise ChatError(ErrorKind.INVALID_NAME, f"the {what} name {shown!r} has whitespace in it; use a single word")
    if blank := next((char for char in shown if char in _BLANKS), None):
        raise ChatError(
            ErrorKind.INVALID_NAME,
            f"the {what} name {shown!r} has {_describe(blank)}, which shows as a blank; use visible characters",
        )
    if unicodedata.category(shown[0]).startswith("M"):
        raise ChatError(
            ErrorKind.INVALID_NAME,
            f"the {what} name {shown!r} starts with a combining mark ({_describe(shown[0])}), which would join the "
            "character before it on screen; start with a letter, digit or symbol",
        )
    glueless = _without_emoji_glue(shown)
    try:
        _NICKNAME.enforce(glueless)
    except UnicodeEncodeError as refusal:
        # PRECIS reports a position in the string it mapped; name the character as typed when one alone fails.
        culprit = next((char for char in glueless if not _allowed(char)), refusal.object[refusal.start])
        raise ChatError(
            ErrorKind.INVALID_NAME,
            f"the {what} name {shown!r} has {_describe(culprit)}, which names may not contain; use visible "
            "letters, digits, punctuation, symbols or emoji",
        ) from None
    return shown


def name_key(name: str) -> str:
    """The form names are compared in: two names with the same key could be taken for each other on screen."""
    # A whisper's recipient can be any length: one far longer than a name names nobody, and is neither folded nor
    # cached (it stays itself, so it cannot match a name given out).
    return name if len(name) > 4 * MAX_NAME_CHARS else _key(name)


@functools.lru_cache(maxsize=4096)
def _key(name: str) -> str:
    try:
        folded = _NICKNAME.enforce(_without_emoji_glue(unicodedata.normalize("NFC", name)))
    except UnicodeEncodeError:
        # Such a name is never given out, so its key only has to be stable (a whisper to it finds nobody).
        folded = name.casefold()
    # Folded again after the skeleton, which maps some lower-case letters to capitals: `b0b` to `bOb`, like `bob`.
    return str(_SPOOF.getSkeleton(0, folded)).casefold()


def _without_emoji_glue(name: str) -> str:
    """`name` without the joiners and presentation selectors inside its emoji sequences (UTS #51); anywhere else
    they stay, for PRECIS to refuse as the invisible characters they are there."""
    if _ZWJ not in name and not any(selector in name for selector in _PRESENTATION_SELECTORS):
        return name
    kept: list[str] = []
    for i, char in enumerate(name):
        before = _emoji_base_before(name, i)
        if char in _PRESENTATION_SELECTORS and i > 0 and (_pictograph(name[i - 1]) or name[i - 1] in _KEYCAP_BASES):
            continue
        if char == _ZWJ and before and i + 1 < len(name) and _pictograph(before) and _pictograph(name[i + 1]):
            continue
        kept.append(char)
    return "".join(kept)


def _emoji_base_before(name: str, i: int) -> str:
    """The character an emoji modifier or selector run before position `i` belongs to ('' at the start)."""
    while i > 0 and (name[i - 1] in _PRESENTATION_SELECTORS or 0x1F3FB <= ord(name[i - 1]) <= 0x1F3FF):
        i -= 1
    return name[i - 1] if i > 0 else ""


def _pictograph(char: str) -> bool:
    # Emoji are "other symbols" (So); a joiner between two of them cannot hide anything a reader would miss.
    return unicodedata.category(char) == "So"


def _allowed(char: str) -> bool:
    try:
        _NICKNAME.enforce(char)
    except UnicodeEncodeError:
        return False
    return True


def _describe(char: str) -> str:
    name = unicodedata.name(char, "") or _CONTROL_NAMES.get(char, "a control character")
    return f"U+{ord(char):04X} ({name})"


def check_text(text: str) -> str:
    """Return `text` if it is a valid chat line, else raise INVALID_TEXT."""
    if not text:
        raise ChatError(ErrorKind.INVALID_TEXT, "the line is empty; type something to say")
    encoded = text.encode("utf-8", "surrogatepass")
    size = len(encoded)
    if size > MAX_TEXT_BYTES:
        raise ChatError(
            ErrorKind.INVALID_TEXT,
            f"the line is {size} bytes long; the limit is {MAX_TEXT_BYTES} bytes, so split it",
        )
    if len(encoded.translate(None, _C0_BYTES)) != size or (
        not encoded.isascii() and _NON_ASCII_UNSAFE.search(text) is not None
    ):
        unsafe = _UNSAFE.search(text)
        assert unsafe is not None
        raise ChatError(
            ErrorKind.INVALID_TEXT,
            f"the line has {_describe(unsafe.group())}; a line is one line of text without line breaks, tabs, "
            "terminal escapes or direction overrides, so send each line on its own",
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
