"""The floor under any Python gRPC gateway: a grpc.aio proxy on uvloop that forwards every
unary call's bytes to one upstream, with no routing, metrics, parsing or request ids.

`bench/gateway_bench.py` runs it beside the gateway, in the same run, so the gateway's hop
splits into what grpc.aio costs for one more hop on this machine (this proxy minus direct)
and what Modelyard's routing adds on top (the gateway minus this proxy).

    .venv/bin/python bench/bare_proxy.py --port 47100 --upstream 127.0.0.1:50061

With `$BARE_PROXY_UPSTREAM_TOKEN` (a service token; the environment keeps it out of `ps`),
every forwarded call carries it, as the gateway's calls carry its own.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import grpc
import uvloop

TOKEN_ENV = "BARE_PROXY_UPSTREAM_TOKEN"
MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class _Forward(grpc.GenericRpcHandler):
    """Every unary method, forwarded as bytes; handlers built once per method."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            upstream = self._channel.unary_unary(method)
            metadata = self._metadata

            async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                remaining = context.time_remaining()
                response: bytes = await upstream(request, timeout=remaining, metadata=metadata)
                return response

            handler = self._handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return handler


async def serve(port: int, upstream: str) -> None:
    async with grpc.aio.insecure_channel(upstream, options=OPTIONS) as channel:
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((_Forward(channel, os.environ.get(TOKEN_ENV)),))
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print(f"listening 127.0.0.1:{bound}", flush=True)
        await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))
