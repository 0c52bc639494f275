"""Store fixtures: every store test runs on SQLite and on PostgreSQL, each test on a database of its own.

PostgreSQL comes from `LORAFLEET_TEST_PG_URL` (default: the local server's `test` database); if it cannot
be reached, the postgresql cases are skipped with the reason. Each test gets a fresh database, created
with `CREATE DATABASE` on an autocommit connection and dropped afterwards, so tests never see each
other's rows and can run side by side with other people's runs on the same server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
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


PG_BIN = Path(os.environ.get("LORAFLEET_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class OwnPostgres:
    """A PostgreSQL cluster of this test session's own, on a free port: tests stop and restart it (a real
    outage), which they must never do to the shared server. Run as the `postgres` OS user when the tests
    run as root (initdb refuses root)."""

    def __init__(self, root: Path, port: int, as_user: list[str]) -> None:
        self.root, self.port, self._as_user = root, port, as_user
        self.data = root / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "server.log")
        self._run(str(PG_BIN / "pg_ctl"), "start", "-w", "-D", str(self.data), "-l", log, "-o", options)

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data))


@pytest.fixture(scope="session")
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL server the tests may stop and start, or a skip saying why there is none."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"no PostgreSQL binaries at {PG_BIN} (LORAFLEET_TEST_PG_BIN) to start a server of ours")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` OS user to run initdb as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = OwnPostgres(root, port, as_user)
    try:
        cluster.init()
        cluster.start()
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot start a PostgreSQL server of our own: {exc}")
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):  # a test that failed mid-outage stopped it
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
