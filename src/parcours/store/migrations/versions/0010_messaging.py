"""Secure messaging: conversations' counters, participants' read marks and mutes, message
numbers, e-mail notices, presence.

Revision ID: 0010_messaging
Revises: 0009_record
Create Date: 2026-11-27

Written out here rather than taken from ``parcours.store.messaging`` so that this
revision keeps meaning the same thing when that module changes;
``tests/test_messaging.py`` checks that both agree.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_messaging"
down_revision = "0009_record"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "messaging_conversation",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("patient", sa.Text),
        sa.Column("started_by", sa.Text, nullable=False),
        sa.Column("patient_started", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("last_message_at", ts, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    )
    op.create_index("messaging_conversation_last", "messaging_conversation", ["last_message_at"])
    op.create_index("messaging_conversation_patient", "messaging_conversation", ["patient"])
    op.create_table(
        "messaging_participant",
        sa.Column("conversation_id", sa.Text, sa.ForeignKey("messaging_conversation.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("participant", sa.Text, primary_key=True),
        sa.Column("last_read_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_read_at", ts),
        sa.Column("muted", sa.Boolean, nullable=False, server_default=sa.text("false")),
    )
    op.create_index("messaging_participant_who", "messaging_participant", ["participant"])
    op.create_table(
        "messaging_message",
        sa.Column("conversation_id", sa.Text, sa.ForeignKey("messaging_conversation.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("message_id", sa.Text, nullable=False, unique=True),
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("sender_participant", sa.Text, nullable=False),
        sa.Column("sent_at", ts, nullable=False),
    )
    op.create_table(
        "messaging_pending",
        sa.Column("participant", sa.Text, primary_key=True),
        sa.Column("conversation_id", sa.Text, sa.ForeignKey("messaging_conversation.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("first_at", ts, nullable=False),
    )
    op.create_index("messaging_pending_due", "messaging_pending", ["first_at"])
    op.create_table(
        "messaging_mailbox",
        sa.Column("participant", sa.Text, primary_key=True),
        sa.Column("last_sent_at", ts, nullable=False),
    )
    op.create_table(
        "messaging_presence",
        sa.Column("account_id", sa.Text, primary_key=True),
        sa.Column("node", sa.Text, primary_key=True),
        sa.Column("connections", sa.Integer, nullable=False),
        sa.Column("seen_at", ts, nullable=False),
    )
    op.create_index("messaging_presence_seen", "messaging_presence", ["seen_at"])


def downgrade() -> None:
    for name in ("messaging_presence", "messaging_mailbox", "messaging_pending", "messaging_message", "messaging_participant",
                 "messaging_conversation"):
        op.drop_table(name)
