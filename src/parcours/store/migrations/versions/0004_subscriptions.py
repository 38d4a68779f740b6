"""Events and subscriptions: change notifications, matcher cursor, delivery queue.

* a statement trigger on ``resource_log`` sends ``NOTIFY parcours_changes`` (no
  payload): PostgreSQL delivers it when the writing transaction commits, and folds
  identical notifications of one transaction into one, so a transaction of a
  million writes sends one notification;
* ``event_cursor``: how far the subscription matcher got in ``resource_log``
  (a head and the gaps below it), starting at the current end of the log;
* ``subscription_delivery``: the rest-hook notifications waiting to be sent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION parcours_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('parcours_changes', '');
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER resource_log_notify AFTER INSERT ON resource_log
        FOR EACH STATEMENT EXECUTE FUNCTION parcours_notify_change()
    """)
    op.create_table(
        "event_cursor",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("head", sa.BigInteger, nullable=False),
        sa.Column("gaps", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("generation", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    # Subscriptions created before this revision are found by the matcher's first
    # load (status requested/active), not by replaying the log.
    op.execute("INSERT INTO event_cursor (name, head) SELECT 'subscriptions', coalesce(max(seq), 0) FROM resource_log")
    op.create_table(
        "subscription_delivery",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("subscription_id", sa.Text, nullable=False),
        sa.Column("resource_type", sa.Text, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("subscription_delivery_due", "subscription_delivery", ["next_attempt_at"])
    op.create_index("subscription_delivery_subscription", "subscription_delivery", ["subscription_id"])


def downgrade() -> None:
    op.drop_table("subscription_delivery")
    op.drop_table("event_cursor")
    op.execute("DROP TRIGGER IF EXISTS resource_log_notify ON resource_log")
    op.execute("DROP FUNCTION IF EXISTS parcours_notify_change()")
