"""A test schema with rules across fields: ``--schema tests.banded_schema:Banded``.

Pydantic reports a broken rule on the section (``band``: ``lo`` must not exceed
``hi``) or on the whole model (a wide band takes few steps), not on a key that
one layer set: what the merge does with such a problem is what the tests check.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lo: float = Field(0.0, ge=0)
    hi: float = 1.0

    @model_validator(mode="after")
    def ordered(self) -> Band:
        if self.lo > self.hi:
            raise ValueError("lo must not exceed hi")
        return self


class Banded(BaseModel):
    model_config = ConfigDict(extra="forbid")

    band: Band = Field(default_factory=Band)
    steps: int = Field(1, ge=1)

    @model_validator(mode="after")
    def few_steps_for_a_wide_band(self) -> Banded:
        if self.band.hi - self.band.lo > 10 and self.steps > 5:
            raise ValueError("a wide band takes at most 5 steps")
        return self


class ClippedTrain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)
    clip: float | Literal["auto"] = 1.0  # pydantic reports a bad value once per member


class Clipped(BaseModel):
    """A union-typed leaf: ``--schema tests.banded_schema:Clipped``."""

    model_config = ConfigDict(extra="forbid")

    train: ClippedTrain = Field(default_factory=ClippedTrain)
