"""Idempotency keys per project.

`lf_jobs.idempotency_key` was unique across the whole database: a project token reusing another
project's key got a 409 naming that project's job, and could claim keys another project would use.
A key now belongs to its project: unique on (project, idempotency_key).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lf_jobs") as batch:
        batch.drop_constraint(op.f("uq_lf_jobs_idempotency_key"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_lf_jobs_project_idempotency_key"), ["project", "idempotency_key"]
        )


def downgrade() -> None:
    """Fails if two projects used the same key since the upgrade: there is no global key to go back to."""
    with op.batch_alter_table("lf_jobs") as batch:
        batch.drop_constraint(op.f("uq_lf_jobs_project_idempotency_key"), type_="unique")
        batch.create_unique_constraint(op.f("uq_lf_jobs_idempotency_key"), ["idempotency_key"])
