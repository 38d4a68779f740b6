"""Import journal: what ``parcours import`` has loaded, so that a rerun resumes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

The columns are written out here rather than taken from ``parcours.store.bulk``
so that this revision keeps meaning the same thing when that module changes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "import_journal",
        # A file is known by its content: renamed or copied, it is still the same import.
        sa.Column("sha256", sa.Text, primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        # running: an NDJSON file committed up to ``position`` lines; complete: done.
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("resources", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("errors", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("finished_at", ts),
    )


def downgrade() -> None:
    op.drop_table("import_journal")
