"""A load-generator process: its own event loop and channels, its share of a shape's members, senders and watchers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Awaitable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import grpc

from bench.processes import channels, command
from bench.protocol import Check, Done, End, Final, Go, Join, Ready, WorkerPlan
from bench.shapes import WINDOW, Kind, MemberSpec
from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc

if TYPE_CHECKING:
    ChatCall = grpc.aio.StreamStreamCall[pb.ChatRequest, pb.ChatResponse]

MAX_EXAMPLES = 10
OPEN_CONCURRENCY = 128  # streams being opened at once
DRAIN_SECONDS = 30.0  # reading every stream to its end after the server stops
STALL_SECONDS = 10.0  # no delivery for this long, with messages missing, ends the measured phase
# Once the server has dropped a member the run has failed, and a dropped sender's messages never come: end sooner.
STALL_AFTER_DROP_SECONDS = 1.0


class _Member:
    """One Chat stream: joins, then checks every message it receives against the room's sequence numbers."""

    def __init__(self, spec: MemberSpec, worker: _Worker, expected: int, latency: bool) -> None:
        self.spec, self.worker, self.expected = spec, worker, expected
        self.label = f"{spec.room}/{spec.name}"
        self.call: ChatCall | None = None
        self.last, self.next_seq = expected, 1
        self.count = self.responses = 0
        self.room_count = 0  # members in the room as this member knows it: Joined.members plus announcements
        self.lagging = self.complete = self.closed = self.ended = False
        self.check = Check(members=1)
        self.latencies: array[int] | None = array("q") if latency else None
        # A watcher acknowledges the senders of its room, which live in this process too.
        self.senders: dict[str, _Member] = {}
        self.next_index: dict[str, int] = {}
        # A burst sender's lines not yet seen by its room's watcher, who releases one for each it receives.
        self.window = asyncio.Semaphore(WINDOW)

    async def _ask(self, request: pb.ChatRequest, kind: str) -> list[pb.Event]:
        """Write `request` and read the answer, whose first event must be of `kind`."""
        assert self.call is not None
        await self.call.write(request)
        response = await self.call.read()
        if not isinstance(response, pb.ChatResponse):
            raise RuntimeError(f"{self.label}: the stream ended ({await self.call.code()}) before its {kind} event")
        if not response.events or response.events[0].WhichOneof("kind") != kind:
            raise RuntimeError(f"{self.label}: expected a {kind} event, got {response}")
        return list(response.events)

    async def open(self, stub: chat_pb2_grpc.ChatServiceAsyncStub) -> None:
        """Start the stream and wait until the server's handler has answered it, before any join."""
        self.call = stub.Chat()
        # A request with no action is refused with an error event: proof the server is serving this call.
        await self._ask(pb.ChatRequest(), "error")

    async def join(self) -> None:
        """Join the (already created) room and take in whatever came in the same batch as Joined."""
        join = pb.ChatRequest.JoinRoom(room=self.spec.room, name=self.spec.name)
        events = await self._ask(pb.ChatRequest(join=join), "joined")
        joined = events[0].joined
        self.next_seq, self.last = joined.last_seq + 1, joined.last_seq + self.expected
        self.room_count = len(joined.members)
        self.consume(events[1:], time.monotonic_ns())

    async def read(self) -> None:
        """Consume the stream until it ends; record how it ended."""
        assert self.call is not None
        try:
            while isinstance(response := await self.call.read(), pb.ChatResponse):
                self.consume(response.events, time.monotonic_ns())
                if self.closed:
                    # The server ends the call only once the client half-closes; keep reading to catch extras.
                    self.closed = False
                    await self.call.done_writing()
        except grpc.aio.AioRpcError as error:
            # The server ends a too-slow member's stream with RESOURCE_EXHAUSTED: the count of dropped members.
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.check.dropped += 1
                self._example(f"dropped as too slow: {error.details()}")
            elif not self.complete:
                self.check.stream_errors += 1
                self._example(f"stream failed: {error.code().name} {error.details()}")
        finally:
            # A stream that ended hears nothing more: it must not hold the others up.
            self.ended = True
            self._caught_up()
            self._complete(time.monotonic_ns())

    def consume(self, events: Sequence[pb.Event], now: int) -> None:
        """Check one batch of events: the hot path of the load generator, so it keeps state in locals."""
        self.responses += 1
        next_seq, count, latencies = self.next_seq, self.count, self.latencies
        watching = bool(self.senders)
        for event in events:
            message = event.message
            seq = message.seq
            if not seq:
                self._other(event)
                continue
            count += 1
            next_seq = next_seq + 1 if seq == next_seq else self._disorder(seq, next_seq)
            if latencies is not None:
                latencies.append(now - int(message.text.partition(" ")[2]))
            if watching:
                self._acknowledge(message)
        self.next_seq, self.count = next_seq, count
        if next_seq > self.last:
            self._complete(now)

    def _disorder(self, seq: int, next_seq: int) -> int:
        """Count a message that is not the next one due; returns the sequence number due after it."""
        self._example(f"seq {seq} arrived when {next_seq} was due")
        if seq < next_seq:
            self.check.duplicated += 1
        elif seq > self.last:
            self.check.extra += 1
        else:
            self.check.out_of_order += 1
            return seq + 1
        return next_seq

    def _acknowledge(self, message: pb.Message) -> None:
        sender = self.senders.get(message.sender)
        if sender is None:
            return
        index = int(message.text.partition(" ")[0])
        due = self.next_index.get(message.sender, 0)
        if index != due:
            self.check.out_of_order += 1
            self._example(f"{message.sender}'s message {index} arrived when {due} was due")
        self.next_index[message.sender] = index + 1
        sender.window.release()

    def _other(self, event: pb.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind in ("member_joined", "members"):
            # A wave of joins can reach a member as one member list instead of a MemberJoined each.
            self.room_count = len(event.members.names) if kind == "members" else self.room_count + 1
            if self.room_count >= self.worker.target:
                self._caught_up()
        elif kind == "room_closed":
            self.closed = True
        elif kind == "error":
            self.check.stream_errors += 1
            self._example(f"error event: {event.error.message}")
        else:
            self._example(f"unexpected {kind} event")

    def _caught_up(self) -> None:
        if self.lagging:
            self.lagging = False
            self.worker.lagging -= 1
            if not self.worker.lagging:
                self.worker.caught_up.set()

    def _complete(self, now: int) -> None:
        if not self.complete:
            self.complete = True
            self.worker.on_complete(now)

    def _example(self, text: str) -> None:
        if len(self.check.examples) < MAX_EXAMPLES:
            self.check.examples.append(f"{self.label}: {text}")

    async def send(self, count: int, interval_ns: int, start_ns: int) -> None:
        """Say `count` lines: paced every `interval_ns` whatever the replies, else at most WINDOW not yet watched."""
        assert self.call is not None
        for i in range(count):
            if interval_ns:
                if (delay := start_ns + i * interval_ns - time.monotonic_ns()) > 0:
                    await asyncio.sleep(delay / 1e9)
            else:
                # A sender whose watcher is gone waits here until the run ends as stalled.
                await self.window.acquire()
            await self.call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=f"{i} {time.monotonic_ns()}")))

    def verdict(self) -> Check:
        """This member's count of messages lost (never reached), duplicated, extra and out of order."""
        self.check.lost = max(0, self.last + 1 - self.next_seq)
        if self.check.lost:
            self._example(f"{self.check.lost} of {self.expected} messages never arrived")
        return self.check


