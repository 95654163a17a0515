"""Alembic environment: manages only the `marketplace_worker` schema.

The main app's tables belong to Prisma's migrations and are never touched here.
"""

from alembic import context
from sqlalchemy import create_engine, text

import models
from models.base import WORKER_SCHEMA
from models.migrate import include_name, include_object

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connection)


def _run(connection) -> None:
    # Only when absent: even IF NOT EXISTS needs CREATE on the database, which the worker's own
    # role (models/grants.py: it owns the schema the DBA made for it) does not have.
    present = connection.execute(
        text("SELECT 1 FROM pg_namespace WHERE nspname = :schema"), {"schema": WORKER_SCHEMA}
    ).scalar()
    if not present:
        connection.execute(text(f"CREATE SCHEMA {WORKER_SCHEMA}"))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=models.Base.metadata,
        version_table_schema=WORKER_SCHEMA,
        include_schemas=True,
        include_object=include_object,
        include_name=include_name,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `marketplace-worker migrate`")
run_migrations_online()
