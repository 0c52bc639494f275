"""Jobs of two kinds: trained from a spec, or driven call by call (a training session).

Adds `lf_jobs.kind` (`train` or `session`; every existing row is a `train` job) and `lf_jobs.end_reason`
(text, nullable): why a session ended (closed by its client, saved with `close`, idle past the server's
timeout, the server restarted). A session is a job so that it belongs to a project, its saved states are
adapters of it (lineage, export, promotion, MLflow) and its calls' metrics live in the event log like a
pack's; the kind lets the controller, which derives a job's state from its adapters, leave it alone.

`kind` is added with a server default so existing rows get `train`, then the default is dropped: every
value is set from Python (see `store/models.py`), so both backends hold the same thing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lf_jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="train"))
        batch.add_column(sa.Column("end_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("lf_jobs") as batch:
        batch.alter_column("kind", existing_type=sa.String(16), server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("lf_jobs") as batch:
        batch.drop_column("end_reason")
        batch.drop_column("kind")
