"""SMART on FHIR authorization server and sign-in with external identity providers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25

Written out here rather than taken from ``parcours.store.oauth`` so that this
revision keeps meaning the same thing when that module changes;
``tests/test_smart_server.py`` checks that both agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "oauth_client",
        sa.Column("client_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("client_type", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.Text),
        sa.Column("redirect_uris", ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("jwks", JSONB),
        sa.Column("jwks_url", sa.Text),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'active'")),
        sa.Column("created_by", sa.Text),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.CheckConstraint("client_type IN ('public', 'confidential', 'backend')", name="oauth_client_type"),
        sa.CheckConstraint("status IN ('active', 'disabled')", name="oauth_client_status"),
    )
    op.create_table(
        "oauth_authorization_code",
        sa.Column("code_hash", sa.Text, primary_key=True),
        sa.Column("client_id", sa.Text, sa.ForeignKey("oauth_client.client_id", ondelete="CASCADE"), nullable=False),
        sa.Column("account_id", sa.Text, sa.ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
        sa.Column("grant_id", sa.Text, nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("patient", sa.Text),
        sa.Column("nonce", sa.Text),
        sa.Column("code_challenge", sa.Text),
        sa.Column("code_challenge_method", sa.Text),
        sa.Column("auth_time", ts, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("used_at", ts),
    )
    op.create_index("oauth_code_nonce", "oauth_authorization_code", ["client_id", "nonce"],
                    postgresql_where=sa.text("nonce IS NOT NULL"))
    op.create_index("oauth_code_expires", "oauth_authorization_code", ["expires_at"])
    op.create_table(
        "oauth_refresh_token",
        sa.Column("token_hash", sa.Text, primary_key=True),
        sa.Column("grant_id", sa.Text, nullable=False),
        sa.Column("client_id", sa.Text, sa.ForeignKey("oauth_client.client_id", ondelete="CASCADE"), nullable=False),
        sa.Column("account_id", sa.Text, sa.ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("patient", sa.Text),
        sa.Column("auth_time", ts, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("used_at", ts),
        sa.Column("revoked_at", ts),
    )
    op.create_index("oauth_refresh_grant", "oauth_refresh_token", ["grant_id"])
    op.create_index("oauth_refresh_expires", "oauth_refresh_token", ["expires_at"])
    op.create_table(
        "oauth_revoked_token",
        sa.Column("jti", sa.Text, primary_key=True),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("revoked_at", ts, nullable=False),
    )
    op.create_index("oauth_revoked_expires", "oauth_revoked_token", ["expires_at"])
    op.create_table(
        "oauth_issued_access",
        sa.Column("jti", sa.Text, primary_key=True),
        sa.Column("grant_id", sa.Text, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
    )
    op.create_index("oauth_issued_access_grant", "oauth_issued_access", ["grant_id"])
    op.create_index("oauth_issued_access_expires", "oauth_issued_access", ["expires_at"])
    op.create_table(
        "oauth_client_assertion",
        sa.Column("client_id", sa.Text, nullable=False),
        sa.Column("jti", sa.Text, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("client_id", "jti"),
    )
    op.create_index("oauth_assertion_expires", "oauth_client_assertion", ["expires_at"])
    op.create_table(
        "oauth_signing_key",
        sa.Column("kid", sa.Text, primary_key=True),
        sa.Column("alg", sa.Text, nullable=False),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("public_jwk", JSONB, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("retired_at", ts),
    )
    op.create_table(
        "oidc_signin",
        sa.Column("state_hash", sa.Text, primary_key=True),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("nonce", sa.Text, nullable=False),
        sa.Column("code_verifier", sa.Text, nullable=False),
        sa.Column("next", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("browser_hash", sa.Text, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
    )
    op.create_index("oidc_signin_expires", "oidc_signin", ["expires_at"])
    op.create_table(
        "account_external_identity",
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("issuer", sa.Text, nullable=False),
        sa.Column("account_id", sa.Text, sa.ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
        sa.Column("linked_at", ts, nullable=False),
        sa.Column("last_used_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("provider", "subject"),
    )
    op.create_index("account_external_identity_account", "account_external_identity", ["account_id"])


def downgrade() -> None:
    for table in ("account_external_identity", "oidc_signin", "oauth_signing_key", "oauth_client_assertion",
                  "oauth_issued_access", "oauth_revoked_token", "oauth_refresh_token", "oauth_authorization_code",
                  "oauth_client"):
        op.drop_table(table)
