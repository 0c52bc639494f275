"""lorafleet's SQL state (SQLite or PostgreSQL): typed models, Alembic migrations and one `Store`.

    store = Store.open("sqlite:///~/.lorafleet/lorafleet.db")   # embedded: migrates first
    store = Store(os.environ["LORAFLEET_DB_URL"])               # cluster: refuses a stale schema

Layout: `models.py` (ORM rows), `records.py` (the immutable records callers get), `repository.py` (the
store), `errors.py` (typed errors), `migrate.py` (Alembic helpers), `engine.py` (engine set-up).
"""

from orchestrator.store.errors import (
    Conflict,
    DatabaseRefused,
    DatabaseUnavailable,
    NotFound,
    SchemaOutOfDate,
    StoreError,
)
from orchestrator.store.migrate import VERSION_TABLE, downgrade, upgrade
from orchestrator.store.records import (
    UNSET,
    AdapterChange,
    AdapterRecord,
    CheckpointRecord,
    EventRecord,
    JobRecord,
    MetricRecord,
    NewAdapter,
    NewEvent,
    PackMemberRecord,
    PackRecord,
    RegistryRecord,
    TokenRecord,
    Unset,
    config_hash,
)
from orchestrator.store.repository import Store

__all__ = [
    "UNSET",
    "VERSION_TABLE",
    "AdapterChange",
    "AdapterRecord",
    "CheckpointRecord",
    "Conflict",
    "DatabaseRefused",
    "DatabaseUnavailable",
    "EventRecord",
    "JobRecord",
    "MetricRecord",
    "NewAdapter",
    "NewEvent",
    "NotFound",
    "PackMemberRecord",
    "PackRecord",
    "RegistryRecord",
    "SchemaOutOfDate",
    "Store",
    "StoreError",
    "TokenRecord",
    "Unset",
    "config_hash",
    "downgrade",
    "upgrade",
]
