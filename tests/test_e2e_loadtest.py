"""End to end: the load-test runner against the real cluster writes Locust's CSVs with TTFT/ITL
rows and the report with its plots; the confidential mix finds no residency violation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_headless_mixed_run_writes_csvs_and_report(e2e_cluster, base_url, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "--host", base_url, "--scenario", "mixed", "-u", "8", "-r", "8",
         "-t", "15s", "--max-tokens", "uniform:8-24", "--prompt-words", "lognormal:16,0.5", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (out / "locust_stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    kinds = {(row["Type"], row["Name"]) for row in rows}
    assert ("TTFT", "spillway-dense") in kinds and ("ITL", "spillway-dense") in kinds
    assert ("E2E", "spillway-dense non-stream") in kinds
    assert any(kind == "TTFT" and name.startswith("tenant ") for kind, name in kinds)
    ttft = next(row for row in rows if row["Type"] == "TTFT" and row["Name"] == "spillway-dense")
    assert int(ttft["Request Count"]) > 0 and float(ttft["Median Response Time"]) > 0
    assert all(int(row["Failure Count"]) == 0 for row in rows), [r for r in rows if int(r["Failure Count"])]

    report = out / "locust_report"
    summary = json.loads((report / "report.json").read_text())
    assert summary["all"]["requests"] > 10 and summary["all"]["error_rate"] == 0
    assert summary["all"]["ttft_ms"]["p50"] > 0 and summary["all"]["tokens_per_s"] > 0
    assert set(summary["by_user_class"]) == {"StreamingChatUser", "ChatUser", "ConfidentialMixUser",
                                             "MultiTenantUser"}
    # Every sensitive request of the confidential mix was served on-prem.
    records = [json.loads(line) for line in (report / "requests.jsonl").read_text().splitlines()]
    sensitive = [r for r in records if r["data_class"] in ("confidential", "restricted")]
    assert sensitive and all(r["site"] == "onprem" for r in sensitive)
    # What the capacity planner replays: each request's lengths and how the router placed it.
    served = [r for r in records if r["status"] == 200]
    assert all(r["prompt_tokens"] > 0 and 8 <= r["max_tokens"] <= 24 for r in served)
    assert all(r["spill_reason"] in ("none", "onprem_wait_over_budget", "onprem_queue_full", "failover") for r in served)
    assert "| all |" in (report / "report.md").read_text()

    # The recorded run replays through the planner, set against what it measured.
    _, config_path, _ = e2e_cluster
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "plan", "accuracy", "--config", str(config_path),
         "--profiles", str(ROOT / "cluster_configs" / "profiles" / "local-cpu.yaml"), "--trace", str(report), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accuracy = json.loads(result.stdout)
    assert accuracy["requests"] == len(served) and accuracy["ttft_samples"] > 0
    rows = {row["metric"]: row for row in accuracy["rows"]}
    assert rows["ttft_p50_ms"]["measured"] > 0 and rows["ttft_p50_ms"]["simulated"] > 0
    assert 0 < rows["onprem_share"]["simulated"] <= 1 and rows["onprem_share"]["measured"] > 0
    for png in ("ttft.png", "throughput.png", "queue_depth.png", "site_share.png"):
        assert (report / png).stat().st_size > 5_000


def test_plan_profile_measures_the_dense_engine_through_the_router(e2e_cluster, base_url, tmp_path):
    from serve_app.planner.cli import load_profiles
    from tests.conftest import e2e_api_key

    _, config_path, _ = e2e_cluster
    out = tmp_path / "profile.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "plan", "profile", "--config", str(config_path), "--host", base_url,
         "--api-key", e2e_api_key(), "--rounds", "1", "--max-tokens", "24", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    profiles = load_profiles(out)
    profile = profiles[("spillway-dense", "onprem")]
    assert profiles[("spillway-dense", "cloud")] == profile  # (every site of the model uses it)
    assert set(profile.itl_ms) == {1, 2, 4, 8} and all(ms > 0 for ms in profile.itl_ms.values())  # 8 slots
    assert profile.max_num_seqs == 8 and profile.prefill_tokens_per_s > 0 and "plan profile" in profile.source
