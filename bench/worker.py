"""A load-generator process: its own event loop and channels, its share of a shape's members, senders and watchers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from array import array
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, TypeVar

import grpc
import uvloop

from bench import procstat
from bench.bare import CHANNEL_OPTIONS, raise_open_files
from bench.protocol import Check, Command, Done, End, Failed, Final, Go, Join, Opened, Report, Settled, WorkerPlan
from bench.shapes import MemberSpec, room_size_after
from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc

if TYPE_CHECKING:
    ChatCall = grpc.aio.StreamStreamCall[pb.ChatRequest, pb.ChatResponse]

MAX_EXAMPLES = 10
STALL_SECONDS = 10.0  # no delivery for this long, with messages missing, ends the measured phase
# Once the server has dropped a member the run has failed, and a dropped sender's messages never come: end sooner.
STALL_AFTER_DROP_SECONDS = 1.0

C = TypeVar("C", Join, Go, End)


class _Member:
    """One Chat stream: joins, then checks every message it receives against the room's sequence numbers."""

    __slots__ = (
        "acked",
        "base",
        "call",
        "check",
        "closed",
        "complete",
        "count",
        "ended",
        "expected",
        "in_range",
        "lagging",
        "last",
        "latencies",
        "next_index",
        "next_seq",
        "responses",
        "room_count",
        "seen",
        "senders",
        "sent",
        "spec",
        "unwatched",
        "waiter",
        "worker",
    )

    def __init__(self, spec: MemberSpec, worker: _Worker, expected: int, latency: bool) -> None:
        self.spec = spec
        self.worker = worker
        self.call: ChatCall | None = None
        self.expected = expected
        self.base = 0
        self.last = expected
        self.next_seq = 1
        self.count = 0
        self.responses = 0
        # Filled only after the first out-of-sequence message: the common path is one comparison per message.
        self.seen: set[int] | None = None
        self.in_range = 0
        self.room_count = 0  # members in the room as this member knows it: Joined.members plus announcements
        self.lagging = False  # the worker waits for this member to hear of every join so far
        self.complete = False
        self.closed = False
        self.ended = False
        self.check = Check(members=1)
        self.latencies: array[int] | None = array("q") if latency else None
        # A watcher acknowledges the senders of its room (they live in this process too).
        self.senders: dict[str, _Member] | None = None
        self.next_index: dict[str, int] = {}
        self.sent = 0
        self.acked = 0
        self.unwatched = False  # the room's watcher is gone: nothing will acknowledge this sender's messages
        self.waiter: asyncio.Future[None] | None = None

    @property
    def label(self) -> str:
        return f"{self.spec.room}/{self.spec.name}"

    async def open(self, stub: chat_pb2_grpc.ChatServiceAsyncStub) -> None:
        """Start the stream and wait until the server's handler has answered it, before any join."""
        call = self.call = stub.Chat()
        # A request with no action is refused with an error event: proof the server is serving this call.
        await call.write(pb.ChatRequest())
        response = await call.read()
        if not isinstance(response, pb.ChatResponse) or response.events[0].WhichOneof("kind") != "error":
            raise RuntimeError(f"{self.label}: the stream did not open ({response!r})")

    async def join(self) -> None:
        """Join the (already created) room and take in whatever came in the same batch as Joined."""
        call = self.call
        assert call is not None
        spec = self.spec
        await call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=spec.room, name=spec.name)))
        response = await call.read()
        if not isinstance(response, pb.ChatResponse):
            raise RuntimeError(f"{self.label}: the stream ended before the join ({await call.code()})")
        events = list(response.events)
        if not events or events[0].WhichOneof("kind") != "joined":
            raise RuntimeError(f"{self.label}: join refused: {events[0] if events else response}")
        joined = events[0].joined
        self.base = joined.last_seq
        self.next_seq = self.base + 1
        self.last = self.base + self.expected
        self.room_count = len(joined.members)
        self.consume(events[1:], time.monotonic_ns())

    async def read(self) -> None:
        """Consume the stream until it ends; record how it ended."""
        call = self.call
        assert call is not None
        try:
            while True:
                response = await call.read()
                if not isinstance(response, pb.ChatResponse):
                    break
                self.consume(response.events, time.monotonic_ns())
                if self.closed:
                    # The server ends the call only once the client half-closes; keep reading to catch extras.
                    self.closed = False
                    await call.done_writing()
        except grpc.aio.AioRpcError as error:
            # The server ends a too-slow member's stream with RESOURCE_EXHAUSTED: the count of dropped members.
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.check.dropped += 1
                self._example(f"dropped as too slow: {error.details()}")
            elif not self.complete:
                self.check.stream_errors += 1
                self._example(f"stream failed: {error.code().name} {error.details()}")
        finally:
            # A stream that ended hears nothing more: it must not hold the others up, nor its senders' windows.
            self.ended = True
            self._caught_up()
            self._complete(time.monotonic_ns())
            for sender in (self.senders or {}).values():
                sender.unwatched = True
                if sender.waiter is not None and not sender.waiter.done():
                    sender.waiter.set_result(None)

    def consume(self, events: Sequence[pb.Event], now: int) -> None:
        """Check one batch of events: the hot path of the load generator, so it keeps state in locals."""
        self.responses += 1
        next_seq = self.next_seq
        seen = self.seen
        count = self.count
        latencies = self.latencies
        watching = self.senders is not None
        for event in events:
            message = event.message
            seq = message.seq
            if not seq:
                self._other(event)
                continue
            count += 1
            if seq == next_seq and seen is None:
                next_seq += 1
            else:
                next_seq = self._disorder(seq, next_seq)
                seen = self.seen
            if latencies is not None:
                text = message.text
                latencies.append(now - int(text[text.index(" ") + 1 :]))
            if watching:
                self._acknowledge(message)
        self.next_seq = next_seq
        self.count = count
        if not self.complete and (next_seq > self.last if seen is None else self.in_range >= self.expected):
            self._complete(now)

    def _disorder(self, seq: int, next_seq: int) -> int:
        seen = self.seen
        if seen is None:
            seen = self.seen = set(range(self.base + 1, next_seq))
            self.in_range = min(next_seq - 1, self.last) - self.base
        if seq in seen:
            self._example(f"seq {seq} arrived twice")
        else:
            seen.add(seq)
            if self.base < seq <= self.last:
                self.in_range += 1
            if seq != next_seq:
                self.check.out_of_order += 1
                self._example(f"seq {seq} arrived when {next_seq} was due")
        return max(next_seq, seq + 1)

    def _acknowledge(self, message: pb.Message) -> None:
        assert self.senders is not None
        sender = self.senders.get(message.sender)
        if sender is None:
            return
        text = message.text
        index = int(text[: text.index(" ")])
        due = self.next_index.get(message.sender, 0)
        if index != due:
            self.check.out_of_order += 1
            self._example(f"{message.sender}'s message {index} arrived when {due} was due")
        self.next_index[message.sender] = index + 1
        sender.acked += 1
        waiter = sender.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _other(self, event: pb.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind in ("member_joined", "members"):
            # A wave of joins can reach a member as one member list instead of a MemberJoined each.
            self.room_count = len(event.members.names) if kind == "members" else self.room_count + 1
            if self.lagging and self.room_count >= self.worker.targets[self.spec.room]:
                self._caught_up()
        elif kind == "member_left":
            self._example(f"saw {event.member_left.name} leave ({pb.LeaveReason.Name(event.member_left.reason)})")
        elif kind == "error":
            self.check.stream_errors += 1
            self._example(f"error event: {event.error.message}")
        elif kind == "room_closed":
            self.closed = True
        else:
            self._example(f"unexpected {kind} event")

    def _caught_up(self) -> None:
        if self.lagging:
            self.lagging = False
            self.worker.on_caught_up()

    def _complete(self, now: int) -> None:
        if not self.complete:
            self.complete = True
            self.worker.on_complete(now)

    def _example(self, text: str) -> None:
        if len(self.check.examples) < MAX_EXAMPLES:
            self.check.examples.append(f"{self.label}: {text}")

    async def send_burst(self, count: int, window: int) -> int:
        """Say `count` lines, never more than `window` of them not yet seen by the room's watcher."""
        call = self.call
        assert call is not None
        loop = asyncio.get_running_loop()
        for i in range(count):
            while self.sent - self.acked >= window and not self.unwatched:
                self.waiter = loop.create_future()
                await self.waiter
            await call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=f"{i} {time.monotonic_ns()}")))
            self.sent += 1
        return 0

    async def send_paced(self, count: int, interval_ns: int, start_ns: int) -> int:
        """Say `count` lines on a fixed schedule whatever the replies; returns the worst lateness in ns."""
        call = self.call
        assert call is not None
        lag = 0
        for i in range(count):
            due = start_ns + i * interval_ns
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            now = time.monotonic_ns()
            lag = max(lag, now - due)
            await call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=f"{i} {now}")))
            self.sent += 1
        return lag

    def verdict(self) -> Check:
        """This member's final count of lost, duplicated, extra and reordered messages."""
        check = self.check
        if self.seen is None:
            unique = self.next_seq - 1 - self.base
            in_range = min(unique, self.expected)
        else:
            unique = len(self.seen)
            in_range = self.in_range
        check.lost = self.expected - in_range
        check.duplicated = self.count - unique
        check.extra = unique - in_range
        check.incomplete = int(in_range < self.expected)
        if check.lost:
            self._example(f"{check.lost} of {self.expected} messages never arrived")
        if check.extra:
            self._example(f"{check.extra} messages beyond the {self.expected} said")
        return check


