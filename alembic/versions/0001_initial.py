"""Initial schema.

Creates jobs, adapters (with lineage), packs and their attempts, checkpoints, metric summaries,
registry decisions and progress events.

Why: SQL is lorafleet's source of truth, so a restarted controller can rebuild everything it needs from
it (which adapters are queued, which packs were running, the last checkpoint of each adapter), and the
API, CLI and MLflow mirror all read the same rows. Tables are prefixed `lf_` and the revision is kept in
`lf_alembic_version`, so this history can live in the same database as MLflow's.

Reviewed against `alembic revision --autogenerate` of `orchestrator/store/models.py`; the schema is
written out here (not imported from models) so this revision stays what it was when the models change.
Also seeds the `adapter_seq` counter that orders adapters first come first served.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.String:
    return sa.String(length=32)


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _bigid() -> sa.types.TypeEngine:
    # SQLite autoincrements only a column declared exactly INTEGER PRIMARY KEY
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "lf_projects",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_lf_projects")),
    )
    sequences = op.create_table(
        "lf_sequences",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_lf_sequences")),
    )
    op.bulk_insert(sequences, [{"name": "adapter_seq", "value": 0}])

    op.create_table(
        "lf_jobs",
        sa.Column("id", _id(), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project"], ["lf_projects.name"], name=op.f("fk_lf_jobs_project_lf_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_jobs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_lf_jobs_idempotency_key")),
    )
    op.create_index(op.f("ix_lf_jobs_project_created_at"), "lf_jobs", ["project", "created_at"])
    op.create_index(op.f("ix_lf_jobs_state"), "lf_jobs", ["state"])

    op.create_table(
        "lf_adapters",
        sa.Column("id", _id(), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("job_id", _id(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("quantization", sa.String(length=16), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("train", sa.JSON(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("parent_id", _id(), nullable=True),
        sa.Column("root_id", _id(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("parent_checkpoint", sa.Text(), nullable=True),
        sa.Column("data_fingerprint", sa.String(length=128), nullable=True),
        sa.Column("config_hash", sa.String(length=64), nullable=False),
        sa.Column("output_dir", sa.Text(), nullable=True),
        sa.Column("final_checkpoint", sa.Text(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("eval_loss", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.Column("started_at", _time(), nullable=True),
        sa.Column("finished_at", _time(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["lf_jobs.id"], name=op.f("fk_lf_adapters_job_id_lf_jobs")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["lf_adapters.id"], name=op.f("fk_lf_adapters_parent_id_lf_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["project"], ["lf_projects.name"], name=op.f("fk_lf_adapters_project_lf_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_adapters")),
        sa.UniqueConstraint("project", "name", name=op.f("uq_lf_adapters_project_name")),
        sa.UniqueConstraint("seq", name=op.f("uq_lf_adapters_seq")),
    )
    op.create_index(op.f("ix_lf_adapters_job_id"), "lf_adapters", ["job_id"])
    op.create_index(op.f("ix_lf_adapters_parent_id"), "lf_adapters", ["parent_id"])
    op.create_index(op.f("ix_lf_adapters_root_id"), "lf_adapters", ["root_id"])
    op.create_index(op.f("ix_lf_adapters_state_priority_seq"), "lf_adapters", ["state", "priority", "seq"])

    op.create_table(
        "lf_packs",
        sa.Column("id", _id(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("quantization", sa.String(length=16), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("resources", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("ray_run_name", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("finished_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_packs")),
    )
    op.create_index(op.f("ix_lf_packs_state"), "lf_packs", ["state"])

    op.create_table(
        "lf_pack_members",
        sa.Column("id", _bigid(), autoincrement=True, nullable=False),
        sa.Column("pack_id", _id(), nullable=False),
        sa.Column("adapter_id", _id(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("joined_at", _time(), nullable=False),
        sa.Column("left_at", _time(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["lf_adapters.id"], name=op.f("fk_lf_pack_members_adapter_id_lf_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["pack_id"], ["lf_packs.id"], name=op.f("fk_lf_pack_members_pack_id_lf_packs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_pack_members")),
        sa.UniqueConstraint("adapter_id", "attempt", name=op.f("uq_lf_pack_members_adapter_id_attempt")),
    )
    op.create_index(op.f("ix_lf_pack_members_pack_id"), "lf_pack_members", ["pack_id"])

    op.create_table(
        "lf_checkpoints",
        sa.Column("id", _bigid(), autoincrement=True, nullable=False),
        sa.Column("adapter_id", _id(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["lf_adapters.id"], name=op.f("fk_lf_checkpoints_adapter_id_lf_adapters")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_checkpoints")),
    )
    op.create_index(op.f("ix_lf_checkpoints_adapter_id_step"), "lf_checkpoints", ["adapter_id", "step"])

    op.create_table(
        "lf_metric_summaries",
        sa.Column("adapter_id", _id(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("last_value", sa.Float(), nullable=False),
        sa.Column("best_value", sa.Float(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["lf_adapters.id"], name=op.f("fk_lf_metric_summaries_adapter_id_lf_adapters")
        ),
        sa.PrimaryKeyConstraint("adapter_id", "key", name=op.f("pk_lf_metric_summaries")),
    )

    op.create_table(
        "lf_registry_entries",
        sa.Column("id", _bigid(), autoincrement=True, nullable=False),
        sa.Column("adapter_id", _id(), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("alias", sa.String(length=200), nullable=True),
        sa.Column("metric", sa.String(length=200), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["lf_adapters.id"], name=op.f("fk_lf_registry_entries_adapter_id_lf_adapters")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_registry_entries")),
    )
    op.create_index(op.f("ix_lf_registry_entries_adapter_id"), "lf_registry_entries", ["adapter_id"])

    op.create_table(
        "lf_events",
        sa.Column("id", _bigid(), autoincrement=True, nullable=False),
        sa.Column("job_id", _id(), nullable=False),
        sa.Column("adapter_id", _id(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["lf_adapters.id"], name=op.f("fk_lf_events_adapter_id_lf_adapters")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["lf_jobs.id"], name=op.f("fk_lf_events_job_id_lf_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_events")),
    )
    op.create_index(op.f("ix_lf_events_job_id_id"), "lf_events", ["job_id", "id"])


def downgrade() -> None:
    # dependants first; dropping a table drops its indexes
    for table in (
        "lf_events",
        "lf_registry_entries",
        "lf_metric_summaries",
        "lf_checkpoints",
        "lf_pack_members",
        "lf_packs",
        "lf_adapters",
        "lf_jobs",
        "lf_sequences",
        "lf_projects",
    ):
        op.drop_table(table)
