"""Why a queued adapter waits.

Adds `lf_adapters.waiting` (text, nullable): the controller's reason an adapter is still queued (its
project is at its cap, every worker that could take it is busy, its parent has not finished, no worker of
a cluster that may still grow can hold it), shown by `status` and `adapters` so that nothing waits without
a visible reason. Cleared when the adapter leaves the queue.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lf_adapters") as batch:
        batch.add_column(sa.Column("waiting", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lf_adapters") as batch:
        batch.drop_column("waiting")
