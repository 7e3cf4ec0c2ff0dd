"""Server-Sent Events, as the HTTP protocols that stream (OpenAI, Triton's generate_stream) send them."""

from __future__ import annotations

import anyio
from fastapi.sse import EventSourceResponse
from starlette.types import Send


class ClosingEventSourceResponse(EventSourceResponse):
    """Closes its body iterator as soon as sending stops. Starlette leaves the iterator to the garbage
    collector when the client has gone (the send raises), which delays the cancellation of a generation
    by however long that takes."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