class _Worker:
    """Runs one plan through its phases, answering the coordinator at each step."""

    def __init__(self, plan: WorkerPlan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.inbox: asyncio.Queue[Command] = asyncio.Queue()
        self.members = [_Member(spec, self, plan.room_messages, plan.latency) for spec in plan.members]
        self.targets: dict[str, int] = {}
        self.lagging = 0
        self.caught_up = asyncio.Event()
        self.incomplete = len(self.members)
        self.completed = asyncio.Event()
        self.finish_ns = 0
        watchers = {m.spec.room: m for m in self.members if m.spec.watcher}
        for member in self.members:
            if member.spec.sender:
                watcher = watchers[member.spec.room]
                if watcher.senders is None:
                    watcher.senders = {}
                watcher.senders[member.spec.name] = member

    def on_caught_up(self) -> None:
        """A member has heard of every join of the current wave."""
        self.lagging -= 1
        if self.lagging <= 0:
            self.caught_up.set()

    def on_complete(self, now: int) -> None:
        """A member has every message (or its stream ended)."""
        self.incomplete -= 1
        self.finish_ns = max(self.finish_ns, now)
        if self.incomplete <= 0:
            self.completed.set()

    def send(self, report: Report) -> None:
        """Report to the coordinator."""
        self.conn.send(report)

    def _on_command(self) -> None:
        try:
            command = self.conn.recv()
        except (EOFError, OSError):
            # The coordinator is gone: nobody will read the results or stop this process.
            os._exit(3)
        self.inbox.put_nowait(command)

    async def _expect(self, kind: type[C]) -> C:
        command = await self.inbox.get()
        if not isinstance(command, kind):
            raise RuntimeError(f"expected {kind.__name__} from the coordinator, got {command!r}")
        return command

    async def _within(self, step: Awaitable[None], what: str) -> None:
        try:
            await asyncio.wait_for(step, self.plan.join_timeout)
        except TimeoutError:
            raise RuntimeError(f"worker {self.plan.index}: {what} took over {self.plan.join_timeout:.0f} s") from None

    async def run(self) -> None:
        """Open, join wave by wave, run the load on Go and report Done, then drain on End and report Final."""
        plan = self.plan
        loop = asyncio.get_running_loop()
        watch(self.conn, self._on_command)
        per_channel = max(1, plan.streams_per_channel)
        channels = [
            grpc.aio.insecure_channel(plan.address, options=CHANNEL_OPTIONS)
            for _ in range(-(-len(self.members) // per_channel))
        ]
        readers: list[asyncio.Task[None]] = []
        senders: list[asyncio.Task[int]] = []
        try:
            stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
            await self._within(self._open_all(stubs, readers), "opening the streams")
            self.send(Opened())
            go: Go | None = None
            while go is None:
                command = await asyncio.wait_for(self.inbox.get(), plan.join_timeout + 120)
                if isinstance(command, Go):
                    go = command
                elif isinstance(command, Join):
                    await self._within(self._join_wave(command.wave, readers), f"join wave {command.wave}")
                    self.send(Settled(command.wave, _cpu(), procstat.sched(), len(channels)))
                else:
                    raise RuntimeError(f"expected Join or Go from the coordinator, got {command!r}")
            responses = sum(m.responses for m in self.members)
            senders = self._start_senders(go.at_ns)
            if not await self._until_complete():
                self.finish_ns = time.monotonic_ns()
            lag = max((task.result() for task in senders if task.done() and not task.exception()), default=0)
            self.send(
                Done(
                    cpu=_cpu(),
                    sched=procstat.sched(),
                    finish_ns=max(self.finish_ns, go.at_ns),
                    deliveries=sum(m.count for m in self.members),
                    responses=sum(m.responses for m in self.members) - responses,
                    sender_lag_ns=lag,
                )
            )

            async with asyncio.timeout(plan.run_timeout + 120):
                await self._expect(End)
            # The server is stopping: each stream ends after RoomClosed; anything after the last seq is extra.
            if readers:
                await asyncio.wait(readers, timeout=plan.drain_timeout)
            check = Check()
            latencies = array("q")
            for member in self.members:
                check.add(member.verdict())
                if member.latencies is not None:
                    latencies.extend(member.latencies)
            self.send(Final(check, latencies.tobytes()))
        finally:
            for task in (*senders, *readers):
                task.cancel()
            await asyncio.gather(*senders, *readers, return_exceptions=True)
            for channel in channels:
                await channel.close(grace=None)
            loop.remove_reader(self.conn.fileno())

    async def _until_complete(self) -> bool:
        """Wait until every member has every message; False when the run times out or deliveries stall."""
        deadline = time.monotonic() + self.plan.run_timeout
        delivered, progressed = -1, time.monotonic()
        while not self.completed.is_set():
            now = time.monotonic()
            count = sum(member.count for member in self.members)
            if count != delivered:
                delivered, progressed = count, now
            # A lost message stalls a closed loop for good: no need to sit out the whole time limit.
            dropped = any(member.check.dropped for member in self.members)
            if now >= deadline or now - progressed >= (STALL_AFTER_DROP_SECONDS if dropped else STALL_SECONDS):
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.completed.wait(), STALL_AFTER_DROP_SECONDS)
        return True

    async def _open_all(
        self, stubs: list[chat_pb2_grpc.ChatServiceAsyncStub], readers: list[asyncio.Task[None]]
    ) -> None:
        """Create this worker's rooms and join their watchers first, then open every other stream, bounded."""
        plan = self.plan
        gate = asyncio.Semaphore(plan.open_concurrency)

        async def open_one(i: int, member: _Member) -> None:
            async with gate:
                await member.open(stubs[i // plan.streams_per_channel])

        await asyncio.gather(*(open_one(i, member) for i, member in enumerate(self.members)))
        watchers = [m for m in self.members if m.spec.watcher]
        for member in watchers:
            await stubs[0].CreateRoom(pb.CreateRoomRequest(room=member.spec.room), timeout=plan.join_timeout)
        # The watcher is first in its room's fan-out order: it hears each message as early as the server allows.
        await self._join(watchers, readers)

    async def _join_wave(self, wave: int, readers: list[asyncio.Task[None]]) -> None:
        """Join this wave's members all at once, then wait until every member has heard of every join so far."""
        self.targets = {
            room: room_size_after(wave, members, self.plan.wave_size) for room, members in self.plan.room_sizes.items()
        }
        await self._join([m for m in self.members if m.spec.wave == wave], readers)
        # Counted with no await in between, so no announcement can slip between the test and the flag.
        self.lagging = 0
        self.caught_up.clear()
        for member in self.members:
            # room_count is 0 until a member has joined; an ended stream will hear nothing more.
            if member.room_count and not member.ended and member.room_count < self.targets[member.spec.room]:
                member.lagging = True
                self.lagging += 1
        if self.lagging:
            await self.caught_up.wait()

    async def _join(self, members: list[_Member], readers: list[asyncio.Task[None]]) -> None:
        async def join(member: _Member) -> None:
            await member.join()
            readers.append(asyncio.create_task(member.read()))

        await asyncio.gather(*(join(member) for member in members))

    def _start_senders(self, go_ns: int) -> list[asyncio.Task[int]]:
        plan = self.plan
        tasks = []
        for member in self.members:
            if not member.spec.sender:
                continue
            if plan.window:
                coro = member.send_burst(plan.messages, plan.window)
            else:
                start = go_ns + int(member.spec.phase * plan.interval_ns)
                coro = member.send_paced(plan.messages, plan.interval_ns, start)
            tasks.append(asyncio.create_task(coro))
        return tasks


def watch(conn: Connection, on_readable: Callable[[], None]) -> None:
    """Call `on_readable` on the running loop whenever the coordinator has written to `conn`."""
    asyncio.get_running_loop().add_reader(conn.fileno(), on_readable)
    # uvloop makes a watched descriptor non-blocking, and this pipe is written to as well: a large Final would then
    # be cut short, and the coordinator would see "got end of file during message".
    os.set_blocking(conn.fileno(), True)


def _cpu() -> float:
    """CPU seconds (user + system, all threads) this process has used, as the server's are counted."""
    return procstat.cpu_seconds()


def main(plan: WorkerPlan, conn: Connection) -> None:
    """Entry point of a worker process (started with the spawn method, so grpc starts fresh here)."""
    try:
        raise_open_files()
        # uvloop cuts the load generator's CPU by up to a tenth (bench/README.md), leaving more CPU to the server.
        uvloop.run(_Worker(plan, conn).run())
    except BaseException as error:  # the coordinator must hear about any failure, then the process ends
        if isinstance(error, RuntimeError):
            reason = "".join(traceback.format_exception_only(error)).strip()
        else:
            reason = traceback.format_exc()
        with contextlib.suppress(OSError):
            conn.send(Failed(reason))
        raise SystemExit(1) from None
    finally:
        conn.close()
