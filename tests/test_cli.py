"""The installed `chat` executable, from a pipe and on a terminal, against a real server; and its Session."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
from prompt_toolkit.output.vt100 import FG_ANSI_COLORS

from chat_cli import render
from tests.conftest import ServerProcess, executable, start_server_process
from tests.proc import Proc, chat, run_admin, unused_port
from tests.terminal import Terminal

NOT_IN_ROOM = "error: you are not in a room; /join ROOM or /create ROOM first"


def messages(proc: Proc, count: int) -> list[str]:
    """The next `count` chat lines (`SENDER : TEXT`) that `proc` prints, skipping notices."""
    return [proc.expect(" : ") for _ in range(count)]


def assert_clean_exit(*procs: Proc, status: int = 0) -> None:
    """End each client's input and check it left quietly: `status` (1 after any error line), no traceback."""
    for proc in procs:
        assert proc.finish() == status, proc.stderr
        assert "Traceback" not in proc.stderr


def test_seed_scenario(server_process: ServerProcess) -> None:
    with chat(server_process) as alice, chat(server_process) as bob, chat(server_process) as third:
        alice.send("/ls")
        alice.expect("no rooms yet; /create ROOM makes one")
        alice.send("/create lobby alice")
        alice.expect("* room lobby created; you joined as alice")
        server_process.wait_for_line("New room lobby created")

        bob.send("/join lobby bob")
        bob.expect("* you joined lobby as bob (members: alice, bob)")
        alice.expect("* bob joined")
        third.send("/join lobby")
        third.expect("* you joined lobby as Unknown (members: ")
        bob.expect("* Unknown joined")

        # Lines sent by two members at once reach every member in one order, the senders included.
        for n in range(3):
            alice.send(f"alice line {n}")
            bob.send(f"bob line {n}")
        seen_by_alice, seen_by_bob, seen_by_third = (messages(proc, 6) for proc in (alice, bob, third))
        assert seen_by_alice == seen_by_bob == seen_by_third
        assert sorted(seen_by_alice) == sorted(
            [f"alice : alice line {n}" for n in range(3)] + [f"bob : bob line {n}" for n in range(3)]
        )
        assert [line for line in seen_by_alice if line.startswith("alice")] == [
            f"alice : alice line {n}" for n in range(3)
        ]

        alice.send("/whisper bob hi")
        bob.expect("(whisper) alice : hi")
        alice.expect("(whisper to bob) alice : hi")
        # A whisper to the third member would have arrived before this later line from the same sender.
        alice.send("a later line")
        third.expect("alice : a later line")
        assert not [line for line in third.output if "(whisper" in line or line.endswith(": hi")]

        bob.send("/who")
        bob.expect("members of lobby: Unknown, alice, bob")
        bob.send("/ls")
        bob.expect("rooms:")
        bob.expect("  lobby (3 members, ")

        assert_clean_exit(third)
        assert "* you left lobby" in third.output
        alice.expect("* Unknown left")
        bob.send("/who")
        bob.expect("members of lobby: alice, bob")
        assert_clean_exit(alice, bob)


def test_default_names_are_numbered(server_process: ServerProcess) -> None:
    with chat(server_process) as first, chat(server_process) as second:
        first.send("/create lobby")
        first.expect("* room lobby created; you joined as Unknown")
        second.send("/join lobby")
        second.expect("* you joined lobby as Unknown-2 (members: Unknown, Unknown-2)")
        first.expect("* Unknown-2 joined")
        assert_clean_exit(first, second)


def test_room_commands_follow_the_state(server_process: ServerProcess) -> None:
    with chat(server_process) as alice, chat(server_process) as bob:
        for line in ("hello", "/who", "/leave", "/whisper bob hi"):
            alice.send(line)
            alice.expect(NOT_IN_ROOM)
        alice.send("/join nowhere")
        assert "nowhere" in alice.expect("error: ")

        alice.send("/create lobby alice")
        alice.expect("* room lobby created; you joined as alice")
        alice.send("/ls")
        alice.expect("  lobby (1 member, 0 messages)")
        alice.send("/create other")
        alice.expect("error: you are already in room lobby; /leave first")
        alice.send("/join lobby")
        alice.expect("error: you are already in room lobby; /leave first")

        bob.send("/create lobby")
        assert "lobby" in bob.expect("error: ")
        bob.send("/join lobby alice")
        assert "alice" in bob.expect("error: ")
        bob.send("/join lobby bob")
        bob.expect("* you joined lobby as bob (members: alice, bob)")

        alice.send("/leave")
        alice.expect("* you left lobby")
        bob.expect("* alice left")
        alice.send("hello")
        alice.expect(NOT_IN_ROOM)
        alice.send("/join lobby alice")
        alice.expect("* you joined lobby as alice (members: alice, bob)")
        bob.expect("* alice joined")
        alice.send("back again")
        bob.expect("alice : back again")
        assert_clean_exit(alice, bob, status=1)


