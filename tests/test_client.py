"""The pure parts of `chat`: splitting piped input into lines, and Tab completion."""

from __future__ import annotations

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from chat_cli.client import READ_LIMIT, split_lines
from chat_cli.commands import Invalid
from chat_cli.protocol import too_long
from chat_cli.screen import ChatCompleter


def test_input_is_split_into_lines_wherever_the_chunks_break() -> None:
    assert list(split_lines([b"one\ntw", b"o\r\n", b"", b"thr", b"ee"])) == ["one", "two\r", "three"]


def test_a_line_that_is_not_utf8_is_refused_and_the_next_goes_on() -> None:
    assert list(split_lines([b"caf\xe9\nok\n"])) == [
        Invalid("not sent: the line is not valid UTF-8 (byte 4 of it); fix its encoding"),
        "ok",
    ]


def test_an_over_long_line_is_measured_and_refused_without_being_held() -> None:
    chunk = b"x" * 65536
    lines = list(split_lines([chunk] * 160 + [b"x\r\nnext\n", b"y" * (READ_LIMIT + 1)]))
    assert lines == [Invalid(too_long(160 * 65536 + 1)), "next", Invalid(too_long(READ_LIMIT + 1))]


def completions(text: str, members: list[str]) -> list[str]:
    found = ChatCompleter(lambda: members).get_completions(Document(text), CompleteEvent(completion_requested=True))
    return [completion.text for completion in found]


def test_tab_completes_commands_at_the_start_and_members_elsewhere() -> None:
    members = ["alice", "Bob", "bea"]
    assert completions("/wh", members) == ["/who", "/whisper"]
    assert completions("/M", members) == ["/me", "/msg"]
    assert completions("/whisper b", members) == ["Bob", "bea"]
    assert completions("hello A", members) == ["alice"]
    assert completions("hello /w", members) == []
