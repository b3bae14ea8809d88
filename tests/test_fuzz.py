"""Adversarial requests: seeded random and mutated protobuf bytes to every RPC, before and after a join.

Every answer is a status a client can act on, never UNKNOWN or INTERNAL; a Chat stream answers each undecodable
frame with an error event and lives on; afterwards the server still serves and has printed no traceback.
`make fuzz` runs many more cases; FUZZ_CASES and FUZZ_SEED choose how many and which."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.encoding import varint
from chat_service.service import SERVICE_NAME
from tests.conftest import UNLIMITED_FLAGS, ServerProcess, start_server_process
from tests.streams import Stream, raw_chat

CASES = int(os.environ.get("FUZZ_CASES", "2400"))
SEED = int(os.environ.get("FUZZ_SEED", "20261128"))
# Calls in flight at once: enough to overlap the round trips, few enough not to measure the machine's speed.
IN_FLIGHT = 16
FRAMES_PER_STREAM = 20
# Generous: the suite must pass on a busy machine, and a server that hangs fails the test either way.
TIMEOUT = 30.0
TOO_LARGE = 5 * 1024 * 1024

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
NAMES = ["fuzz", "lobby", "alice", "Unknown", "", "x" * 33, "a b", "é"]
# Byte strings that no UTF-8 decoder accepts: a lone continuation byte, an overlong NUL, a surrogate, and so on.
BAD_UTF8 = [b"\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xfe", b"\xe2\x82"]

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub

Call = grpc.aio.StreamStreamCall[bytes, pb.ChatResponse]


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _key(number, 2) + varint(len(payload)) + payload


def _sample(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    """A valid message of any type, its fields filled at random from its descriptor (so new RPCs are covered too)."""
    message = message_factory.GetMessageClass(descriptor)()
    chosen = {oneof.name: rng.choice(oneof.fields) for oneof in descriptor.oneofs}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if (oneof is not None and chosen[oneof.name] is not field) or rng.random() < 0.3 or field.is_repeated:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < 3 and field.message_type is not None:
                getattr(message, field.name).CopyFrom(_sample(field.message_type, rng, depth + 1))
        elif field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, rng.choice([*NAMES, "hello", "x" * rng.randint(0, 5000)]))
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, field.name, rng.random() < 0.5)
        elif field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
            bits = 32 if field.type == FieldDescriptor.TYPE_UINT32 else 64
            setattr(message, field.name, rng.choice([0, 1, 20, 2**bits - 1, rng.getrandbits(bits)]))
    return message


Mutation = Callable[[random.Random, bytes, bytes], bytes]


def _flip(rng: random.Random, data: bytes, _other: bytes) -> bytes:
    if not data:
        return bytes([rng.getrandbits(8)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes, _: bytes) -> bytes:
    return data[: rng.randint(0, max(len(data) - 1, 0))]


def _splice(rng: random.Random, data: bytes, other: bytes) -> bytes:
    return data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)) :]


def _insert(rng: random.Random, data: bytes, _: bytes) -> bytes:
    at = rng.randint(0, len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]


def _wrong_type(rng: random.Random, data: bytes, _: bytes) -> bytes:
    """A known field number with another wire type: varint, fixed64, length-delimited, a group, fixed32."""
    number = rng.randint(1, 6)
    payloads = {
        0: varint(rng.getrandbits(64)),
        1: rng.randbytes(8),
        2: varint(3) + b"abc",
        3: b"",
        5: rng.randbytes(4),
    }
    wire_type = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
    return data + _key(number, wire_type) + payloads.get(wire_type, b"")


def _huge_number(rng: random.Random, data: bytes, _: bytes) -> bytes:
    """Varints at and past their ten-byte limit, lengths far past the end, field numbers at the top of the range."""
    return data + rng.choice(
        [
            _key(rng.randint(1, 6), 0) + b"\xff" * 9 + b"\x01",
            _key(rng.randint(1, 6), 0) + b"\xff" * 11 + b"\x01",
            _key(rng.randint(1, 6), 2) + varint(rng.choice([2**31, 2**32 - 1, 2**63])) + b"abc",
            _key(2**29 - 1, 0) + b"\x01",
            _key(0, 0) + b"\x01",
        ]
    )


def _bad_utf8(rng: random.Random, data: bytes, _: bytes) -> bytes:
    """Invalid UTF-8 in a string field, at the top or nested (a join's room, a resume's token)."""
    bad = rng.choice(BAD_UTF8)
    inner = _field(rng.randint(1, 3), bad)
    return data + rng.choice([inner, _field(rng.randint(1, 4), inner), _field(1, _field(5, _field(1, bad)))])


def _groups(rng: random.Random, data: bytes, _: bytes) -> bytes:
    """Unbalanced or very deep group markers."""
    depth = rng.choice([1, 5, 99, 101, 1000])
    return data + b"\x0b" * depth + b"\x0c" * rng.randint(0, depth)


def _noise(rng: random.Random, _: bytes, __: bytes) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 512]))


MUTATIONS: list[Mutation] = [_flip, _truncate, _splice, _insert, _wrong_type, _huge_number, _bad_utf8, _groups, _noise]


def _case(descriptor: Descriptor, rng: random.Random) -> bytes:
    """One adversarial request body for messages of `descriptor`: a valid one mutated, once or twice."""
    data = _sample(descriptor, rng).SerializeToString()
    for _ in range(rng.choice([1, 1, 1, 2])):
        other = _sample(descriptor, rng).SerializeToString()
        data = rng.choice(MUTATIONS)(rng, data, other)
    return data


def _decodes(descriptor: Descriptor, data: bytes) -> bool:
    try:
        message_factory.GetMessageClass(descriptor).FromString(data)
    except DecodeError:
        return False
    return True


@dataclass
class Failure:
    """A request whose answer broke the rules, with what it takes to replay it."""

    what: str
    body: bytes
    code: grpc.StatusCode
    details: str

    def __str__(self) -> str:
        return f"{self.what} (FUZZ_SEED={SEED}): {self.code.name} {self.details!r} for {self.body[:200].hex()}"


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """The real executable without rate limits: the fuzzer sends everything from one address as fast as it can."""
    proc = start_server_process(tmp_path / "state", *UNLIMITED_FLAGS)
    try:
        yield proc
    finally:
        proc.stop()


async def test_fuzzed_unary_requests_get_a_status_never_unknown(server_process: ServerProcess) -> None:
    rng = random.Random(SEED)
    token = server_process.token_path.read_text().strip()
    service = pb.DESCRIPTOR.services_by_name["ChatService"]
    async with grpc.aio.insecure_channel(server_process.address) as channel:
        methods = [
            method
            for method in service.methods
            if not method.client_streaming and await _implemented(channel, method.name, method.input_type)
        ]
        assert {"ListRooms", "CreateRoom", "KillRoom"} <= {method.name for method in methods}
        cases = [(method, _case(method.input_type, rng)) for method in (rng.choice(methods) for _ in range(CASES // 2))]
        cases += [(method, _field(1, b"x" * TOO_LARGE)) for method in methods]
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def attempt(index: int, name: str, body: bytes) -> Failure | None:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE_NAME}/{name}")
            # Half the calls carry the admin token, so that admin-only methods get past the check to the decoding.
            metadata = (("authorization", f"Bearer {token}"),) if index % 2 else ()
            async with gate:
                try:
                    await call(body, metadata=metadata, timeout=TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    if error.code() not in ALLOWED:
                        return Failure(f"case {index} to {name}", body, error.code(), error.details() or "")
            return None

        failures = await asyncio.gather(*(attempt(i, m.name, body) for i, (m, body) in enumerate(cases)))
        assert [str(f) for f in failures if f is not None] == []
        await _still_serves(chat_pb2_grpc.ChatServiceStub(channel))
    _assert_no_traceback(server_process)


async def _implemented(channel: grpc.aio.Channel, name: str, input_type: Descriptor) -> bool:
    """Whether the server implements `name` at all (a method the proto has but the server lacks is not fuzzed)."""
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE_NAME}/{name}")
    try:
        await call(message_factory.GetMessageClass(input_type)().SerializeToString(), timeout=TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


async def test_fuzzed_chat_frames_are_answered_and_the_stream_lives_on(server_process: ServerProcess) -> None:
    rng = random.Random(SEED + 1)
    chat_request = pb.ChatRequest.DESCRIPTOR
    async with grpc.aio.insecure_channel(server_process.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await stub.CreateRoom(pb.CreateRoomRequest(room="fuzz"))
        streams: list[tuple[str, list[bytes]]] = []
        for index in range(-(-CASES // 2 // FRAMES_PER_STREAM)):
            flavour = ("bad-before-join", "bad-after-join", "any")[index % 3]
            frames: list[bytes] = []
            while len(frames) < FRAMES_PER_STREAM:
                frame = _case(chat_request, rng)
                if flavour == "any" or not _decodes(chat_request, frame):
                    frames.append(frame)
            streams.append((flavour, frames))
        streams.append(("any", [_field(2, b"x" * TOO_LARGE)]))
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def run(index: int, flavour: str, frames: list[bytes]) -> list[str]:
            async with gate:
                call = raw_chat(channel)
                try:
                    if flavour == "any":
                        return await _any_frames(call, index, frames)
                    return await _bad_frames(call, index, frames, join_first=flavour == "bad-after-join")
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    body = b"".join(_field(1, frame) for frame in frames)
                    return [str(Failure(f"stream {index} ({flavour}) ended early", body, *await _status(call)))]
                except TimeoutError:
                    call.cancel()
                    return [f"stream {index} ({flavour}): no answer within {TIMEOUT} s (FUZZ_SEED={SEED})"]

        problems = await asyncio.gather(*(run(index, *stream) for index, stream in enumerate(streams)))
        assert [problem for found in problems for problem in found] == []
        await _still_serves(stub)
    _assert_no_traceback(server_process)


async def _bad_frames(call: Call, index: int, frames: list[bytes], *, join_first: bool) -> list[str]:
    """Undecodable frames before or after a join: one error event each, and then the stream works as before."""
    room = f"own-{index}"
    join = pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name="me", create=True)).SerializeToString()
    say = pb.ChatRequest(say=pb.ChatRequest.SendMessage(text="after the garbage")).SerializeToString()
    events: list[pb.Event] = []
    if join_first:
        await call.write(join)
        events += await _read(call, 1)
    for frame in frames:
        await call.write(frame)
    errors = await _read(call, len(frames))
    await call.write(say if join_first else join)
    events += errors + await _read(call, 1)
    await call.done_writing()
    kinds = [event.WhichOneof("kind") for event in events]
    expected = [*(["joined"] if join_first else []), *["error"] * len(frames), "message" if join_first else "joined"]
    problems = [] if kinds == expected else [f"stream {index}: events {kinds}, expected {expected}"]
    problems += [
        f"stream {index}: {error.error}"
        for error in errors
        if "not a valid chat.v1.ChatRequest" not in error.error.message
    ]
    await _read_to_end(call)
    return problems + _status_problems(index, frames, *await _status(call))


async def _any_frames(call: Call, index: int, frames: list[bytes]) -> list[str]:
    """Any mutated frames, decodable or not, from a member of the shared room: the call ends with an allowed status."""
    reader = asyncio.create_task(_read_to_end(call))
    try:
        if index % 2:
            join = pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="fuzz", name=f"any-{index}"))
            await call.write(join.SerializeToString())
        for frame in frames:
            await call.write(frame)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # The server ended the call (a frame too large, say); its status is checked below.
    await reader
    return _status_problems(index, frames, *await _status(call))


def _status_problems(index: int, frames: list[bytes], code: grpc.StatusCode, details: str) -> list[str]:
    if code in ALLOWED:
        return []
    return [str(Failure(f"stream {index}", b"".join(_field(1, frame) for frame in frames), code, details))]


async def _status(call: Call) -> tuple[grpc.StatusCode, str]:
    return await asyncio.wait_for(call.code(), TIMEOUT), await call.details() or ""


async def _read(call: Call, count: int) -> list[pb.Event]:
    events: list[pb.Event] = []
    while len(events) < count:
        response = await asyncio.wait_for(call.read(), TIMEOUT)
        if not isinstance(response, pb.ChatResponse):
            break
        events.extend(response.events)
    return events


async def _read_to_end(call: Call) -> None:
    """Read until the server ends the call; its status is then in `call.code()`."""
    try:
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass  # The status is what the caller checks.


async def _still_serves(stub: Stub) -> None:
    """A plain chat works after the fuzzing: two members, a line each way."""
    alice, _ = await Stream.joined(stub, "after-fuzz", "alice", create=True)
    bob, _ = await Stream.joined(stub, "after-fuzz", "bob")
    await alice.say("still serving")
    assert (await bob.next_of("message")).message.text == "still serving"
    await bob.say("and hearing")
    assert [(await alice.next_of("message")).message.text for _ in range(2)] == ["still serving", "and hearing"]
    rooms = {room.name: room.member_count for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms}
    assert rooms["after-fuzz"] == 2


def _assert_no_traceback(server_process: ServerProcess) -> None:
    """Stop the server and check that nothing it printed is a traceback or gRPC's report of an unexpected error."""
    server_process.process.terminate()
    server_process.wait_for_line("server stopped", timeout=TIMEOUT)
    bad = [line for line in server_process.seen if "Traceback" in line or "Unexpected" in line]
    assert bad == [], server_process.seen[-50:]