def test_bad_input_is_an_error_and_the_stream_lives_on(server_process: ServerProcess) -> None:
    with chat(server_process) as alice:
        alice.send("/frobnicate")
        alice.expect("error: unknown command /frobnicate; /help lists the commands")
        alice.send("/help")
        alice.expect("/whisper NAME TEXT")
        alice.send("/create " + "r" * 40)
        alice.expect("error: ")
        alice.send("/create lobby")
        alice.expect("* room lobby created")
        alice.send("x" * 5000)
        alice.expect("error: ")
        alice.send("/whisper nobody hi")
        assert "nobody" in alice.expect("error: ")
        alice.send("//still here")
        alice.expect("Unknown : /still here")
        assert_clean_exit(alice, status=1)
        assert not [line for line in alice.output if "x" * 100 in line]


def test_a_line_that_would_drive_the_terminal_is_refused_and_nothing_raw_is_printed(
    server_process: ServerProcess,
) -> None:
    with chat(server_process) as alice, chat(server_process) as bob:
        alice.send("/create lobby alice")
        alice.expect("* room lobby created")
        bob.send("/join LOBBY Bob")
        bob.expect("* you joined lobby as Bob")
        alice.send("hi\x1b]0;pwned\x07\x1b[2J")
        assert "U+001B (a terminal escape)" in alice.expect("error: the line has")
        alice.send("/whisper bob \u202esecret")
        assert "U+202E (RIGHT-TO-LEFT OVERRIDE)" in alice.expect("error: the line has")
        alice.send("still one line")
        assert messages(bob, 1) == ["alice : still one line"]
        assert_clean_exit(alice, status=1)
        assert_clean_exit(bob)
    printed = [*alice.output, *bob.output, alice.stderr, bob.stderr]
    assert not [line for line in printed if "\x1b" in line or "\u202e" in line]


def test_end_of_input_leaves_after_printing_what_is_due(server_process: ServerProcess) -> None:
    with chat(server_process) as alice, chat(server_process) as bob:
        alice.send("/create lobby alice")
        alice.expect("* room lobby created")
        bob.send("/join lobby bob")
        bob.expect("* you joined lobby")
        bob.send("last words")
        assert_clean_exit(bob)
        assert bob.output[-2:] == ["bob : last words", "* you left lobby"]
        alice.expect("bob : last words")
        alice.expect("* bob left")
        alice.send("/quit")
        assert alice.wait() == 0
        assert alice.output[-1] == "* you left lobby"


def test_admin_kill_returns_every_member_to_waiting(server_process: ServerProcess) -> None:
    with chat(server_process) as alice, chat(server_process) as bob:
        alice.send("/create lobby alice")
        alice.expect("* room lobby created")
        bob.send("/join lobby bob")
        bob.expect("* you joined lobby")

        killed = run_admin(server_process, "kill", "lobby")
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout == "room lobby killed; 2 members sent back to waiting\n"
        for member in (alice, bob):
            member.expect("* room lobby was closed by the server")
            member.send("still there?")
            member.expect(NOT_IN_ROOM)
        bob.send("/ls")
        bob.expect("no rooms yet")

        bob.send("/create lobby bob")
        bob.expect("* room lobby created; you joined as bob")
        alice.send("/join lobby alice")
        alice.expect("* you joined lobby as alice (members: alice, bob)")
        assert_clean_exit(alice, bob, status=1)


