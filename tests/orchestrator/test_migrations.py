"""Alembic migrations on SQLite and PostgreSQL: they build exactly the ORM's schema, both ways, and the
store refuses a database that is not at the head, saying which command fixes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from orchestrator.store import (
    VERSION_TABLE,
    NewAdapter,
    SchemaOutOfDate,
    Store,
    StoreError,
    downgrade,
    migrate,
    upgrade,
)
from orchestrator.store.engine import make_engine
from orchestrator.store.migrate import head_revision, include_name, script_location
from orchestrator.store.models import Base

TABLES = {t.name for t in Base.metadata.sorted_tables}


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_creates_every_table(db_url: str) -> None:
    upgrade(db_url)
    names = table_names(db_url)
    assert names == TABLES | {VERSION_TABLE} and VERSION_TABLE == "lf_alembic_version"
    assert "alembic_version" not in names  # MLflow's version table stays MLflow's
    with Store(db_url) as store:
        assert store.list_jobs() == []


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={"version_table": VERSION_TABLE, "include_name": include_name, "compare_type": True},
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_store_refuses_a_database_that_was_never_migrated(db_url: str) -> None:
    with pytest.raises(SchemaOutOfDate) as refused:
        Store(db_url)
    message = str(refused.value)
    assert "lorafleet db upgrade" in message and "LORAFLEET_DB_URL=" in message
    assert head_revision() in message


def test_the_default_database_is_upgraded_with_the_plain_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DB_URL", raising=False)
    url = f"sqlite:///{(tmp_path / 'home' / 'lorafleet.db').resolve()}"
    with pytest.raises(SchemaOutOfDate, match=r"Run:\n    lorafleet db upgrade$"):
        Store(url)
    assert not (tmp_path / "home").exists()  # refusing does not create an empty database
    with Store.open(url) as store:  # the embedded default migrates, creating the directory
        assert store.list_adapters() == []


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    upgrade(db_url)
    with Store(db_url) as store:
        store.create_job("p", "j", {}, [])
    downgrade(db_url, "base")
    assert table_names(db_url) <= {VERSION_TABLE}
    with pytest.raises(SchemaOutOfDate):
        Store(db_url)
    upgrade(db_url)
    with Store(db_url) as store:
        assert store.list_jobs() == []
        _, (a,), _ = store.create_job("p", "j", {}, [NewAdapter("a", "tiny", {"path": "a.jsonl"})])
        assert a.seq == 1  # the counter was seeded again


def test_shares_a_database_with_mlflow(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:  # stand-ins for MLflow's tables and its Alembic history
            connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            connection.execute(text("INSERT INTO alembic_version VALUES ('mlflow-head')"))
            connection.execute(text("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY)"))
        upgrade(db_url)
        with engine.connect() as connection:
            mlflow_revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert mlflow_revision == "mlflow-head"
            context = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE, "include_name": include_name}
            )
            assert compare_metadata(context, Base.metadata) == []  # MLflow's tables are not ours to drop
        with Store(db_url) as store:
            assert store.list_packs() == []
        downgrade(db_url, "base")
        assert {"alembic_version", "experiments"} <= table_names(db_url)
    finally:
        engine.dispose()


def test_a_newer_schema_is_refused_with_its_own_advice(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaOutOfDate, match="a newer lorafleet migrated it"):
        Store(db_url)


def test_missing_migrations_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert script_location().name == "alembic"
    monkeypatch.setattr(migrate, "SCRIPT_LOCATION", tmp_path / "alembic")
    with pytest.raises(StoreError, match="migrations are missing"):
        script_location()


def test_an_in_memory_store_migrates_its_own_connection() -> None:
    with Store.open("sqlite://") as store:  # a second engine would see a different, empty database
        _, (a,), _ = store.create_job("p", "j", {}, [NewAdapter("a", "tiny", {"path": "a.jsonl"})])
        assert store.get_adapter("p", "a") == a


def test_0006_makes_every_existing_job_a_train_job_and_steps_back(db_url: str) -> None:
    upgrade(db_url, "0005")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO lf_projects (name, created_at) VALUES ('p', '2026-01-01')"))
            connection.execute(
                text(
                    "INSERT INTO lf_jobs (id, project, name, spec, state, created_at, updated_at) "
                    "VALUES ('old', 'p', 'j', '{}', 'succeeded', '2026-01-01', '2026-01-01')"
                )
            )
    finally:
        engine.dispose()
    upgrade(db_url)
    with Store(db_url) as store:
        old = store.get_job("old")
        assert (old.kind, old.end_reason) == ("train", None)
        store.create_session_job("p", "sess-1", {"base_model": "b"})
        assert [j.id for j in store.list_jobs(kind="session")] == ["sess-1"]  # type: ignore[arg-type]
    downgrade(db_url, "0005")
    engine = make_engine(db_url)
    try:
        assert "kind" not in {c["name"] for c in inspect(engine).get_columns("lf_jobs")}
    finally:
        engine.dispose()
    upgrade(db_url)
    with Store(db_url) as store:
        assert store.get_job("sess-1").kind == "train"  # the kind went with the downgrade
