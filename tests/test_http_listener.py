"""The router's own listener (``http.ingress: shared``), without Ray: real sockets on localhost, a
small ASGI app standing in for the router's. Covers sharing one port between listeners, the bounds
a client meets with no proxy in front (a silent or dribbling head, a huge head, garbage, too many
connections, too many requests in flight) and the drain on close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest

from serve_app.http.listener import MAX_HEAD_BYTES, SharedListener

HEAD_TIMEOUT_S = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class App:
    """Answers ``who`` (the listener's name); ``/slow`` waits until released; ``/echo`` reads the
    body and answers its length; ``/id`` answers the request's x-request-id."""

    def __init__(self, who: str):
        self.who = who
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.ongoing = 0  # /slow requests that arrived

    async def __call__(self, scope, receive, send):
        body = self.who.encode()
        if scope["path"] == "/slow":
            self.slow_started.set()
            self.ongoing += 1
            await self.release.wait()
        if scope["path"] == "/id":  # the request id the app saw
            body = b",".join(value for name, value in scope["headers"] if name == b"x-request-id")
        if scope["path"] == "/echo":
            received = b""
            while True:
                message = await receive()
                received += message.get("body", b"")
                if not message.get("more_body"):
                    break
            body = str(len(received)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def listener(app, port: int, **limits) -> SharedListener:
    settings = {"head_timeout_s": HEAD_TIMEOUT_S, "max_connections": 64, "max_ongoing_requests": 64, "grace_s": 5.0}
    return SharedListener(app, "127.0.0.1", port, **{**settings, **limits})


@contextlib.asynccontextmanager
async def serving(app, **limits):
    """One listener on a free port, closed at the end: yields the port."""
    port = free_port()
    server = listener(app, port, **limits)
    await server.start()
    try:
        yield port
    finally:
        await server.close()


async def exchange(port: int, raw: bytes, *, until_close: bool = True, timeout_s: float = 5.0) -> bytes:
    """Send ``raw``; read until the server closes (or, with ``until_close=False``, one answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(_read(reader, until_close), timeout_s)
    finally:
        writer.close()


async def _read(reader: asyncio.StreamReader, until_close: bool) -> bytes:
    if until_close:
        return await reader.read(-1)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return head + await reader.readexactly(length)


def get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


def status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def test_listeners_share_one_port_and_the_kernel_spreads_connections():
    async def main():
        port = free_port()
        first, second = listener(App("first"), port), listener(App("second"), port)
        await first.start()
        await second.start()
        try:
            answers = [await exchange(port, get(), until_close=False) for _ in range(40)]
        finally:
            await first.close()
            await second.close()
        return {answer.rpartition(b"\r\n\r\n")[2] for answer in answers}

    assert asyncio.run(main()) == {b"first", b"second"}  # (40 connections on one listener: 2**-39)


def test_a_port_held_without_sharing_fails_at_start():
    async def main():
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
                await listener(App("x"), holder.getsockname()[1]).start()

    asyncio.run(main())


def test_a_silent_connection_is_closed_and_a_dribbled_head_gets_408_while_others_are_served():
    async def main():
        async with serving(App("ok")) as port:
            loop = asyncio.get_running_loop()
            started = loop.time()
            silent = asyncio.create_task(exchange(port, b""))
            dribbled = asyncio.create_task(exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"))
            served = await exchange(port, get(), until_close=False)
            return served, await silent, await dribbled, loop.time() - started

    served, silent, dribbled, elapsed = asyncio.run(main())
    assert served.endswith(b"\r\n\r\nok")
    assert silent == b""  # closed without a word: it never began a request
    status, error = status_and_error(dribbled)
    assert (status, error["code"]) == (408, "request_timeout")
    assert HEAD_TIMEOUT_S - 0.05 <= elapsed < 4


def test_a_kept_alive_connection_is_served_again_then_closed_when_idle():
    async def main():
        async with serving(App("ok")) as port:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get())
            first = await _read(reader, until_close=False)
            await asyncio.sleep(HEAD_TIMEOUT_S / 2)  # (within the deadline: the connection is still there)
            writer.write(get())
            second = await _read(reader, until_close=False)
            idle_from = loop.time()
            rest = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
            return first, second, rest, loop.time() - idle_from

    first, second, rest, idle_s = asyncio.run(main())
    assert first.endswith(b"ok") and second.endswith(b"ok")
    assert rest == b"" and HEAD_TIMEOUT_S - 0.05 <= idle_s < 4


def test_a_pipelined_request_is_not_cut_by_the_head_deadline_while_it_runs():
    async def main():
        app = App("ok")
        async with serving(app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get() + get("/slow"))  # two requests in one write
            first = await _read(reader, until_close=False)
            await asyncio.wait_for(app.slow_started.wait(), 5)
            await asyncio.sleep(HEAD_TIMEOUT_S * 2)  # the slow one runs past the head deadline
            app.release.set()
            second = await asyncio.wait_for(_read(reader, until_close=False), 5)
            writer.close()
            return first, second

    first, second = asyncio.run(main())
    assert first.endswith(b"ok") and second.endswith(b"ok")


def test_a_huge_head_is_431_and_garbage_is_400_in_openai_format():
    async def main():
        async with serving(App("ok")) as port:
            huge = await exchange(port, get(extra=b"x-pad: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n"))
            many = await exchange(port, get(extra=b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 100) for i in range(1000))))
            garbage = await exchange(port, b"\x00\x01 not http at all\r\n\r\n")
            return huge, many, garbage

    huge, many, garbage = asyncio.run(main())
    assert status_and_error(huge)[0] == status_and_error(many)[0] == 431
    assert status_and_error(huge)[1]["code"] == "header_too_large"
    status, error = status_and_error(garbage)
    assert (status, error["type"], error["code"]) == (400, "invalid_request_error", "invalid_http")


def test_a_malformed_chunked_body_is_a_400_while_the_app_reads_it():
    async def main():
        async with serving(App("ok")) as port:
            return await exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                        b"3\r\nabc\r\nZZ\r\nxyz\r\n0\r\n\r\n")

    status, error = status_and_error(asyncio.run(main()))
    assert (status, error["code"]) == (400, "invalid_http")


def test_a_large_body_sent_with_its_head_is_not_taken_for_a_huge_head():
    async def main():
        async with serving(App("ok")) as port:
            body = b"z" * (1 << 20)
            return await exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                                  + body, until_close=False)

    assert asyncio.run(main()).endswith(b"\r\n\r\n" + str(1 << 20).encode())


def test_at_the_connection_cap_the_longest_silent_connection_makes_room():
    async def main():
        async with serving(App("ok"), max_connections=2) as port:
            oldest = await asyncio.open_connection("127.0.0.1", port)
            newer = await asyncio.open_connection("127.0.0.1", port)
            served = await exchange(port, get(), until_close=False)  # a third client, at the cap
            oldest_end = await asyncio.wait_for(oldest[0].read(-1), 5)
            newer[1].write(get())  # the newer silent one is still there
            newer_answer = await _read(newer[0], until_close=False)
            for _, writer in (oldest, newer):
                writer.close()
            return served, oldest_end, newer_answer

    served, oldest_end, newer_answer = asyncio.run(main())
    assert served.endswith(b"ok") and newer_answer.endswith(b"ok")
    assert oldest_end == b""  # closed without a word: it never began a request


def test_at_the_connection_cap_with_every_connection_busy_a_new_one_gets_a_readable_503():
    async def main():
        app = App("ok")
        async with serving(app, max_connections=2) as port:
            busy = [asyncio.create_task(exchange(port, get("/slow"), until_close=False)) for _ in range(2)]
            while app.ongoing < 2:
                await asyncio.sleep(0.01)
            refused = await exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            app.release.set()
            return refused, await asyncio.gather(*busy)

    refused, busy = asyncio.run(main())
    status, error = status_and_error(refused)
    assert (status, error["code"]) == (503, "too_many_connections") and b"retry-after: 1" in refused
    assert all(answer.endswith(b"ok") for answer in busy)


def test_requests_past_the_ongoing_cap_get_503_with_retry_after():
    async def main():
        app = App("ok")
        async with serving(app, max_ongoing_requests=1) as port:
            slow = asyncio.create_task(exchange(port, get("/slow"), until_close=False))
            await asyncio.wait_for(app.slow_started.wait(), 5)
            refused = await exchange(port, get(), until_close=False)
            app.release.set()
            return refused, await slow

    refused, slow = asyncio.run(main())
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused.lower()
    assert status_and_error(refused)[1]["code"] == "overloaded"
    assert slow.endswith(b"ok")


def test_close_lets_requests_in_flight_finish_and_the_other_listener_takes_new_connections():
    async def main():
        port = free_port()
        draining_app = App("draining")
        draining, staying = listener(draining_app, port), listener(App("staying"), port)
        await draining.start()
        await staying.start()
        try:
            slow = None
            while slow is None:  # a slow request that landed on the listener that will close
                attempt = asyncio.create_task(exchange(port, get("/slow"), until_close=False))
                done, _ = await asyncio.wait([attempt, asyncio.create_task(draining_app.slow_started.wait())],
                                             timeout=1, return_when=asyncio.FIRST_COMPLETED)
                if draining_app.slow_started.is_set():
                    slow = attempt
                else:
                    attempt.cancel()
            closing = asyncio.create_task(draining.close())
            while draining.accepting:
                await asyncio.sleep(0.01)
            after = [await exchange(port, get(), until_close=False) for _ in range(10)]
            assert not closing.done()  # still waiting for the slow request
            draining_app.release.set()
            await asyncio.wait_for(closing, 5)
            return await slow, after, draining.serving
        finally:
            await staying.close()

    slow, after, still_serving = asyncio.run(main())
    assert slow.endswith(b"draining")
    assert all(answer.endswith(b"staying") for answer in after)
    assert not still_serving


def test_every_answer_carries_a_request_id_the_app_sees_too():
    def answer_id(answer: bytes) -> bytes:
        head, _, body = answer.partition(b"\r\n\r\n")
        (value,) = [line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        return value, body

    async def main():
        async with serving(App("ok")) as port:
            return [await exchange(port, get("/id", extra), until_close=False)
                    for extra in (b"", b"x-request-id: trace-7\r\n", b"x-request-id: not valid\r\n")]

    fresh, kept, invalid = (answer_id(answer) for answer in asyncio.run(main()))
    assert len(fresh[0]) == 32 and fresh[1] == fresh[0]  # a new one, and the request carried it
    assert kept == (b"trace-7", b"trace-7")
    assert invalid[1] == b"not valid" and len(invalid[0]) == 32  # (the edge refuses the request with a 400)


def test_the_open_file_limit_is_raised_to_hold_the_connection_cap():
    import subprocess
    import sys

    script = ("import resource\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
              "from serve_app.http.listener import SPARE_FILES, _room_for_connections\n"
              "_room_for_connections(2000)\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, SPARE_FILES)\n")
    raised, hard, spare = (int(x) for x in subprocess.run([sys.executable, "-c", script], check=True, text=True,
                                                          capture_output=True, timeout=120).stdout.split())
    assert raised == (2000 + spare if hard < 0 else min(2000 + spare, hard))
