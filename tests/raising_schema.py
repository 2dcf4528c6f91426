"""A test schema whose own code raises on some values instead of refusing them:
``--schema tests.raising_schema:Raising``. Pydantic turns only a validator's
``ValueError`` or ``assert`` into a validation error; anything else a validator, a
post-init or a computed field raises (``v.strip()`` handed a number) comes out as it is,
naming no key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SecretStr, computed_field, field_validator, model_validator


class Train(BaseModel):
    lr: float = 0.1
    mode: str = "cosine"
    warmup: int = 0
    cooldown: int = 0
    total: int = 100

    @field_validator("mode", mode="before")
    @classmethod
    def lower(cls, value: Any) -> Any:
        return value.strip().lower()  # AttributeError for a number

    @computed_field  # type: ignore[prop-decorator]
    @property
    def inverse_lr(self) -> float:
        return 1 / self.lr  # ZeroDivisionError at 0, on the dump

    @model_validator(mode="after")
    def one_schedule_end(self) -> Train:
        if self.warmup and self.cooldown:
            raise TypeError("warmup and cooldown together")  # two keys together
        if self.warmup > self.total:
            raise ValueError("warmup must not exceed total")  # a plain validation error
        return self


class Auth(BaseModel):
    token: SecretStr = SecretStr("default-token-1234")
    user: str = "ops"

    @field_validator("token", mode="before")
    @classmethod
    def known_token(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("x"):
            raise KeyError(f"unknown token {value}")  # quotes the secret
        return value

    @field_validator("user")
    @classmethod
    def user_not_token(cls, value: str, info: Any) -> str:
        token = info.data.get("token")
        if token is not None and value == "root":
            raise LookupError(f"root may not use {token.get_secret_value()}")  # another's secret
        if token is not None and value == "admin":
            shown = token.get_secret_value().strip().upper()
            raise LookupError(f"admin may not use {shown}")  # the secret, changed
        return value


class Raising(BaseModel):
    train: Train = Field(default_factory=Train)
    auth: Auth = Field(default_factory=Auth)


class RaisingAlways(BaseModel):
    """A schema that raises on its own defaults: no value is to blame."""

    x: int = 0

    def model_post_init(self, context: Any) -> None:
        raise RuntimeError("this schema cannot be built")


class RaisingRequired(BaseModel):
    """A required key (no default to set it back to) beside a value that raises."""

    name: str
    lr: float = 0.1

    @computed_field  # type: ignore[prop-decorator]
    @property
    def inverse_lr(self) -> float:
        return 1 / self.lr


class BadMessage(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


class OddRaises(BaseModel):
    """Exceptions awkward to report: a message over lines, a message that cannot be made,
    a validator that exits."""

    a: int = 0

    @field_validator("a")
    @classmethod
    def odd(cls, value: int) -> int:
        if value == 1:
            raise RuntimeError("first line\nTraceback (most recent call last):\n  second line")
        if value == 2:
            raise BadMessage()
        if value == 3:
            raise SystemExit("bye")
        return value


def _boom() -> int:
    raise RuntimeError("factory boom")


class FactoryRaises(BaseModel):
    a: int = Field(default_factory=_boom)


class FactoryTakesData(BaseModel):
    """A default made from the other fields as pydantic validates them."""

    a: int = 1
    b: int = Field(default_factory=lambda data: 10 // data["a"])
