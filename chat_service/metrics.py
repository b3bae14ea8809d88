"""Prometheus metrics at /metrics: the registry's counts read when scraped, and the RPCs timed by an interceptor.

The HTTP server is prometheus_client's own, on a thread of its own, so a scrape never waits for the event loop nor
delays it. That thread reads only what is safe to read while the loop runs: integers, len() of a dict, and copies
of lists and of dicts whose keys never change (see chat_service.stats); it never walks the rooms or the members.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar, cast
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from chat_service.stats import Stats, cumulative

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# From a quick CreateRoom to a Chat stream that stayed open all day.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600, 3600, 86400)


class _Counts:
    """A collector that turns `Stats` and the registry's sizes into metric families at each scrape."""

    def __init__(self, stats: Stats, rooms: Callable[[], int], members: Callable[[], int]) -> None:
        self._stats = stats
        self._rooms = rooms
        self._members = members

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        yield GaugeMetricFamily("chat_rooms", "Rooms open.", value=self._rooms())
        yield GaugeMetricFamily(
            "chat_members",
            "Names held in rooms, by members and for resumes (what --max-members caps).",
            value=self._members(),
        )
        yield _labelled(
            CounterMetricFamily("chat_messages_received", "Lines and whispers accepted from members.", labels=["kind"]),
            stats.received,
        )
        yield _labelled(
            CounterMetricFamily("chat_members_evicted", "Members the server dropped, by reason.", labels=["reason"]),
            stats.evicted,
        )
        yield _labelled(
            CounterMetricFamily(
                "chat_requests_refused", "Requests refused by a rate limit or a cap.", labels=["limit"]
            ),
            stats.refused,
        )
        sizes, events = cumulative(stats.write_sizes)
        yield CounterMetricFamily("chat_deliveries", "Events written to members' streams.", value=events)
        yield HistogramMetricFamily("chat_write_events", "Events per write to a stream.", sizes, events)
        depths, waiting = cumulative(stats.queue_depths)
        yield HistogramMetricFamily(
            "chat_queue_depth", "Events waiting for a member when a write to it starts.", depths, waiting
        )


def _labelled(family: CounterMetricFamily, counts: dict[str, int]) -> CounterMetricFamily:
    for label, value in dict(counts).items():
        family.add_metric([label], value)
    return family


class Metrics:
    """One server's metrics in a registry of their own, so servers in one process (as in tests) never collide."""

    def __init__(self, stats: Stats, rooms: Callable[[], int], members: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Counts(stats, rooms, members))
        self.streams = Gauge("chat_streams_open", "Chat streams open.", registry=self.registry)
        self.durations = Histogram(
            "chat_rpc_duration_seconds",
            "How long each call took, a Chat stream from its start to its end.",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on `host`:`port` (0 picks a free port) from a thread; returns the port."""
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port} ({error.strerror or error})") from error
        bound: int = self._http[0].server_address[1]
        return bound

    def close(self) -> None:
        """Stop serving /metrics."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join()
            self._http = None

    def interceptor(self, service: str) -> grpc.aio.ServerInterceptor:
        """A server interceptor that times `service`'s calls and counts its open Chat streams."""
        return _Timing(self, f"/{service}/")


class _Timing(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, prefix: str) -> None:
        self._metrics = metrics
        self._prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Only methods that exist get a label, so a client naming made-up methods cannot grow the metrics.
        if handler is None or not method.startswith(self._prefix):
            return handler
        durations = self._metrics.durations.labels(method.removeprefix(self._prefix))
        if handler.unary_unary is not None:
            return _timed_unary(handler, durations)
        if handler.stream_stream is not None:
            return _timed_stream(handler, durations, self._metrics.streams)
        return handler


def _timed_unary(handler: grpc.RpcMethodHandler[Any, Any], durations: Histogram) -> grpc.RpcMethodHandler[Any, Any]:
    behavior = cast(Callable[[object, grpc.aio.ServicerContext[Any, Any]], Awaitable[object]], handler.unary_unary)

    async def timed(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> object:
        start = time.perf_counter()
        try:
            return await behavior(request, context)
        finally:
            durations.observe(time.perf_counter() - start)

    return grpc.unary_unary_rpc_method_handler(
        timed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _timed_stream(
    handler: grpc.RpcMethodHandler[Any, Any], durations: Histogram, streams: Gauge
) -> grpc.RpcMethodHandler[Any, Any]:
    # Chat writes with context.write and returns nothing: a coroutine, not an async generator.
    behavior = cast(
        Callable[[AsyncIterator[object], grpc.aio.ServicerContext[Any, Any]], Awaitable[None]], handler.stream_stream
    )

    async def timed(requests: AsyncIterator[object], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        start = time.perf_counter()
        streams.inc()
        try:
            await behavior(requests, context)
        finally:
            streams.dec()
            durations.observe(time.perf_counter() - start)

    return grpc.stream_stream_rpc_method_handler(
        timed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
