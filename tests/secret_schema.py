"""A test schema with secret fields: ``--schema tests.secret_schema:Params``.

``service.api_key`` is a ``SecretStr`` with a length rule, so a too-short key is
rejected (and its rejection is logged) without the key itself ever being shown.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from hotknob.config.schema import TrainParams


class ServiceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "http://localhost:8000"
    api_key: SecretStr = Field(SecretStr("default-api-key-0000"), min_length=12)
    backup_key: SecretStr | None = None


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    train: TrainParams = Field(default_factory=TrainParams)
    service: ServiceParams = Field(default_factory=ServiceParams)


class CheckedService(BaseModel):
    """Secrets checked by the schema's own validators, whose messages quote the input, as a
    user's validator may: such a message must never be shown for a secret key."""

    model_config = ConfigDict(extra="forbid")

    name: str = "svc"
    token: SecretStr = Field(SecretStr("tk-default-000000"), min_length=12)
    pin: SecretStr | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        if isinstance(value, str) and value != value.lower():
            raise ValueError(f"name must be lowercase, got {value!r}")
        return value

    @field_validator("token", mode="before")
    @classmethod
    def _prefixed(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith("tk-"):
            raise ValueError(f"token must start with 'tk-', got {value!r}")
        return value

    @field_validator("pin")
    @classmethod
    def _digits(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            pin = value.get_secret_value()
            assert pin.isdigit(), f"pin must be digits, got {pin}"
        return value


class Checked(BaseModel):
    """``--schema tests.secret_schema:Checked``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    train: TrainParams = Field(default_factory=TrainParams)
    svc: CheckedService = Field(default_factory=CheckedService)