class _Worker:
    """Runs one plan through its phases, answering the coordinator at each step."""

    def __init__(self, plan: WorkerPlan, conn: Connection) -> None:
        self.plan, self.conn = plan, conn
        shape = plan.shape
        self.members = [_Member(spec, self, shape.room_messages, shape.kind is Kind.STEADY) for spec in plan.members]
        self.target = 0  # members in every room once the current wave has joined
        self.lagging = 0  # members that have not yet heard of every join of the wave
        self.caught_up = asyncio.Event()
        self.incomplete = len(self.members)
        self.completed = asyncio.Event()
        self.finish_ns = 0
        self.readers: list[asyncio.Task[None]] = []
        watchers = {m.spec.room: m for m in self.members if m.spec.watcher}
        for member in self.members:
            if member.spec.sender:
                watchers[member.spec.room].senders[member.spec.name] = member

    def on_complete(self, now: int) -> None:
        """A member has every message (or its stream ended)."""
        self.incomplete -= 1
        self.finish_ns = max(self.finish_ns, now)
        if self.incomplete <= 0:
            self.completed.set()

    async def _within(self, step: Awaitable[None], what: str) -> None:
        try:
            await asyncio.wait_for(step, self.plan.join_timeout)
        except TimeoutError:
            raise RuntimeError(f"{what} took over {self.plan.join_timeout:.0f} s") from None

    async def run(self) -> None:
        """Open, join wave by wave, run the load on Go and report Done, then drain on End and report Final."""
        plan, conn = self.plan, self.conn
        opened = channels(plan.address, len(self.members), plan.streams_per_channel)
        senders: list[asyncio.Task[None]] = []
        try:
            stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in opened]
            await self._within(self._open_all(stubs), "opening the streams")
            conn.send(Ready())
            while isinstance(step := await command(conn, plan.join_timeout + 120, Join, Go), Join):
                await self._within(self._join_wave(step.wave), f"join wave {step.wave}")
                conn.send(Ready())
            assert isinstance(step, Go)
            responses = sum(m.responses for m in self.members)
            for member in self.members:
                if member.spec.sender:
                    start = step.at_ns + int(member.spec.phase * plan.shape.interval_ns)
                    senders.append(asyncio.create_task(member.send(plan.shape.messages, plan.shape.interval_ns, start)))
            if not await self._until_complete():
                self.finish_ns = time.monotonic_ns()
            deliveries = sum(m.count for m in self.members)
            batches = sum(m.responses for m in self.members) - responses
            conn.send(Done(max(self.finish_ns, step.at_ns), deliveries, batches))

            await command(conn, plan.run_timeout + 120, End)
            # The server is stopping: each stream ends after RoomClosed; anything after the last seq is extra.
            if self.readers:
                await asyncio.wait(self.readers, timeout=DRAIN_SECONDS)
            check = Check()
            latencies = array("q")
            for member in self.members:
                check.add(member.verdict())
                latencies.extend(member.latencies or ())
            conn.send(Final(check, latencies.tobytes()))
        finally:
            for task in (*senders, *self.readers):
                task.cancel()
            await asyncio.gather(*senders, *self.readers, return_exceptions=True)
            for channel in opened:
                await channel.close(grace=None)

    async def _until_complete(self) -> bool:
        """Wait until every member has every message; False when the run times out or deliveries stall."""
        deadline = time.monotonic() + self.plan.run_timeout
        delivered, progressed = -1, time.monotonic()
        while not self.completed.is_set():
            now = time.monotonic()
            if (count := sum(member.count for member in self.members)) != delivered:
                delivered, progressed = count, now
            # A lost message stalls a closed loop for good: no need to sit out the whole time limit.
            dropped = any(member.check.dropped for member in self.members)
            if now >= deadline or now - progressed >= (STALL_AFTER_DROP_SECONDS if dropped else STALL_SECONDS):
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.completed.wait(), STALL_AFTER_DROP_SECONDS)
        return True

    async def _open_all(self, stubs: list[chat_pb2_grpc.ChatServiceAsyncStub]) -> None:
        """Open every stream, a bounded number at a time, then create this worker's rooms and join their watchers."""
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def open_one(i: int, member: _Member) -> None:
            async with gate:
                await member.open(stubs[i // self.plan.streams_per_channel])

        await asyncio.gather(*(open_one(i, member) for i, member in enumerate(self.members)))
        watchers = [m for m in self.members if m.spec.watcher]
        for member in watchers:
            await stubs[0].CreateRoom(pb.CreateRoomRequest(room=member.spec.room), timeout=self.plan.join_timeout)
        # The watcher is first in its room's fan-out order: it hears each message as early as the server allows.
        await self._join(watchers)

    async def _join_wave(self, wave: int) -> None:
        """Join this wave's members all at once, then wait until every member has heard of every join so far."""
        self.target = min(self.plan.shape.members, 1 + (wave + 1) * self.plan.wave_size)
        await self._join([m for m in self.members if m.spec.wave == wave])
        # Counted with no await in between, so no announcement can slip between the test and the flag.
        self.caught_up.clear()
        self.lagging = 0
        for member in self.members:
            # room_count is 0 until a member has joined; an ended stream will hear nothing more.
            member.lagging = 0 < member.room_count < self.target and not member.ended
            self.lagging += member.lagging
        if self.lagging:
            await self.caught_up.wait()

    async def _join(self, members: list[_Member]) -> None:
        async def join(member: _Member) -> None:
            await member.join()
            self.readers.append(asyncio.create_task(member.read()))

        await asyncio.gather(*(join(member) for member in members))


async def main(conn: Connection, plan: WorkerPlan) -> None:
    """A worker process's work, run by bench.processes in its own uvloop loop."""
    await _Worker(plan, conn).run()
