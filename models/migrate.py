"""Applying the worker's migrations, and (dev and tests only) the main app's DDL."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from config.settings import sqlalchemy_url
from models.base import WORKER_SCHEMA
from models.inbox import PARTITION_NAME

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


# Autogenerate looks at the worker's schema only: the main app's tables are Prisma's.
def include_object(obj, name, type_, reflected, compare_to):
    if type_ == "table":
        # The inbox's monthly partitions are made by a job, not by a model: not the
        # migrations' business.
        return obj.schema == WORKER_SCHEMA and not (reflected and PARTITION_NAME.fullmatch(name))
    return True


def include_name(name, type_, parent_names):
    if type_ == "schema":
        return name == WORKER_SCHEMA
    return True


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def app_schema_sql() -> str:
    return resources.files("models").joinpath("schema.sql").read_text()


def create_app_tables_if_absent(database_url: str) -> bool:
    """Create the main app's tables from Prisma's DDL when they are not there.

    Only for the dev stack and tests: in production the main app's own Prisma
    migrations own these tables. Returns whether they were created.
    """
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.begin() as conn:
            present = conn.execute(text("SELECT to_regclass('public.\"Invoice\"')")).scalar()
            if present is not None:
                return False
            conn.exec_driver_sql(app_schema_sql())
            return True
    finally:
        engine.dispose()
