"""Engine event ids.

Adds `lf_events.event_id` (unique, nullable for events recorded before it and for events the
controller itself records): every event the engine emits carries an id and is also appended to a log
under storage, so a controller that starts after another died replays the log and records each event
exactly once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lf_events") as batch:
        batch.add_column(sa.Column("event_id", sa.String(length=32), nullable=True))
        batch.create_unique_constraint(op.f("uq_lf_events_event_id"), ["event_id"])


def downgrade() -> None:
    with op.batch_alter_table("lf_events") as batch:
        batch.drop_constraint(op.f("uq_lf_events_event_id"), type_="unique")
        batch.drop_column("event_id")
