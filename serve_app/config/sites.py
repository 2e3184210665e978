"""Sites: where engines run (on-prem, cloud, an external API), what they may see, what they cost."""

from __future__ import annotations

import re
from enum import Enum

from pydantic import Field, field_validator, model_validator

from serve_app.config.base import DataClassName, Strict
from serve_app.config.cost import SiteCost


class SiteKind(str, Enum):
    onprem = "onprem"
    cloud = "cloud"
    external = "external"


class SiteConfig(Strict):
    name: str = Field(description="Short name of the site, used in headers, metrics and replica placement.")
    resource: str = Field(
        description="Ray custom resource that every node of this site carries (e.g. 'site:onprem'). "
        "Every placement-group bundle of a replica on this site asks for a sliver of it."
    )
    kind: SiteKind = Field(description="onprem: own hardware; cloud: elastic capacity; external: an outside API.")
    preference: int = Field(
        default=0,
        ge=0,
        description="Lower is preferred when a request could run on several sites (on-prem first by default).",
    )
    trusted_up_to: DataClassName | None = Field(
        default=None,
        description="Most sensitive data class this site may process. Default: restricted for onprem, "
        "internal for cloud and external sites (so confidential data never leaves on-prem).",
    )
    cost_per_1k_tokens: float = Field(
        default=0.0, ge=0,
        description="Price of 1,000 tokens served here: the simple cost model (or give `cost` instead).")
    cost: SiteCost | None = Field(
        default=None,
        description="The site's cost basis: amortised (own hardware), cloud (per accelerator-hour), api (per "
        "million tokens) or per_1k_tokens. See serve_app/config/cost.py.")
    engine_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for every engine replica on this site, over the model's env (e.g. CPU binding).",
    )

    @property
    def trust(self) -> str:
        if self.trusted_up_to is not None:
            return self.trusted_up_to
        return "restricted" if self.kind == SiteKind.onprem else "internal"

    @model_validator(mode="after")
    def _one_cost_form(self) -> "SiteConfig":
        if self.cost is not None and self.cost_per_1k_tokens:
            raise ValueError(f"site {self.name!r}: give either cost_per_1k_tokens or cost, not both")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", value):
            raise ValueError("site name must be a lowercase slug (a-z, 0-9, '-'), at most 32 characters")
        return value
