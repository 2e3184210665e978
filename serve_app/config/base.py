"""Shared pieces of the configuration models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DataClassName = Literal["public", "internal", "confidential", "restricted"]
