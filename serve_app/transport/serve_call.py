"""The Serve-call fallback: one Ray Serve streaming call per request, Serve picking the replica.

Used for a replica the router does not know yet (just started) or when the known ones refuse.
The call's first item is the reply (see ``EngineReplica.open``): a complete answer, an
``accepted`` mark for a non-streamed request followed by its result, or the address of a parked
stream that the router claims on the engine's port. Cancelling the call aborts the request.
"""

from __future__ import annotations

import asyncio

from deployments import wire
from serve_app.transport.base import EngineReply, EngineRequest, EngineStream, TransportError

CONNECT_TIMEOUT_S = 2.0


def _call_failures() -> tuple[type[BaseException], ...]:
    import ray.exceptions

    return (ray.exceptions.RayError, asyncio.TimeoutError, OSError, StopAsyncIteration)


class ServeCallTransport:
    def __init__(self, secret: "callable"):
        self._secret = secret  # () -> bytes | None: the cluster's, once the directory has read it

    async def send(self, handle, request: EngineRequest, timeout_s: float) -> EngineReply:
        call = handle.options(stream=True).open.remote(request.endpoint, request.body, request.request_id,
                                                        request.trace_headers)
        try:
            async with asyncio.timeout(timeout_s):
                reply = await call.__anext__()
            if reply.get("accepted"):
                reply = await call.__anext__()  # generation: bounded by the client, not a timeout
        except _call_failures() as exc:
            call.cancel()
            raise TransportError(f"Serve call failed: {exc!r}") from exc
        except BaseException:
            call.cancel()
            raise
        replica = reply["replica"]
        if reply.get("engine_dead"):
            call.cancel()
            raise TransportError("the engine is dead", replica)
        if "token" not in reply:
            call.cancel()
            return EngineReply(reply["status"], replica, body=reply["body"])
        return EngineReply(reply["status"], replica, stream=await self._claim(reply, call))

    async def _claim(self, reply: dict, call) -> EngineStream:
        secret = self._secret()
        try:
            if secret is None:
                raise TransportError("the cluster's secret is not known yet", reply["replica"])
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(reply["host"], reply["port"])
        except (OSError, asyncio.TimeoutError) as exc:
            call.cancel()  # the engine closes the parked stream when its call is cancelled
            raise TransportError(f"could not claim the stream: {exc!r}", reply["replica"]) from exc
        except BaseException:
            call.cancel()
            raise
        writer.write(wire.pack(wire.KIND_CLAIM, secret, reply["token"].encode("ascii")))
        return EngineStream(reader, writer, reply["replica"], call=call)
