"""A loopback TCP proxy owned by the tests, standing in for a network that freezes or is cut."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards 127.0.0.1:`port` to a target port; `freeze` stalls every byte, `cut` kills every connection.

    With `source` (any 127.x.y.z is local on Linux) the server sees the proxy's clients come from that address.
    """

    def __init__(self, target_port: int, source: str | None = None) -> None:
        self._target_port = target_port
        self._source = source
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._open = True
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def freeze(self) -> None:
        """Stop forwarding while holding every connection open, like a network that went silent."""
        self._flowing.clear()

    def cut(self) -> None:
        """Reset every connection and refuse new ones until `restore`, like a network that went down."""
        self._open = False
        for pair in list(self._connections):
            for writer in pair:
                writer.transport.abort()
        self._connections.clear()

    def restore(self) -> None:
        """Accept and forward connections again."""
        self._open = True
        self._flowing.set()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self._open:
            client_writer.transport.abort()
            return
        try:
            local = (self._source, 0) if self._source is not None else None
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self._target_port, local_addr=local
            )
        except OSError:
            client_writer.transport.abort()
            return
        if not self._open:
            for writer in (client_writer, server_writer):
                writer.transport.abort()
            return
        self.accepted += 1
        pair = (client_writer, server_writer)
        self._connections.add(pair)
        pipes = [
            asyncio.create_task(self._pipe(client_reader, server_writer)),
            asyncio.create_task(self._pipe(server_reader, client_writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)
            self._connections.discard(pair)
            for writer in pair:
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
