"""Secure messaging: the subject line of each conversation and the name of each participant
kept with them, so that sending a message needs no read of the conversation's Communication.

Revision ID: 0011_messaging_names
Revises: 0010_messaging
Create Date: 2026-11-27

Added with a default, then filled from the conversations' Communications (messaging is new:
a few rows at most, so in one statement each rather than in batches).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_messaging_names"
down_revision = "0010_messaging"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messaging_conversation", sa.Column("topic", sa.Text, nullable=False, server_default=sa.text("''")))
    op.add_column("messaging_participant", sa.Column("display", sa.Text, nullable=False, server_default=sa.text("''")))
    op.execute("""
        UPDATE messaging_conversation c SET topic = coalesce((m.content::jsonb) -> 'topic' ->> 'text', '')
        FROM "Communication" m WHERE m.id = c.id AND m.content IS NOT NULL
    """)
    op.execute("""
        UPDATE messaging_participant p SET display = coalesce(r ->> 'display', '')
        FROM "Communication" m, jsonb_array_elements(coalesce((m.content::jsonb) -> 'recipient', '[]'::jsonb)) AS r
        WHERE m.id = p.conversation_id AND m.content IS NOT NULL AND r ->> 'reference' = p.participant
    """)


def downgrade() -> None:
    op.drop_column("messaging_participant", "display")
    op.drop_column("messaging_conversation", "topic")
