"""Booking: slot claims, the notification queue and private agenda feeds.

Revision ID: 0008_booking
Revises: 0007
Create Date: 2026-11-25

Written out here rather than taken from ``parcours.store.booking`` so that this
revision keeps meaning the same thing when that module changes;
``tests/test_booking.py`` checks that both agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008_booking"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    # One row per taken slot: the primary key is the database's own guarantee that a
    # slot is never held by two appointments, whatever path wrote them.
    op.create_table(
        "booking_claim",
        sa.Column("slot_id", sa.Text, primary_key=True),
        sa.Column("appointment_id", sa.Text, nullable=False),
        sa.Column("claimed_at", ts, nullable=False),
    )
    op.create_index("booking_claim_appointment", "booking_claim", ["appointment_id"])
    op.create_table(
        "booking_job",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("appointment_id", sa.Text),
        sa.Column("due_at", ts, nullable=False),
        sa.Column("payload", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("done_at", ts),
        sa.CheckConstraint("status IN ('pending', 'done', 'failed', 'cancelled')", name="booking_job_status"),
    )
    op.create_index("booking_job_due", "booking_job", ["due_at"], postgresql_where=sa.text("status = 'pending'"))
    op.create_index("booking_job_appointment", "booking_job", ["appointment_id"])
    op.create_table(
        "booking_feed",
        sa.Column("token_hash", sa.Text, primary_key=True),
        sa.Column("account_id", sa.Text, sa.ForeignKey("account.id", ondelete="CASCADE"), nullable=False, unique=True),
        sa.Column("created_at", ts, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("booking_feed")
    op.drop_table("booking_job")
    op.drop_table("booking_claim")
