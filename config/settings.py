"""The worker's settings, read once from the environment (SPEC §6)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from config.cadence import Cadence, parse_cadence


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line naming it."""


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


SecretList = Annotated[list[SecretStr], NoDecode]
CadenceSetting = Annotated[Cadence, NoDecode, BeforeValidator(parse_cadence)]


def is_amqp_url(url: str | None) -> bool:
    """A RabbitMQ broker URL (README, "RabbitMQ")."""
    return (url or "").split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def sqlalchemy_url(value: str) -> str:
    """Accept the usual `postgresql://` form and use psycopg 3 for it."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if value.startswith(prefix):
            return "postgresql+psycopg://" + value[len(prefix):]
    raise ValueError("must be a postgresql:// URL")


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
    # Reconciliation's wait before the first retry of a 429; doubles each attempt, with jitter.
    stripe_rate_limit_backoff_seconds: float = Field(default=0.5, gt=0, le=60)

    # Connect reconciliation: a paid transaction with no transfer this long after payment is
    # reported as `missing_transfer` (before that it is only awaiting its transfer).
    reconcile_transfer_grace_hours: int = Field(default=48, ge=0)
    # Stripe lists one reconciliation run reads at a time (pages of one list are sequential);
    # the shared rate cap bounds the total.
    reconcile_stripe_concurrency: int = Field(default=4, ge=1, le=32)

    platform_fee_bps: int = Field(default=500, ge=0, le=10_000)
    completion_hold_days: int = Field(default=7, ge=0)

    # Invoice polling. Each run re-reads this far behind its watermark on "Invoice"."updatedAt":
    # the app's transaction may commit after the poll read the table, its clock may lag ours.
    poll_overlap_seconds: int = Field(default=120, ge=0)
    poll_batch_size: int = Field(default=500, ge=1, le=10_000)
    # Changed invoices one run looks at; the next run carries on from the watermark.
    poll_max_invoices_per_run: int = Field(default=50_000, ge=1)
    # A Stripe-backed invoice still draft/open with no event (or API read) for this long is
    # re-read from Stripe; one open past its due date after poll_recheck_seconds.
    poll_stale_after_seconds: int = Field(default=6 * 3600, ge=60)
    poll_recheck_seconds: int = Field(default=900, ge=60)
    # Stripe API reads per poll run, to stay far inside Stripe's rate limits.
    poll_stripe_reads_per_run: int = Field(default=50, ge=0, le=1000)
    # A paid invoice whose payment link a read did not get (the read failed, was rate limited,
    # or Stripe had no charge yet) is read again after this, doubling up to the stale interval.
    poll_link_retry_base_seconds: int = Field(default=60, ge=1)

    webhook_tolerance_seconds: int = Field(default=300, ge=1)
    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Receiver processes sharing the port (uvicorn's workers). One by default: a process takes
    # ~4,000 Stripe-sized events/s on a core, more than a 2-core host running Postgres and the
    # workers beside it has to spare, and the receiver's Prometheus counters are per process
    # (a scrape reads one process). Raise it where the receiver has cores of its own.
    webhook_processes: int = Field(default=1, ge=1, le=64)

    # Work a job fanned out (domain/fanout.py): a piece not started this long after its message
    # was due, while its queue holds no message, lost that message and is enqueued again.
    fanout_sweep_after_seconds: int = Field(default=120, ge=1)
    # Re-enqueued whatever its queue holds, once this overdue: a queue that never empties
    # (a steady backlog) must not hide a lost piece for ever.
    fanout_stale_after_seconds: int = Field(default=3600, ge=60)

    # An event still `received` this long after arrival lost its broker message.
    sweeper_threshold_seconds: int = Field(default=60, ge=1)
    event_max_attempts: int = Field(default=8, ge=1)

    # Provider stats. The incremental pass re-reads the app's listing/review changes this far
    # behind its watermark: an app transaction can commit after the pass read the tables, and
    # an app server's clock can lag the database's.
    stats_change_overlap_seconds: int = Field(default=300, ge=0)
    # Providers per transaction of the nightly full pass.
    stats_full_batch_size: int = Field(default=1000, ge=1, le=100_000)
    # Providers per task of the nightly full pass. The job aggregates every provider once and
    # a task applies the staged values of its range, so a task costs what its changed
    # providers do, not a read of the tables: smaller ranges spread the writes over more
    # workers at little cost (benchmarks/stats_bench.py).
    stats_full_range_size: int = Field(default=50_000, ge=1)
    # First retry delay; each later one doubles (with jitter), capped at 10 minutes.
    event_retry_base_seconds: float = Field(default=2.0, gt=0)

    flower_basic_auth: SecretStr | None = None
    # Local development only: `celery -A worker flower` then starts without FLOWER_BASIC_AUTH,
    # on 127.0.0.1 only.
    flower_unauthenticated: bool = False

    # Beat cadences: seconds on a UTC grid, or a daily UTC time HH:MM (worker/schedule.py).
    schedule_sweep_inbox: CadenceSetting = Cadence(60)
    schedule_catch_up_events: CadenceSetting = Cadence(600)
    schedule_incremental_stats: CadenceSetting = Cadence(60)
    schedule_poll_invoices: CadenceSetting = Cadence(300)
    schedule_complete_transactions: CadenceSetting = Cadence(3600)
    schedule_full_stats: CadenceSetting = Cadence(86_400, 2 * 3600)
    schedule_reconcile_all: CadenceSetting = Cadence(86_400, 3 * 3600)
    # Accounts named by transfer/payout events since their last reconciliation.
    schedule_reconcile_dirty: CadenceSetting = Cadence(600)
    schedule_purge_inbox: CadenceSetting = Cadence(86_400, 4 * 3600)
    # The inbox's monthly partitions, made two months ahead: a daily run has weeks to succeed.
    schedule_prepare_inbox_partitions: CadenceSetting = Cadence(86_400, 3 * 3600 + 1800)
    schedule_sweep_fanout: CadenceSetting = Cadence(60)

    # Processed and ignored inbox events older than this are deleted nightly. Longer than the
    # 30 days of event history Stripe keeps, so a catch-up can never meet a purged id as new.
    inbox_retention_days: int = Field(default=90, ge=31)
    job_runs_retention_days: int = Field(default=30, ge=1)
    # Rows per delete transaction: short transactions, no long lock, vacuum keeps up.
    retention_batch_size: int = Field(default=1000, ge=1, le=50_000)
    # One purge run deletes for this long, then sends the next run with what is left, so a
    # backlog of months goes in short tasks (their time limit, tasks/maintenance.py, is above
    # the largest value allowed here).
    retention_run_seconds: float = Field(default=240, gt=0, le=600)

    log_level: str = "INFO"
    log_json: bool = False

    # Traces (worker/tracing.py): on with OTEL_EXPORTER_OTLP_ENDPOINT, or with this and the
    # exporter's other OTEL_* variables. Error reports: on with a DSN.
    tracing_enabled: bool = False
    sentry_dsn: SecretStr | None = None
    sentry_environment: str | None = None

    @field_validator("stripe_webhook_secrets", "stripe_connect_webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("stripe_api_key", "flower_basic_auth", "sentry_dsn", "sentry_environment", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes an unset secret as an empty string: it must count as missing.
        return None if value == "" else value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_password_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            for pair in value.get_secret_value().split(","):
                user, _, password = pair.partition(":")
                if not user.strip() or not password:
                    raise ValueError("must be user:password (several comma-separated)")
        return value

    @field_validator("database_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        return sqlalchemy_url(value)

    @field_validator("celery_broker_url", "celery_result_backend", mode="before")
    @classmethod
    def _empty_url_is_unset(cls, value: object) -> object:
        # Compose passes CELERY_BROKER_URL empty unless the operator chose a broker of its own.
        return None if value == "" else value

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
    def broker_is_amqp(self) -> bool:
        return is_amqp_url(self.broker_url)

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
