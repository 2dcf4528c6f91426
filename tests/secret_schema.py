"""A test schema with secret fields: ``--schema tests.secret_schema:Params``.

``service.api_key`` is a ``SecretStr`` with a length rule, so a too-short key is
rejected (and its rejection is logged) without the key itself ever being shown.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

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
