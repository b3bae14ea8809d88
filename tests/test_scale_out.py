"""Several `chat-server` processes sharing rooms through NATS JetStream, through the real executables: one room
across servers, a server killed or every server restarted, a NATS node lost mid-burst, and --workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest
import pytest_asyncio

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from tests.conftest import UNLIMITED_FLAGS, ServerProcess, start_server_process
from tests.nats import NatsNode, nats_cluster, nats_node
from tests.proc import chat, run_admin
from tests.streams import Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub

T = TypeVar("T")

# Bounds every wait: far above what a busy 2-core machine needs, and only reached when something is broken.
WAIT = 30.0
# How often a test looks again at what only shows by asking (member counts travel in heartbeats, every 2 s).
POLL = 0.1
# The resume test's room chats on at most this many lines, a pause between them: under the server's --history 1000.
CHATTER_LINES = 900
CHATTER_PAUSE = 0.02


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsNode]:
    """One nats-server with JetStream for the module's tests, which use rooms of their own names."""
    async with nats_node(tmp_path_factory.mktemp("jetstream")) as node:
        yield node


def serve(state: Path, *urls: str, args: tuple[str, ...] = ()) -> ServerProcess:
    """A chat-server on the NATS at `urls`, without rate limits: the tests send from one address on purpose."""
    # Generous: a server's first start sets up the streams, which a cluster electing its leaders answers slowly.
    return start_server_process(state, "--store", ",".join(urls), *UNLIMITED_FLAGS, *args, timeout=WAIT)


@pytest.fixture(scope="module")
def pair(shared_nats: NatsNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two chat servers sharing `shared_nats`."""
    servers: list[ServerProcess] = []
    try:
        for _ in range(2):
            servers.append(serve(tmp_path_factory.mktemp("state"), shared_nats.url))
        yield servers
    finally:
        stop_all(servers)


def stop_all(servers: list[ServerProcess]) -> None:
    """Stop `servers` and print what they said last, which pytest shows if the test failed."""
    for server in servers:
        server.stop()
        while not server.lines.empty():
            print(f"server on port {server.port}: {server.lines.get_nowait()}")


@contextlib.asynccontextmanager
async def stubs(*servers: ServerProcess) -> AsyncIterator[list[Stub]]:
    """A stub on a channel of its own to each server."""
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(s.address)) for s in servers]
        yield [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """`probe()` again until `done` holds of its result, bounded by WAIT; for state that no event announces."""
    async with asyncio.timeout(WAIT):
        while not done(result := await probe()):  # noqa: ASYNC110 (nothing to await: the state shows only by asking)
            await asyncio.sleep(POLL)
    return result


async def messages(stream: Stream, count: int) -> list[pb.Message]:
    """The next `count` messages of `stream`; fails at an error event."""
    received: list[pb.Message] = []
    while len(received) < count:
        event = await stream.next(WAIT)
        assert event.WhichOneof("kind") != "error", event
        if event.WhichOneof("kind") == "message":
            received.append(event.message)
    return received


def seen(received: list[pb.Message]) -> list[tuple[int, str, str]]:
    return [(m.seq, m.sender, m.text) for m in received]


async def rooms(stub: Stub) -> list[tuple[str, int, int]]:
    """ListRooms: each room's name, last seq and member count."""
    listed = await stub.ListRooms(pb.ListRoomsRequest(), timeout=WAIT)
    return [(room.name, room.last_seq, room.member_count) for room in listed.rooms]


async def logs(stub: Stub) -> list[tuple[str, int]]:
    """ListRooms without the member counts, which reach other servers only with their next heartbeat."""
    return [(name, last_seq) for name, last_seq, _ in await rooms(stub)]


def resume(room: str, name: str, joined: pb.Joined, last_seq: int) -> pb.ChatRequest:
    token = pb.ChatRequest.Resume(token=joined.resume_token, last_seq=last_seq)
    return pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name=name, resume=token))


async def resumed(stub: Stub, room: str, name: str, joined: pb.Joined, last_seq: int) -> tuple[Stream, pb.Joined]:
    """A new stream on `stub` that resumes the membership `joined` after `last_seq`."""
    stream = Stream(stub)
    await stream.call.write(resume(room, name, joined, last_seq))
    event = await stream.next(WAIT)
    assert event.WhichOneof("kind") == "joined", event
    assert event.joined.resumed
    return stream, event.joined


