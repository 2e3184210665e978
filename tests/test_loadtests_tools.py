"""Load-test helpers without a cluster: length distributions, the burst shape, the report."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.distributions import Distribution
from loadtests.report import build_report, percentile

ROOT = Path(__file__).resolve().parent.parent


def test_distributions_parse_and_sample_within_bounds():
    rng = random.Random(7)
    assert Distribution.parse("64").sample(rng) == 64
    uniform = [Distribution.parse("uniform:16-128").sample(rng) for _ in range(2000)]
    assert min(uniform) >= 16 and max(uniform) <= 128 and 60 < sum(uniform) / len(uniform) < 84
    normal = [Distribution.parse("normal:64,16").sample(rng) for _ in range(2000)]
    assert 60 < sum(normal) / len(normal) < 68 and min(normal) >= 1
    lognormal = sorted(Distribution.parse("lognormal:64,0.5").sample(rng) for _ in range(2001))
    assert 58 <= lognormal[1000] <= 70 and lognormal[-1] > 2 * lognormal[1000]
    assert {Distribution.parse("choice:16,64,256").sample(rng) for _ in range(200)} == {16, 64, 256}


@pytest.mark.parametrize("spec", ["", "uniform:9", "uniform:10-5", "zipf:3", "choice:", "0", "normal:64"])
def test_bad_distributions_fail_with_a_clear_message(spec):
    with pytest.raises(ValueError, match="bad length distribution"):
        Distribution.parse(spec)


def test_burst_shape_goes_base_burst_base_then_stops():
    # In a child process: importing locust monkey-patches the interpreter (gevent).
    probe = """
import json
from loadtests.burst_shape import BurstShape
shape = BurstShape()
clock = iter([0.0, 15.0, 31.0])
shape.get_run_time = lambda: next(clock)
print(json.dumps({"users": [shape.users_at(t) for t in (0, 9.9, 10, 19.9, 20, 29.9, 30)],
                  "ticks": [shape.tick(), shape.tick(), shape.tick()]}))
"""
    env = {**os.environ, "SPILLWAY_BASE_USERS": "3", "SPILLWAY_BURST_USERS": "40", "SPILLWAY_STAGE_S": "10"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["users"] == [3, 3, 40, 40, 3, 3, None]
    assert result["ticks"] == [[3, 8.0], [40, 8.0], None]


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([], 50) is None and percentile([5.0], 99) == 5.0


def test_report_table_share_and_plots(tmp_path):
    records = []
    for i in range(40):
        site = "cloud" if i % 4 == 0 else "onprem"
        records.append({"start": 1000.0 + i * 0.5, "end": 1001.0 + i * 0.5, "kind": "StreamingChatUser",
                        "tenant": "alpha" if i % 2 else "beta", "model": "m", "status": 200, "ok": i != 39,
                        "ttft_ms": float(10 + i), "itl_ms": 5.0, "e2e_ms": 1000.0, "output_tokens": 10,
                        "site": site, "data_class": "public", "error": None if i != 39 else "boom"})
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{\"cut")
    (tmp_path / "scheduler.jsonl").write_text(json.dumps({"t": 1005.0, "queued": 7, "in_flight": 4}) + "\n")
    summary = build_report(tmp_path)
    overall = summary["all"]
    assert overall["requests"] == 40 and overall["errors"] == 1
    assert overall["ttft_ms"]["p50"] == 29.0  # 39 ok values 10..48, nearest rank 20
    assert overall["site_share"] == {"cloud": 10 / 39, "onprem": 29 / 39}
    assert overall["output_tokens"] == 390 and round(overall["tokens_per_s"], 2) == round(390 / 20.5, 2)
    assert summary["max_queue_depth"] == 7 and set(summary["by_tenant"]) == {"alpha", "beta"}
    text = (tmp_path / "report.md").read_text()
    assert "| all | 40 | 2.5% | 29 |" in text and "cloud 26% / onprem 74%" in text
    for png in ("ttft.png", "throughput.png", "queue_depth.png", "site_share.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
