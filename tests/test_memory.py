"""What a client can make the server hold has a bound: history bytes, members, streams, and streams that never join."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.history import MESSAGE_OVERHEAD
from chat_service.memory_store import MemoryStore
from chat_service.server import ChatServer, Config
from tests.conftest import running
from tests.streams import TIMEOUT, Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Stub, ChatServer]]:
    async with running(config) as chat, grpc.aio.insecure_channel(chat.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel), chat


async def test_a_flood_of_history_stays_within_the_servers_byte_budget() -> None:
    budget = 64 * 1024
    line = "x" * 4096
    async with serving(Config(port=0, history_bytes=budget, grace_seconds=1.0)) as (stub, chat):
        tokens = {}
        for room in ("a", "b", "c"):
            flooder, joined = await Stream.joined(stub, room, "flooder", create=True)
            tokens[room] = joined.resume_token
            for _ in range(20):
                await flooder.say(line)
            for _ in range(20):
                await flooder.next_of("message")
        # Three rooms of 20 lines of 4 KiB do not fit in 64 KiB: the oldest messages on the server went first.
        kept = {}
        for room in ("a", "b", "c"):
            reader = Stream(stub)
            await reader.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name="reader", history=100)))
            joined = (await reader.next()).joined
            kept[room] = joined.replayed
            replayed = [(await reader.next()).message.seq for _ in range(joined.replayed)]
            assert replayed == list(range(21 - joined.replayed, 21))
        assert kept["a"] == kept["b"] == 0
        assert 0 < kept["c"] < 20
        assert kept["c"] * (len(line) + MESSAGE_OVERHEAD) <= budget
        # A resume from the start is told how many messages the server no longer keeps.
        again = Stream(stub)
        resume = pb.ChatRequest.Resume(token=tokens["c"], last_seq=0)
        await again.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="c", name="flooder", resume=resume)))
        resumed = (await again.next()).joined
        assert (resumed.replayed, resumed.lost) == (kept["c"], 20 - kept["c"])
        assert isinstance(chat.store, MemoryStore)
        assert chat.store.history_budget.held <= budget


async def test_a_stream_that_never_joins_is_ended_and_a_joined_one_lives_on() -> None:
    async with serving(Config(port=0, join_timeout_seconds=0.5, grace_seconds=1.0)) as (stub, _):
        member, _ = await Stream.joined(stub, "r", "alice", create=True)
        idle = Stream(stub)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(idle.call.read(), TIMEOUT)
        assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert ended.value.details() == "no room was joined within 0.5 s of opening the stream; send join first"
        await member.say("still here")
        assert (await member.next_of("message")).message.text == "still here"


async def test_members_past_the_servers_limit_are_refused_and_the_stream_lives_on() -> None:
    async with serving(Config(port=0, max_members=2, grace_seconds=1.0)) as (stub, _):
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        await Stream.joined(stub, "r", "bob")
        carol = Stream(stub)
        await carol.join("r", "carol")
        refusal = await carol.next()
        assert refusal.error.code == pb.ERROR_CODE_MEMBER_LIMIT
        assert refusal.error.message == "the server has reached its limit of members (2); try again later"
        await alice.leave()
        await alice.expect_end()
        await carol.join("r", "carol")
        assert (await carol.next()).WhichOneof("kind") == "joined"


async def test_streams_past_the_per_connection_limit_wait_for_one_to_end() -> None:
    async with serving(Config(port=0, max_streams_per_connection=2, grace_seconds=1.0)) as (stub, _):
        first, _ = await Stream.joined(stub, "r", "first", create=True)
        await Stream.joined(stub, "r", "second")
        third = Stream(stub)

        async def join_third() -> pb.Event:
            await third.join("r", "third")
            return await third.next()

        answer = asyncio.create_task(join_third())
        # A bound, not a synchronisation: the answer must not come while both streams stay open.
        done, _ = await asyncio.wait({answer}, timeout=1.0)
        assert not done
        await first.leave()
        await first.expect_end()
        assert (await answer).WhichOneof("kind") == "joined"
