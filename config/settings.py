"""The worker's settings, read once from the environment (SPEC §6)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line naming it."""


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


SecretList = Annotated[list[SecretStr], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_file=None)

    database_url: str = Field(repr=False)
    redis_url: str = Field(repr=False)
    celery_broker_url: str | None = Field(default=None, repr=False)
    celery_result_backend: str | None = Field(default=None, repr=False)

    stripe_api_key: SecretStr | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secrets: SecretList = Field(default_factory=list)
    stripe_connect_webhook_secrets: SecretList = Field(default_factory=list)
    stripe_livemode: bool = False
    stripe_max_network_retries: int = Field(default=3, ge=0, le=10)
    # Shared by every worker process (Redis token bucket); Stripe's sandbox allows 25/s.
    stripe_rate_limit_per_s: float = Field(default=20.0, gt=0)

    platform_fee_bps: int = Field(default=500, ge=0, le=10_000)
    completion_hold_days: int = Field(default=7, ge=0)

    webhook_tolerance_seconds: int = Field(default=300, ge=1)
    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    # An event still `received` this long after arrival lost its broker message.
    sweeper_threshold_seconds: int = Field(default=60, ge=1)
    event_max_attempts: int = Field(default=8, ge=1)
    # First retry delay; each later one doubles (with jitter), capped at 10 minutes.
    event_retry_base_seconds: float = Field(default=2.0, gt=0)

    flower_basic_auth: SecretStr | None = None

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("stripe_webhook_secrets", "stripe_connect_webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("database_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        """Accept the usual `postgresql://` form and use psycopg 3 for it."""
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix):]
        raise ValueError("must be a postgresql:// URL")

    @field_validator("redis_url", "celery_broker_url", "celery_result_backend")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("must be a URL such as redis://host:6379/0")
        return value

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        return self.celery_result_backend or self.redis_url

    @property
    def libpq_database_url(self) -> str:
        """The database URL for plain psycopg (no SQLAlchemy dialect prefix)."""
        return "postgresql://" + self.database_url.removeprefix("postgresql+psycopg://")


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    name = str(first["loc"][0]).upper() if first["loc"] else "settings"
    reason = "is not set" if first["type"] == "missing" else first["msg"]
    return f"configuration error: {name} {reason}"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
