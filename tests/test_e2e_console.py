"""The operator console in headless Chromium (Debian's package), on the real cluster: the page
loads with the admin key, its numbers match the admin API, and a screenshot is saved
(``$SPILLWAY_TEST_ARTIFACTS``, default ``test-artifacts/`` in the checkout)."""

from __future__ import annotations

import html
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import E2E_ADMIN_KEY, admin_headers

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("SPILLWAY_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
CELL = re.compile(r'<td class="num"([^>]*)>([^<]*)</td>|<td([^>]*)>([^<]*)</td>')


def chromium(*argv: str, url: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (./dev setup installs Debian's package)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=20000", "--user-data-dir=" + tempfile.mkdtemp(prefix="spillway-chromium-")]
    return subprocess.run([binary, *flags, *argv, url], capture_output=True, text=True, timeout=180)


def cells(dom: str) -> dict[tuple, str]:
    """``{(attributes...): text}`` of every table cell that carries data attributes."""
    found = {}
    for match in CELL.finditer(dom):
        attrs, text = (match.group(1), match.group(2)) if match.group(1) is not None else (match.group(3), match.group(4))
        pairs = tuple(sorted((k, html.unescape(v)) for k, v in re.findall(r'data-([a-z_-]+)="([^"]*)"', attrs)))
        if pairs:
            found[pairs] = html.unescape(text)
    return found


def api(base_url: str) -> dict:
    admin = f"{base_url}/v1/spillway/admin"
    get = lambda path, **params: httpx.get(admin + path, params=params, headers=admin_headers(), timeout=60).json()
    return {"budgets": get("/budgets")["data"], "usage": get("/usage", period="month", by="site")["data"],
            "audit": get("/audit", limit=20)["data"]}


def test_the_console_shows_what_the_admin_api_says_and_a_screenshot_is_saved(base_url):
    admin = f"{base_url}/v1/spillway/admin"
    tenant = "console-" + secrets.token_hex(3)
    assert httpx.put(f"{admin}/tenants/{tenant}", json={"budgets": [{"period": "day", "limit": 5.0}]},
                     headers=admin_headers(), timeout=60).status_code == 200
    key = httpx.post(f"{admin}/keys", json={"tenant": tenant}, headers=admin_headers(), timeout=60).json()["key"]
    for i in range(3):
        assert httpx.post(f"{base_url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "spillway-dense", "messages": [{"role": "user", "content": f"console {i}"}],
                                "max_tokens": 4}, timeout=120).status_code == 200
    url = f"{base_url}/v1/spillway/console#key={E2E_ADMIN_KEY}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # The numbers move while settlements arrive: read the API, the page, the API again, until
    # both reads of the API agree (nothing moved while the page loaded).
    for _ in range(10):
        before = api(base_url)
        dom = chromium("--dump-dom", url=url).stdout
        after = api(base_url)
        if before == after and 'data-loaded="1"' in dom:
            break
    assert before == after and 'data-loaded="1"' in dom, dom[:2000]
    shown = cells(dom)

    budget = next(b for b in after["budgets"] if b["scope"] == f"tenant:{tenant}" and b["period"].startswith("day"))
    assert budget["spent"] > 0
    for row in after["budgets"]:
        ident = f"{row['scope']}|{row['period']}"
        assert float(shown[(("budget", ident), ("field", "spent"))]) == pytest.approx(row["spent"], abs=1e-6)
        assert float(shown[(("budget", ident), ("field", "used_pct"))].removesuffix(" %")) == \
            pytest.approx(row["used_pct"])
    for row in after["usage"]:
        assert int(shown[(("field", "requests"), ("site", row["site"]))]) == row["requests"]
        assert float(shown[(("field", "cost"), ("site", row["site"]))]) == pytest.approx(row["cost"], abs=1e-6)
    assert {int(v[0][1]) for v in shown if v[0][0] == "seq"} == {r["seq"] for r in after["audit"]}
    assert 'data-site="onprem"' in dom and "<svg" in dom  # the cost chart

    screenshot = ARTIFACTS / "console.png"
    screenshot.unlink(missing_ok=True)
    result = chromium(f"--screenshot={screenshot}", "--window-size=1500,1150", url=url)
    assert screenshot.exists() and screenshot.stat().st_size > 20_000, result.stderr[-2000:]
