"""Rate limits per client address and per member, the admin's exemption, pruning and expiring empty rooms."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_cli.session import Session
from chat_service.errors import ChatError, ErrorKind
from chat_service.limits import AddressBuckets, Limiter, Limits, Rate, TokenBucket, client_address
from chat_service.server import ChatServer, Config
from tests.conftest import executable, running, start_server_process
from tests.proc import Proc
from tests.proxy import Proxy
from tests.recorder import Recorder
from tests.streams import Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub

# So slow that no token comes back while a test runs, however busy the machine.
GLACIAL = 0.001


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_steady_rate() -> None:
    bucket = TokenBucket(Rate(2.0, 3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    # A refusal takes nothing: half a second later the next token is there.
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    # Refilling stops at the burst.
    assert not bucket.full(1.0)
    assert bucket.full(100.0)
    assert [bucket.take(100.0) for _ in range(4)][3] > 0


def test_addresses_have_buckets_of_their_own() -> None:
    clock = FakeClock()
    buckets = AddressBuckets(Rate(1.0, 2), clock)
    assert [buckets.take("127.0.0.7") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert buckets.take("127.0.0.8") == 0.0
    clock.now += 1.0
    assert buckets.take("127.0.0.7") == 0.0


def test_the_table_forgets_full_buckets_and_stays_bounded() -> None:
    clock = FakeClock()
    buckets = AddressBuckets(Rate(1.0, 5), clock, max_addresses=100)
    for i in range(1000):
        buckets.take(f"10.0.{i // 256}.{i % 256}")
    assert len(buckets) == 100
    # Once refilled, a bucket is the same as none: the idle ones drain away as new addresses come.
    clock.now += 10.0
    for i in range(60):
        buckets.take(f"10.9.0.{i}")
    assert len(buckets) <= 60
    # A forgotten address that was refused starts again with a full bucket, no worse than a newcomer.
    assert buckets.take("10.0.0.0") == 0.0


def test_a_rate_of_zero_is_unlimited() -> None:
    buckets = AddressBuckets(Rate(0, 1), FakeClock())
    assert all(buckets.take("127.0.0.1") == 0.0 for _ in range(1000))
    assert len(buckets) == 0
    assert Limiter(Limits(lines=Rate(0, 1)), FakeClock()).lines() is None


def test_refusals_carry_the_wait() -> None:
    clock = FakeClock()
    limiter = Limiter(Limits(rooms=Rate(6 / 60, 1), joins=Rate(1.0, 1), lines=Rate(4.0, 1)), clock)
    limiter.create_room("a")
    with pytest.raises(ChatError) as refused:
        limiter.create_room("a")
    assert refused.value.kind == ErrorKind.RATE_LIMITED
    assert refused.value.retry_after == pytest.approx(10.0)
    assert "6 a minute" in refused.value.message
    lines = limiter.lines()
    assert lines is not None
    lines.charge()
    with pytest.raises(ChatError) as flooded:
        lines.charge()
    assert flooded.value.retry_after == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.7:54321", "127.0.0.7"),
        ("ipv6:[::1]:5", "::1"),
        ("ipv6:[2001:db8::1]:50051", "2001:db8::1"),
        ("unix:/tmp/chat.sock", "unix:/tmp/chat.sock"),
    ],
)
def test_client_address_is_the_peer_ip(peer: str, address: str) -> None:
    assert client_address(peer) == address


@contextlib.asynccontextmanager
async def stub_from(server: ChatServer, source: str) -> AsyncIterator[Stub]:
    """A stub whose calls reach `server` from the loopback address `source`, through a proxy bound to it."""
    async with Proxy(server.port, source=source) as proxy, grpc.aio.insecure_channel(proxy.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def admin(server: ChatServer) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the server's admin token."""
    return (("authorization", f"Bearer {server.admin_token}"),)


