"""Audit trail (log and seals), emergency access, resource authorship.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from alembic import op

from parcours.store import audit, schema

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    audit.metadata.create_all(bind, checkfirst=True)
    # Who created each resource: restricted items stay visible to their author.
    for rtype in schema.all_types():
        op.execute(f'ALTER TABLE "{rtype}" ADD COLUMN IF NOT EXISTS author text')


def downgrade() -> None:
    for rtype in schema.all_types():
        op.execute(f'ALTER TABLE "{rtype}" DROP COLUMN IF EXISTS author')
    audit.metadata.drop_all(op.get_bind())
