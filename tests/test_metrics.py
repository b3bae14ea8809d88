"""Prometheus metrics of a real `chat-server`, scraped over HTTP and read with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from tests.conftest import ServerProcess, failed_start, start_server_process
from tests.streams import Stream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample at `url`, by name and sorted labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers.get_content_type() == "text/plain"
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), -1.0)


async def scrape_until(url: str, ready: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    """Scrape until `ready` holds, as a monitoring system polls; fail with the last scrape after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


def metrics_url(server: ServerProcess) -> str:
    line = next(line for line in server.seen if line.startswith("metrics: "))
    return line.removeprefix("metrics: ")


@pytest.fixture
def metered_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with metrics on a free port, a queue of 16, lines unlimited and two rooms' creation burst."""
    server = start_server_process(
        tmp_path / "state",
        *("--metrics-port", "0", "--max-queue", "16", "--lines-per-second", "0"),
        *("--room-burst", "2", "--rooms-per-minute", "0.001", "--log-format", "json"),
    )
    try:
        yield server
    finally:
        server.stop()


async def _flood_until_evicted(fast: Stream, slow: Stream) -> int:
    """Say large lines until the member who never reads is dropped; returns how many were said."""
    said = 0
    dropped = False
    # Once the transport's buffers are full the slow member's queue overflows, and it is dropped.
    while not dropped and said < 2000:
        await fast.say("x" * 4000)
        said += 1
        event = await fast.next()
        while event.WhichOneof("kind") != "message":
            dropped = dropped or event.WhichOneof("kind") == "member_left"
            event = await fast.next()
    assert dropped, "the slow member was never dropped"
    # Its call ends once it reads what the transport still holds for it, up to the status.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        for _ in range(said + 10):
            await slow.next()
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return said


async def test_metrics_count_rooms_members_messages_refusals_and_evictions(metered_server: ServerProcess) -> None:
    url = metrics_url(metered_server)
    assert url == f"http://127.0.0.1:{url.rsplit(':', 1)[1]}"
    async with (
        grpc.aio.insecure_channel(metered_server.address) as fast_channel,
        grpc.aio.insecure_channel(metered_server.address) as slow_channel,
    ):
        stub = chat_pb2_grpc.ChatServiceStub(fast_channel)
        await stub.CreateRoom(pb.CreateRoomRequest(room="attic"))
        fast, _ = await Stream.joined(stub, "lobby", "fast", create=True)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateRoom(pb.CreateRoomRequest(room="cellar"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow, _ = await Stream.joined(chat_pb2_grpc.ChatServiceStub(slow_channel), "lobby", "slow")
        await fast.next_of("member_joined")
        await fast.whisper("slow", "psst")
        await fast.next_of("whisper")
        said = await _flood_until_evicted(fast, slow)
        evicted = json.loads(metered_server.wait_for_line("dropped from room lobby"))
        assert (evicted["level"], evicted["room"], evicted["member"], evicted["reason"]) == (
            "INFO",
            "lobby",
            "slow",
            "too_slow",
        )

        samples = await scrape_until(url, lambda s: value(s, "chat_streams_open") == 1)
        assert value(samples, "chat_rooms") == 2
        assert value(samples, "chat_members") == 1
        assert value(samples, "chat_streams_open") == 1
        assert value(samples, "chat_messages_received_total", kind="say") == said
        assert value(samples, "chat_messages_received_total", kind="whisper") == 1
        assert value(samples, "chat_requests_refused_total", limit="rooms") == 1
        assert value(samples, "chat_requests_refused_total", limit="lines") == 0
        assert value(samples, "chat_members_evicted_total", reason="too_slow") == 1
        assert value(samples, "chat_members_evicted_total", reason="resumed_elsewhere") == 0
        assert value(samples, "chat_rpc_duration_seconds_count", method="CreateRoom") == 2
        assert value(samples, "chat_rpc_duration_seconds_count", method="Chat") == 1
        # The fast member read a join, its whisper and every line it said; the slow one at least its join.
        deliveries = value(samples, "chat_deliveries_total")
        assert deliveries >= said + 4
        assert value(samples, "chat_write_events_sum") == deliveries
        writes = value(samples, "chat_write_events_count")
        assert 0 < writes <= deliveries
        assert value(samples, "chat_write_events_bucket", le="+Inf") == writes
        assert value(samples, "chat_queue_depth_count") == writes
        assert value(samples, "chat_queue_depth_sum") >= deliveries

        await fast.leave()
        assert await fast.expect_end() == []
    samples = await scrape_until(url, lambda s: value(s, "chat_streams_open") == 0)
    assert value(samples, "chat_streams_open") == 0
    assert value(samples, "chat_rpc_duration_seconds_count", method="Chat") == 2


def test_metrics_are_off_unless_asked_for(server_process: ServerProcess) -> None:
    assert not [line for line in server_process.seen if line.startswith("metrics:")]


def test_a_metrics_port_in_use_stops_the_start_with_a_sentence(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = failed_start(tmp_path, "--metrics-port", str(port))
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert not list(tmp_path.rglob("admin-token-*"))
