"""A model server leaving the gateway's routing: its channel is retired, not closed under the
calls still on it, which finish with their answers; then it closes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from gateway.forwarder import INFER_METHOD, ChannelPool

pytestmark = pytest.mark.integration


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    """A real grpc server whose Infer answers its request bytes reversed, after 0.3 s."""

    async def infer(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(0.3)
        return request[::-1]

    server = grpc.aio.server()
    _, _, method = INFER_METHOD.split("/")
    handler = grpc.method_handlers_generic_handler(
        INFER_METHOD.split("/")[1], {method: grpc.unary_unary_rpc_method_handler(infer)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_calls_in_flight_finish_when_their_server_is_forgotten(slow_server: str) -> None:
    pool = ChannelPool(max_message_bytes=1 << 20)
    calls = [asyncio.create_task(pool.infer(slow_server, b"abc%d" % i, 5.0, f"r{i}")) for i in range(4)]
    await asyncio.sleep(0.1)
    assert pool.in_flight(slow_server) == 4
    await pool.forget(slow_server)  # the server left membership while the calls run
    assert pool.in_flight(slow_server) == 0  # new calls would open a new channel
    answers = await asyncio.gather(*calls)
    assert answers == [(b"abc%d" % i)[::-1] for i in range(4)]
    assert await pool.infer(slow_server, b"xyz", 5.0, "after") == b"zyx"  # a new channel works
    await pool.aclose()


async def test_an_idle_forgotten_channel_closes_at_once(slow_server: str) -> None:
    pool = ChannelPool(max_message_bytes=1 << 20)
    assert await pool.infer(slow_server, b"ab", 5.0, "r") == b"ba"
    await pool.forget(slow_server)
    await pool.aclose()
