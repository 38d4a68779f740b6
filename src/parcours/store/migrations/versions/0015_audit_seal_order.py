"""Audit trail: an index in seal order, so that the sealer finds the entries after the last
sealed one without scanning the whole log.

Revision ID: 0015_audit_seal_order
Revises: 0014_booking_search
Create Date: 2026-11-25

Entries are sealed in ``(xid, seq)`` order, each once every older transaction has ended, so
the entries still to seal are exactly those after the last seal in that order (an entry
written "into the past" is never sealed, and ``parcours audit verify`` reports it).
"""

from alembic import op

revision = "0015_audit_seal_order"
down_revision = "0014_booking_search"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS audit_log_seal_order ON audit_log ((xid::xid8), seq)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS audit_log_seal_order")
