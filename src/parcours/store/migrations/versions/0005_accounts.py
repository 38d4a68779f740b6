"""User accounts, recovery codes, sign-in throttling and web sessions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

The tables are written out here rather than taken from ``parcours.store.accounts``
so that this revision keeps meaning the same thing when that module changes;
``tests/test_accounts.py`` checks that both agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "account",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("email", sa.Text, nullable=False, unique=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("fhir_user", sa.Text),
        sa.Column("display_name", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("identity_status", sa.Text),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("totp_secret", sa.Text),
        sa.Column("totp_last_step", sa.BigInteger),
        sa.Column("locale", sa.Text),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'active'")),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.Column("password_changed_at", ts, nullable=False),
        sa.Column("last_signin_at", ts),
        sa.CheckConstraint("role IN ('patient', 'practitioner', 'staff', 'admin', 'proxy')", name="account_role"),
        sa.CheckConstraint("status IN ('active', 'disabled')", name="account_status"),
        sa.CheckConstraint(
            "identity_status IS NULL OR identity_status IN ('provisional', 'recovered', 'validated', 'qualified')",
            name="account_identity_status",
        ),
    )
    op.create_index("account_fhir_user", "account", ["fhir_user"])
    op.create_table(
        "account_recovery_code",
        sa.Column("account_id", sa.Text, sa.ForeignKey("account.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("code_hash", sa.Text, primary_key=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("used_at", ts),
    )
    op.create_table(
        "signin_throttle",
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("window_start", ts, nullable=False),
        sa.Column("locked_until", ts),
    )
    op.create_table(
        "web_session",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("account_id", sa.Text, sa.ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("csrf_token", sa.Text, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("last_seen_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("ip", sa.Text),
        sa.Column("user_agent", sa.Text),
        sa.Column("data", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.CheckConstraint("stage IN ('full', 'totp', 'enrol')", name="web_session_stage"),
    )
    op.create_index("web_session_account", "web_session", ["account_id"])
    op.create_index("web_session_expires", "web_session", ["expires_at"])


def downgrade() -> None:
    op.drop_table("web_session")
    op.drop_table("signin_throttle")
    op.drop_table("account_recovery_code")
    op.drop_table("account")
