"""The pure command parser: one typed line in, one command object out, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Create:
    """Create ROOM and join it, as NAME or the server's default name."""

    room: str
    name: str | None = None


@dataclass(frozen=True)
class Join:
    """Join the existing ROOM, as NAME or the server's default name."""

    room: str
    name: str | None = None


@dataclass(frozen=True)
class Say:
    """Say a line to the whole room."""

    text: str


@dataclass(frozen=True)
class Me:
    """Say what the member does (`/me waves` shows as `* alice waves`)."""

    text: str


@dataclass(frozen=True)
class Whisper:
    """Say a line to one member of the room."""

    recipient: str
    text: str


@dataclass(frozen=True)
class Leave:
    """Leave the room and go back to waiting."""


@dataclass(frozen=True)
class Who:
    """List the members of the room."""


@dataclass(frozen=True)
class Ls:
    """List the open rooms."""


@dataclass(frozen=True)
class Kill:
    """Close ROOM and eject its members (admin console only)."""

    room: str


@dataclass(frozen=True)
class Prune:
    """Close every empty room (admin console only)."""


@dataclass(frozen=True)
class Help:
    """Show the usage text."""


@dataclass(frozen=True)
class Quit:
    """Leave the room, if any, and exit."""


@dataclass(frozen=True)
class Invalid:
    """A line that is not a valid command; `message` tells the user how to fix it."""

    message: str


Command = Create | Join | Say | Me | Whisper | Leave | Who | Ls | Help | Quit | Invalid
AdminCommand = Ls | Kill | Prune | Help | Quit | Invalid

USAGE = """\
commands:
  /create ROOM [NAME]   create ROOM and join it (NAME defaults to Unknown)
  /join ROOM [NAME]     join ROOM (NAME defaults to Unknown)
  /ls                   list the rooms (also /list)
  /who                  list the members of your room
  /me ACTION            say what you do: /me waves shows as * NAME waves
  /whisper NAME TEXT    say TEXT to NAME only (also /w, /msg)
  /leave                leave your room
  /help                 show this help
  /quit                 leave your room and exit (also /exit, Ctrl-D)
  TEXT                  say TEXT to your room; //TEXT says /TEXT
Tab completes commands and the names of your room's members."""

ADMIN_USAGE = """\
commands:
  /ls                   list the rooms
  /kill ROOM            close ROOM and send its members back to waiting
  /prune                close every room nobody is in
  /help                 show this help
  /quit                 exit (also Ctrl-D)"""

_ALIASES = {"w": "whisper", "msg": "whisper", "exit": "quit", "list": "ls"}
# What Tab completes after '/': every command and alias, in the order /help lists them.
COMMAND_NAMES = ("create", "join", "ls", "list", "who", "me", "whisper", "w", "msg", "leave", "help", "quit", "exit")
_ADMIN_ALIASES = {"exit": "quit", "list": "ls"}


def parse(line: str) -> Command | None:
    """The command a member typed; None for a blank line, `Invalid` for anything malformed."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Say(line)
    if line.startswith("//"):
        return Say(line[1:])
    split = _split_command(line, _ALIASES)
    if isinstance(split, Invalid):
        return split
    word, rest = split
    args = rest.split()
    if word in ("create", "join"):
        if not 1 <= len(args) <= 2:
            return Invalid(f"usage: /{word} ROOM [NAME]")
        name = args[1] if len(args) == 2 else None
        return Create(args[0], name) if word == "create" else Join(args[0], name)
    if word == "me":
        return Me(rest) if rest.strip() else Invalid("usage: /me ACTION")
    if word == "whisper":
        parts = rest.split(None, 1)
        if len(parts) != 2:
            return Invalid("usage: /whisper NAME TEXT")
        return Whisper(parts[0], parts[1])
    simple: dict[str, Command] = {"leave": Leave(), "who": Who(), "ls": Ls(), "help": Help(), "quit": Quit()}
    if word in simple:
        return Invalid(f"usage: /{word} (it takes no arguments)") if args else simple[word]
    return _unknown(word)


def parse_admin(line: str) -> AdminCommand | None:
    """The command an administrator typed in the admin console; None for a blank line."""
    if not line.strip():
        return None
    if not line.lstrip().startswith("/"):
        return Invalid("admin commands start with '/'; /help lists them")
    split = _split_command(line.strip(), _ADMIN_ALIASES)
    if isinstance(split, Invalid):
        return split
    word, rest = split
    args = rest.split()
    if word == "kill":
        return Kill(args[0]) if len(args) == 1 else Invalid("usage: /kill ROOM")
    simple: dict[str, AdminCommand] = {"ls": Ls(), "prune": Prune(), "help": Help(), "quit": Quit()}
    if word in simple:
        return Invalid(f"usage: /{word} (it takes no arguments)") if args else simple[word]
    return _unknown(word)


def _split_command(line: str, aliases: dict[str, str]) -> tuple[str, str] | Invalid:
    """`/word rest` -> (canonical word, rest); the word must follow the slash directly."""
    body = line[1:]
    if not body or body[0].isspace():
        return Invalid("a command name must follow '/'; /help lists the commands, //TEXT says /TEXT")
    parts = body.split(None, 1)
    word = parts[0].lower()
    return aliases.get(word, word), parts[1] if len(parts) == 2 else ""


def _unknown(word: str) -> Invalid:
    return Invalid(f"unknown command /{word}; /help lists the commands")
