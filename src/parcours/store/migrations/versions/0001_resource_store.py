"""Resource store: per-type current, index and history tables; change log.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op
from sqlalchemy import text

from parcours.store import schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    for stmt in schema.PRELUDE:
        bind.execute(text(stmt))
    # The tables of this revision are exactly the generated schema at the time it
    # was written; later changes to the registry come as new revisions.
    schema.metadata.create_all(bind, checkfirst=True)


def downgrade() -> None:
    schema.metadata.drop_all(op.get_bind())
