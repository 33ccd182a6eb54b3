"""The port ``serve --workers N`` binds once for its server processes: connections
accepted on it must have Nagle's algorithm off (with it on, every response of a
multi-process serve waited out the client's delayed ACK, about 40 ms)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.cli.server import listen


async def _accepted_nodelay(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Probe, sock=sock)
    try:
        host, port = sock.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        value = await asyncio.wait_for(accepted, 10)
        writer.close()
        return value
    finally:
        server.close()
        await server.wait_closed()


def test_connections_on_the_shared_port_have_nagle_off() -> None:
    sock = listen("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    assert asyncio.run(_accepted_nodelay(sock)) != 0


def test_uvicorns_own_socket_would_not() -> None:
    """Why ``listen`` exists: a socket made as uvicorn makes it gets no TCP_NODELAY."""
    sock = socket.socket(family=socket.AF_INET)
    sock.bind(("127.0.0.1", 0))
    assert asyncio.run(_accepted_nodelay(sock)) == 0


def test_a_port_in_use_is_a_clear_error() -> None:
    taken = listen("127.0.0.1", 0)
    taken.listen()
    try:
        in_use = r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"
        with pytest.raises(SystemExit, match=in_use):
            listen("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
