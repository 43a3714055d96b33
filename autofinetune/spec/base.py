"""The base model of every part of a study spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every spec section: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
