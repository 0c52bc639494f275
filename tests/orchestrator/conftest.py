"""Store fixtures: every store test runs on SQLite and on PostgreSQL, each test on a database of its own.

PostgreSQL comes from `LORAFLEET_TEST_PG_URL` (default: the local server's `test` database); if it cannot
be reached, the postgresql cases are skipped with the reason. Each test gets a fresh database, created
with `CREATE DATABASE` on an autocommit connection and dropped afterwards, so tests never see each
other's rows and can run side by side with other people's runs on the same server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from orchestrator.store import Store, upgrade

PG_URL = os.environ.get("LORAFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_server() -> URL:
    """The admin URL of the test server (its maintenance database), or a skip saying why there is none."""
    url = make_url(PG_URL)
    engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any reason it is unusable is a reason to skip, reported as such
        pytest.skip(f"PostgreSQL not reachable at {url.render_as_string()} (LORAFLEET_TEST_PG_URL): {exc}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def _pg_admin(pg_server: URL) -> Iterator:
    engine = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, never migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lorafleet.db'}"
        return
    admin = request.getfixturevalue("_pg_admin")
    name = f"lf_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A store on a database migrated to the head."""
    upgrade(db_url)
    with Store(db_url) as s:
        yield s
