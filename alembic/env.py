"""Alembic environment for lorafleet's tables (all named `lf_*`).

Normally driven from Python (`orchestrator.store.migrate`: `lorafleet db upgrade`, `Store.open`), which
passes either an open connection or the URL as `sqlalchemy.url`. From the Alembic CLI the target is
`$LORAFLEET_DB_URL`, else the embedded SQLite database in `$LORAFLEET_HOME`.

The revision lives in `lf_alembic_version`, and autogenerate only looks at `lf_*` tables, so a database
shared with MLflow keeps both histories apart. SQLite cannot ALTER most things, so its migrations run in
batch mode (copy-and-move tables), which is also why every constraint is named (see models.py).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from orchestrator.store.engine import make_engine
from orchestrator.store.migrate import VERSION_TABLE, default_url, include_name
from orchestrator.store.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or os.environ.get("LORAFLEET_DB_URL") or default_url()


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        render_as_batch=url.startswith("sqlite"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # the caller owns the connection and its transaction
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