async def test_one_address_spends_its_room_budget_while_another_still_creates_rooms() -> None:
    config = Config(port=0, grace_seconds=1.0, limits=Limits(rooms=Rate(GLACIAL, 3)))
    async with (
        running(config) as server,
        stub_from(server, "127.0.0.7") as seven,
        stub_from(server, "127.0.0.8") as eight,
    ):
        for i in range(3):
            await seven.CreateRoom(pb.CreateRoomRequest(room=f"seven-{i}"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await seven.CreateRoom(pb.CreateRoomRequest(room="seven-3"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "creates rooms too fast" in str(refused.value.details())
        assert "try again in" in str(refused.value.details())
        # A join that would create a room spends the same budget; the refusal is an event and the stream goes on.
        stream = Stream(seven)
        await stream.join("seven-3", "alice", create=True)
        error = (await stream.next()).error
        assert error.code == pb.ERROR_CODE_RATE_LIMITED
        assert error.retry_after.ToNanoseconds() > 0
        await stream.join("seven-0", "alice")
        assert (await stream.next()).joined.room == "seven-0"

        await eight.CreateRoom(pb.CreateRoomRequest(room="eight-0"))
        await seven.CreateRoom(pb.CreateRoomRequest(room="by-admin"), metadata=admin(server))
        rooms = [room.name for room in (await eight.ListRooms(pb.ListRoomsRequest())).rooms]
        assert rooms == ["by-admin", "eight-0", "seven-0", "seven-1", "seven-2"]


async def test_joining_too_fast_is_an_error_event_and_the_stream_lives_on() -> None:
    config = Config(port=0, grace_seconds=1.0, limits=Limits(joins=Rate(GLACIAL, 2)))
    async with running(config) as server, grpc.aio.insecure_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await stub.CreateRoom(pb.CreateRoomRequest(room="lobby"))
        await Stream.joined(stub, "lobby", "alice")
        stream = Stream(stub)
        # Every attempt counts, a refused one too.
        await stream.join("lobby", "alice")
        assert (await stream.next()).error.code == pb.ERROR_CODE_NAME_TAKEN
        await stream.join("lobby", "bob")
        error = (await stream.next()).error
        assert error.code == pb.ERROR_CODE_RATE_LIMITED, error
        assert "joins rooms too fast" in error.message
        assert error.retry_after.ToNanoseconds() > 0
        await stream.say("hello")
        assert (await stream.next()).error.code == pb.ERROR_CODE_NOT_JOINED
        # The admin token exempts a stream from the limit.
        exempt = Stream(stub, admin(server))
        await exempt.join("lobby", "carol")
        assert (await exempt.next()).joined.name == "carol"


async def test_a_flooding_member_gets_rate_limited_events_and_the_others_chat_on() -> None:
    config = Config(port=0, grace_seconds=1.0, limits=Limits(lines=Rate(GLACIAL, 3)))
    async with running(config) as server, grpc.aio.insecure_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        flood, _ = await Stream.joined(stub, "lobby", "flood", create=True)
        bob, _ = await Stream.joined(stub, "lobby", "bob")
        await flood.next_of("member_joined")
        for i in range(8):
            await flood.say(f"spam {i}")
        await flood.whisper("bob", "psst")
        events = [await flood.next() for _ in range(9)]
        assert [event.message.text for event in events[:3]] == ["spam 0", "spam 1", "spam 2"]
        refusals = [event.error for event in events[3:]]
        assert all(error.code == pb.ERROR_CODE_RATE_LIMITED for error in refusals), refusals
        assert all(error.retry_after.ToNanoseconds() > 0 for error in refusals)
        assert "sending lines too fast" in refusals[0].message

        # The flood's stream lives on, and bob's own budget is untouched.
        await bob.say("still here")
        assert (await flood.next()).message.text == "still here"
        seen = [(await bob.next()).message.text for _ in range(4)]
        assert seen == ["spam 0", "spam 1", "spam 2", "still here"]

        # The admin token exempts a member from flood control.
        admin_stream = Stream(stub, admin(server))
        await admin_stream.join("lobby", "op")
        assert (await admin_stream.next()).joined.name == "op"
        for i in range(6):
            await admin_stream.say(f"notice {i}")
        texts = [(await admin_stream.next_of("message")).message.text for _ in range(6)]
        assert texts == [f"notice {i}" for i in range(6)]


def test_the_client_shows_how_long_to_wait(tmp_path: Path) -> None:
    proc = start_server_process(tmp_path / "state", "--line-burst", "2", "--lines-per-second", "0.001")
    try:
        with Proc([executable("chat"), "--port", str(proc.port)], env=proc.env) as client:
            client.send("/create lobby alice")
            client.expect("* room lobby created")
            for text in ("one", "two", "three"):
                client.send(text)
            client.expect("alice : two")
            line = client.expect("error: ")
            assert line.startswith("error: slow down: you are sending lines too fast (at most 0.001 a second)")
            assert line.endswith(" s)") and "(try again in " in line
            # A line was refused, so a script learns from the status that not everything went through.
            assert client.finish() == 1
    finally:
        proc.stop()


async def test_a_resume_refused_for_the_rate_is_tried_again_later() -> None:
    # A token every 3 s: the session's next attempt after the bucket is emptied comes sooner, and a later one not.
    config = Config(port=0, grace_seconds=1.0, limits=Limits(joins=Rate(1 / 3, 3)))
    seen = Recorder()
    async with (
        running(config) as server,
        Proxy(server.port, source="127.0.0.7") as carols_network,
        stub_from(server, "127.0.0.7") as neighbour,
        Session(f"127.0.0.1:{carols_network.port}", seen) as carol,
    ):
        await carol.connect()
        assert await carol.create("lobby", "carol") is not None
        carols_network.cut()
        await seen.until_true(lambda: len(seen.attempts) >= 2)
        # Someone else at carol's address spends what is left of its joins while she is away.
        for i in range(5):
            stream = Stream(neighbour)
            await stream.join("lobby", f"n{i}")
            if (await stream.next()).WhichOneof("kind") == "error":
                break
        else:
            raise AssertionError("the address never ran out of joins")
        carols_network.restore()
        await seen.until_true(lambda: bool(seen.joined) and seen.joined[-1].resumed, timeout=30)
        assert seen.lost == []
