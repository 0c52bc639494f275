"""Project tokens.

Adds `lf_tokens`: API tokens bound to one project with a role (`reader` or `member`), stored as the
sha256 of the token (tokens are 256-bit random strings, so a fast hash is enough and a leaked table
reveals none), with an optional name and the time each was revoked. The admin token stays an
environment setting (`LORAFLEET_API_TOKEN`), never a row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lf_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_lf_tokens_token_hash")),
    )
    op.create_index(op.f("ix_lf_tokens_project"), "lf_tokens", ["project"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_lf_tokens_project"), table_name="lf_tokens")
    op.drop_table("lf_tokens")
