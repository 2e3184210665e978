"""Placement filters: which engine groups a request may run on now.

A filter keeps groups; an empty result means "not now", never "somewhere else". Residency comes
first in the default order and applies on every path (first placement, failover, spill).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Sequence

from pydantic import Field

from serve_app.policy.registry import Policy, PolicyParams

if TYPE_CHECKING:
    from serve_app.policy.placement import GroupView, RequestView


class Filter(Policy, kind="filter"):
    """Override ``_keep`` (one group at a time), or ``filter`` itself as the built-ins do: every
    decision runs every filter over every group, so they test inline."""

    def filter(self, request: "RequestView", groups: Sequence["GroupView"]) -> list["GroupView"]:
        return [g for g in groups if self._keep(request, g)]

    def _keep(self, request: "RequestView", group: "GroupView") -> bool:
        raise NotImplementedError


class ResidencyFilter(Filter, name="residency"):
    """A request runs only where its data class is trusted."""

    def filter(self, request, groups):
        data_class = request.data_class
        return [g for g in groups if data_class <= g.trusted_up_to]


class HealthFilter(Filter, name="health"):
    """Groups with at least one replica that is not cooling down after a failure."""

    def filter(self, request, groups):
        return [g for g in groups if g.healthy]


class KvHeadroomParams(PolicyParams):
    max_kv_cache_usage: float = Field(default=0.95, gt=0, le=1, description="Skip groups whose KV cache is fuller.")


class FreeSlotFilter(Filter, name="free_slot"):
    """Continuous batching: a group takes a request only while it has room for all its sequences
    (``n`` x prompts) and KV headroom."""

    Params: ClassVar[type[PolicyParams]] = KvHeadroomParams

    def filter(self, request, groups):
        sequences, kv_limit = request.sequences, self.params.max_kv_cache_usage
        return [g for g in groups if g.free >= sequences and g.kv_cache_usage <= kv_limit]


class SpillFilter(Filter, name="spill"):
    """Only the preferred site, unless the scheduler lets this request spill."""

    def filter(self, request, groups):
        return list(groups) if request.allow_spill else [g for g in groups if g.site_rank == 0]


DEFAULT_FILTERS = ("residency", "health", "free_slot", "spill")
