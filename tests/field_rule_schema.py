"""A test schema with a rule across fields written as a field validator (pydantic's own
idiom): ``--schema tests.field_rule_schema:FieldRule``. Unlike ``banded_schema``, the
broken rule is reported on the key ``band.hi`` itself, as if its value were invalid."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lo: float = 0.0
    hi: float = 100.0

    @field_validator("hi")
    @classmethod
    def not_below_lo(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("lo", 0.0):
            raise ValueError("hi must not be below lo")
        return value


class FieldRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    band: Band = Field(default_factory=Band)
