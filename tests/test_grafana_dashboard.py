"""The Grafana dashboard queries only metrics the router exports, and shows every one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "cluster_configs" / "grafana" / "spillway-dashboard.json"


def _exported_metrics() -> dict[str, str]:
    """name -> kind, read from the metric constructors in serve_app/observe/metrics.py."""
    source = (ROOT / "serve_app" / "observe" / "metrics.py").read_text()
    return {name: kind for kind, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"(spillway_\w+)\"", source)}


def test_dashboard_queries_exist_and_cover_every_metric():
    exported = _exported_metrics()
    assert len(exported) >= 10
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"ray_(spillway_\w+)", " ".join(exprs)))
    valid = set()
    for name, kind in exported.items():
        if kind == "Histogram":
            valid |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            valid.add(name)
    assert used <= valid, used - valid
    shown = {re.sub(r"_(bucket|sum|count)$", "", u) for u in used}
    assert shown == set(exported), set(exported) - shown
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")")
