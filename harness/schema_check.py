"""Do the SQLAlchemy models match the database they run against?"""

from __future__ import annotations

import re

from sqlalchemy import Engine, MetaData, inspect
from sqlalchemy.dialects import postgresql

_dialect = postgresql.dialect()


def _ddl_type(type_) -> str:
    # Prisma's TIMESTAMP(3) is the same type as TIMESTAMP for the worker's purposes.
    return re.sub(r"TIMESTAMP\(\d\)", "TIMESTAMP", type_.compile(dialect=_dialect))


def model_mismatches(engine: Engine, metadata: MetaData) -> list[str]:
    """Every mapped table and column must exist with the same type and nullability."""
    inspector = inspect(engine)
    problems = []
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name, schema=table.schema):
            problems.append(f"{table.schema}.{table.name}: table missing")
            continue
        actual = {c["name"]: c for c in inspector.get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            where = f"{table.schema}.{table.name}.{column.name}"
            found = actual.get(column.name)
            if found is None:
                problems.append(f"{where}: column missing")
                continue
            if _ddl_type(column.type) != _ddl_type(found["type"]):
                problems.append(
                    f"{where}: mapped as {_ddl_type(column.type)}, is {_ddl_type(found['type'])}"
                )
            if column.nullable != found["nullable"]:
                problems.append(
                    f"{where}: mapped nullable={column.nullable}, is nullable={found['nullable']}"
                )
    return problems