def test_server_restart_returns_members_to_waiting_once_the_room_is_known_gone(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    with chat(server_process) as alice:
        alice.send("/create lobby")
        alice.expect("* room lobby created")
        server_process.process.terminate()
        alice.expect("* the server is shutting down")
        alice.expect("* connection to the server lost; reconnecting to lobby in ")
        assert server_process.process.wait(timeout=10) == 0
        alice.send("hello")
        alice.expect("(pending) hello")
        restarted = start_server_process(tmp_path / "state", "--port", str(server_process.port))
        try:
            alice.expect(
                "error: room lobby no longer exists (it was closed, or the server restarted); "
                "you are back in the waiting state; 1 unsent line was dropped"
            )
            alice.send("hello")
            alice.expect(NOT_IN_ROOM)
            assert_clean_exit(alice, status=1)
        finally:
            restarted.stop()


def _in_lobby_when_the_server_crashes(alice: Proc, server_process: ServerProcess) -> None:
    alice.send("/create lobby")
    alice.expect("* room lobby created")
    server_process.process.kill()
    alice.expect("* connection to the server lost; reconnecting to lobby in ")


def test_server_crash_leaves_the_member_reconnecting_until_it_leaves(server_process: ServerProcess) -> None:
    with chat(server_process) as alice:
        _in_lobby_when_the_server_crashes(alice, server_process)
        alice.send("/who")
        alice.expect("members of lobby: Unknown")
        alice.send("/join other")
        alice.expect("error: you are already in room lobby (reconnecting to it); /leave first")
        alice.send("/ls")
        alice.expect(f"error: cannot reach the chat server at {server_process.address}")
        alice.send("/leave")
        alice.expect("* you left lobby")
        alice.send("hello")
        alice.expect(NOT_IN_ROOM)
        assert_clean_exit(alice, status=1)


def test_ctrl_c_while_reconnecting_exits_without_a_traceback(server_process: ServerProcess) -> None:
    with chat(server_process) as alice:
        _in_lobby_when_the_server_crashes(alice, server_process)
        alice.popen.send_signal(signal.SIGINT)
        assert alice.wait() == 130
        assert "Traceback" not in alice.stderr


def test_no_server_is_a_clear_error() -> None:
    port = unused_port()
    result = subprocess.run(
        [executable("chat"), "--port", str(port)],
        input="/ls\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    # `in`, not `==`: under PYTHONASYNCIODEBUG=1 asyncio may add a slow-callback warning on a busy machine.
    assert (
        f"error: cannot reach the chat server at 127.0.0.1:{port} (is it running? start it with 'make run')\n"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("exit_key", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
def test_interactive_prompt_follows_the_state(server_process: ServerProcess, exit_key: str) -> None:
    with Terminal([executable("chat"), "--port", str(server_process.port)], server_process.env) as term:
        term.expect("type /help for the commands")
        # prompt_toolkit draws the prompt's trailing space as a cursor move.
        term.expect(">")
        term.type("/create lobby alice\r")
        term.expect("* room lobby created; you joined as alice")
        term.expect("[lobby as alice]>")
        term.type("half a line\x03")  # Ctrl-C drops what was typed and keeps the session
        term.expect("[lobby as alice]>")
        term.type("hello\r")
        term.expect("alice : hello")  # not "half a linehello"
        # Keys typed while a line is printed above the prompt meet a terminal in cooked mode: wait for the prompt.
        term.expect("[lobby as alice]>")
        term.type(exit_key)  # on an empty line, either key leaves the room and exits
        assert term.wait() == 0
    assert "* you left lobby" in term.screen
    assert "Traceback" not in term.screen


def test_a_pasted_block_is_sent_one_message_per_line(server_process: ServerProcess) -> None:
    with Terminal([executable("chat"), "--port", str(server_process.port)], server_process.env) as term:
        term.expect("type /help for the commands")
        term.expect(">")
        term.type("/create lobby alice\r")
        term.expect("[lobby as alice]>")
        # A terminal wraps a paste in these markers; its line breaks then reach the prompt as text, not as Enter.
        term.type("\x1b[200~first line\r\nsecond line\n\nthird line\x1b[201~")
        term.type("\r")
        term.expect("* pasted 3 lines: sending them as 3 messages")
        for line in ("alice : first line", "alice : second line", "alice : third line"):
            term.expect(line)
        term.expect("[lobby as alice]>")
        term.type("\x04")
        assert term.wait() == 0
    assert "error:" not in term.screen


def test_interactive_prompt_shows_reconnecting_and_ctrl_c_exits(server_process: ServerProcess) -> None:
    with Terminal([executable("chat"), "--port", str(server_process.port)], server_process.env) as term:
        term.expect("type /help for the commands")
        term.expect(">")
        term.type("/create lobby alice\r")
        term.expect("[lobby as alice]>")
        server_process.process.kill()
        term.expect("reconnecting to lobby")
        term.expect("[lobby as alice, reconnecting]>")
        term.type("\x03")
        assert term.wait() == 0
    assert "* you left lobby" in term.screen
    assert "Traceback" not in term.screen


def test_joining_shows_recent_history_unless_told_not_to(server_process: ServerProcess) -> None:
    address = ["--host", server_process.host, "--port", str(server_process.port)]
    with (
        chat(server_process) as alice,
        Proc([executable("chat"), *address, "--history", "2"], env=server_process.env) as bob,
        Proc([executable("chat"), *address, "--history", "0"], env=server_process.env) as carol,
    ):
        alice.send("/create lobby alice")
        alice.expect("* room lobby created")
        for n in range(3):
            alice.send(f"line {n}")
        alice.expect("alice : line 2")
        bob.send("/join lobby bob")
        bob.expect("* you joined lobby as bob")
        carol.send("/join lobby carol")
        carol.expect("* you joined lobby as carol")
        alice.send("live")
        for member in (bob, carol):
            member.expect("alice : live")
        assert [line.split("] ", 1)[1] for line in bob.output if line.startswith("[history ")] == [
            "alice : line 1",
            "alice : line 2",
        ]
        assert not [line for line in carol.output if line.startswith("[history ")]
        assert_clean_exit(alice, bob, carol)


def test_history_must_be_a_count() -> None:
    result = subprocess.run(
        [executable("chat"), "--history", "-1"], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 2
    assert "expected a whole number of messages (0 or more), got '-1'" in result.stderr


def run_chat(
    server: ServerProcess, stdin: bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `chat` once on `stdin` against `server`, as a script would."""
    return subprocess.run(
        [executable("chat"), "--host", server.host, "--port", str(server.port)],
        input=stdin,
        capture_output=True,
        env={**server.env, **(env or {})},
        timeout=30,
        check=False,
    )


def test_each_outcome_is_printed_before_the_next_command_is_read(server_process: ServerProcess) -> None:
    script = "/create lobby alice\nhello\n/frobnicate\n/whisper nobody hi\n/ls\n/me waves\n/quit\n"
    result = run_chat(server_process, script.encode())
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "* room lobby created; you joined as alice"
    assert lines[1] == "alice : hello"
    assert lines[2] == "error: unknown command /frobnicate; /help lists the commands"
    assert lines[3].startswith("error: ") and "nobody" in lines[3]
    assert lines[4:6] == ["rooms:", "  lobby (1 member, 1 message)"]
    assert lines[6:] == ["* alice waves", "* you left lobby"]
    assert result.returncode == 1


def test_a_script_whose_every_command_succeeds_exits_0(server_process: ServerProcess) -> None:
    result = run_chat(server_process, b"/create lobby\nhello\n/who\n")
    assert result.stdout.decode().splitlines()[-2:] == ["members of lobby: Unknown", "* you left lobby"]
    assert result.returncode == 0


def test_a_line_that_is_not_utf8_is_an_error_and_the_client_goes_on(server_process: ServerProcess) -> None:
    # A strict ASCII locale, where a text stdin would fail to decode and a text stdout to encode.
    strict = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    result = run_chat(server_process, b"/create lobby\n\xff\xfe hi\ncaf\xc3\xa9\n", env=strict)
    lines = result.stdout.decode().splitlines()
    assert lines[1] == "error: not sent: the line is not valid UTF-8 (byte 1 of it); fix its encoding"
    assert lines[2] == "Unknown : caf\\xe9"
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr


def test_a_line_over_the_limit_is_refused_before_it_is_sent(server_process: ServerProcess) -> None:
    with chat(server_process) as bob:
        bob.send("/create lobby bob")
        bob.expect("* room lobby created")
        result = run_chat(server_process, b"/join lobby alice\n" + b"x" * 10_485_760 + b"\nstill here\n")
        lines = result.stdout.decode().splitlines()
        assert lines[1:3] == [
            "error: not sent: a line is at most 4,096 bytes of UTF-8 and this one has 10,485,760; "
            "split it into shorter lines",
            "alice : still here",
        ]
        assert result.returncode == 1
        bob.expect("alice : still here")
        bob.expect("* alice left")
        assert_clean_exit(bob)
    assert not [line for line in bob.output if "connection lost" in line]


def test_a_reader_that_goes_away_ends_the_client_quietly(server_process: ServerProcess) -> None:
    with subprocess.Popen(
        [executable("chat"), "--port", str(server_process.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=server_process.env,
    ) as alice:
        assert alice.stdin is not None and alice.stdout is not None and alice.stderr is not None
        alice.stdin.write(b"/create lobby\n")
        alice.stdin.flush()
        assert alice.stdout.readline() == b"* room lobby created; you joined as Unknown\n"
        # As `chat | head -1` does once it has its line.
        alice.stdout.close()
        alice.stdin.write(b"/ls\n")
        alice.stdin.close()
        assert alice.wait(timeout=30) == 141
        assert alice.stderr.read() == b""


# An SGR sequence that sets a foreground colour (30-37, 90-97), among other attributes.
_COLOUR = re.compile(r"\x1b\[[0-9;]*?\b(3[0-7]|9[0-7])\b[0-9;]*m")


def raw_line(term: Terminal, text: str) -> str:
    """The last line `term` drew with `text` in it (once its escapes are taken out), escapes and all."""
    return [line for line in term.raw.split("\r\n") if text in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line)][-1]


def test_a_terminal_shows_times_nickname_colours_your_lines_and_mentions(server_process: ServerProcess) -> None:
    with (
        Terminal([executable("chat"), "--port", str(server_process.port)], server_process.env) as term,
        chat(server_process) as bob,
    ):
        term.expect(">")
        term.type("/create lobby alice\r")
        term.expect("[lobby as alice]>")
        bob.send("/join lobby bob")
        term.expect("* bob joined")
        bob.send("hi ALICE!")
        bob.send("plain")
        term.expect("bob : plain")
        term.type("/me waves\r")
        term.expect("* alice waves")
        term.expect("[lobby as alice]>")
        term.type("\x04")
        assert term.wait() == 0
    assert re.search(r"\[\d\d:\d\d\] bob : plain", term.seen)
    bob_colour = FG_ANSI_COLORS[render.nick_colour("bob")]
    assert f"\x1b[0;{bob_colour}mbob" in raw_line(term, "bob : plain")
    # A line that names you is reversed (SGR 7), your own lines are bold (SGR 1).
    assert ";7m" in raw_line(term, "hi ALICE!") and ";7m" not in raw_line(term, "bob : plain")
    assert ";1m" in raw_line(term, "* alice waves")


def test_no_color_and_no_timestamps_print_plain_lines(server_process: ServerProcess) -> None:
    args = [executable("chat"), "--port", str(server_process.port), "--no-timestamps"]
    with Terminal(args, {**server_process.env, "NO_COLOR": "1"}) as term:
        term.expect(">")
        term.type("/create lobby alice\r")
        term.expect("[lobby as alice]>")
        term.type("hello\r")
        term.expect("alice : hello")
        term.expect("[lobby as alice]>")
        term.type("\x04")
        assert term.wait() == 0
    # No colour, and not the bold of your own lines either.
    assert not _COLOUR.search(raw_line(term, "alice : hello"))
    assert ";1m" not in raw_line(term, "alice : hello")
    assert not re.search(r"\[\d\d:\d\d\]", term.seen)


def test_tab_completes_commands_and_members(server_process: ServerProcess) -> None:
    with (
        Terminal([executable("chat"), "--port", str(server_process.port)], server_process.env) as term,
        chat(server_process) as bob,
    ):
        term.expect(">")
        term.type("/create lobby alice\r")
        term.expect("[lobby as alice]>")
        bob.send("/join lobby bob")
        term.expect("* bob joined")
        term.expect("[lobby as alice]>")
        term.type("/whi\t")
        term.expect("/whisper")
        term.type(" b\t")
        term.expect("bob")
        term.type(" psst\r")
        term.expect("(whisper to bob) alice : psst")
        bob.expect("(whisper) alice : psst")
        term.expect("[lobby as alice]>")
        term.type("\x04")
        assert term.wait() == 0


def test_input_history_is_kept_across_runs_privately(server_process: ServerProcess, tmp_path: Path) -> None:
    env = {**server_process.env, "XDG_STATE_HOME": str(tmp_path)}
    args = [executable("chat"), "--port", str(server_process.port)]
    with Terminal(args, env) as term:
        term.expect(">")
        term.type("/ls\r")
        term.expect("no rooms yet")
        term.expect(">")
        term.type("\x04")
        assert term.wait() == 0
    history = tmp_path / "chat-service" / "history"
    assert (history.parent.stat().st_mode & 0o777, history.stat().st_mode & 0o777) == (0o700, 0o600)
    with Terminal(args, env) as term:
        term.expect(">")
        term.type("\x1b[A")  # the Up arrow brings back the line typed in the last run
        term.expect("/ls")
        term.type("\r")
        term.expect("no rooms yet")
        term.expect(">")
        term.type("\x04")
        assert term.wait() == 0
