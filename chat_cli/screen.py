"""Where the member's client writes: plain lines for scripts, times and colours on a terminal; Tab completion and
the input history kept across runs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prompt_toolkit import print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory

from chat.v1 import chat_pb2
from chat_cli import render
from chat_cli.commands import COMMAND_NAMES
from chat_cli.protocol import ConnectionLost, HistoryMessage, Incoming

TIME_STYLE = "ansibrightblack"


def colour_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org) or the terminal is dumb."""
    environ = os.environ if environ is None else environ
    return sys.stdout.isatty() and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


class Screen:
    """Prints lines one at a time, remembering whether any was an error and whether the reader has gone."""

    def __init__(self, *, timestamps: bool = False, colour: bool = False) -> None:
        self.timestamps = timestamps
        self.colour = colour
        # Set once an error line was printed: a failed command, an error from the server, a stay lost.
        self.failed = False
        # Set once the reader of standard output has gone (`chat | head -1`).
        self.closed = False

    def event(self, incoming: Incoming, me: str) -> None:
        """Print one incoming event as seen by `me`."""
        if isinstance(incoming, ConnectionLost) or (
            isinstance(incoming, chat_pb2.Event) and incoming.WhichOneof("kind") == "error"
        ):
            self.failed = True
        self._put(render.event(incoming, me), incoming, me)

    def line(self, line: str) -> None:
        """Print a line that is already safe (a result, a notice)."""
        self._put(line, None, "")

    def error(self, message: str) -> None:
        """Print an expected failure as an `error:` line."""
        self.failed = True
        self._put(render.error(message), None, "")

    def _put(self, line: str, incoming: Incoming | None, me: str) -> None:
        if self.closed:
            return
        stamp = ""
        # A history line carries the time it was said already.
        if self.timestamps and not isinstance(incoming, HistoryMessage):
            when = render.sent_at(incoming)
            stamp = f"[{render.clock(time.time() if when is None else when)}] "
        try:
            if self.colour:
                print_formatted_text(FormattedText([(TIME_STYLE, stamp), *render.styled(line, incoming, me)]))
            else:
                print(stamp + line, flush=True)
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed = True
        # Python flushes stdout again at exit; pointed at /dev/null, that flush cannot fail with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class ChatCompleter(Completer):
    """Tab completes a command after '/' at the start of the line, and otherwise a member of the room."""

    def __init__(self, members: Callable[[], Iterable[str]]) -> None:
        self._members = members

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        word = document.get_word_before_cursor(WORD=True)
        if word.startswith("/") and document.text_before_cursor.lstrip() == word:
            for name in COMMAND_NAMES:
                if f"/{name}".startswith(word.lower()):
                    yield Completion(f"/{name}", start_position=-len(word))
            return
        folded = word.casefold()
        for member in self._members():
            if member.casefold().startswith(folded):
                yield Completion(member, start_position=-len(word), display=render.safe(member))


def history_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the lines typed are kept across runs: $XDG_STATE_HOME/chat-service/history."""
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "chat-service" / "history"


def input_history(path: Path) -> History:
    """The input history kept in `path`, private to the user (directory 700, file 600); in memory if it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
        os.chmod(path, 0o600)
    except OSError:
        return InMemoryHistory()
    return FileHistory(path)
