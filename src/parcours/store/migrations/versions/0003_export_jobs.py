"""Bulk $export job queue.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

The table is written out here rather than taken from ``parcours.store.export_jobs``
so that this revision keeps meaning the same thing when that module changes;
``tests/test_export.py`` checks that both agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "export_job",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("level", sa.Text, nullable=False),
        sa.Column("group_id", sa.Text),
        sa.Column("types", ARRAY(sa.Text)),
        sa.Column("since", ts),
        sa.Column("output_format", sa.Text, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("caller", JSONB, nullable=False),
        sa.Column("file_lines", sa.Integer, nullable=False),
        sa.Column("transaction_time", ts, nullable=False),
        sa.Column("created", ts, nullable=False),
        sa.Column("started", ts),
        sa.Column("finished", ts),
        sa.Column("heartbeat", ts),
        sa.Column("worker", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("progress", sa.Text),
        sa.Column("directory", sa.Text),
        sa.Column("output", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("error", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("issues", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("expires", ts),
    )
    op.create_index("export_job_live", "export_job", ["created"],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.create_index("export_job_expires", "export_job", ["expires"], postgresql_where=sa.text("expires IS NOT NULL"))


def downgrade() -> None:
    op.drop_table("export_job")