async def handed_over(stream: Stream) -> None:
    """A server stopping over NATS leaves the room open: the stream ends UNAVAILABLE, for the client to resume."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream.expect_end(WAIT)
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == "the server is restarting; reconnect to resume"


async def test_members_on_two_servers_share_one_order_a_whisper_and_the_room_list(pair: list[ServerProcess]) -> None:
    async with stubs(*pair) as (first, second):
        ann, _ = await Stream.joined(first, "order", "ann", create=True)
        bob, _ = await Stream.joined(second, "order", "bob")
        cid, _ = await Stream.joined(second, "order", "cid")
        sent = 20

        async def say(stream: Stream, who: str) -> None:
            for n in range(sent):
                await stream.say(f"{who} {n}")

        await asyncio.gather(say(ann, "ann"), say(bob, "bob"))
        heard = await asyncio.gather(*(messages(stream, 2 * sent) for stream in (ann, bob, cid)))
        assert [m.seq for m in heard[0]] == list(range(1, 2 * sent + 1))
        assert seen(heard[0]) == seen(heard[1]) == seen(heard[2])
        assert sorted(m.text for m in heard[0]) == sorted(f"{who} {n}" for who in ("ann", "bob") for n in range(sent))

        await bob.whisper("ANN", "psst")
        whisper = (await ann.next_of("whisper", WAIT)).whisper
        assert (whisper.sender, whisper.recipient, whisper.text) == ("bob", "ann", "psst")
        assert (await bob.next_of("whisper", WAIT)).whisper.text == "psst"

        # Names and last seqs come from the store at once; member counts travel in the servers' heartbeats.
        listed = await eventually(lambda: rooms(first), lambda found: ("order", 2 * sent, 3) in found)
        assert await eventually(lambda: rooms(second), lambda found: found == listed) == listed


async def test_two_creates_of_one_name_on_two_servers_have_one_winner(pair: list[ServerProcess]) -> None:
    async with stubs(*pair) as (first, second):
        for round_ in range(5):
            name = f"race-{round_}"
            results = await asyncio.gather(
                first.CreateRoom(pb.CreateRoomRequest(room=name), timeout=WAIT),
                second.CreateRoom(pb.CreateRoomRequest(room=name.upper()), timeout=WAIT),
                return_exceptions=True,
            )
            made = [result for result in results if isinstance(result, pb.CreateRoomResponse)]
            refused = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
            assert len(made) == 1 and len(refused) == 1, results
            assert refused[0].code() == grpc.StatusCode.ALREADY_EXISTS
            assert [room for room, _ in await logs(first) if room.lower() == name] == [made[0].room.name]
            assert await logs(first) == await logs(second)


def test_a_kill_against_either_server_closes_the_room_for_members_on_both(pair: list[ServerProcess]) -> None:
    with chat(pair[0]) as alice, chat(pair[1]) as bob:
        for killer, server in enumerate(pair):
            room = f"doomed-{killer}"
            alice.send(f"/create {room} alice")
            alice.expect(f"* room {room} created")
            bob.send(f"/join {room} bob")
            bob.expect(f"* you joined {room} as bob")
            bob.send("/whisper alice psst")
            alice.expect("(whisper) bob : psst")
            killed = run_admin(server, "kill", room)
            assert (killed.returncode, killed.stderr) == (0, "")
            assert killed.stdout.startswith(f"room {room} killed;")
            alice.expect(f"* room {room} was closed by the server")
            bob.expect(f"* room {room} was closed by the server")
            for other in pair:
                with grpc.insecure_channel(other.address) as channel:
                    listed = chat_pb2_grpc.ChatServiceStub(channel).ListRooms(pb.ListRoomsRequest(), timeout=WAIT)
                assert room not in [found.name for found in listed.rooms]


async def test_a_kill_counts_the_members_ejected_on_every_server(pair: list[ServerProcess]) -> None:
    async with stubs(*pair) as (first, second):
        ann, _ = await Stream.joined(first, "counted", "ann", create=True)
        bob, _ = await Stream.joined(second, "counted", "bob")
        token = pair[1].token_path.read_text().strip()
        killed = await second.KillRoom(
            pb.KillRoomRequest(room="counted"), metadata=(("authorization", f"Bearer {token}"),), timeout=WAIT
        )
        for stream in (ann, bob):
            assert (await stream.expect_end(WAIT))[-1].room_closed.reason == pb.CLOSE_REASON_KILLED
        assert killed.ejected_members == 2


async def test_members_of_a_killed_server_resume_on_the_other_with_no_gap_or_duplicate(
    pair: list[ServerProcess], shared_nats: NatsNode, tmp_path: Path
) -> None:
    survivor = pair[0]
    victim = await asyncio.to_thread(serve, tmp_path / "victim", shared_nats.url)
    try:
        async with stubs(survivor, victim) as (alive, doomed):
            ann, _ = await Stream.joined(alive, "sturdy", "ann", create=True)
            moving = {name: await Stream.joined(doomed, "sturdy", name) for name in ("bob", "cid")}
            said: list[pb.Message] = []
            resumes_done = asyncio.Event()
            spoke = asyncio.Event()

            async def chatter() -> None:
                """ann talks on, one line after the echo of the last, until both have resumed and heard more."""
                for n in range(CHATTER_LINES):
                    await ann.say(f"line {n}")
                    said.append((await ann.next_of("message", WAIT)).message)
                    spoke.set()
                    if resumes_done.is_set() and n >= 40:
                        return
                    # A pace, not a wait for anything: within the room's history whatever the resumes take.
                    await asyncio.sleep(CHATTER_PAUSE)
                raise AssertionError(f"the resumes did not finish while ann said {CHATTER_LINES} lines")

            talking = asyncio.create_task(chatter())
            last: dict[str, int] = {}
            before: dict[str, list[pb.Message]] = {}
            for name, (stream, _) in moving.items():
                before[name] = await messages(stream, 5)
            # Mid-chat: ann goes on talking while the server goes, and its members read what reached them.
            victim.process.kill()
            for name, (stream, _) in moving.items():
                with pytest.raises(grpc.aio.AioRpcError) as broken:
                    while True:
                        before[name].append((await stream.next_of("message", WAIT)).message)
                assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
                last[name] = before[name][-1].seq
            # The room goes on while they are away: each has lines to catch up on when it resumes.
            async with asyncio.timeout(WAIT):
                while not said or said[-1].seq < max(last.values()) + 3:
                    spoke.clear()
                    await spoke.wait()
            back = {}
            for name, (_, joined) in moving.items():
                back[name] = await resumed(alive, "sturdy", name, joined, last[name])
            resumes_done.set()
            await talking
            for name, (stream, joined) in back.items():
                assert (joined.replayed, joined.lost) == (joined.last_seq - last[name], 0)
                assert joined.replayed > 0
                after = await messages(stream, said[-1].seq - last[name])
                assert seen(before[name] + after) == seen(said), name
                assert [m.seq for m in before[name] + after] == list(range(1, said[-1].seq + 1))
    finally:
        victim.stop()


async def test_the_members_of_a_server_that_died_are_seen_to_leave_on_the_others(
    pair: list[ServerProcess], shared_nats: NatsNode, tmp_path: Path
) -> None:
    victim = await asyncio.to_thread(serve, tmp_path / "victim", shared_nats.url)
    try:
        async with stubs(pair[0], victim) as (alive, doomed):
            ann, _ = await Stream.joined(alive, "haunted", "ann", create=True)
            await Stream.joined(doomed, "haunted", "bob")
            assert (await ann.next_of("member_joined", WAIT)).member_joined.name == "bob"
            victim.process.kill()
            # Nobody is left on the dead server to say bob went: the survivor notices its heartbeat age out.
            left = (await ann.next_of("member_left", WAIT)).member_left
            assert (left.name, left.reason) == ("bob", pb.LEAVE_REASON_DISCONNECTED)
    finally:
        victim.stop()


async def test_rooms_history_and_resume_outlive_a_restart_of_every_server(tmp_path: Path) -> None:
    async with nats_node(tmp_path / "jetstream") as node:
        servers = [serve(tmp_path / f"state-{n}", node.url) for n in range(2)]
        try:
            async with stubs(*servers) as (first, second):
                ann, ann_joined = await Stream.joined(first, "durable", "ann", create=True)
                bob, bob_joined = await Stream.joined(second, "durable", "bob")
                for n in range(3):
                    await ann.say(f"before {n}")
                assert [m.seq for m in await messages(bob, 3)] == [1, 2, 3]
                # bob's connection drops; ann says two more lines he misses.
                bob.call.cancel()
                await ann.say("missed 1")
                await ann.say("missed 2")
                said = await messages(ann, 5)
                for server in servers:
                    server.process.terminate()
                await handed_over(ann)
            for server in servers:
                assert await asyncio.to_thread(server.process.wait, WAIT) == 0
                server.stop()
            servers = [await asyncio.to_thread(serve, tmp_path / f"again-{n}", node.url) for n in range(2)]
            async with stubs(*servers) as (first, second):
                assert await rooms(first) == await rooms(second) == [("durable", 5, 0)]
                bob, bob_back = await resumed(first, "durable", "bob", bob_joined, 3)
                assert (bob_back.replayed, bob_back.lost, bob_back.last_seq) == (2, 0, 5)
                assert seen(await messages(bob, 2)) == seen(said[3:])
                ann, ann_back = await resumed(second, "durable", "ann", ann_joined, 5)
                assert (ann_back.replayed, ann_back.last_seq) == (0, 5)
                await ann.say("after")
                for stream in (ann, bob):
                    assert (await stream.next_of("message", WAIT)).message.seq == 6
                newcomer = Stream(first)
                await newcomer.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="durable", history=10)))
                assert (await newcomer.next(WAIT)).joined.replayed == 6
                history = await messages(newcomer, 6)
                assert seen(history) == [*seen(said), (6, "ann", "after")]
        finally:
            stop_all(servers)


def chat_connections(node: NatsNode) -> int:
    """How many chat servers are connected to `node`, from its monitoring endpoint."""
    url = f"http://127.0.0.1:{node.monitor_port}/connz"
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        report = json.load(response)
    return sum(connection.get("name") == "chat-server" for connection in report.get("connections", []))


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_a_nats_node_lost_mid_burst_loses_and_repeats_nothing_for_any_member(tmp_path: Path) -> None:
    async with nats_cluster(tmp_path / "cluster") as nodes:
        urls = [node.url for node in nodes]
        servers = []
        try:
            for n in range(2):
                servers.append(await asyncio.to_thread(serve, tmp_path / f"state-{n}", *urls))
            async with stubs(*servers) as (first, second):
                ann, _ = await Stream.joined(first, "burst", "ann", create=True)
                bob, _ = await Stream.joined(second, "burst", "bob")
                cid, _ = await Stream.joined(first, "burst", "cid")
                dan, _ = await Stream.joined(second, "burst", "dan")
                burst = 500

                async def say(stream: Stream, who: str) -> None:
                    for n in range(burst):
                        await stream.say(f"{who} {n}")

                # The node most chat servers talk to: their requests in flight lose their answers and go again.
                connected = await asyncio.gather(*(asyncio.to_thread(chat_connections, node) for node in nodes))
                sending = asyncio.gather(say(ann, "ann"), say(bob, "bob"))
                readers = [asyncio.create_task(messages(stream, 2 * burst)) for stream in (ann, bob, cid, dan)]
                # Members read behind the log, so the log says how far the burst has gone.
                ((_, logged, _),) = await eventually(lambda: rooms(first), lambda found: found[0][1] >= burst // 4)
                await nodes[connected.index(max(connected))].stop(kill=True)
                assert logged < 2 * burst, "the burst was over before the node was killed"
                await sending
                heard = [seen(received) for received in await asyncio.gather(*readers)]
                assert [seq for seq, _, _ in heard[0]] == list(range(1, 2 * burst + 1))
                assert heard[1] == heard[2] == heard[3] == heard[0]
                assert sorted(text for _, _, text in heard[0]) == sorted(
                    f"{who} {n}" for who in ("ann", "bob") for n in range(burst)
                )
        finally:
            stop_all(servers)


def worker_pids(supervisor: int) -> list[int]:
    """The children of `supervisor`, from /proc."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return [int(pid) for pid in children.split()]


