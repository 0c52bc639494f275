"""Alembic, driven from Python: `lorafleet db upgrade`, `Store.open(upgrade=True)` and the start-up check.

The schema only ever changes through the revisions in the repository's `alembic/` directory. A store
refuses to start on a database whose revision is not the head this code knows, and says exactly which
command brings it there: running on a stale schema corrupts data quietly, refusing costs one command.
lorafleet keeps its revision in `lf_alembic_version`, so it can share a database with MLflow (which
keeps its own in `alembic_version`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from alembic.command import downgrade as alembic_downgrade
from alembic.command import upgrade as alembic_upgrade
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from orchestrator.store.engine import ensure_sqlite_dir, make_engine, sqlite_path
from orchestrator.store.errors import DatabaseUnavailable, SchemaOutOfDate, StoreError

VERSION_TABLE = "lf_alembic_version"
# located from this file, not `orchestrator.__file__`: that is None when an editable install registered
# `orchestrator` as a namespace package
SCRIPT_LOCATION = Path(__file__).resolve().parents[2] / "alembic"
TABLE_PREFIX = "lf_"
UPGRADE_COMMAND = "lorafleet db upgrade"
_MIGRATION_LOCK_KEY = 0x6C66_6D69_6772  # "lfmigr": a PostgreSQL advisory lock id


def script_location() -> Path:
    """The `alembic/` directory: next to the package in a checkout, or where a wheel put its data files."""
    for path in (SCRIPT_LOCATION, Path(sys.prefix) / "share" / "lorafleet" / "alembic"):
        if (path / "env.py").is_file():
            return path
    raise StoreError(
        f"lorafleet's migrations are missing: expected the Alembic directory at {SCRIPT_LOCATION} (with "
        "env.py) or under the environment's share/lorafleet; reinstall lorafleet (`pip install -e .`)."
    )


def default_url() -> str:
    """The embedded database: SQLite in `$LORAFLEET_HOME` (default `~/.lorafleet`), as `Settings` has it."""
    home = Path(os.environ.get("LORAFLEET_HOME") or "~/.lorafleet").expanduser().resolve()
    return f"sqlite:///{home / 'lorafleet.db'}"


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate and schema comparison look only at lorafleet's tables, never at MLflow's."""
    return type_ != "table" or (name or "").startswith(TABLE_PREFIX)


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic config for our script directory; `url` (or an open `connection`) is the target."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no Alembic revisions found in {script_location() / 'versions'}")
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision; None for a database lorafleet never migrated."""
    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (default: the newest), creating a SQLite file if needed."""
    ensure_sqlite_dir(url)
    engine = make_engine(url)
    try:
        upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """`upgrade` on an existing engine (needed for in-memory SQLite, where a new engine is a new db)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # two servers starting at once migrate one at a time
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        alembic_upgrade(alembic_config(connection=connection), revision)


def downgrade(url: str, revision: str) -> None:
    """Step the schema back to `revision` (`base` drops every lorafleet table). Used by tests and ops."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            alembic_downgrade(alembic_config(connection=connection), revision)
    finally:
        engine.dispose()


def upgrade_command(url: str) -> str:
    """The exact command that upgrades the database at `url` (the password, if any, masked)."""
    configured = os.environ.get("LORAFLEET_DB_URL")
    if url == configured or (configured is None and url == default_url()):
        return UPGRADE_COMMAND
    shown = make_url(url).render_as_string(hide_password=True)
    return f"LORAFLEET_DB_URL={shlex.quote(shown)} {UPGRADE_COMMAND}"


def check_schema(engine: Engine, url: str) -> None:
    """Raise `SchemaOutOfDate` unless the database at `url` is at the head revision."""
    head = head_revision()
    shown = make_url(url).render_as_string(hide_password=True)
    path = sqlite_path(url)
    if path is not None and not path.expanduser().exists():
        current = None
    else:
        try:
            with engine.connect() as connection:
                current = current_revision(connection)
        except DBAPIError as exc:
            raise DatabaseUnavailable(f"cannot read the schema revision of {shown}: {exc.orig}") from exc
    if current == head:
        return
    if current is not None and not _known(current):
        raise SchemaOutOfDate(
            f"the lorafleet schema in {shown} is at revision {current!r}, which this lorafleet does not "
            f"know (head {head!r}): a newer lorafleet migrated it. Upgrade lorafleet."
        )
    found = "missing (never migrated)" if current is None else f"at revision {current!r}"
    raise SchemaOutOfDate(
        f"the lorafleet schema in {shown} is {found}; this lorafleet needs revision {head!r}. Run:\n"
        f"    {upgrade_command(url)}"
    )


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except (CommandError, RevisionError):  # wrapped or not, depending on the Alembic version
        return False
