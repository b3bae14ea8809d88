"""The name and text rules on their own: what is refused, and which names count as the same."""

from __future__ import annotations

import pytest

from chat_service.errors import ChatError, ErrorKind
from chat_service.validation import check_name, check_text, name_key

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man, ZWJ, woman, ZWJ, girl: one emoji


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("alice", "Alice"),
        ("alice", "ALICE"),
        ("alice", "\u0430lice"),  # Cyrillic a
        ("alice", "\uff41lice"),  # full-width a
        ("alice", "a1ice"),  # digit one for l
        ("bob", "b0b"),  # digit zero for o
        ("jos\u00e9", "jose\u0301"),  # NFC and NFD
        (FAMILY, "\U0001f468\U0001f469\U0001f467"),  # with and without the joiners
    ],
    ids=["case", "upper", "cyrillic", "fullwidth", "one-for-l", "zero-for-o", "nfc-nfd", "emoji-joiners"],
)
def test_names_that_look_alike_have_one_key(first: str, second: str) -> None:
    assert name_key(check_name(first, "member")) == name_key(check_name(second, "member"))


@pytest.mark.parametrize("name", ["alice", "bob", "Unknown", "Unknown-2", "m7", "jos\u00e9", "\u540d\u524d"])
def test_distinct_names_keep_distinct_keys(name: str) -> None:
    others = {"alice", "bob", "Unknown", "Unknown-2", "m7", "jos\u00e9", "\u540d\u524d"} - {name}
    assert name_key(name) not in {name_key(other) for other in others}


def test_a_name_is_shown_as_typed_in_nfc() -> None:
    assert check_name("Alice", "member") == "Alice"
    assert check_name("jose\u0301", "member") == "jos\u00e9"


@pytest.mark.parametrize(
    "name",
    [FAMILY, "\U0001f600", "\u2764\ufe0f", "\U0001f468\U0001f3fd\u200d\U0001f4bb", "1\ufe0f\u20e3", "\u540d\u524d"],
    ids=["family", "grin", "heart-vs16", "technologist-skin-tone", "keycap", "han"],
)
def test_emoji_and_other_scripts_are_names(name: str) -> None:
    assert check_name(name, "member") == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("\u3164", "U+3164 (HANGUL FILLER), which shows as a blank"),
        ("\u2800", "U+2800 (BRAILLE PATTERN BLANK), which shows as a blank"),
        ("a\u2800b", "which shows as a blank"),
        ("\uffa0", "which shows as a blank"),
        ("al\u200dice", "U+200D (ZERO WIDTH JOINER), which names may not contain"),
        ("al\u200bice", "U+200B (ZERO WIDTH SPACE)"),
        ("a\u00adb", "U+00AD (SOFT HYPHEN)"),
        ("a\ufe0f", "U+FE0F (VARIATION SELECTOR-16)"),
        ("\u200d\U0001f600", "U+200D"),
        ("\u202eevil", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("bell\a", "U+0007 (a control character)"),
        ("\u0301a", "starts with a combining mark"),
        ("a b", "has whitespace"),
        ("a\u3000b", "has whitespace"),
        ("", "is empty"),
        ("x" * 33, "33 characters long"),
    ],
    ids=[
        "hangul-filler",
        "braille-blank",
        "blank-inside",
        "halfwidth-filler",
        "zwj-between-letters",
        "zero-width-space",
        "soft-hyphen",
        "selector-after-letter",
        "leading-zwj",
        "bidi-override",
        "bell",
        "leading-mark",
        "space",
        "ideographic-space",
        "empty",
        "too-long",
    ],
)
def test_invisible_and_malformed_names_are_refused(name: str, says: str) -> None:
    with pytest.raises(ChatError) as refused:
        check_name(name, "member")
    assert refused.value.kind is ErrorKind.INVALID_NAME
    assert says in refused.value.message


def test_a_whisper_recipient_of_any_length_has_a_key() -> None:
    assert name_key("x" * 5000) != name_key("x")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("two\nlines", "U+000A (a line break)"),
        ("over\rwrite", "U+000D (a carriage return)"),
        ("\x1b]0;pwned\x07", "U+001B (a terminal escape)"),
        ("col\tumn", "U+0009 (a tab)"),
        ("del\x7f", "U+007F"),
        ("csi\x9b2J", "U+009B"),
        ("caf\u00e9\u2028next", "U+2028 (LINE SEPARATOR)"),
        ("abc\u202edcb", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("\u2066isolated\u2069", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
    ],
    ids=["newline", "cr", "escape", "tab", "del", "c1-csi", "line-separator", "rlo", "isolate"],
)
def test_text_that_could_forge_lines_is_refused(text: str, says: str) -> None:
    with pytest.raises(ChatError) as refused:
        check_text(text)
    assert refused.value.kind is ErrorKind.INVALID_TEXT
    assert says in refused.value.message
    assert "send each line on its own" in refused.value.message


@pytest.mark.parametrize(
    "text",
    ["hello", "caf\u00e9 \u540d\u524d", FAMILY, "\u05e9\u05dc\u05d5\u05dd\u200f ok", "x" * 4096],
    ids=["ascii", "accents-han", "emoji-zwj", "rtl-mark", "longest"],
)
def test_plain_text_in_any_script_is_a_line(text: str) -> None:
    assert check_text(text) == text
