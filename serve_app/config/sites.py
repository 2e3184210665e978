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


class ExternalEndpoint(Strict):
    """An OpenAI-compatible API elsewhere (a managed provider, another company's cluster), reached
    over HTTP by every router replica. Its key comes from the environment, never from this file."""

    base_url: str = Field(description="The API's base URL, up to and including '/v1' (e.g. https://api.openai.com/v1).")
    api_key_env: str | None = Field(
        default=None, description="Environment variable that holds the API key (sent as a bearer token); "
        "None for an endpoint without keys.")
    max_concurrency: int = Field(
        default=64, gt=0, description="Requests in flight to the API at once, per model, over all router replicas "
        "(each replica takes its share): the site's slots. Past it, requests wait in the router's queue.")
    models: dict[str, str] = Field(
        default_factory=dict, description="Spillway model id -> the API's model name, where they differ.")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Longest wait for a TCP/TLS connection.")
    first_byte_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest wait for a stream's response headers (the API accepted it).")
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a non-streamed request may take, answer included.")
    retries: int = Field(
        default=2, ge=0, description="Retries of a request that failed before its first byte (no connection, a "
        "timeout, 429/5xx), with backoff; a stream is never retried once a token reached the client.")
    retry_backoff_s: float = Field(default=0.5, ge=0, description="First retry's delay; doubled for each further one.")
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Largest non-streamed answer read from the API (502 past it).")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError("base_url must be an http(s) URL")
        return value.rstrip("/")


class SiteConfig(Strict):
    name: str = Field(description="Short name of the site, used in headers, metrics and replica placement.")
    resource: str | None = Field(
        default=None,
        description="Required unless the site is external. Ray custom resource that every node of this site carries (e.g. 'site:onprem'). "
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
    external: ExternalEndpoint | None = Field(
        default=None, description="For kind external: the API's URL, key variable, concurrency, timeouts and retries.")
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
        if self.resource is None and self.kind != SiteKind.external:
            raise ValueError(f"site {self.name!r}: `resource` is required (the Ray custom resource its nodes carry)")
        if (self.kind == SiteKind.external) != (self.external is not None):
            raise ValueError(f"site {self.name!r}: a site of kind external needs `external` (its API), and only "
                             "such a site may have one")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", value):
            raise ValueError("site name must be a lowercase slug (a-z, 0-9, '-'), at most 32 characters")
        return value
