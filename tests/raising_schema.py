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
        return value


class Raising(BaseModel):
    train: Train = Field(default_factory=Train)
    auth: Auth = Field(default_factory=Auth)


class RaisingAlways(BaseModel):
    """A schema that raises on its own defaults: no value is to blame."""

    x: int = 0

    def model_post_init(self, context: Any) -> None:
        raise RuntimeError("this schema cannot be built")
