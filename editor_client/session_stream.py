"""A Session stream driven one message at a time: queue a message to send, await the next reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc


class SessionStream:
    def __init__(
        self, stub: pb_grpc.CompletionStub, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._outgoing: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
        self.call = stub.Session(self._messages(), metadata=metadata)

    async def _messages(self) -> AsyncIterator[pb.ClientMessage]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    def send(self, message: pb.ClientMessage) -> None:
        self._outgoing.put_nowait(message)

    async def read(self, timeout: float | None = None) -> pb.ServerMessage:
        return await asyncio.wait_for(self.call.read(), timeout)

    def close(self) -> None:
        """Half-close: the server finishes what is in flight, then ends the stream."""
        self._outgoing.put_nowait(None)


def full_text(path: str, body: bytes, version: int) -> pb.ClientMessage:
    """A file's whole text, as sent the first time or to resynchronize."""
    return pb.ClientMessage(file_update=pb.FileUpdate(path=path, version=version, text=body))


def insertion(path: str, version: int, offset: int, text: str) -> pb.ClientMessage:
    """`text` typed at `offset`, turning version - 1 into `version`."""
    return _edit(path, version, pb.Edit(start=offset, end=offset, text=text.encode()))


def deletion(path: str, version: int, offset: int, length: int) -> pb.ClientMessage:
    """`length` characters deleted from `offset` on, turning version - 1 into `version`."""
    return _edit(path, version, pb.Edit(start=offset, end=offset + length))


def _edit(path: str, version: int, edit: pb.Edit) -> pb.ClientMessage:
    return pb.ClientMessage(
        file_update=pb.FileUpdate(
            path=path, version=version, base_version=version - 1, edits=pb.EditList(edits=[edit])
        )
    )
