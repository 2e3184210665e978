"""Load-test timing against a server with a known delay: each token is timed when it arrives
(the server sends the next one only once the client's clock has been read for this one, so a
client that buffered events would stall it), and a real headless Locust run records TTFT/ITL/E2E
rows. No bound depends on how quickly a busy machine schedules the client."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from loadtests.sse import time_stream

FIRST_TOKEN_DELAY_S = 0.300
TOKEN_GAP_S = 0.100
TOKENS = 5


class DelayedSSEHandler(BaseHTTPRequestHandler):
    """Answers any POST with an OpenAI-style stream: first token after 300 ms, then one every 100 ms;
    the send time of each content event goes in ``server.sent``. With ``server.handshake`` on, it
    sends a token only after the client acknowledged the one before (``server.acks``)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-spillway-site", "onprem")
        self.end_headers()
        time.sleep(FIRST_TOKEN_DELAY_S)
        for i in range(TOKENS):
            if i:
                if self.server.handshake:
                    self.server.acks.acquire(timeout=5)  # (a client that never acknowledges fails the test)
                time.sleep(TOKEN_GAP_S)
            self.server.sent.append(time.perf_counter())  # (before the write: it cannot arrive earlier)
            self._event({"choices": [{"index": 0, "delta": {"content": "x\u2028"}}]})
        self._event({"choices": [], "usage": {"completion_tokens": TOKENS}})
        self._event(b"[DONE]")
        self._chunk(b"")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), DelayedSSEHandler)
    httpd.sent, httpd.handshake, httpd.acks = [], False, threading.Semaphore(0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def _post(url):
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/chat/completions", json={"stream": True}, stream=True, timeout=10)
    return response, started


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def test_first_token_is_timed_on_arrival(server):
    server.sent.clear()
    server.handshake, seen = True, []

    def clock() -> float:
        now = time.perf_counter()  # (read before the acknowledgement: the next token comes 100 ms after it)
        seen.append(len(server.sent))  # tokens the server had sent when the client read the clock
        server.acks.release()
        return now

    try:
        response, started = _post(_url(server))
        timing = time_stream(response, started, clock=clock)
    finally:
        server.handshake = False
    assert timing.error is None and timing.done and timing.site == "onprem"
    assert len(server.sent) == TOKENS and timing.output_tokens == TOKENS
    # Token k was timed while the server had sent exactly k: on arrival, never after a later one.
    assert seen[:TOKENS] == list(range(1, TOKENS + 1))
    sent_ms = [(at - started) * 1000 for at in server.sent]
    assert FIRST_TOKEN_DELAY_S * 1000 <= sent_ms[0] <= timing.ttft_ms
    assert len(timing.token_gaps_ms) == TOKENS - 1 and min(timing.token_gaps_ms) >= TOKEN_GAP_S * 1000
    assert timing.e2e_ms >= sent_ms[-1]


def test_locust_headless_run_writes_ttft_itl_and_e2e_rows(server, tmp_path):
    root = Path(__file__).resolve().parent.parent
    prefix = tmp_path / "run"
    subprocess.run(
        [str(Path(sys.executable).with_name("locust")), "-f", str(root / "loadtests" / "locustfile.py"), "--headless",
         "-u", "2", "-r", "2", "-t", "6s", "--host", _url(server), "--csv", str(prefix), "--only-summary"],
        cwd=tmp_path, check=True, capture_output=True, timeout=120,
    )
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    ttft = rows[("TTFT", "spillway-dense")]
    assert int(ttft["Request Count"]) >= 2 and int(ttft["Failure Count"]) == 0
    # The first token's time, not the whole answer's (which takes 400 ms more).
    assert FIRST_TOKEN_DELAY_S * 1000 <= float(ttft["Median Response Time"]) < (
        FIRST_TOKEN_DELAY_S + (TOKENS - 1) * TOKEN_GAP_S) * 1000
    assert ("ITL", "spillway-dense") in rows and ("E2E", "spillway-dense") in rows
    assert float(rows[("E2E", "spillway-dense")]["Average Content Size"]) == TOKENS
    assert int(rows[("POST", "chat stream spillway-dense")]["Failure Count"]) == 0
