"""Where a request runs: the place where routing policies plug in.

For now the placement is the simple one: try the model's sites in preference
order (on-prem first), and move to the next site only when the previous one
could not take the request at all (no healthy replica). The router issue turns
this into the filter -> score -> pick pipeline; callers only see
``candidates()`` returning an ordered list of ``SiteTarget``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.config import SiteConfig, SiteKind, SpillwayConfig


@dataclass(frozen=True)
class SiteTarget:
    """One engine deployment a request may be sent to."""

    model_id: str
    site: SiteConfig
    handle: Any  # ray.serve.handle.DeploymentHandle (Any keeps this module free of Ray)


class SitePreferencePlacement:
    """Orders a model's engine deployments by site preference: on-prem kinds first,
    then ``preference``, then name (for a stable order)."""

    def __init__(self, config: SpillwayConfig, handles: dict[str, dict[str, Any]]):
        self._targets: dict[str, list[SiteTarget]] = {}
        for model_id, by_site in handles.items():
            targets = [SiteTarget(model_id, config.site(site_name), handle) for site_name, handle in by_site.items()]
            targets.sort(key=lambda t: (t.site.kind != SiteKind.onprem, t.site.preference, t.site.name))
            self._targets[model_id] = targets

    def models(self) -> list[str]:
        return list(self._targets)

    def candidates(self, model_id: str) -> list[SiteTarget]:
        """Targets to try in order; empty when the model is not served."""
        return self._targets.get(model_id, [])