def streams_open(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=WAIT) as response:
        text = response.read().decode()
    values = [line.split()[1] for line in text.splitlines() if line.startswith("chat_streams_open ")]
    assert len(values) == 1, text
    return float(values[0])


async def test_workers_share_the_port_the_rooms_and_the_admin_token_and_stop_together(
    shared_nats: NatsNode, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(
        serve, tmp_path / "state", shared_nats.url, args=("--workers", "2", "--metrics-port", "0")
    )
    try:
        assert f"chat server listening on 127.0.0.1:{server.port} (2 workers)" in server.seen
        scrapes = [line.split(": ", 2)[2] for line in server.seen if line.startswith("metrics: worker ")]
        assert len(scrapes) == 2
        assert server.token_path.stat().st_mode & 0o777 == 0o600
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        # One connection each, so that the kernel spreads them over the workers: all on one is 2 in 2**24.
        count = 24
        channels = [
            grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)
        ]
        try:
            members = [
                (await Stream.joined(chat_pb2_grpc.ChatServiceStub(channel), "spread", f"m{n}", create=n == 0))[0]
                for n, channel in enumerate(channels)
            ]
            per_worker = [await asyncio.to_thread(streams_open, url) for url in scrapes]
            assert sum(per_worker) == count and min(per_worker) > 0, per_worker
            await members[-1].say("hello, every worker")
            for member in members:
                assert (await member.next_of("message", WAIT)).message.text == "hello, every worker"
            listed = [await logs(chat_pb2_grpc.ChatServiceStub(channel)) for channel in channels]
            assert all(found == listed[0] for found in listed), listed
            assert ("spread", 1) in listed[0]
            ls = await asyncio.to_thread(run_admin, server, "ls")
            assert ls.returncode == 0 and "spread" in ls.stdout
            server.process.send_signal(signal.SIGTERM)
            for member in members:
                await handed_over(member)
        finally:
            for channel in channels:
                await channel.close()
        assert await asyncio.to_thread(server.process.wait, WAIT) == 0
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not server.token_path.exists()
    finally:
        server.stop()
