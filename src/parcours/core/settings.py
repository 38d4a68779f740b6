"""The settings tree: one typed object built once and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration read from the environment (prefix ``PARCOURS_``) and ``.env``.

    ``DATABASE_URL`` (no prefix) selects an external PostgreSQL; without it the
    platform starts an embedded PostgreSQL in ``$PARCOURS_HOME/pgdata``.
    """

    model_config = SettingsConfigDict(env_prefix="PARCOURS_", env_file=".env", extra="ignore")

    home: Path = Path("./var")
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    base_url: str = "http://127.0.0.1:8000"
    # Size limits protect the server from memory exhaustion by one request.
    max_resource_bytes: int = 8 * 1024 * 1024
    max_bundle_bytes: int = 64 * 1024 * 1024
    max_bundle_entries: int = 10_000
    default_page_size: int = 20
    max_page_size: int = 1000
    db_pool_size: int = 10
    log_level: str = "INFO"
    log_json: bool = False
    # Secret used to sign tokens; generated into $PARCOURS_HOME when not given.
    secret_key: str | None = None
    # Web sessions: signed out after this long without a request, and this long after sign-in whatever happens.
    session_idle_minutes: int = 30
    session_absolute_minutes: int = 12 * 60
    # Sign-in throttling: this many failures within the window locks the account (or the address) for a while.
    signin_window_minutes: int = 15
    signin_max_failures_account: int = 5
    signin_max_failures_ip: int = 50
    signin_lockout_minutes: int = 15
    password_min_length: int = 12
    # Bulk $export: every server process also runs export jobs unless this is off
    # (then run `parcours worker`); NDJSON files are split after this many resources.
    export_worker: bool = True
    export_file_lines: int = 50_000
    # Subscriptions (rest-hook): the first retry comes after this many seconds, then
    # twice as long each time (at most an hour); after the last attempt the
    # Subscription goes to status error.
    subscription_retry_seconds: float = 5.0
    subscription_max_attempts: int = 8
    subscription_timeout_seconds: float = 10.0

    @property
    def fhir_base(self) -> str:
        return self.base_url.rstrip("/") + "/fhir"

    def resolved_home(self) -> Path:
        home = self.home.expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        return home
