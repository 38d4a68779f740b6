"""Shared record: encrypted blobs, the lab results reconciliation queue, patients' notices.

Revision ID: 0009_record
Revises: 0008_booking
Create Date: 2026-11-26

Written out here rather than taken from ``parcours.store.blobs`` / ``parcours.store.records``
so that this revision keeps meaning the same thing when those modules change;
``tests/test_record_documents.py`` checks that both agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0009_record"
down_revision = "0008_booking"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "record_blob",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("patient", sa.Text, nullable=False),
        sa.Column("owner", sa.Text),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("text_enc", sa.LargeBinary),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("erased_at", ts),
    )
    op.create_index("record_blob_patient_sha", "record_blob", ["patient", "sha256"])
    op.create_index("record_blob_key", "record_blob", ["key_id"])
    op.create_index("record_blob_owner", "record_blob", ["owner"])
    op.create_table(
        "record_lab_inbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("received_at", ts, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("control_id", sa.Text),
        sa.Column("sender", sa.Text),
        sa.Column("patient_name", sa.Text),
        sa.Column("birth_date", sa.Text),
        sa.Column("sex", sa.Text),
        sa.Column("identifiers", ARRAY(sa.Text), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("summary", sa.Text),
        sa.Column("blob_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("assigned_patient", sa.Text),
        sa.Column("assigned_by", sa.Text),
        sa.Column("assigned_at", ts),
        sa.Column("outcome", JSONB),
        sa.CheckConstraint("status IN ('pending', 'assigned', 'rejected')", name="record_lab_inbox_status"),
    )
    op.create_index("record_lab_inbox_pending", "record_lab_inbox", ["received_at"], postgresql_where=sa.text("status = 'pending'"))
    op.create_table(
        "record_notice",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("patient", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("seen_at", ts),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("sent_at", ts),
        sa.CheckConstraint("status IN ('pending', 'sent', 'skipped', 'failed')", name="record_notice_status"),
    )
    op.create_index("record_notice_patient", "record_notice", ["patient", "created_at"])
    op.create_index("record_notice_pending", "record_notice", ["id"], postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.drop_table("record_notice")
    op.drop_table("record_lab_inbox")
    op.drop_table("record_blob")
