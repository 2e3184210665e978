"""Locust users for Spillway.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --csv loadtests/results/run/locust
    # add the burst shape (ramps above on-prem capacity and back):
    locust -f loadtests/locustfile.py,loadtests/burst_shape.py --headless --host ... --csv ...

Users (pick some by naming them after the options; all run by default, by weight):
- ``StreamingChatUser``: streaming chat; TTFT, ITL, end-to-end and output tokens per request.
- ``ChatUser``: non-streaming chat; end-to-end latency and output tokens.
- ``ConfidentialMixUser``: a mix of public prompts, prompts with PII and requests declared
  confidential; every sensitive response must say it was served on-prem, or it is a failure.
- ``MultiTenantUser``: streaming chat under several API keys (tenants), rows per tenant.

Custom rows in Locust's statistics (and CSVs): ``TTFT`` (first content token, timed when its
bytes arrive), ``ITL`` (mean inter-token latency of the request) and ``E2E`` (its "content size"
column is the output token count). Every HTTP status is checked; a stream that ends without
``[DONE]`` or with an error event is a failure.

With ``--csv PREFIX`` the run also writes ``PREFIX_report/``: the per-request log, the routers'
queue depth sampled every second, and the report (table and PNG plots, see loadtests/report.py).

Settings (environment variables): ``SPILLWAY_MODEL`` (spillway-dense), ``SPILLWAY_MAX_TOKENS`` and
``SPILLWAY_PROMPT_WORDS`` (length distributions, see loadtests/distributions.py; default 64 and 32),
``SPILLWAY_IGNORE_EOS`` (1: generate exactly the sampled length), ``SPILLWAY_TENANTS``
(``name=key,...``; keys that ``spillway keys create`` gave, once the cluster has keys),
``SPILLWAY_API_KEY`` (the key of every other user), ``SPILLWAY_ONPREM_SITES`` (sites where sensitive data may go; onprem).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

# Locust puts only this folder on sys.path; the helpers live in the `loadtests` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.distributions import Distribution  # noqa: E402
from loadtests.sse import StreamTiming, time_stream  # noqa: E402

MODEL = os.environ.get("SPILLWAY_MODEL", "spillway-dense")
MAX_TOKENS = Distribution.parse(os.environ.get("SPILLWAY_MAX_TOKENS", "64"))
PROMPT_WORDS = Distribution.parse(os.environ.get("SPILLWAY_PROMPT_WORDS", "32"))
IGNORE_EOS = os.environ.get("SPILLWAY_IGNORE_EOS", "1") == "1"
TENANTS = [tuple(pair.split("=", 1)) for pair in
           os.environ.get("SPILLWAY_TENANTS", "alpha=sk-alpha-0001,beta=sk-beta-0002,gamma=sk-gamma-0003").split(",")]
ONPREM_SITES = set(os.environ.get("SPILLWAY_ONPREM_SITES", "onprem").split(","))
SENSITIVE_CLASSES = {"confidential", "restricted"}
WORDS = "river lake stream spill dam flood basin delta channel canal reservoir weir".split()
PII_SNIPPETS = [
    "please write to jane.doe@example.com about it",
    "my IBAN is DE89 3704 0044 0532 0130 00",
    "call me on +44 20 7946 0958 tomorrow",
]
SCHEDULER_POLL_S = 1.0


def prompt(words: int | None = None) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words or PROMPT_WORDS.sample()))


def report(environment, kind: str, name: str, millis: float | None, size: int = 0, exception=None) -> None:
    if millis is None and exception is None:
        return
    environment.events.request.fire(
        request_type=kind, name=name, response_time=millis or 0.0, response_length=size,
        exception=exception, context={},
    )


# ---- the run log and the report ----------------------------------------------------------


class RunLog:
    """Per-request records and scheduler samples for the report (local runner or master only)."""

    def __init__(self):
        self.dir: Path | None = None
        self._requests = None
        self._samples = None
        self._poller = None

    def open(self, directory: Path, host: str | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self._requests = (directory / "requests.jsonl").open("w", buffering=1)
        self._samples = (directory / "scheduler.jsonl").open("w", buffering=1)
        if host:
            import gevent

            self._poller = gevent.spawn(self._poll_scheduler, host.rstrip("/"))

    def record(self, **fields) -> None:
        if self._requests is not None:
            self._requests.write(json.dumps(fields) + "\n")

    def _poll_scheduler(self, host: str) -> None:
        import gevent
        import requests

        latest: dict[str, dict] = {}  # per router replica: each GET reaches one of them
        while True:
            try:
                state = requests.get(f"{host}/v1/spillway/scheduler", timeout=2).json()
                latest[state["router_replica"]] = state["models"]
                queued = sum(m["queued"] for models in latest.values() for m in models.values())
                in_flight = sum(g["in_flight"] for models in latest.values() for m in models.values()
                                for g in m["groups"].values())
                self._samples.write(json.dumps({"t": time.time(), "queued": queued, "in_flight": in_flight}) + "\n")
            except Exception:  # noqa: BLE001 - a missed sample is a gap in the plot, not a failure
                pass
            gevent.sleep(SCHEDULER_POLL_S)

    def close(self) -> Path | None:
        if self._poller is not None:
            self._poller.kill()
            self._poller = None
        for handle in (self._requests, self._samples):
            if handle is not None:
                handle.close()
        self._requests = self._samples = None
        return self.dir


RUN_LOG = RunLog()


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--report-dir", default="", help="Where the per-request log and the report go "
                        "(default: <csv prefix>_report when --csv is given).")


@events.test_start.add_listener
def _open_run_log(environment, **_):
    from locust.runners import WorkerRunner

    options = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner) or options is None:
        return
    directory = options.report_dir or (f"{options.csv_prefix}_report" if options.csv_prefix else "")
    if directory:
        RUN_LOG.open(Path(directory), environment.host)


@events.quitting.add_listener
def _write_report(environment, **_):
    directory = RUN_LOG.close()
    if directory is not None:
        from loadtests.report import build_report, render_markdown

        print(render_markdown(build_report(directory)))
        print(f"report: {directory}/report.md (plots: ttft.png, throughput.png, queue_depth.png, site_share.png)")


# ---- users ---------------------------------------------------------------------------------


class SpillwayUser(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.2)
    tenant: str | None = None
    api_key: str | None = os.environ.get("SPILLWAY_API_KEY") or None  # where the cluster has keys

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _body(self, content: str, stream: bool) -> dict:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                "max_tokens": MAX_TOKENS.sample(), "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if IGNORE_EOS:
            body["ignore_eos"] = True
        return body

    def stream_chat(self, content: str, row: str, headers: dict[str, str] | None = None, check=None) -> StreamTiming:
        """One streamed chat. ``check(response) -> error or None`` runs on the response headers."""
        body = self._body(content, True)
        started_wall, started = time.time(), time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, headers=self._headers(headers),
                              stream=True, catch_response=True, name=f"chat stream {row}") as response:
            problem = check(response) if check and response.status_code == 200 else None
            timing = time_stream(response, started)
            timing.error = timing.error or problem
            if timing.error:
                response.failure(f"HTTP {timing.status}: {timing.error}")
            else:
                response.success()
        failure = RuntimeError(timing.error) if timing.error else None
        report(self.environment, "TTFT", row, timing.ttft_ms, exception=failure)
        report(self.environment, "ITL", row, timing.itl_ms)
        report(self.environment, "E2E", row, timing.e2e_ms, size=timing.output_tokens, exception=failure)
        RUN_LOG.record(start=started_wall, end=time.time(), kind=type(self).__name__, tenant=self.tenant,
                       model=MODEL, status=timing.status, ok=timing.error is None, ttft_ms=timing.ttft_ms,
                       itl_ms=timing.itl_ms, e2e_ms=timing.e2e_ms, output_tokens=timing.output_tokens,
                       prompt_tokens=timing.prompt_tokens, max_tokens=body["max_tokens"], error=timing.error,
                       **_placement(response))
        return timing


class StreamingChatUser(SpillwayUser):
    """Streaming chat: TTFT, ITL, end-to-end latency and output tokens per request."""

    weight = 4

    @task
    def chat(self) -> None:
        self.stream_chat(prompt(), MODEL)


class ChatUser(SpillwayUser):
    """Non-streaming chat: end-to-end latency and output tokens per request."""

    weight = 1

    @task
    def chat(self) -> None:
        body = self._body(prompt(), False)
        started_wall, started = time.time(), time.perf_counter()
        tokens, prompt_tokens, error = 0, None, None
        with self.client.post("/v1/chat/completions", json=body, headers=self._headers(),
                              catch_response=True, name=f"chat {MODEL}") as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                try:
                    usage = response.json()["usage"]
                    tokens, prompt_tokens = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
                except (ValueError, KeyError, TypeError):
                    error = "response has no usage"
            if error:
                response.failure(error)
            else:
                response.success()
        e2e_ms = (time.perf_counter() - started) * 1000
        report(self.environment, "E2E", f"{MODEL} non-stream", e2e_ms, size=tokens,
               exception=RuntimeError(error) if error else None)
        RUN_LOG.record(start=started_wall, end=time.time(), kind="ChatUser", tenant=self.tenant, model=MODEL,
                       status=response.status_code, ok=error is None, ttft_ms=None, itl_ms=None, e2e_ms=e2e_ms,
                       output_tokens=tokens, prompt_tokens=prompt_tokens, max_tokens=body["max_tokens"], error=error,
                       **_placement(response))


def _placement(response) -> dict:
    """How the router placed a request, from its response headers (what the planner replays)."""
    headers = response.headers
    try:
        queue_ms = float(headers["x-spillway-queue-ms"]) if "x-spillway-queue-ms" in headers else None
    except ValueError:
        queue_ms = None
    return {"site": headers.get("x-spillway-site"), "data_class": headers.get("x-spillway-data-class"),
            "spill_reason": headers.get("x-spillway-spill-reason"), "queue_ms": queue_ms}


def _must_stay_on_prem(response) -> str | None:
    site = response.headers.get("x-spillway-site")
    data_class = response.headers.get("x-spillway-data-class")
    if data_class not in SENSITIVE_CLASSES:
        return f"residency: sensitive request classified {data_class!r}"
    if site not in ONPREM_SITES:
        return f"residency violation: sensitive request served on {site!r}"
    return None


class ConfidentialMixUser(SpillwayUser):
    """A third public, a third with PII in the prompt, a third declared confidential by header.
    Every sensitive response must come from an on-prem site (else the request fails)."""

    weight = 1

    @task
    def public(self) -> None:
        self.stream_chat(prompt(), "public")

    @task
    def pii(self) -> None:
        self.stream_chat(f"{prompt()} {random.choice(PII_SNIPPETS)}", "pii", check=_must_stay_on_prem)

    @task
    def declared(self) -> None:
        self.stream_chat(prompt(), "declared confidential", headers={"x-data-classification": "confidential"},
                         check=_must_stay_on_prem)


_tenant_cycle = itertools.cycle(range(len(TENANTS)))


class MultiTenantUser(SpillwayUser):
    """Streaming chat under several API keys; each simulated user belongs to one tenant."""

    weight = 2

    def on_start(self) -> None:
        self.tenant, self.api_key = TENANTS[next(_tenant_cycle)]

    @task
    def chat(self) -> None:
        self.stream_chat(prompt(), f"tenant {self.tenant}")
