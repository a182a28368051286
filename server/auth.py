"""A shared token for teams that expose the server beyond localhost: `auth_token` in the settings.

Checked once per call, before any handler runs; health checks and reflection stay open so that
load balancers and grpcurl work without it. Clients send `authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

PROTECTED_PREFIX = "/ghostpen.v1.Completion/"
FIRST_MESSAGE_WAIT_S = 1.0  # how long a refused stream may take to send its first message


class TokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        message = (
            "missing or wrong token: this server has auth_token set; send "
            "'authorization: Bearer <token>'"
            if given
            else "no token: this server has auth_token set; send 'authorization: Bearer <token>'"
        )
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED.

    A streaming request's first message is read first: grpc's asyncio client reports a write
    that lands after the call ended as INTERNAL "Internal error from Core" instead of the
    server's status (grpc/grpc#36066), and every client writes its Hello at once."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if handler.request_streaming:
            with contextlib.suppress(TimeoutError, StopAsyncIteration):
                async with asyncio.timeout(FIRST_MESSAGE_WAIT_S):
                    await anext(aiter(request))
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse(request, context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(request, context)
        yield

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)
